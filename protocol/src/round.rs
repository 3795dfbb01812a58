//! The coordinator's round state machine, without I/O: who takes part, what each
//! participant is waiting for, and when the round is over. Time is passed in as
//! milliseconds, so tests (and a restarted coordinator) control it.
//!
//! One round (DDOME.md, "One round"): anchors get the gate and their expert and train at
//! once; normal devices first get the gate, answer with their top-K experts, then get those
//! experts and train. The round completes when every participant has uploaded, or at its
//! deadline with at least `min_updates` uploads; with fewer, the attempt fails and the round
//! is retried with a fresh selection. Stragglers never hold a round past its deadline.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::message::ErrorCode;
use crate::seed::{Purpose, derive};
use crate::selection::{SelectionConfig, SelectionError, select_participants};

/// Which federation a round belongs to: DDOME, or a baseline run on the same machinery so
/// that its bytes can be measured on the same wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoundKind {
    /// Anchors plus normal devices that rank, then train their top-K.
    #[default]
    Ddome,
    /// FedMix: every participant trains the gate and all M experts; no anchors, no ranking.
    Fedmix,
    /// FedAvg: every participant trains the one model; no gate.
    Fedavg,
}

/// How rounds are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// DDOME or a baseline.
    pub kind: RoundKind,
    /// N_a anchors and N_c normal devices per round.
    pub selection: SelectionConfig,
    /// M, experts.
    pub experts: usize,
    /// K, experts per normal device.
    pub k: usize,
    /// Uploads needed to aggregate when the deadline passes.
    pub min_updates: usize,
    /// Milliseconds from a round's start to its deadline.
    pub deadline_ms: u64,
}

/// A participant's part in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    /// Anchor of an expert: trains the gate and that expert.
    Anchor {
        /// The expert.
        expert: usize,
    },
    /// Normal device: ranks, then trains its top-K.
    Normal,
    /// Baseline participant: trains a fixed set of experts (all M for FedMix, the one model
    /// for FedAvg) without ranking.
    Fixed,
}

/// Where a participant is in the round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// A normal device that has not answered with its ranking.
    AwaitingRanking,
    /// Training these experts; the upload has not arrived.
    Training {
        /// Experts it was sent, in the order sent.
        experts: Vec<usize>,
    },
    /// Its update was accepted.
    Uploaded,
}

/// What the coordinator must send a participant next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the gate and wait for a ranking.
    Rank,
    /// Send the gate (anchors) and these experts, and wait for an update.
    Train {
        /// Anchor or normal.
        part: Part,
        /// Experts to send.
        experts: Vec<usize>,
    },
    /// Nothing: the participant has uploaded.
    Nothing,
}

/// A message that does not fit the round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    /// For another round or attempt than the one running.
    #[error(
        "message for round {round} attempt {attempt}, but round {current} attempt {current_attempt} is running"
    )]
    Stale {
        /// Round in the message.
        round: u64,
        /// Attempt in the message.
        attempt: u32,
        /// Round running.
        current: u64,
        /// Attempt running.
        current_attempt: u32,
    },
    /// From a device that is not a participant.
    #[error("device {device} is not a participant of round {round}")]
    NotSelected {
        /// The device.
        device: u64,
        /// The round.
        round: u64,
    },
    /// The device already uploaded this round.
    #[error("device {device} already uploaded in round {round}")]
    Duplicate {
        /// The device.
        device: u64,
        /// The round.
        round: u64,
    },
    /// Something the participant's phase does not expect (e.g. a ranking from an anchor).
    #[error("device {device}: {what}")]
    Unexpected {
        /// The device.
        device: u64,
        /// What was wrong.
        what: String,
    },
    /// A ranking or update naming the wrong experts.
    #[error("device {device}: {what}")]
    BadExperts {
        /// The device.
        device: u64,
        /// What was wrong.
        what: String,
    },
}

impl RoundError {
    /// The code sent to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            RoundError::Stale { .. } => ErrorCode::StaleRound,
            RoundError::NotSelected { .. } => ErrorCode::NotSelected,
            RoundError::Duplicate { .. } => ErrorCode::DuplicateUpdate,
            RoundError::Unexpected { .. } => ErrorCode::UnexpectedMessage,
            RoundError::BadExperts { .. } => ErrorCode::BadShape,
        }
    }
}

