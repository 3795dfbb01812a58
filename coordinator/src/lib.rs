//! The ddome coordinator: the federation's server and the owner of its durable state.
//!
//! Entry types: [`StateDir`], a state directory holding the TLS identity agents pin and
//! the [`Store`], the SQLite database of devices, credentials (salted hashes only), rounds,
//! accepted updates, model checkpoints and failures. Every write is one durable
//! transaction, so the coordinator can be killed at any instant and resume from the last
//! commit without losing an accepted update.
//!
//! [`server::start_with`] runs the federation and, on the same endpoint, the personalisation
//! service: enrolled devices fetch the gate, receive the bundle of the experts their
//! unlabelled data chose, or have batches predicted, with the limits of
//! [`config::InferenceConfig`].

pub mod config;
mod credential;
mod error;
pub mod server;
mod service;
mod state_dir;
mod store;

pub use credential::{Credential, CredentialFormatError, DeviceName, NameError, RandomnessError};
pub use error::{AuthError, EnrollError, InitError, OpenError, RevokeError, StoreError};
pub use service::ServiceSetupError;
pub use state_dir::StateDir;
pub use store::{
    AcceptedUpdate, CHECKPOINTS_KEPT, DeviceRecord, FailureRecord, ModelCheckpoint, RoundRecord,
    RoundStatus, SCHEMA_VERSION, Status, Store,
};
