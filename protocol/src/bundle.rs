//! The model bundle: what a personalised device stores and predicts with, offline.
//!
//! A self-describing file (layout in `docs/bundle.md`):
//!
//! ```text
//! offset  size  field
//!      0     8  magic "DDOMEBDL"
//!      8     4  format version, u32 little-endian (1)
//!     12     8  payload length in bytes, u64 little-endian
//!     20    32  SHA-256 of the payload
//!     52     …  payload: postcard-encoded [`Bundle`]
//! ```
//!
//! [`Bundle::decode`] never panics on any byte string: it checks the header, the length, the
//! hash and the shapes, in that order, and names the first thing that is wrong. Whether the
//! gate and experts fit the described architecture is checked by whoever loads them into
//! modules (the model crate knows the layout; this crate does not).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::message::{CommonExpertRef, ModelDescription};

/// The first eight bytes of every bundle.
pub const BUNDLE_MAGIC: [u8; 8] = *b"DDOMEBDL";
/// The format version this build writes and reads.
pub const BUNDLE_VERSION: u32 = 1;
/// Bytes before the payload: magic, version, payload length, SHA-256.
pub const BUNDLE_HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// A device's personalised model: the gate and its K experts, versioned by the global
/// model they were cut from, with the scores that chose them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// The device it was made for.
    pub device: String,
    /// The federation's model (widths, classes, M, K, common expert).
    pub model: ModelDescription,
    /// Rounds folded into the global model the parameters come from.
    pub round: u64,
    /// SHA-256 of that global model's parameters.
    pub global_model_sha256: String,
    /// The common expert (and its input size) the device must embed with.
    pub common_expert: CommonExpertRef,
    /// The gate W_r, flat.
    pub gate: Vec<f32>,
    /// (global expert index, flat parameters), best first.
    pub experts: Vec<(u32, Vec<f32>)>,
    /// The device's mean gate scores over its unlabelled data, one per expert of the model.
    pub scores: Vec<f32>,
    /// Samples the scores average over.
    pub samples: u64,
}

/// A bundle that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Fewer bytes than the header, or than the header's payload length.
    #[error("bundle is truncated: {got} bytes, {expected} expected")]
    Truncated {
        /// Bytes the header (or the header and payload) need.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// Bytes after the payload.
    #[error("bundle has {extra} bytes after its payload")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The file does not start with [`BUNDLE_MAGIC`].
    #[error("not a ddome bundle (magic bytes {found:02x?})")]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A format version this build does not read.
    #[error("bundle format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// [`BUNDLE_VERSION`].
        supported: u32,
    },
    /// The payload's SHA-256 differs from the header's: the file is corrupt or was altered.
    #[error("bundle hash mismatch: the header says {expected}, the payload hashes to {actual}")]
    HashMismatch {
        /// The hash in the header, hex.
        expected: String,
        /// The hash of the payload as read, hex.
        actual: String,
    },
    /// The payload is not a postcard-encoded [`Bundle`].
    #[error("bundle payload is malformed: {0}")]
    Malformed(String),
    /// The parts do not fit together (the message names which).
    #[error("bundle shapes are inconsistent: {0}")]
    Shape(String),
    /// A parameter or score is NaN or infinite.
    #[error("bundle {what} holds a non-finite value at index {index}")]
    NotFinite {
        /// Which vector.
        what: String,
        /// Position of the first bad value.
        index: usize,
    },
}

impl Bundle {
    /// The experts' global indices, best first.
    pub fn expert_indices(&self) -> Vec<usize> {
        self.experts.iter().map(|(e, _)| *e as usize).collect()
    }

    /// Checks that the parts fit together: one score per expert of the model; 1 to M
    /// distinct experts, each in range and of one length; finite values; a SHA-256 for the
    /// common expert.
    pub fn check(&self) -> Result<(), BundleError> {
        let shape = |m: String| Err(BundleError::Shape(m));
        let m = self.model.experts as usize;
        if self.scores.len() != m {
            return shape(format!(
                "{} scores for a model of {m} experts",
                self.scores.len()
            ));
        }
        if self.experts.is_empty() || self.experts.len() > m {
            return shape(format!(
                "{} experts; a bundle holds 1 to {m}",
                self.experts.len()
            ));
        }
        if self.gate.is_empty() {
            return shape("the gate is empty".into());
        }
        let expert_len = self.experts[0].1.len();
        for (i, (index, params)) in self.experts.iter().enumerate() {
            if *index as usize >= m {
                return shape(format!("expert {index}, the model has {m}"));
            }
            if self.experts[..i].iter().any(|(e, _)| e == index) {
                return shape(format!("expert {index} appears twice"));
            }
            if params.is_empty() || params.len() != expert_len {
                return shape(format!(
                    "expert {index} has {} parameters, expert {} has {expert_len}",
                    params.len(),
                    self.experts[0].0
                ));
            }
        }
        if !is_sha256_hex(&self.common_expert.sha256) {
            return shape(format!(
                "common expert hash {:?} is not 64 hex digits",
                self.common_expert.sha256
            ));
        }
        finite("gate", &self.gate)?;
        finite("scores", &self.scores)?;
        for (index, params) in &self.experts {
            finite(&format!("expert {index}"), params)?;
        }
        Ok(())
    }

