//! FedAvg aggregation, written once: the coordinator and the simulator both call
//! [`aggregate_round`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use ddome_protocol::seed::{Purpose, derive};

use crate::backend::cpu_device;
use crate::nn::ModelSpec;
use crate::params;
use crate::train::LocalUpdate;

/// The federation's global parameters: the gate W_r and the experts W_1..W_M, flat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalModel {
    /// W_r (empty for single-model methods).
    pub gate: Vec<f32>,
    /// W_1..W_M.
    pub experts: Vec<Vec<f32>>,
}

impl GlobalModel {
    /// The model a federation starts from: every module drawn from its own stream of `seed`,
    /// so the coordinator and the simulator start alike and different seeds share no module.
    pub fn initial(spec: &ModelSpec, seed: u64, with_gate: bool) -> Self {
        let device = cpu_device();
        let gate = if with_gate {
            params::init(&spec.gate(&device), derive(seed, Purpose::GateInit, &[]))
        } else {
            Vec::new()
        };
        let template = spec.expert(&device);
        Self {
            gate,
            experts: (0..spec.experts)
                .map(|e| params::init(&template, derive(seed, Purpose::ExpertInit, &[e as u64])))
                .collect(),
        }
    }

    /// SHA-256 of the parameters (little-endian f32, gate then experts in order): two models
    /// are bit-identical exactly when their hashes are.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256::new();
        for v in self.gate.iter().chain(self.experts.iter().flatten()) {
            hasher.update(v.to_le_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

/// An update that cannot be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// A delta's length differs from the parameter vector it updates.
    #[error("{what}: delta holds {found} values, the model {expected}")]
    Shape {
        /// Which parameters (gate, expert 2, ...).
        what: String,
        /// Length of the global vector.
        expected: usize,
        /// Length of the delta.
        found: usize,
    },
    /// The update names an expert the model does not have.
    #[error("update for expert {expert}, but the model has {experts} experts")]
    UnknownExpert {
        /// Expert index in the update.
        expert: usize,
        /// M.
        experts: usize,
    },
    /// A delta holds NaN or an infinity.
    #[error("{what}: delta value {value} at index {index} is not finite")]
    NotFinite {
        /// Which parameters.
        what: String,
        /// Position of the first bad value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// An update claims zero samples, so it has no weight.
    #[error("an update with zero samples has no FedAvg weight")]
    ZeroSamples,
}

/// Adds the sample-weighted mean of `deltas` to `global`: w ← w + Σ n_i Δ_i / Σ n_i.
///
/// Accumulates in f64 in the order given, so the result depends only on the inputs and their
/// order; callers sort updates by device id.
pub fn fedavg_apply(
    global: &mut [f32],
    deltas: &[(&[f32], usize)],
    what: &str,
) -> Result<(), AggregateError> {
    if deltas.is_empty() {
        return Ok(());
    }
    for (delta, n) in deltas {
        check_delta(delta, global.len(), what)?;
        if *n == 0 {
            return Err(AggregateError::ZeroSamples);
        }
    }
    let total: f64 = deltas.iter().map(|(_, n)| *n as f64).sum();
    let mut sum = vec![0.0f64; global.len()];
    for (delta, n) in deltas {
        let weight = *n as f64;
        for (s, d) in sum.iter_mut().zip(delta.iter()) {
            *s += weight * *d as f64;
        }
    }
    for (w, s) in global.iter_mut().zip(sum) {
        *w = (*w as f64 + s / total) as f32;
    }
    Ok(())
}

/// Rejects a delta of the wrong length or with a non-finite value.
pub fn check_delta(delta: &[f32], expected: usize, what: &str) -> Result<(), AggregateError> {
    if delta.len() != expected {
        return Err(AggregateError::Shape {
            what: what.to_string(),
            expected,
            found: delta.len(),
        });
    }
    if let Some((index, &value)) = delta.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(AggregateError::NotFinite {
            what: what.to_string(),
            index,
            value,
        });
    }
    Ok(())
}

/// One round's aggregation (DDOME.md, step 6): W_r from every participant that trained it,
/// each expert only from the devices that trained it this round; untouched experts stay.
///
/// Every update is validated before anything changes, so a bad update leaves `global` as it
/// was.
pub fn aggregate_round(
    global: &mut GlobalModel,
    updates: &[LocalUpdate],
) -> Result<(), AggregateError> {
    for update in updates {
        if update.samples == 0 {
            return Err(AggregateError::ZeroSamples);
        }
        if let Some(delta) = &update.gate_delta {
            check_delta(delta, global.gate.len(), "gate")?;
        }
        for (expert, delta) in &update.expert_deltas {
            let target = global
                .experts
                .get(*expert)
                .ok_or(AggregateError::UnknownExpert {
                    expert: *expert,
                    experts: global.experts.len(),
                })?;
            check_delta(delta, target.len(), &format!("expert {expert}"))?;
        }
    }
    let gate_deltas: Vec<(&[f32], usize)> = updates
        .iter()
        .filter_map(|u| u.gate_delta.as_deref().map(|d| (d, u.samples)))
        .collect();
    fedavg_apply(&mut global.gate, &gate_deltas, "gate")?;
    for (index, expert) in global.experts.iter_mut().enumerate() {
        let deltas: Vec<(&[f32], usize)> = updates
            .iter()
            .flat_map(|u| {
                u.expert_deltas
                    .iter()
                    .filter(|(e, _)| *e == index)
                    .map(move |(_, d)| (d.as_slice(), u.samples))
            })
            .collect();
        fedavg_apply(expert, &deltas, &format!("expert {index}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(gate: Option<Vec<f32>>, experts: Vec<(usize, Vec<f32>)>, n: usize) -> LocalUpdate {
        LocalUpdate {
            gate_delta: gate,
            expert_deltas: experts,
            samples: n,
            mean_loss: 0.0,
        }
    }

    /// Each run seed must start from modules no other seed starts from: under the old
    /// `seed + 1 + e` rule seed 1's expert 0 was seed 0's expert 1, bit for bit.
    #[test]
    fn different_seeds_share_no_initial_module() {
        let spec = crate::nn::tiny_test_spec();
        let models: Vec<GlobalModel> = (0..3)
            .map(|s| GlobalModel::initial(&spec, s, true))
            .collect();
        assert_eq!(models[0], GlobalModel::initial(&spec, 0, true));
        let mut modules: Vec<&Vec<f32>> = Vec::new();
        for m in &models {
            modules.push(&m.gate);
            modules.extend(&m.experts);
        }
        for (i, a) in modules.iter().enumerate() {
            for b in &modules[i + 1..] {
                assert_ne!(a, b, "two initial modules are identical");
            }
        }
    }

    #[test]
    fn weighted_mean_is_exact() {
        // Values and weights chosen so every intermediate is exactly representable.
        let mut global = vec![1.0f32, -2.0, 0.5];
        let a = [4.0f32, 0.0, -8.0];
        let b = [-2.0f32, 6.0, 2.0];
        fedavg_apply(&mut global, &[(&a, 1), (&b, 3)], "w").unwrap();
        // mean = (1·a + 3·b) / 4 = [-0.5, 4.5, -0.5]
        assert_eq!(global, vec![0.5, 2.5, 0.0]);
    }

    #[test]
    fn experts_update_only_from_their_trainers() {
        let mut global = GlobalModel {
            gate: vec![0.0; 2],
            experts: vec![vec![0.0; 2], vec![10.0; 2], vec![5.0; 2]],
        };
        let updates = [
            update(Some(vec![1.0, 1.0]), vec![(0, vec![2.0, 2.0])], 1),
            update(
                Some(vec![4.0, 4.0]),
                vec![(0, vec![6.0, 6.0]), (2, vec![1.0, -1.0])],
                3,
            ),
        ];
        aggregate_round(&mut global, &updates).unwrap();
        assert_eq!(global.gate, vec![3.25, 3.25]);
        assert_eq!(global.experts[0], vec![5.0, 5.0]);
        assert_eq!(
            global.experts[1],
            vec![10.0, 10.0],
            "untouched expert must stay"
        );
        assert_eq!(
            global.experts[2],
            vec![6.0, 4.0],
            "sole trainer's delta applies fully"
        );
    }

    #[test]
    fn bad_update_leaves_model_untouched() {
        let mut global = GlobalModel {
            gate: vec![0.0; 2],
            experts: vec![vec![0.0; 2]],
        };
        let before = global.clone();
        let good = update(Some(vec![1.0, 1.0]), vec![(0, vec![1.0, 1.0])], 1);
        let cases = [
            (
                update(Some(vec![1.0]), vec![], 1),
                AggregateError::Shape {
                    what: "gate".into(),
                    expected: 2,
                    found: 1,
                },
            ),
            (
                update(None, vec![(0, vec![f32::NAN, 0.0])], 1),
                AggregateError::NotFinite {
                    what: "expert 0".into(),
                    index: 0,
                    value: f32::NAN,
                },
            ),
            (
                update(None, vec![(3, vec![0.0, 0.0])], 1),
                AggregateError::UnknownExpert {
                    expert: 3,
                    experts: 1,
                },
            ),
            (update(None, vec![], 0), AggregateError::ZeroSamples),
        ];
        for (bad, expected) in cases {
            let err = aggregate_round(&mut global, &[good.clone(), bad]).unwrap_err();
            match (&err, &expected) {
                (AggregateError::NotFinite { index, .. }, AggregateError::NotFinite { .. }) => {
                    assert_eq!(*index, 0)
                }
                _ => assert_eq!(err, expected),
            }
            assert_eq!(global, before);
        }
    }
}