/// Where a round stands at a given time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for participants.
    Collecting,
    /// Aggregate these devices' updates (ascending ids); `stragglers` did not upload in time.
    Complete {
        /// Devices whose updates are aggregated.
        uploaded: Vec<u64>,
        /// Participants that missed the deadline.
        stragglers: Vec<u64>,
    },
    /// The deadline passed with too few uploads: discard them and retry the round.
    Failed {
        /// Uploads received.
        uploaded: usize,
        /// Uploads needed.
        needed: usize,
    },
}

/// One attempt of one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// Round number (0-based).
    pub round: u64,
    /// Attempt (0 first).
    pub attempt: u32,
    /// Deadline, milliseconds on the caller's clock.
    pub deadline_ms: u64,
    /// Participants by device id: their part and phase.
    participants: BTreeMap<u64, (Part, Phase)>,
    kind: RoundKind,
    experts: usize,
    k: usize,
    min_updates: usize,
}

/// The selection seed of an attempt: the first attempt uses the run's seed, so it picks
/// what the simulator picks.
fn attempt_seed(seed: u64, attempt: u32) -> u64 {
    if attempt == 0 {
        seed
    } else {
        derive(seed, Purpose::RetryAttempt, &[attempt as u64])
    }
}

/// The shuffling seed of `device`'s local training in `round`: the coordinator sends it, the
/// simulator computes it, so both shuffle alike.
pub fn local_seed(seed: u64, round: u64, device: u64) -> u64 {
    derive(seed, Purpose::LocalTraining, &[round, device])
}

impl Round {
    /// Starts `attempt` of `round`: selects participants from the available anchors
    /// (device, expert) and normal devices, each list in ascending id order.
    pub fn start(
        round: u64,
        attempt: u32,
        anchors: &[(u64, usize)],
        normals: &[u64],
        config: &RoundConfig,
        seed: u64,
        now_ms: u64,
    ) -> Result<Self, SelectionError> {
        let (anchor_ids, normal_ids, selection_config) = match config.kind {
            RoundKind::Ddome => (
                anchors.iter().map(|&(d, _)| d as usize).collect(),
                normals.iter().map(|&d| d as usize).collect(),
                config.selection,
            ),
            // Baselines draw from everyone, as the simulator does.
            RoundKind::Fedmix | RoundKind::Fedavg => {
                let mut everyone: Vec<usize> = anchors
                    .iter()
                    .map(|&(d, _)| d as usize)
                    .chain(normals.iter().map(|&d| d as usize))
                    .collect();
                everyone.sort_unstable();
                (
                    Vec::new(),
                    everyone,
                    SelectionConfig {
                        anchors: 0,
                        normals: config.selection.anchors + config.selection.normals,
                    },
                )
            }
        };
        let selection = select_participants(
            &anchor_ids,
            &normal_ids,
            selection_config,
            attempt_seed(seed, attempt),
            round,
        )?;
        let chosen_anchors: Vec<(u64, usize)> = selection
            .anchors
            .iter()
            .map(|&d| {
                *anchors
                    .iter()
                    .find(|&&(id, _)| id as usize == d)
                    .expect("selection draws from the pool")
            })
            .collect();
        let chosen_normals: Vec<u64> = selection.normals.iter().map(|&d| d as u64).collect();
        Ok(Self::resume(
            round,
            attempt,
            &chosen_anchors,
            &chosen_normals,
            now_ms.saturating_add(config.deadline_ms),
            &[],
            config,
        ))
    }