    /// The bundle as bytes, and its payload's SHA-256 (hex). Refuses an inconsistent bundle.
    pub fn encode(&self) -> Result<(Vec<u8>, String), BundleError> {
        self.check()?;
        let payload =
            postcard::to_allocvec(self).map_err(|e| BundleError::Malformed(e.to_string()))?;
        let digest: [u8; 32] = Sha256::digest(&payload).into();
        let mut bytes = Vec::with_capacity(BUNDLE_HEADER_LEN + payload.len());
        bytes.extend_from_slice(&BUNDLE_MAGIC);
        bytes.extend_from_slice(&BUNDLE_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&digest);
        bytes.extend_from_slice(&payload);
        Ok((bytes, hex::encode(digest)))
    }

    /// Reads a bundle, verifying its header, hash and shapes; returns it with its payload's
    /// SHA-256 (hex).
    pub fn decode(bytes: &[u8]) -> Result<(Self, String), BundleError> {
        let (payload, expected) = verified_payload(bytes)?;
        let (bundle, rest) = postcard::take_from_bytes::<Bundle>(payload)
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(BundleError::Malformed(format!(
                "{} bytes after the bundle inside its payload",
                rest.len()
            )));
        }
        bundle.check()?;
        Ok((bundle, expected))
    }
}

/// The payload of `bytes` once the header is valid and the hash matches, and that hash.
fn verified_payload(bytes: &[u8]) -> Result<(&[u8], String), BundleError> {
    let truncated = |expected: usize| BundleError::Truncated {
        expected: expected as u64,
        got: bytes.len() as u64,
    };
    let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(if BUNDLE_MAGIC.starts_with(bytes) {
            truncated(BUNDLE_HEADER_LEN)
        } else {
            BundleError::BadMagic {
                found: bytes.to_vec(),
            }
        });
    };
    if *magic != BUNDLE_MAGIC {
        return Err(BundleError::BadMagic {
            found: magic.to_vec(),
        });
    }
    let (version, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| truncated(BUNDLE_HEADER_LEN))?;
    let version = u32::from_le_bytes(*version);
    if version != BUNDLE_VERSION {
        return Err(BundleError::UnsupportedVersion {
            found: version,
            supported: BUNDLE_VERSION,
        });
    }
    let (len, rest) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| truncated(BUNDLE_HEADER_LEN))?;
    let (digest, payload) = rest
        .split_first_chunk::<32>()
        .ok_or_else(|| truncated(BUNDLE_HEADER_LEN))?;
    let len = u64::from_le_bytes(*len);
    let have = payload.len() as u64;
    if have < len {
        return Err(BundleError::Truncated {
            expected: (BUNDLE_HEADER_LEN as u64).saturating_add(len),
            got: bytes.len() as u64,
        });
    }
    if have > len {
        return Err(BundleError::TrailingBytes { extra: have - len });
    }
    let expected = hex::encode(digest);
    let actual = hex::encode(Sha256::digest(payload));
    if actual != expected {
        return Err(BundleError::HashMismatch { expected, actual });
    }
    Ok((payload, expected))
}

