//! DDOME's learning engine: the frozen common expert ([`CommonExpert`], ONNX through tract),
//! the gate and experts as burn modules ([`ModelSpec`]), the mixture losses and zero-shot
//! prediction ([`predict`], and [`Mixture`] for rows of embeddings), local training
//! ([`train_local`]) and FedAvg aggregation ([`aggregate_round`]).
//!
//! Each algorithm lives here once; the simulator, the agent and the coordinator call it.

mod aggregate;
mod backend;
mod common_expert;
mod features;
mod mixture;
mod moe;
mod nn;
pub mod params;
mod train;

pub use aggregate::{AggregateError, GlobalModel, aggregate_round, check_delta, fedavg_apply};
pub use backend::{BackendChoice, BackendError, cpu_device, device, device_or_cpu};
pub use common_expert::{
    CommonExpert, CommonExpertConfig, CommonExpertError, Threading, embed_cached,
};
pub use features::{Features, Pixels};
pub use mixture::{Mixture, MixtureError, PREDICT_BATCH};
pub use moe::{
    Predictions, anchor_loss, cross_entropy, gate_probabilities, mean_gate_scores, mixture_nll,
    predict, top_k,
};
pub use nn::{Expert, ExpertInput, ExpertKind, Gate, ModelSpec, PixelShape};
pub use train::{LocalUpdate, Received, Role, TrainConfig, TrainError, train_local};

/// Re-exported so callers name devices without depending on burn directly.
pub use burn::tensor::Device;