    /// Rebuilds an attempt from what was persisted: its participants, its deadline and the
    /// devices whose updates were already accepted.
    pub fn resume(
        round: u64,
        attempt: u32,
        anchors: &[(u64, usize)],
        normals: &[u64],
        deadline_ms: u64,
        uploaded: &[u64],
        config: &RoundConfig,
    ) -> Self {
        let mut participants = BTreeMap::new();
        for &(device, expert) in anchors {
            participants.insert(
                device,
                (
                    Part::Anchor { expert },
                    Phase::Training {
                        experts: vec![expert],
                    },
                ),
            );
        }
        for &device in normals {
            let slot = match config.kind {
                RoundKind::Ddome => (Part::Normal, Phase::AwaitingRanking),
                RoundKind::Fedmix => (
                    Part::Fixed,
                    Phase::Training {
                        experts: (0..config.experts).collect(),
                    },
                ),
                RoundKind::Fedavg => (Part::Fixed, Phase::Training { experts: vec![0] }),
            };
            participants.insert(device, slot);
        }
        for device in uploaded {
            if let Some((_, phase)) = participants.get_mut(device) {
                *phase = Phase::Uploaded;
            }
        }
        Self {
            round,
            attempt,
            deadline_ms,
            participants,
            kind: config.kind,
            experts: config.experts,
            k: config.k,
            min_updates: config.min_updates,
        }
    }