fn finite(what: &str, values: &[f32]) -> Result<(), BundleError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(BundleError::NotFinite {
            what: what.to_string(),
            index,
        }),
        None => Ok(()),
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        Bundle {
            device: "pi-9".into(),
            model: ModelDescription {
                embedding_dim: 4,
                classes: vec!["a".into(), "b".into()],
                experts: 3,
                k: 2,
                gate_hidden: 2,
                expert_hidden: 2,
                common_expert_sha256: String::new(),
            },
            round: 7,
            global_model_sha256: "ab".repeat(32),
            common_expert: CommonExpertRef {
                sha256: "cd".repeat(32),
                input_size: [64, 64],
            },
            gate: (0..16).map(|i| i as f32 / 16.0).collect(),
            experts: vec![(2, vec![0.5; 10]), (0, vec![-0.25; 10])],
            scores: vec![0.3, 0.1, 0.6],
            samples: 120,
        }
    }

    #[test]
    fn bundles_round_trip_with_their_hash() {
        let original = bundle();
        let (bytes, sha) = original.encode().unwrap();
        assert_eq!(&bytes[..8], b"DDOMEBDL");
        assert_eq!(sha.len(), 64);
        assert_eq!(hex::encode(&bytes[20..52]), sha);
        let (decoded, decoded_sha) = Bundle::decode(&bytes).unwrap();
        assert_eq!(decoded, original);
        assert_eq!(decoded_sha, sha);
        assert_eq!(decoded.expert_indices(), [2, 0]);
    }

    #[test]
    fn a_flipped_payload_byte_or_header_hash_is_a_hash_mismatch() {
        let (bytes, sha) = bundle().encode().unwrap();
        let mut payload_flip = bytes.clone();
        *payload_flip.last_mut().unwrap() ^= 0x01;
        let mut hash_flip = bytes.clone();
        hash_flip[30] ^= 0x80;
        for corrupt in [payload_flip, hash_flip] {
            match Bundle::decode(&corrupt) {
                Err(BundleError::HashMismatch { expected, actual }) => {
                    assert_ne!(expected, actual);
                    assert!(expected == sha || actual == sha);
                }
                other => panic!("expected a hash mismatch, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let (bytes, _) = bundle().encode().unwrap();
        for len in 0..bytes.len() {
            match Bundle::decode(&bytes[..len]) {
                Err(BundleError::Truncated { expected, got }) => {
                    assert_eq!(got, len as u64);
                    assert!(expected > got);
                }
                other => panic!("{len} bytes: expected truncated, got {other:?}"),
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Bundle::decode(&longer).unwrap_err(),
            BundleError::TrailingBytes { extra: 1 }
        );
    }

    #[test]
    fn another_version_or_magic_is_refused_by_name() {
        let (bytes, _) = bundle().encode().unwrap();
        let mut v2 = bytes.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            Bundle::decode(&v2).unwrap_err(),
            BundleError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        let mut other = bytes.clone();
        other[..8].copy_from_slice(b"GIF89a\0\0");
        assert!(matches!(
            Bundle::decode(&other),
            Err(BundleError::BadMagic { .. })
        ));
        let err = Bundle::decode(b"PK\x03\x04").unwrap_err();
        assert!(matches!(err, BundleError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn inconsistent_shapes_are_refused_on_encode_and_decode() {
        type Mutation = Box<dyn Fn(&mut Bundle)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|b| {
                    b.scores.pop();
                }),
                "scores",
            ),
            (Box::new(|b| b.experts[0].0 = 3), "expert 3"),
            (Box::new(|b| b.experts[1].0 = 2), "twice"),
            (
                Box::new(|b| {
                    b.experts[1].1.pop();
                }),
                "parameters",
            ),
            (Box::new(|b| b.experts.clear()), "0 experts"),
            (Box::new(|b| b.gate.clear()), "gate"),
            (Box::new(|b| b.common_expert.sha256 = "x".into()), "hex"),
        ];
        for (mutate, needle) in cases {
            let mut b = bundle();
            mutate(&mut b);
            let err = b.encode().unwrap_err();
            assert!(matches!(err, BundleError::Shape(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
            // The same bundle written by a buggy encoder, with a valid hash.
            let payload = postcard::to_allocvec(&b).unwrap();
            let mut bytes = BUNDLE_MAGIC.to_vec();
            bytes.extend_from_slice(&BUNDLE_VERSION.to_le_bytes());
            bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&Sha256::digest(&payload));
            bytes.extend_from_slice(&payload);
            assert_eq!(Bundle::decode(&bytes).unwrap_err(), err);
        }
        let mut b = bundle();
        b.experts[1].1[4] = f32::NAN;
        assert_eq!(
            b.encode().unwrap_err(),
            BundleError::NotFinite {
                what: "expert 0".into(),
                index: 4
            }
        );
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (bytes, _) = bundle().encode().unwrap();
        for len in 0..300 {
            let mut garbage = vec![0u8; len];
            rng.fill_bytes(&mut garbage);
            assert!(Bundle::decode(&garbage).is_err());
            // A valid header over a random payload with its true hash: postcard must cope.
            let mut forged = bytes[..12].to_vec();
            forged.extend_from_slice(&(len as u64).to_le_bytes());
            forged.extend_from_slice(&Sha256::digest(&garbage));
            forged.extend_from_slice(&garbage);
            let _ = Bundle::decode(&forged);
        }
    }
}
