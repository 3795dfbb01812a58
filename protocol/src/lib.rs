//! ddome's wire protocol without I/O, in the manner of quinn-proto: the messages, their
//! framing, the delta codecs and the round state machine. The coordinator and the agent
//! wrap it in QUIC; the in-process simulator drives the same selection and seeds, so a
//! networked run and a simulated one agree.
//!
//! Entry points: [`message`] (what crosses the wire), [`frame`] (how), [`codec`] (how deltas
//! shrink), [`round::Round`] (who takes part in a round and when it ends), [`bundle::Bundle`]
//! (what a personalised device stores).

pub mod bundle;
pub mod codec;
pub mod frame;
pub mod message;
pub mod round;
pub mod seed;
mod selection;

pub use codec::{
    CodecConfig, CodecConfigError, DecodeError, EncodeError, EncodedDelta, EncodedValues,
    ErrorFeedback, ValueCodec,
};
pub use selection::{Selection, SelectionConfig, SelectionError, select_participants};

/// Version of the protocol; checked in the first exchange of every connection. Version 2
/// added the `Hello`'s intent and the personalisation service; version 3 names the attempt
/// an `UpdateAccepted` confirms and the device's last accepted update in its `Welcome`, so
/// an agent keeps the error-feedback residual of exactly the uploads that were applied.
pub const PROTOCOL_VERSION: u32 = 3;
