//! ddome's wire protocol without I/O, in the manner of quinn-proto: what a round looks like
//! and who takes part in it. The coordinator and the agent wrap it in QUIC; the in-process
//! simulator drives the very same functions, so a networked run and a simulated one agree.
//!
//! Entry points: [`select_participants`] and [`Selection`].

mod selection;

pub use selection::{Selection, SelectionConfig, SelectionError, select_participants};

/// Version of the protocol; checked in the first exchange of every connection.
pub const PROTOCOL_VERSION: u32 = 1;
