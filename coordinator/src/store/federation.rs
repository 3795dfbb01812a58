//! Federation state: global model checkpoints, accepted updates, the round in progress,
//! and the failure log.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Store, now_unix_ms};
use crate::error::StoreError;

/// Global model checkpoints kept; [`Store::commit_model`] prunes older ones.
pub const CHECKPOINTS_KEPT: u64 = 3;
/// Failure-log entries kept; counts per kind and per device stay exact regardless.
const FAILURE_LOG_KEPT: u64 = 1000;
/// Longest failure detail stored, in bytes; details can quote what a device sent.
const MAX_FAILURE_DETAIL: usize = 1024;

/// A committed global model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCheckpoint {
    /// Rounds folded into this model (0 for the initial model).
    pub rounds_completed: u64,
    /// The model, encoded by the caller.
    pub blob: Vec<u8>,
}

/// An update accepted for a round and not yet folded into a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedUpdate {
    /// The device that sent it.
    pub device_id: u64,
    /// The round attempt it answered.
    pub attempt: u32,
    /// The update, encoded by the caller.
    pub blob: Vec<u8>,
}

/// A round attempt that has begun and whose round is not yet in a committed model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoundRecord {
    /// The round number (= rounds completed before it).
    pub round: u64,
    /// The attempt at this round, from 0.
    pub attempt: u32,
    /// The devices selected for this attempt, ascending.
    pub selected: Vec<u64>,
    /// When the attempt stops taking updates, unix milliseconds.
    pub deadline_ms: u64,
    /// When the attempt began, unix milliseconds.
    pub begun_at_ms: u64,
}

/// One entry of the failure log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureRecord {
    /// When it was recorded, unix milliseconds.
    pub at_ms: u64,
    /// The device concerned, if one is known.
    pub device_id: Option<u64>,
    /// A short machine-readable category, e.g. `"bad_frame"`.
    pub kind: String,
    /// What happened, for a person (cut to 1024 bytes).
    pub detail: String,
}

/// Rounds completed by the newest model, if any model is committed.
fn latest_rounds_completed(conn: &Connection) -> rusqlite::Result<Option<u64>> {
    conn.query_row("SELECT MAX(rounds_completed) FROM models", [], |row| {
        row.get(0)
    })
}

fn device_exists(conn: &Connection, device_id: u64) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row("SELECT 1 FROM devices WHERE id = ?1", [device_id], |_| {
            Ok(())
        })
        .optional()?
        .is_some())
}

