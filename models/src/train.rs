//! Local training: one device, one round. Written once; the simulator, the agent and the
//! tests all call [`train_local`].

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::features::Features;
use crate::moe::{anchor_loss, cross_entropy, mixture_nll};
use crate::nn::{Expert, Gate, ModelSpec};
use crate::params::{self, ParamLenError};

/// Optimiser settings of one local round. Defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Local epochs E (paper: 1).
    pub epochs: usize,
    /// Mini-batch size (paper: 256 for images).
    pub batch_size: usize,
    /// Expert SGD learning rate (paper: 0.01).
    pub expert_lr: f64,
    /// Gate SGD learning rate (paper: 0.001).
    pub gate_lr: f64,
    /// SGD momentum for experts and gate (paper: 0.9).
    pub momentum: f64,
    /// FedProx proximal weight μ; 0 disables the term.
    pub prox_mu: f64,
    /// Whether normal devices train the gate through the mixture loss (DDOME.md's choice,
    /// the default). When false only anchors train it, and a normal device uses the gate it
    /// received as fixed mixture weights and sends no gate delta.
    #[serde(default = "default_true")]
    pub normals_train_gate: bool,
}

fn default_true() -> bool {
    true
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 256,
            expert_lr: 0.01,
            gate_lr: 0.001,
            momentum: 0.9,
            prox_mu: 0.0,
            normals_train_gate: true,
        }
    }
}

/// What a device does this round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A normal device: trains the gate and its selected experts jointly on the mixture loss.
    Normal {
        /// Global indices of the experts it received (its top-K).
        experts: Vec<usize>,
    },
    /// An anchor pinned to one expert: CE on its expert plus CE pulling the gate to it.
    Anchor {
        /// The expert it is pinned to.
        expert: usize,
    },
    /// One model and no gate (FedAvg, FedProx, the central reference).
    Single,
}

impl Role {
    /// The experts this role trains, in the order their parameters are sent.
    pub fn experts(&self) -> Vec<usize> {
        match self {
            Role::Normal { experts } => experts.clone(),
            Role::Anchor { expert } => vec![*expert],
            Role::Single => vec![0],
        }
    }

    /// Whether this role trains the gate.
    pub fn trains_gate(&self) -> bool {
        !matches!(self, Role::Single)
    }
}

/// The parameters a device received for this round.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The gate W_r, if the role trains it.
    pub gate: Option<&'a [f32]>,
    /// The experts, in the order of [`Role::experts`].
    pub experts: &'a [&'a [f32]],
}

/// A device's result of one round: parameter deltas (new − received) and its sample count.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalUpdate {
    /// Δ W_r, if the role trains the gate.
    pub gate_delta: Option<Vec<f32>>,
    /// (global expert index, Δ W_i) for each trained expert.
    pub expert_deltas: Vec<(usize, Vec<f32>)>,
    /// Samples trained on: the aggregation weight n.
    pub samples: usize,
    /// Mean training loss over the round's batches.
    pub mean_loss: f32,
}

/// Why local training could not run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A received parameter vector does not fit the model spec.
    #[error(transparent)]
    Params(#[from] ParamLenError),
    /// The role and the received parameters disagree (e.g. no gate for a normal device).
    #[error("role {role:?} needs {needed}, but the device received {received}")]
    RoleMismatch {
        /// The role.
        role: Role,
        /// What the role needs.
        needed: String,
        /// What arrived.
        received: String,
    },
    /// The device holds no samples.
    #[error("the device has no training samples")]
    NoSamples,
    /// The loss became NaN or infinite: the update would poison the global model.
    #[error("training diverged: loss {loss} at batch {batch}")]
    Diverged {
        /// The loss value.
        loss: f32,
        /// Batch index within the round.
        batch: usize,
    },
}

/// All float parameters of a module as one flat autodiff tensor (for the proximal term).
fn flat_param_tensor<M: Module>(module: &M) -> Tensor<1> {
    struct Collect(Vec<Tensor<1>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let len = value.dims().iter().product::<usize>();
            self.0.push(value.reshape([len]));
        }
    }
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    Tensor::cat(collect.0, 0)
}

fn sgd(momentum: f64) -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new()
                .with_momentum(momentum)
                .with_dampening(0.0),
        ))
        .init()
}

