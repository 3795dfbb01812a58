//! QUIC for ddome: the coordinator's TLS identity, certificate pinning on agents, and
//! length-prefixed postcard frames over quinn streams.

pub mod endpoint;
pub mod framed;
pub mod tls;

pub use endpoint::{ALPN, EndpointError, client, server};
pub use framed::{TransportError, read_frame, read_message, within, write_message};
pub use tls::{Identity, IdentityError, SERVER_NAME, fingerprint};