    /// Participants in ascending id order with their part.
    pub fn participants(&self) -> impl Iterator<Item = (u64, Part)> + '_ {
        self.participants.iter().map(|(&d, (part, _))| (d, *part))
    }

    /// Anchors (device, expert) of this attempt.
    pub fn anchors(&self) -> Vec<(u64, usize)> {
        self.participants()
            .filter_map(|(d, part)| match part {
                Part::Anchor { expert } => Some((d, expert)),
                Part::Normal | Part::Fixed => None,
            })
            .collect()
    }

    /// Participants that are not anchors (normal devices, or a baseline's participants).
    pub fn normals(&self) -> Vec<u64> {
        self.participants()
            .filter(|(_, part)| !matches!(part, Part::Anchor { .. }))
            .map(|(d, _)| d)
            .collect()
    }

    /// Whether `device` takes part.
    pub fn is_participant(&self, device: u64) -> bool {
        self.participants.contains_key(&device)
    }

    /// What to send `device` now (when the round starts or the device reconnects).
    pub fn next_step(&self, device: u64) -> Option<Step> {
        let (part, phase) = self.participants.get(&device)?;
        Some(match phase {
            Phase::AwaitingRanking => Step::Rank,
            Phase::Training { experts } => Step::Train {
                part: *part,
                experts: experts.clone(),
            },
            Phase::Uploaded => Step::Nothing,
        })
    }

    /// A participant came back on a new connection: a normal device that ranked but has not
    /// uploaded ranks again (its ranking is a pure function of the gate and its data, so the
    /// answer is the same, and a restarted agent no longer holds the gate).
    pub fn reconnected(&mut self, device: u64) {
        if let Some((Part::Normal, phase @ Phase::Training { .. })) =
            self.participants.get_mut(&device)
        {
            *phase = Phase::AwaitingRanking;
        }
    }

    fn check_current(&self, round: u64, attempt: u32) -> Result<(), RoundError> {
        if round != self.round || attempt != self.attempt {
            return Err(RoundError::Stale {
                round,
                attempt,
                current: self.round,
                current_attempt: self.attempt,
            });
        }
        Ok(())
    }

    fn slot(&mut self, device: u64) -> Result<&mut (Part, Phase), RoundError> {
        let round = self.round;
        self.participants
            .get_mut(&device)
            .ok_or(RoundError::NotSelected { device, round })
    }

    /// A normal device's ranking: its top-K experts. Returns the experts to send it.
    pub fn on_ranking(
        &mut self,
        device: u64,
        round: u64,
        attempt: u32,
        experts: &[u32],
    ) -> Result<Vec<usize>, RoundError> {
        self.check_current(round, attempt)?;
        let (m, k) = (self.experts, self.k);
        let (part, phase) = self.slot(device)?;
        if *part != Part::Normal {
            return Err(RoundError::Unexpected {
                device,
                what: "only normal DDOME devices rank experts".into(),
            });
        }
        match phase {
            Phase::AwaitingRanking => {}
            Phase::Training { .. } => {
                return Err(RoundError::Unexpected {
                    device,
                    what: "ranking sent twice".into(),
                });
            }
            Phase::Uploaded => return Err(RoundError::Duplicate { device, round }),
        }
        if experts.len() != k {
            return Err(RoundError::BadExperts {
                device,
                what: format!("ranking names {} experts, K is {k}", experts.len()),
            });
        }
        let mut chosen = Vec::with_capacity(k);
        for &e in experts {
            let e = e as usize;
            if e >= m {
                return Err(RoundError::BadExperts {
                    device,
                    what: format!("ranking names expert {e}, the model has {m}"),
                });
            }
            if chosen.contains(&e) {
                return Err(RoundError::BadExperts {
                    device,
                    what: format!("ranking names expert {e} twice"),
                });
            }
            chosen.push(e);
        }
        *phase = Phase::Training {
            experts: chosen.clone(),
        };
        Ok(chosen)
    }

    /// Checks an upload against the round before the caller validates and stores it: the
    /// right round, a participant that was training, the experts it was given, a gate delta.
    pub fn check_update(
        &self,
        device: u64,
        round: u64,
        attempt: u32,
        experts: &[u32],
        has_gate: bool,
    ) -> Result<(), RoundError> {
        self.check_current(round, attempt)?;
        let (_, phase) = self
            .participants
            .get(&device)
            .ok_or(RoundError::NotSelected {
                device,
                round: self.round,
            })?;
        let given = match phase {
            Phase::Uploaded => {
                return Err(RoundError::Duplicate {
                    device,
                    round: self.round,
                });
            }
            Phase::AwaitingRanking => {
                return Err(RoundError::Unexpected {
                    device,
                    what: "update before ranking".into(),
                });
            }
            Phase::Training { experts } => experts,
        };
        let sent: Vec<usize> = experts.iter().map(|&e| e as usize).collect();
        if &sent != given {
            return Err(RoundError::BadExperts {
                device,
                what: format!("update for experts {sent:?}, the device was sent {given:?}"),
            });
        }
        let gate_expected = self.kind != RoundKind::Fedavg;
        if has_gate != gate_expected {
            return Err(RoundError::BadExperts {
                device,
                what: if gate_expected {
                    "update without a gate delta".into()
                } else {
                    "a FedAvg update carries no gate delta".into()
                },
            });
        }
        Ok(())
    }

    /// Records that `device`'s update (already checked and durably stored) is accepted.
    pub fn mark_uploaded(&mut self, device: u64) -> Result<(), RoundError> {
        let round = self.round;
        let (_, phase) = self.slot(device)?;
        if *phase == Phase::Uploaded {
            return Err(RoundError::Duplicate { device, round });
        }
        *phase = Phase::Uploaded;
        Ok(())
    }

    /// Devices whose updates were accepted, ascending.
    pub fn uploaded(&self) -> Vec<u64> {
        self.participants
            .iter()
            .filter(|(_, (_, phase))| *phase == Phase::Uploaded)
            .map(|(&d, _)| d)
            .collect()
    }

    /// Where the round stands at `now_ms`.
    pub fn progress(&self, now_ms: u64) -> Progress {
        let uploaded = self.uploaded();
        if uploaded.len() == self.participants.len() {
            return Progress::Complete {
                uploaded,
                stragglers: Vec::new(),
            };
        }
        if now_ms < self.deadline_ms {
            return Progress::Collecting;
        }
        if uploaded.len() >= self.min_updates.max(1) {
            let stragglers = self
                .participants
                .keys()
                .copied()
                .filter(|d| !uploaded.contains(d))
                .collect();
            Progress::Complete {
                uploaded,
                stragglers,
            }
        } else {
            Progress::Failed {
                uploaded: uploaded.len(),
                needed: self.min_updates.max(1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoundConfig {
        RoundConfig {
            kind: RoundKind::Ddome,
            selection: SelectionConfig {
                anchors: 2,
                normals: 2,
            },
            experts: 3,
            k: 2,
            min_updates: 3,
            deadline_ms: 1_000,
        }
    }

    fn started() -> Round {
        let anchors = [(0, 0), (1, 1), (2, 2)];
        let normals = [3, 4, 5, 6];
        Round::start(5, 0, &anchors, &normals, &config(), 9, 10_000).unwrap()
    }

    #[test]
    fn first_attempt_selects_what_the_simulator_selects() {
        let round = started();
        let sel = select_participants(&[0, 1, 2], &[3, 4, 5, 6], config().selection, 9, 5).unwrap();
        let anchors: Vec<usize> = round.anchors().iter().map(|&(d, _)| d as usize).collect();
        let normals: Vec<usize> = round.normals().iter().map(|&d| d as usize).collect();
        assert_eq!(anchors, sel.anchors);
        assert_eq!(normals, sel.normals);
        assert_eq!(round.deadline_ms, 11_000);
        // A retry draws anew.
        let retry = Round::start(
            5,
            1,
            &[(0, 0), (1, 1), (2, 2)],
            &[3, 4, 5, 6],
            &config(),
            9,
            0,
        )
        .unwrap();
        assert_eq!(retry.attempt, 1);
    }

    #[test]
    fn a_full_round_completes_before_its_deadline() {
        let mut round = started();
        for (device, part) in round.participants().collect::<Vec<_>>() {
            let experts = match part {
                Part::Anchor { expert } => {
                    assert_eq!(
                        round.next_step(device),
                        Some(Step::Train {
                            part,
                            experts: vec![expert]
                        })
                    );
                    vec![expert as u32]
                }
                Part::Fixed => unreachable!("DDOME rounds have no fixed parts"),
                Part::Normal => {
                    assert_eq!(round.next_step(device), Some(Step::Rank));
                    let given = round.on_ranking(device, 5, 0, &[2, 0]).unwrap();
                    assert_eq!(given, vec![2, 0]);
                    vec![2, 0]
                }
            };
            round.check_update(device, 5, 0, &experts, true).unwrap();
            round.mark_uploaded(device).unwrap();
        }
        assert_eq!(
            round.progress(10_001),
            Progress::Complete {
                uploaded: round.participants().map(|(d, _)| d).collect(),
                stragglers: vec![]
            }
        );
    }

    #[test]
    fn a_vanished_device_does_not_hold_the_round_past_its_deadline() {
        let mut round = started();
        let all: Vec<(u64, Part)> = round.participants().collect();
        // Every participant but the last uploads; the last vanishes.
        for &(device, part) in &all[..3] {
            let experts = match part {
                Part::Anchor { expert } => vec![expert as u32],
                Part::Fixed => unreachable!("DDOME rounds have no fixed parts"),
                Part::Normal => {
                    round.on_ranking(device, 5, 0, &[1, 2]).unwrap();
                    vec![1, 2]
                }
            };
            round.check_update(device, 5, 0, &experts, true).unwrap();
            round.mark_uploaded(device).unwrap();
        }
        assert_eq!(round.progress(10_999), Progress::Collecting);
        assert_eq!(
            round.progress(11_000),
            Progress::Complete {
                uploaded: all[..3].iter().map(|&(d, _)| d).collect(),
                stragglers: vec![all[3].0]
            }
        );
    }

    #[test]
    fn too_few_uploads_at_the_deadline_fail_the_attempt() {
        let mut round = started();
        let (device, _) = round.anchors().into_iter().next().unwrap();
        let expert = round.anchors()[0].1 as u32;
        round.check_update(device, 5, 0, &[expert], true).unwrap();
        round.mark_uploaded(device).unwrap();
        assert_eq!(
            round.progress(11_000),
            Progress::Failed {
                uploaded: 1,
                needed: 3
            }
        );
    }

    #[test]
    fn misfit_messages_are_typed_errors() {
        let mut round = started();
        let (anchor, expert) = round.anchors()[0];
        let normal = round.normals()[0];
        let outsider = (0..10).find(|d| !round.is_participant(*d)).unwrap();
        assert!(matches!(
            round.on_ranking(normal, 4, 0, &[0, 1]),
            Err(RoundError::Stale { round: 4, .. })
        ));
        assert!(matches!(
            round.check_update(anchor, 5, 1, &[expert as u32], true),
            Err(RoundError::Stale { attempt: 1, .. })
        ));
        assert!(matches!(
            round.on_ranking(outsider, 5, 0, &[0, 1]),
            Err(RoundError::NotSelected { .. })
        ));
        assert!(matches!(
            round.on_ranking(anchor, 5, 0, &[0, 1]),
            Err(RoundError::Unexpected { .. })
        ));
        assert!(matches!(
            round.on_ranking(normal, 5, 0, &[0]),
            Err(RoundError::BadExperts { .. })
        ));
        assert!(matches!(
            round.on_ranking(normal, 5, 0, &[0, 7]),
            Err(RoundError::BadExperts { .. })
        ));
        assert!(matches!(
            round.on_ranking(normal, 5, 0, &[1, 1]),
            Err(RoundError::BadExperts { .. })
        ));
        assert!(matches!(
            round.check_update(normal, 5, 0, &[0, 1], true),
            Err(RoundError::Unexpected { .. })
        ));
        round.on_ranking(normal, 5, 0, &[0, 1]).unwrap();
        assert!(matches!(
            round.on_ranking(normal, 5, 0, &[0, 1]),
            Err(RoundError::Unexpected { .. })
        ));
        assert!(matches!(
            round.check_update(normal, 5, 0, &[1, 0], true),
            Err(RoundError::BadExperts { .. })
        ));
        assert!(matches!(
            round.check_update(normal, 5, 0, &[0, 1], false),
            Err(RoundError::BadExperts { .. })
        ));
        round.check_update(normal, 5, 0, &[0, 1], true).unwrap();
        round.mark_uploaded(normal).unwrap();
        let err = round.check_update(normal, 5, 0, &[0, 1], true).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DuplicateUpdate);
    }

    #[test]
    fn resume_keeps_participants_and_accepted_uploads() {
        let mut round = started();
        let (anchor, _) = round.anchors()[0];
        round.mark_uploaded(anchor).unwrap();
        let resumed = Round::resume(
            round.round,
            round.attempt,
            &round.anchors(),
            &round.normals(),
            round.deadline_ms,
            &round.uploaded(),
            &config(),
        );
        assert_eq!(resumed, round);
        assert_eq!(resumed.next_step(anchor), Some(Step::Nothing));
    }

    #[test]
    fn baselines_select_from_everyone_and_train_fixed_experts() {
        let anchors = [(0, 0), (1, 1), (2, 2)];
        let normals = [3, 4, 5, 6];
        for (kind, experts, gate) in [
            (RoundKind::Fedmix, vec![0, 1, 2], true),
            (RoundKind::Fedavg, vec![0], false),
        ] {
            let config = RoundConfig { kind, ..config() };
            let round = Round::start(5, 0, &anchors, &normals, &config, 9, 0).unwrap();
            let sel = select_participants(
                &[],
                &[0, 1, 2, 3, 4, 5, 6],
                SelectionConfig {
                    anchors: 0,
                    normals: 4,
                },
                9,
                5,
            )
            .unwrap();
            let chosen: Vec<usize> = round.participants().map(|(d, _)| d as usize).collect();
            assert_eq!(chosen, sel.normals);
            for (device, part) in round.participants() {
                assert_eq!(part, Part::Fixed);
                assert_eq!(
                    round.next_step(device),
                    Some(Step::Train {
                        part,
                        experts: experts.clone()
                    })
                );
                let sent: Vec<u32> = experts.iter().map(|&e| e as u32).collect();
                round.check_update(device, 5, 0, &sent, gate).unwrap();
                assert!(round.check_update(device, 5, 0, &sent, !gate).is_err());
            }
        }
    }

    #[test]
    fn local_seeds_differ_by_round_and_device() {
        assert_ne!(local_seed(0, 1, 2), local_seed(0, 2, 1));
        assert_ne!(local_seed(0, 0, 0), local_seed(1, 0, 0));
        assert_eq!(local_seed(3, 4, 5), local_seed(3, 4, 5));
        // Neighbouring run seeds must not swap devices' streams (as `seed ^ device` did).
        assert_ne!(local_seed(1, 0, 0), local_seed(0, 0, 1));
    }
}
