//! Messages over quinn streams: the protocol crate's frames, read with the size limit
//! checked before the payload is allocated.

use ddome_protocol::frame::{FrameError, HEADER_LEN, decode_payload, encode_frame, payload_len};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A message that could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A frame broke the protocol (oversized, malformed, truncated).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream could not be read.
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream could not be written.
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer took too long.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

/// Writes one message as one frame; returns the bytes written.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
    max: usize,
) -> Result<usize, TransportError> {
    let frame = encode_frame(message, max)?;
    send.write_all(&frame).await?;
    Ok(frame.len())
}

/// Reads one message; `Ok(None)` when the peer finished the stream between frames.
pub async fn read_message<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, TransportError> {
    match read_frame(recv, max).await? {
        Some(payload) => Ok(Some(decode_payload(&payload)?)),
        None => Ok(None),
    }
}

/// Reads one frame's payload, undecoded; `Ok(None)` when the peer finished the stream
/// between frames.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<Vec<u8>>, TransportError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(FrameError::Truncated {
                expected: HEADER_LEN,
                got,
            }
            .into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = payload_len(header, max)?;
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(FrameError::Truncated {
                expected: HEADER_LEN + len,
                got: HEADER_LEN + got,
            }
            .into());
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(Some(payload))
}

/// `future`, or [`TransportError::Timeout`] after `limit`.
pub async fn within<T>(
    limit: std::time::Duration,
    future: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| TransportError::Timeout(limit))?
}
