//! The ddome edge agent: embeds its local data once through the common expert (cached),
//! answers the coordinator's rankings, trains its top-K experts with the shared
//! local-training code, and uploads compressed deltas over QUIC, reconnecting with backoff
//! when the link drops ([`run`]).
//!
//! A new device personalises without labels ([`personalize`]: the coordinator's gate ranks
//! the experts on its unlabelled data, and it stores the bundle of its top-K), then predicts
//! on the device, offline ([`DeviceModel`]). [`ServiceClient`] speaks to the coordinator's
//! personalisation service directly (a device too weak to predict asks it to infer).

mod client;
mod data;
mod images;
mod personalize;
mod predict;
mod session;

pub use client::{ServiceClient, ServiceError};
pub use data::{DataError, EmbedConfig, LocalData};
pub use images::{ImageError, embed_files, image_files, load_runs};
pub use personalize::{
    BundleRefusal, PersonalizeError, Personalized, choose_experts, personalize, personalize_with,
    save_bundle, verify_bundle,
};
pub use predict::{DeviceModel, ImagePredictions, PredictError, embed_batch};
pub use session::{AgentConfig, AgentError, AgentSummary, run};