/// Trains one device for one round on `data[indices]` and returns its deltas.
///
/// `device` must have autodiff enabled. Batches are shuffled with `seed`, so the same seed,
/// parameters and data give the same update bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn train_local(
    spec: &ModelSpec,
    received: Received<'_>,
    role: &Role,
    data: &Features,
    indices: &[usize],
    cfg: &TrainConfig,
    seed: u64,
    device: &Device,
) -> Result<LocalUpdate, TrainError> {
    if indices.is_empty() {
        return Err(TrainError::NoSamples);
    }
    let expert_ids = role.experts();
    if role.trains_gate() != received.gate.is_some() || received.experts.len() != expert_ids.len() {
        return Err(TrainError::RoleMismatch {
            role: role.clone(),
            needed: format!(
                "{} and {} expert(s)",
                if role.trains_gate() {
                    "the gate"
                } else {
                    "no gate"
                },
                expert_ids.len()
            ),
            received: format!(
                "{} and {} expert(s)",
                if received.gate.is_some() {
                    "a gate"
                } else {
                    "no gate"
                },
                received.experts.len()
            ),
        });
    }

    let gate_frozen = matches!(role, Role::Normal { .. }) && !cfg.normals_train_gate;
    let mut gate: Option<Gate> = match received.gate {
        Some(flat) => Some(params::load(spec.gate(device), flat, "gate")?),
        None => None,
    };
    let mut experts: Vec<Expert> = Vec::with_capacity(expert_ids.len());
    for (&id, flat) in expert_ids.iter().zip(received.experts) {
        experts.push(params::load(
            spec.expert(device),
            flat,
            &format!("expert {id}"),
        )?);
    }
    let prox_anchor: Option<Tensor<1>> = (cfg.prox_mu > 0.0).then(|| {
        let flat: Vec<f32> = received.experts.concat();
        let len = flat.len();
        // Created without require_grad: a constant in the graph.
        Tensor::from_data(TensorData::new(flat, [len]), device)
    });

    let mut gate_optim = sgd(cfg.momentum);
    let mut expert_optim = sgd(cfg.momentum);
    let mut order = indices.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut loss_sum = 0.0f64;
    let mut batches = 0usize;

    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_size) {
            let (input, labels) = data.batch(chunk, device);
            let expert_logits: Vec<Tensor<2>> = experts
                .iter()
                .map(|expert| expert.forward(&input))
                .collect();
            let mut loss = match (role, &gate) {
                (Role::Normal { experts: ids }, Some(gate)) => mixture_nll(
                    if gate_frozen {
                        gate.forward(input.embeddings.clone()).detach()
                    } else {
                        gate.forward(input.embeddings.clone())
                    },
                    ids,
                    expert_logits,
                    &labels,
                ),
                (Role::Anchor { expert }, Some(gate)) => anchor_loss(
                    gate.forward(input.embeddings.clone()),
                    *expert,
                    expert_logits
                        .into_iter()
                        .next()
                        .expect("an anchor trains exactly one expert"),
                    &labels,
                ),
                _ => cross_entropy(
                    expert_logits
                        .into_iter()
                        .next()
                        .expect("a single-model role trains exactly one expert"),
                    &labels,
                ),
            };
            if let Some(anchor) = &prox_anchor {
                let current = Tensor::cat(experts.iter().map(flat_param_tensor).collect(), 0);
                let distance = (current - anchor.clone()).powf_scalar(2.0).sum();
                loss = loss + distance.mul_scalar(cfg.prox_mu / 2.0);
            }
            let loss_value: f32 = loss.clone().into_scalar::<f32>();
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    loss: loss_value,
                    batch: batches,
                });
            }
            loss_sum += loss_value as f64;
            batches += 1;

            let mut grads = loss.backward();
            if let Some(g) = gate.take_if(|_| !gate_frozen) {
                let gate_grads = GradientsParams::from_module(&mut grads, &g);
                gate = Some(gate_optim.step(cfg.gate_lr, g, gate_grads));
            }
            let expert_grads = GradientsParams::from_module(&mut grads, &experts);
            experts = expert_optim.step(cfg.expert_lr, experts, expert_grads);
        }
    }

    let delta = |new: Vec<f32>, old: &[f32]| -> Vec<f32> {
        new.iter().zip(old).map(|(n, o)| n - o).collect()
    };
    Ok(LocalUpdate {
        gate_delta: gate
            .as_ref()
            .filter(|_| !gate_frozen)
            .zip(received.gate)
            .map(|(g, old)| delta(params::flatten(g), old)),
        expert_deltas: expert_ids
            .iter()
            .zip(&experts)
            .zip(received.experts)
            .map(|((&id, expert), old)| (id, delta(params::flatten(expert), old)))
            .collect(),
        samples: indices.len(),
        mean_loss: (loss_sum / batches.max(1) as f64) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu_device;

    fn spec() -> ModelSpec {
        crate::nn::tiny_test_spec()
    }

    fn data() -> Features {
        let embeddings: Vec<f32> = (0..8 * 4)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
            .collect();
        Features {
            embeddings,
            dim: 4,
            labels: vec![0, 1, 2, 1, 0, 2, 2, 0],
            pixels: None,
        }
    }

    fn normal_round(cfg: &TrainConfig) -> LocalUpdate {
        let spec = spec();
        let cpu = cpu_device();
        let gate = params::init(&spec.gate(&cpu), 1);
        let experts: Vec<Vec<f32>> = [0, 2]
            .iter()
            .map(|e| params::init(&spec.expert(&cpu), 10 + e))
            .collect();
        let expert_refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
        train_local(
            &spec,
            Received {
                gate: Some(&gate),
                experts: &expert_refs,
            },
            &Role::Normal {
                experts: vec![0, 2],
            },
            &data(),
            &(0..8).collect::<Vec<_>>(),
            cfg,
            3,
            &cpu.autodiff(),
        )
        .unwrap()
    }

    #[test]
    fn a_normal_device_with_a_frozen_gate_sends_no_gate_delta_and_mixes_with_the_received_gate() {
        // One batch: the experts' step is taken before the gate could move, so both settings
        // must give the same expert deltas; only the gate delta differs.
        let one_batch = TrainConfig {
            batch_size: 8,
            ..TrainConfig::default()
        };
        let joint = normal_round(&one_batch);
        let frozen = normal_round(&TrainConfig {
            normals_train_gate: false,
            ..one_batch
        });
        assert!(
            joint
                .gate_delta
                .is_some_and(|d| d.iter().any(|v| *v != 0.0))
        );
        assert_eq!(frozen.gate_delta, None);
        assert_eq!(frozen.expert_deltas, joint.expert_deltas);

        // Several batches: the joint run's gate moves between them and changes the mixture
        // the experts learn from; the frozen run's does not.
        let batches = TrainConfig {
            batch_size: 2,
            ..TrainConfig::default()
        };
        let joint = normal_round(&batches);
        let frozen = normal_round(&TrainConfig {
            normals_train_gate: false,
            ..batches
        });
        assert_eq!(frozen.gate_delta, None);
        assert_ne!(frozen.expert_deltas, joint.expert_deltas);
    }
}