impl Store {
    /// The newest committed global model.
    pub fn global_model(&self) -> Result<Option<ModelCheckpoint>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT rounds_completed, blob FROM models \
                 ORDER BY rounds_completed DESC LIMIT 1",
                [],
                |row| {
                    Ok(ModelCheckpoint {
                        rounds_completed: row.get(0)?,
                        blob: row.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// The checkpoint that folds in exactly `rounds_completed` rounds, if it is still kept.
    pub fn model_at(&self, rounds_completed: u64) -> Result<Option<ModelCheckpoint>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT rounds_completed, blob FROM models WHERE rounds_completed = ?1",
                [rounds_completed],
                |row| {
                    Ok(ModelCheckpoint {
                        rounds_completed: row.get(0)?,
                        blob: row.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// Rounds completed by the newest model; 0 before any model is committed.
    pub fn rounds_completed(&self) -> Result<u64, StoreError> {
        Ok(latest_rounds_completed(&self.conn)?.unwrap_or(0))
    }

    /// The `rounds_completed` of every checkpoint kept, newest first.
    pub fn checkpoints(&self) -> Result<Vec<u64>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT rounds_completed FROM models ORDER BY rounds_completed DESC")?;
        let rounds = statement
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rounds)
    }

    /// Commits a new global model in one transaction: stores it, drops the accepted updates
    /// and round records of the rounds it folds in (`round < rounds_completed`), and prunes
    /// checkpoints beyond the newest [`CHECKPOINTS_KEPT`].
    pub fn commit_model(&mut self, rounds_completed: u64, blob: &[u8]) -> Result<(), StoreError> {
        let tx = self.write()?;
        if let Some(current) = latest_rounds_completed(&tx)?
            && rounds_completed <= current
        {
            return Err(StoreError::ModelNotNewer {
                rounds_completed,
                current,
            });
        }
        tx.execute(
            "INSERT INTO models (rounds_completed, blob, committed_at_ms) VALUES (?1, ?2, ?3)",
            params![rounds_completed, blob, now_unix_ms()],
        )?;
        tx.execute("DELETE FROM updates WHERE round < ?1", [rounds_completed])?;
        // Cascades to round_participants.
        tx.execute("DELETE FROM rounds WHERE round < ?1", [rounds_completed])?;
        tx.execute(
            "DELETE FROM models WHERE rounds_completed NOT IN \
             (SELECT rounds_completed FROM models ORDER BY rounds_completed DESC LIMIT ?1)",
            [CHECKPOINTS_KEPT],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a device's update for `round` in one transaction; once this returns the
    /// update survives any crash. The first update per (round, attempt, device) wins: a second gets
    /// [`StoreError::DuplicateUpdate`]. Rounds already in the global model get
    /// [`StoreError::StaleRound`].
    pub fn accept_update(
        &mut self,
        round: u64,
        attempt: u32,
        device_id: u64,
        blob: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        let current = latest_rounds_completed(&tx)?.unwrap_or(0);
        if round < current {
            return Err(StoreError::StaleRound { round, current });
        }
        if !device_exists(&tx, device_id)? {
            return Err(StoreError::UnknownDevice { device_id });
        }
        let duplicate = tx
            .query_row(
                "SELECT 1 FROM updates WHERE round = ?1 AND attempt = ?2 AND device_id = ?3",
                params![round, attempt, device_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if duplicate {
            return Err(StoreError::DuplicateUpdate { round, device_id });
        }
        tx.execute(
            "INSERT INTO updates (round, device_id, attempt, blob, accepted_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![round, device_id, attempt, blob, now_unix_ms()],
        )?;
        tx.execute(
            "UPDATE devices SET updates_accepted = updates_accepted + 1, \
             last_accepted_round = ?2, last_accepted_attempt = ?3 WHERE id = ?1",
            params![device_id, round, attempt],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The updates accepted for `round`, by attempt then ascending device id, so aggregation
    /// sums them in the same order on every run and after every restart.
    pub fn accepted_updates(&self, round: u64) -> Result<Vec<AcceptedUpdate>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT device_id, attempt, blob FROM updates WHERE round = ?1 \
             ORDER BY attempt, device_id",
        )?;
        let updates = statement
            .query_map([round], |row| {
                Ok(AcceptedUpdate {
                    device_id: row.get(0)?,
                    attempt: row.get(1)?,
                    blob: row.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(updates)
    }

    /// Records that attempt `attempt` of `round` began with the devices `selected` and takes
    /// updates until `deadline_ms` (unix milliseconds), so a restarted coordinator can
    /// resume it. `(round, attempt)` must come after every attempt already begun. Updates
    /// accepted in earlier attempts of the same round are kept; the caller decides whether
    /// they still count.
    pub fn begin_round(
        &mut self,
        round: u64,
        attempt: u32,
        selected: &[u64],
        deadline_ms: u64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        let current = latest_rounds_completed(&tx)?.unwrap_or(0);
        if round < current {
            return Err(StoreError::StaleRound { round, current });
        }
        let latest_begun: Option<(u64, u32)> = tx
            .query_row(
                "SELECT round, attempt FROM rounds ORDER BY round DESC, attempt DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((current_round, current_attempt)) = latest_begun
            && (round, attempt) <= (current_round, current_attempt)
        {
            return Err(StoreError::RoundNotNewer {
                round,
                attempt,
                current_round,
                current_attempt,
            });
        }
        tx.execute(
            "INSERT INTO rounds (round, attempt, deadline_ms, begun_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![round, attempt, deadline_ms, now_unix_ms()],
        )?;
        let mut selected = selected.to_vec();
        selected.sort_unstable();
        selected.dedup();
        for &device_id in &selected {
            if !device_exists(&tx, device_id)? {
                // Dropping the transaction rolls back the round row as well.
                return Err(StoreError::UnknownDevice { device_id });
            }
            tx.execute(
                "INSERT INTO round_participants (round, attempt, device_id) VALUES (?1, ?2, ?3)",
                params![round, attempt, device_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The latest round attempt begun whose round is not yet in a committed model: what a
    /// restarted coordinator resumes.
    pub fn current_round(&self) -> Result<Option<RoundRecord>, StoreError> {
        let current = latest_rounds_completed(&self.conn)?.unwrap_or(0);
        let Some((round, attempt, deadline_ms, begun_at_ms)) = self
            .conn
            .query_row(
                "SELECT round, attempt, deadline_ms, begun_at_ms FROM rounds WHERE round >= ?1 \
                 ORDER BY round DESC, attempt DESC LIMIT 1",
                [current],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut statement = self.conn.prepare_cached(
            "SELECT device_id FROM round_participants WHERE round = ?1 AND attempt = ?2 \
             ORDER BY device_id",
        )?;
        let selected = statement
            .query_map(params![round, attempt], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(RoundRecord {
            round,
            attempt,
            selected,
            deadline_ms,
            begun_at_ms,
        }))
    }

    /// Logs a failure or other event of `kind` (a short category such as `"bad_frame"` or
    /// `"deadline_missed"`), against a device when one is known. `detail` is cut to 1024
    /// bytes; the log keeps the latest 1000 entries, the counts are exact.
    pub fn record_failure(
        &mut self,
        device_id: Option<u64>,
        kind: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        if let Some(device_id) = device_id {
            let changed = tx.execute(
                "UPDATE devices SET failures = failures + 1 WHERE id = ?1",
                [device_id],
            )?;
            if changed == 0 {
                return Err(StoreError::UnknownDevice { device_id });
            }
        }
        tx.execute(
            "INSERT INTO failures (at_ms, device_id, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![
                now_unix_ms(),
                device_id,
                kind,
                truncate(detail, MAX_FAILURE_DETAIL)
            ],
        )?;
        tx.execute(
            "INSERT INTO failure_counts (kind, count) VALUES (?1, 1) \
             ON CONFLICT (kind) DO UPDATE SET count = count + 1",
            [kind],
        )?;
        tx.execute(
            "DELETE FROM failures WHERE id <= (SELECT MAX(id) FROM failures) - ?1",
            [FAILURE_LOG_KEPT],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// How many failures of each kind were ever recorded.
    pub fn failure_counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT kind, count FROM failure_counts")?;
        let counts = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(counts)
    }

    /// The latest `limit` failures, newest first.
    pub fn recent_failures(&self, limit: u64) -> Result<Vec<FailureRecord>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT at_ms, device_id, kind, detail FROM failures ORDER BY id DESC LIMIT ?1",
        )?;
        let failures = statement
            .query_map([limit], |row| {
                Ok(FailureRecord {
                    at_ms: row.get(0)?,
                    device_id: row.get(1)?,
                    kind: row.get(2)?,
                    detail: row.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(failures)
    }

    /// Updates accepted for `round` so far.
    pub(crate) fn count_updates(&self, round: u64) -> Result<u64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM updates WHERE round = ?1",
            [round],
            |row| row.get(0),
        )?)
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_with_devices;

    fn blob(round: u64, device_id: u64) -> Vec<u8> {
        format!("update r{round} d{device_id}").into_bytes()
    }

    #[test]
    fn updates_come_back_ordered_by_device_whatever_the_arrival_order() {
        let (_dir, mut store) = store_with_devices(4);
        for device_id in [2, 0, 3, 1] {
            store
                .accept_update(0, 1, device_id, &blob(0, device_id))
                .unwrap();
        }
        let updates = store.accepted_updates(0).unwrap();
        let order: Vec<u64> = updates.iter().map(|update| update.device_id).collect();
        assert_eq!(order, [0, 1, 2, 3]);
        for update in &updates {
            assert_eq!(update.attempt, 1);
            assert_eq!(update.blob, blob(0, update.device_id));
        }
        assert!(store.accepted_updates(1).unwrap().is_empty());
    }

    #[test]
    fn a_second_update_for_the_same_round_and_device_is_refused_and_the_first_kept() {
        let (_dir, mut store) = store_with_devices(1);
        store.accept_update(5, 0, 0, b"first").unwrap();
        assert!(matches!(
            store.accept_update(5, 0, 0, b"second"),
            Err(StoreError::DuplicateUpdate {
                round: 5,
                device_id: 0
            })
        ));
        let updates = store.accepted_updates(5).unwrap();
        assert_eq!(
            updates,
            [AcceptedUpdate {
                device_id: 0,
                attempt: 0,
                blob: b"first".to_vec()
            }]
        );
        assert_eq!(store.devices().unwrap()[0].updates_accepted, 1);
        // A retried attempt of the round may select the device again.
        store.accept_update(5, 1, 0, b"retry").unwrap();
        assert_eq!(store.accepted_updates(5).unwrap().len(), 2);
    }

    #[test]
    fn older_checkpoints_are_found_by_round_until_pruned() {
        let (_dir, mut store) = store_with_devices(0);
        for round in 0..=CHECKPOINTS_KEPT {
            store
                .commit_model(round, format!("model {round}").as_bytes())
                .unwrap();
        }
        assert_eq!(store.model_at(1).unwrap().unwrap().blob, b"model 1");
        assert_eq!(
            store.model_at(CHECKPOINTS_KEPT).unwrap().unwrap(),
            store.global_model().unwrap().unwrap()
        );
        assert_eq!(store.model_at(0).unwrap(), None, "pruned");
        assert_eq!(store.model_at(CHECKPOINTS_KEPT + 1).unwrap(), None);
    }

    #[test]
    fn updates_for_rounds_already_in_the_model_are_stale() {
        let (_dir, mut store) = store_with_devices(1);
        store.commit_model(3, b"model after 3 rounds").unwrap();
        assert!(matches!(
            store.accept_update(2, 0, 0, b"late"),
            Err(StoreError::StaleRound {
                round: 2,
                current: 3
            })
        ));
        assert!(store.accepted_updates(2).unwrap().is_empty());
        store.accept_update(3, 0, 0, b"on time").unwrap();
    }

    #[test]
    fn updates_from_unknown_devices_are_refused() {
        let (_dir, mut store) = store_with_devices(1);
        assert!(matches!(
            store.accept_update(0, 0, 9, b"who?"),
            Err(StoreError::UnknownDevice { device_id: 9 })
        ));
        assert!(store.accepted_updates(0).unwrap().is_empty());
    }

    #[test]
    fn committing_a_model_folds_older_rounds_and_keeps_the_newest_checkpoints() {
        let (_dir, mut store) = store_with_devices(2);
        assert_eq!(store.global_model().unwrap(), None);
        assert_eq!(store.rounds_completed().unwrap(), 0);
        store.commit_model(0, b"initial").unwrap();
        for round in 0..5 {
            store.begin_round(round, 0, &[0, 1], 1_000).unwrap();
            store.accept_update(round, 0, 0, &blob(round, 0)).unwrap();
            // An early update for the next round must survive this round's commit.
            store
                .accept_update(round + 1, 0, 1, &blob(round + 1, 1))
                .unwrap();
            store
                .commit_model(round + 1, format!("model {}", round + 1).as_bytes())
                .unwrap();
            assert!(store.accepted_updates(round).unwrap().is_empty());
            assert_eq!(store.accepted_updates(round + 1).unwrap().len(), 1);
            assert_eq!(store.current_round().unwrap(), None);
        }
        assert_eq!(
            store.global_model().unwrap(),
            Some(ModelCheckpoint {
                rounds_completed: 5,
                blob: b"model 5".to_vec()
            })
        );
        assert_eq!(store.checkpoints().unwrap(), [5, 4, 3]);
        assert_eq!(store.devices().unwrap()[0].updates_accepted, 5);
        for stale in [5, 2] {
            assert!(matches!(
                store.commit_model(stale, b"old"),
                Err(StoreError::ModelNotNewer {
                    rounds_completed,
                    current: 5
                }) if rounds_completed == stale
            ));
        }
        assert_eq!(store.global_model().unwrap().unwrap().blob, b"model 5");
    }

    #[test]
    fn the_round_in_progress_is_recorded_and_resumable() {
        let (dir, mut store) = store_with_devices(5);
        assert_eq!(store.current_round().unwrap(), None);
        store.begin_round(0, 0, &[4, 1, 1, 3], 10_000).unwrap();
        store.accept_update(0, 0, 3, b"u").unwrap();
        store.begin_round(0, 1, &[2, 0], 20_000).unwrap();
        drop(store);

        let store = Store::open(&dir.path().join("state.sqlite3")).unwrap();
        let round = store.current_round().unwrap().unwrap();
        assert_eq!(
            (
                round.round,
                round.attempt,
                round.selected,
                round.deadline_ms
            ),
            (0, 1, vec![0, 2], 20_000)
        );
        assert!(round.begun_at_ms > 0);
        assert_eq!(store.accepted_updates(0).unwrap().len(), 1);
    }

    #[test]
    fn round_attempts_only_move_forward() {
        let (_dir, mut store) = store_with_devices(2);
        store.begin_round(2, 1, &[0], 1).unwrap();
        for (round, attempt) in [(2, 1), (2, 0), (1, 7)] {
            assert!(
                matches!(
                    store.begin_round(round, attempt, &[1], 2),
                    Err(StoreError::RoundNotNewer {
                        current_round: 2,
                        current_attempt: 1,
                        ..
                    })
                ),
                "({round}, {attempt})"
            );
        }
        store.commit_model(3, b"m").unwrap();
        assert!(matches!(
            store.begin_round(2, 5, &[0], 3),
            Err(StoreError::StaleRound {
                round: 2,
                current: 3
            })
        ));
        store.begin_round(3, 0, &[1], 4).unwrap();
    }

    #[test]
    fn a_round_naming_an_unknown_device_is_not_begun_at_all() {
        let (_dir, mut store) = store_with_devices(2);
        assert!(matches!(
            store.begin_round(0, 0, &[0, 1, 2], 1),
            Err(StoreError::UnknownDevice { device_id: 2 })
        ));
        assert_eq!(store.current_round().unwrap(), None);
        store.begin_round(0, 0, &[0, 1], 1).unwrap();
    }

    #[test]
    fn failures_are_counted_by_kind_and_device_and_listed_newest_first() {
        let (_dir, mut store) = store_with_devices(2);
        store
            .record_failure(Some(1), "bad_frame", "frame of 9 GB")
            .unwrap();
        store
            .record_failure(None, "auth", "unknown device \"x\"")
            .unwrap();
        store
            .record_failure(Some(1), "bad_frame", "truncated")
            .unwrap();
        let long_detail = "é".repeat(MAX_FAILURE_DETAIL);
        store
            .record_failure(Some(0), "deadline", &long_detail)
            .unwrap();
        assert!(matches!(
            store.record_failure(Some(42), "bad_frame", "?"),
            Err(StoreError::UnknownDevice { device_id: 42 })
        ));

        let counts = store.failure_counts().unwrap();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [
                ("auth".to_string(), 1),
                ("bad_frame".to_string(), 2),
                ("deadline".to_string(), 1)
            ]
        );
        let per_device: Vec<u64> = store
            .devices()
            .unwrap()
            .iter()
            .map(|device| device.failures)
            .collect();
        assert_eq!(per_device, [1, 2]);

        let recent = store.recent_failures(3).unwrap();
        let kinds: Vec<&str> = recent.iter().map(|failure| failure.kind.as_str()).collect();
        assert_eq!(kinds, ["deadline", "bad_frame", "auth"]);
        assert_eq!(recent[0].detail.len(), MAX_FAILURE_DETAIL);
        assert!(long_detail.starts_with(&recent[0].detail));
        assert_eq!(recent[1].device_id, Some(1));
        assert_eq!(recent[2].device_id, None);
    }

    #[test]
    fn the_failure_log_is_bounded_but_counts_stay_exact() {
        let (_dir, mut store) = store_with_devices(0);
        let total = FAILURE_LOG_KEPT + 5;
        for i in 0..total {
            store.record_failure(None, "probe", &i.to_string()).unwrap();
        }
        assert_eq!(store.failure_counts().unwrap()["probe"], total);
        let kept = store.recent_failures(u64::MAX >> 1).unwrap();
        assert_eq!(kept.len() as u64, FAILURE_LOG_KEPT);
        assert_eq!(kept[0].detail, (total - 1).to_string());
        assert_eq!(kept.last().unwrap().detail, "5");
    }

    #[test]
    fn truncate_stops_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("", 0), "");
    }
}
