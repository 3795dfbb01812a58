//! Framing: one postcard message per frame, prefixed by its length as a little-endian u32.
//!
//! The length is checked against the receiver's limit before a byte of payload is read or
//! allocated, so a hostile peer cannot make the coordinator reserve memory by claiming a
//! huge frame.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default limit on one frame's payload: FedMix sends M = 5 experts and a gate of
/// ~330k f32 each (~8 MB); 64 MiB leaves room for wider models without inviting abuse.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// A frame that cannot be written or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The declared (or encoded) payload length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended after {got} of {expected} bytes of a frame")]
    Truncated {
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A frame of zero bytes: no message is empty.
    #[error("empty frame")]
    Empty,
}

/// Encodes `message` as one frame (header + payload), refusing payloads over `max`.
pub fn encode_frame<T: Serialize>(message: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(message, vec![0u8; HEADER_LEN])
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > max || u32::try_from(len).is_err() {
        return Err(FrameError::Oversized { len, max });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Reads a frame header: the payload length, checked against `max` (and non-zero).
pub fn payload_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    Ok(len)
}

/// Decodes a frame's payload. Trailing bytes are an error: a frame holds one message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (message, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(message)
}

/// Splits complete frames off the front of a byte buffer: the in-memory reader used by
/// tests and by anything that receives bytes in arbitrary chunks.
#[derive(Debug)]
pub struct FrameReader {
    buffer: Vec<u8>,
    max: usize,
}

impl FrameReader {
    /// A reader accepting payloads up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. An oversized header is
    /// reported as soon as the header is complete, before its payload arrives.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buffer.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = payload_len(*header, self.max)?;
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let message = decode_payload(&self.buffer[HEADER_LEN..HEADER_LEN + len]);
        self.buffer.drain(..HEADER_LEN + len);
        message.map(Some)
    }

    /// Called when the stream ends: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let expected = match self.buffer.first_chunk::<HEADER_LEN>() {
            Some(header) => HEADER_LEN + u32::from_le_bytes(*header) as usize,
            None => HEADER_LEN,
        };
        Err(FrameError::Truncated {
            expected,
            got: self.buffer.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AgentMessage, Hello, Ranking};

    fn hello() -> AgentMessage {
        AgentMessage::Hello(Hello {
            version: 1,
            device: "pi-17".into(),
            credential: "ddome1.secret".into(),
            intent: crate::message::Intent::Train,
        })
    }

    #[test]
    fn frames_round_trip_through_arbitrary_chunking() {
        let messages = vec![
            hello(),
            AgentMessage::Ranking(Ranking {
                round: 3,
                attempt: 0,
                experts: vec![4, 1],
                samples: 500,
            }),
        ];
        let bytes: Vec<u8> = messages
            .iter()
            .flat_map(|m| encode_frame(m, DEFAULT_MAX_FRAME).unwrap())
            .collect();
        for chunk in [1, 3, 7, bytes.len()] {
            let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                reader.push(piece);
                while let Some(m) = reader.next_message::<AgentMessage>().unwrap() {
                    got.push(m);
                }
            }
            reader.finish().unwrap();
            assert_eq!(got, messages, "chunk size {chunk}");
        }
    }

    #[test]
    fn oversized_header_is_refused_before_its_payload_arrives() {
        let mut reader = FrameReader::new(1024);
        reader.push(&u32::MAX.to_le_bytes());
        assert_eq!(
            reader.next_message::<AgentMessage>().unwrap_err(),
            FrameError::Oversized {
                len: u32::MAX as usize,
                max: 1024
            }
        );
        assert!(matches!(
            encode_frame(&hello(), 8),
            Err(FrameError::Oversized { max: 8, .. })
        ));
    }

    #[test]
    fn truncated_malformed_empty_and_trailing_frames_are_typed_errors() {
        let frame = encode_frame(&hello(), DEFAULT_MAX_FRAME).unwrap();
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.push(&frame[..frame.len() - 2]);
        assert_eq!(reader.next_message::<AgentMessage>().unwrap(), None);
        assert_eq!(
            reader.finish().unwrap_err(),
            FrameError::Truncated {
                expected: frame.len(),
                got: frame.len() - 2
            }
        );

        // A variant tag no message has.
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.push(&[1, 0, 0, 0, 0x7f]);
        assert!(matches!(
            reader.next_message::<AgentMessage>(),
            Err(FrameError::Malformed(_))
        ));

        assert_eq!(payload_len([0; 4], 10).unwrap_err(), FrameError::Empty);

        let mut payload = frame[HEADER_LEN..].to_vec();
        payload.push(0);
        assert!(matches!(
            decode_payload::<AgentMessage>(&payload),
            Err(FrameError::Malformed(m)) if m.contains("trailing")
        ));
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for len in 0..400 {
            let mut bytes = vec![0u8; len];
            rng.fill_bytes(&mut bytes);
            let _ = decode_payload::<AgentMessage>(&bytes);
            let _ = decode_payload::<crate::message::CoordinatorMessage>(&bytes);
        }
    }
}
