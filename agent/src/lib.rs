//! The ddome edge agent: embeds its local data once through the common expert (cached),
//! answers the coordinator's rankings, trains its top-K experts with the shared
//! local-training code, and uploads compressed deltas over QUIC, reconnecting with backoff
//! when the link drops.

mod data;
mod session;

pub use data::{DataError, EmbedConfig, LocalData};
pub use session::{AgentConfig, AgentError, AgentSummary, run};
