//! Compression of parameter deltas for upload: lossless f32, IEEE half, block-wise int8, and
//! top-k sparsification over any of the three.
//!
//! [`encode`] turns a flat delta into an [`EncodedDelta`], a value to postcard-encode as is;
//! [`EncodedDelta::decode`] checks every field against the length the receiver expects and
//! rebuilds the dense delta. [`ErrorFeedback`] keeps, per parameter set, what compression left
//! out and adds it to the next delta of that set, so a lossy codec delays information rather
//! than losing it.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;

use half::f16;
use serde::{Deserialize, Serialize};

/// Int8 block length when none is given.
///
/// 256 so that an int8 update is at least 3.9× smaller than the f32 one: a value costs one
/// byte plus its block's share of a 4-byte f32 scale, 1 + 4/B bytes against 4, which is
/// 3.76× at B = 64, 3.88× at 128 and 3.94× at 256. Scales stay f32 rather than f16 (which
/// would meet the bound at 128): a delta's magnitudes (learning rate × gradient) often lie
/// below f16's normal range (6.1e-5), where an f16 scale loses precision or flushes to zero.
pub const DEFAULT_INT8_BLOCK: u32 = 256;

/// Largest int8 block accepted, in a config or on the wire.
pub const MAX_INT8_BLOCK: u32 = 65_536;

/// Largest magnitude f16 holds; larger values saturate to it rather than become infinite.
const F16_MAX: f32 = 65_504.0;

/// How the sent values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueCodec {
    /// Lossless: 4 bytes a value.
    F32,
    /// IEEE binary16, rounded to nearest: 2 bytes a value, relative error at most 2^-11 in
    /// f16's normal range; magnitudes beyond 65504 saturate.
    F16,
    /// One byte a value plus one f32 scale per `block` consecutive values; a value's error is
    /// at most half its block's scale (the block's largest magnitude / 127).
    Int8 {
        /// Values per scale, 1 to [`MAX_INT8_BLOCK`].
        block: u32,
    },
}

/// What a device does to a delta before uploading it.
///
/// Written, in TOML, on the command line and on the wire (serde), as text: a value codec
/// (`f32`, `f16`, `int8`, `int8:<block>`) optionally followed by `+topk:<fraction>`, e.g.
/// `int8+topk:0.1`. Deserialising validates, so a config read from anywhere is usable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecConfig {
    /// How the sent values are written.
    pub values: ValueCodec,
    /// Top-k sparsification: the fraction of entries sent, in (0, 1]; `None` sends all.
    pub top_k: Option<f32>,
}

impl CodecConfig {
    /// Every value as a raw f32; the default.
    pub const LOSSLESS: Self = Self {
        values: ValueCodec::F32,
        top_k: None,
    };

    /// Every value as an IEEE half.
    pub const F16: Self = Self {
        values: ValueCodec::F16,
        top_k: None,
    };

    /// Every value as int8 in blocks of [`DEFAULT_INT8_BLOCK`].
    pub const fn int8() -> Self {
        Self {
            values: ValueCodec::Int8 {
                block: DEFAULT_INT8_BLOCK,
            },
            top_k: None,
        }
    }

    /// The `fraction` largest-magnitude values as int8 in blocks of [`DEFAULT_INT8_BLOCK`].
    pub const fn int8_top_k(fraction: f32) -> Self {
        Self::int8().with_top_k(fraction)
    }

    /// This config, sending only the `fraction` largest-magnitude values.
    pub const fn with_top_k(self, fraction: f32) -> Self {
        Self {
            values: self.values,
            top_k: Some(fraction),
        }
    }

    /// Checks the top-k fraction lies in (0, 1] and the int8 block in 1..=[`MAX_INT8_BLOCK`].
    pub fn validate(&self) -> Result<(), CodecConfigError> {
        if let Some(fraction) = self.top_k {
            // Written so that NaN fails too.
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(CodecConfigError::TopKFraction(fraction));
            }
        }
        if let ValueCodec::Int8 { block } = self.values {
            check_block(block).map_err(CodecConfigError::Int8Block)?;
        }
        Ok(())
    }
}

impl Default for CodecConfig {
    /// [`CodecConfig::LOSSLESS`]: compression is an experiment's explicit choice.
    fn default() -> Self {
        Self::LOSSLESS
    }
}

fn check_block(block: u32) -> Result<usize, u32> {
    if (1..=MAX_INT8_BLOCK).contains(&block) {
        Ok(block as usize)
    } else {
        Err(block)
    }
}

impl fmt::Display for ValueCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => f.write_str("f32"),
            Self::F16 => f.write_str("f16"),
            Self::Int8 {
                block: DEFAULT_INT8_BLOCK,
            } => f.write_str("int8"),
            Self::Int8 { block } => write!(f, "int8:{block}"),
        }
    }
}

impl fmt::Display for CodecConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.values)?;
        if let Some(fraction) = self.top_k {
            // f32's Display is the shortest text that parses back to the same value.
            write!(f, "+topk:{fraction}")?;
        }
        Ok(())
    }
}

impl FromStr for CodecConfig {
    type Err = CodecConfigError;

    /// Parses `f32`, `f16`, `int8` or `int8:<block>`, optionally followed by
    /// `+topk:<fraction>`, and validates the result.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = |reason| CodecConfigError::Syntax {
            input: text.to_owned(),
            reason,
        };
        let (base, top_k) = match text.split_once('+') {
            None => (text, None),
            Some((base, rest)) => {
                let fraction = rest
                    .strip_prefix("topk:")
                    .ok_or_else(|| syntax("only `topk:<fraction>` may follow `+`"))?;
                let fraction = fraction
                    .parse::<f32>()
                    .map_err(|_| syntax("the top-k fraction is not a number"))?;
                (base, Some(fraction))
            }
        };
        let values = match base.split_once(':') {
            None => match base {
                "f32" => ValueCodec::F32,
                "f16" => ValueCodec::F16,
                "int8" => ValueCodec::Int8 {
                    block: DEFAULT_INT8_BLOCK,
                },
                _ => return Err(syntax("the value codec is not f32, f16 or int8")),
            },
            Some(("int8", block)) => ValueCodec::Int8 {
                block: block
                    .parse()
                    .map_err(|_| syntax("the int8 block is not a whole number"))?,
            },
            Some(_) => return Err(syntax("only int8 takes a parameter (its block length)")),
        };
        let config = Self { values, top_k };
        config.validate()?;
        Ok(config)
    }
}

impl Serialize for CodecConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CodecConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A codec config that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecConfigError {
    /// The top-k fraction is NaN or outside (0, 1].
    #[error("top-k fraction {0} is outside (0, 1]")]
    TopKFraction(f32),
    /// The int8 block is 0 or larger than [`MAX_INT8_BLOCK`].
    #[error("int8 block of {0} values is outside 1..={MAX_INT8_BLOCK}")]
    Int8Block(u32),
    /// The text is not of the form `<codec>[:<block>][+topk:<fraction>]`.
    #[error(
        "cannot read codec {input:?}: {reason} (expected e.g. `f32`, `f16`, `int8`, \
         `int8:128`, `int8+topk:0.1`)"
    )]
    Syntax {
        /// The text given.
        input: String,
        /// What in it is wrong.
        reason: &'static str,
    },
}

/// A compressed delta as it travels; postcard-encode it as is.
///
/// Postcard writes bytes and f32s raw and integers as varints, so n sent values cost 4n bytes
/// as f32, 2n as f16 and n + 4⌈n/B⌉ as int8; top-k adds one varint gap per sent value (one
/// byte while gaps stay below 128, i.e. when more than about 1% of entries are sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncodedDelta {
    /// Length of the dense delta.
    pub len: u32,
    /// Top-k only: the sent indices, ascending, as gaps: the first index itself, then each
    /// index minus the one before (never 0). Gaps make small varints; indices would not.
    pub index_gaps: Option<Vec<u32>>,
    /// The sent values (all `len` of them, or one per index) in their encoding.
    pub values: EncodedValues,
}

/// The sent values of an [`EncodedDelta`], in index order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EncodedValues {
    /// Raw f32s.
    F32(Vec<f32>),
    /// IEEE halves, two little-endian bytes each: bytes because postcard would write `u16`s
    /// as varints, up to three bytes each.
    F16(Vec<u8>),
    /// Symmetric int8 with one scale per block of consecutive sent values.
    Int8 {
        /// Values per block (the last block may be shorter), 1 to [`MAX_INT8_BLOCK`].
        block: u32,
        /// One per block: its largest magnitude / 127, or 0 for an all-zero block.
        scales: Vec<f32>,
        /// round(x / scale) in [-127, 127]; a value decodes as `q × scale`.
        values: Vec<i8>,
    },
}

/// A delta that cannot be encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// The codec config is invalid.
    #[error(transparent)]
    Config(#[from] CodecConfigError),
    /// A value is NaN or infinite: training diverged, and no codec should hide it.
    #[error("delta value at index {index} is {value}; only finite values can be encoded")]
    NonFinite {
        /// Its index in the delta.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The delta has more values than the wire's u32 length can state.
    #[error(
        "a delta of {len} values is longer than the wire allows ({})",
        u32::MAX
    )]
    TooLong {
        /// Its length.
        len: usize,
    },
}

/// An [`EncodedDelta`] that is malformed or does not fit what the receiver expects.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The dense length is not the one the receiver expects.
    #[error("delta has {len} values but {expected} were expected")]
    LengthMismatch {
        /// Length on the wire.
        len: u32,
        /// Length the receiver expects.
        expected: usize,
    },
    /// The number of sent values does not match the length or the number of indices.
    #[error("{found} values were sent where {expected} were expected")]
    ValueCount {
        /// Values sent.
        found: usize,
        /// Values the length or the indices call for.
        expected: usize,
    },
    /// The f16 bytes are not whole values.
    #[error("f16 values take two bytes each but {bytes} bytes were sent")]
    OddF16Bytes {
        /// Bytes sent.
        bytes: usize,
    },
    /// The int8 block is 0 or larger than [`MAX_INT8_BLOCK`].
    #[error("int8 block of {block} values is outside 1..={MAX_INT8_BLOCK}")]
    Int8Block {
        /// The block on the wire.
        block: u32,
    },
    /// The number of int8 scales does not match the values and the block.
    #[error(
        "{values} int8 values in blocks of {block} need {expected} scales but {found} were sent"
    )]
    ScaleCount {
        /// Scales sent.
        found: usize,
        /// Scales needed.
        expected: usize,
        /// Values sent.
        values: usize,
        /// The block.
        block: u32,
    },
    /// An int8 scale is NaN, infinite or negative.
    #[error("int8 block {block} has scale {scale}")]
    BadScale {
        /// Which block, counting from 0.
        block: usize,
        /// Its scale.
        scale: f32,
    },
    /// An int8 value is -128, which the symmetric range [-127, 127] excludes.
    #[error("int8 value {position} is -128, outside [-127, 127]")]
    Int8OutOfRange {
        /// Its position among the sent values.
        position: usize,
    },
    /// There are more indices than entries.
    #[error("{count} sparse indices were sent for a delta of {len} values")]
    TooManyIndices {
        /// Indices sent.
        count: usize,
        /// Length of the delta.
        len: u32,
    },
    /// A gap other than the first is 0, so an index repeats.
    #[error("sparse index {position} repeats index {index}: indices must strictly increase")]
    IndexNotIncreasing {
        /// Its position among the indices.
        position: usize,
        /// The repeated index.
        index: u64,
    },
    /// The gaps add up to an index past the end (held in a u64, so it cannot overflow).
    #[error("sparse index {index} is beyond the delta length {len}")]
    IndexBeyondLength {
        /// The index the gaps add up to.
        index: u64,
        /// Length of the delta.
        len: u32,
    },
    /// A decoded value is NaN or infinite.
    #[error("decoded value at index {index} is {value}")]
    NonFinite {
        /// Its index in the dense delta.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// Compresses `delta` as `config` says, without error feedback (see [`ErrorFeedback`]).
///
/// Top-k sends the ⌈fraction × len⌉ entries of largest magnitude, the lower index first among
/// equals; when that is every entry it sends them densely, without indices.
pub fn encode(delta: &[f32], config: CodecConfig) -> Result<EncodedDelta, EncodeError> {
    config.validate()?;
    let len = u32::try_from(delta.len()).map_err(|_| EncodeError::TooLong { len: delta.len() })?;
    if let Some((index, &value)) = delta.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(EncodeError::NonFinite { index, value });
    }
    let kept = config
        .top_k
        .map(|fraction| kept_count(fraction, delta.len()));
    let (index_gaps, values) = match kept {
        Some(k) if k < delta.len() => {
            let indices = top_k_indices(delta, k);
            let gathered: Vec<f32> = indices.iter().map(|&i| delta[i as usize]).collect();
            // The first gap is the first index itself.
            let mut previous = 0;
            let gaps = indices
                .iter()
                .map(|&i| {
                    let gap = i - previous;
                    previous = i;
                    gap
                })
                .collect();
            (Some(gaps), encode_values(&gathered, config.values))
        }
        _ => (None, encode_values(delta, config.values)),
    };
    Ok(EncodedDelta {
        len,
        index_gaps,
        values,
    })
}

/// ⌈fraction × len⌉, at most `len`.
fn kept_count(fraction: f32, len: usize) -> usize {
    let exact = f64::from(fraction) * len as f64;
    let nearest = exact.round();
    // f32 holds most decimal fractions inexactly (0.1 is 0.100000001…), so 0.1 × 330,000
    // comes out as 33,000.0005: a product within a millionth of an integer counts as it.
    let k = if (exact - nearest).abs() <= exact * 1e-6 {
        nearest
    } else {
        exact.ceil()
    };
    (k as usize).min(len)
}

/// The indices of the `k` largest magnitudes (lower index first among equals), ascending.
fn top_k_indices(delta: &[f32], k: usize) -> Vec<u32> {
    // `encode` has checked that every index fits in u32.
    let mut order: Vec<u32> = (0..delta.len() as u32).collect();
    if k < order.len() {
        // A total order (values are finite), so the selection is deterministic.
        order.select_nth_unstable_by(k, |&a, &b| {
            let (ma, mb) = (delta[a as usize].abs(), delta[b as usize].abs());
            mb.total_cmp(&ma).then(a.cmp(&b))
        });
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

fn encode_values(values: &[f32], codec: ValueCodec) -> EncodedValues {
    match codec {
        ValueCodec::F32 => EncodedValues::F32(values.to_vec()),
        ValueCodec::F16 => EncodedValues::F16(
            values
                .iter()
                .flat_map(|&v| f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_le_bytes())
                .collect(),
        ),
        ValueCodec::Int8 { block } => {
            let mut scales = Vec::with_capacity(values.len().div_ceil(block as usize));
            let mut quantised = Vec::with_capacity(values.len());
            for chunk in values.chunks(block as usize) {
                let max = chunk.iter().fold(0.0_f32, |m, v| m.max(v.abs()));
                let mut scale = max / 127.0;
                // Near f32::MAX, 127 × scale can round up to infinity; keep every decoded
                // value finite so that what we send always decodes.
                while !(127.0 * scale).is_finite() {
                    scale = scale.next_down();
                }
                scales.push(scale);
                if scale == 0.0 {
                    // All zero (or too small for a nonzero scale): nothing to send.
                    quantised.extend(std::iter::repeat_n(0, chunk.len()));
                } else {
                    quantised.extend(
                        chunk
                            .iter()
                            .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8),
                    );
                }
            }
            EncodedValues::Int8 {
                block,
                scales,
                values: quantised,
            }
        }
    }
}

impl EncodedDelta {
    /// Rebuilds the dense delta, checking every field first.
    ///
    /// `expected_len` is the receiver's own length for this parameter set, never one read
    /// from the wire: the output is the only allocation that depends on it, and it is made
    /// only once the wire length matches. Never panics.
    pub fn decode(&self, expected_len: usize) -> Result<Vec<f32>, DecodeError> {
        if usize::try_from(self.len) != Ok(expected_len) {
            return Err(DecodeError::LengthMismatch {
                len: self.len,
                expected: expected_len,
            });
        }
        let Some(gaps) = &self.index_gaps else {
            let dense = self.values.decode(expected_len)?;
            if let Some((index, &value)) = dense.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(DecodeError::NonFinite { index, value });
            }
            return Ok(dense);
        };
        if gaps.len() > expected_len {
            return Err(DecodeError::TooManyIndices {
                count: gaps.len(),
                len: self.len,
            });
        }
        let sent = self.values.decode(gaps.len())?;
        let mut dense = vec![0.0; expected_len];
        let mut index = 0_u64;
        for (position, (&gap, &value)) in gaps.iter().zip(&sent).enumerate() {
            if position > 0 && gap == 0 {
                return Err(DecodeError::IndexNotIncreasing { position, index });
            }
            // Both terms are at most u32::MAX, so the sum fits in a u64.
            index += u64::from(gap);
            let slot = usize::try_from(index)
                .ok()
                .and_then(|i| dense.get_mut(i))
                .ok_or(DecodeError::IndexBeyondLength {
                    index,
                    len: self.len,
                })?;
            if !value.is_finite() {
                return Err(DecodeError::NonFinite {
                    index: index as usize,
                    value,
                });
            }
            *slot = value;
        }
        Ok(dense)
    }

    /// Size of this delta's postcard encoding, in bytes.
    pub fn wire_len(&self) -> usize {
        postcard::experimental::serialized_size(self)
            .expect("sizing a postcard encoding cannot fail: it writes to no buffer")
    }
}

impl EncodedValues {
    /// The `count` sent values as f32s, checking counts, block and scales (not finiteness,
    /// which the caller checks where it knows the dense index).
    fn decode(&self, count: usize) -> Result<Vec<f32>, DecodeError> {
        let check_count = |found| {
            if found == count {
                Ok(())
            } else {
                Err(DecodeError::ValueCount {
                    found,
                    expected: count,
                })
            }
        };
        match self {
            Self::F32(values) => {
                check_count(values.len())?;
                Ok(values.clone())
            }
            Self::F16(bytes) => {
                if bytes.len() % 2 != 0 {
                    return Err(DecodeError::OddF16Bytes { bytes: bytes.len() });
                }
                check_count(bytes.len() / 2)?;
                Ok(bytes
                    .chunks_exact(2)
                    .map(|pair| f16::from_le_bytes([pair[0], pair[1]]).to_f32())
                    .collect())
            }
            Self::Int8 {
                block,
                scales,
                values,
            } => {
                let size = check_block(*block).map_err(|block| DecodeError::Int8Block { block })?;
                check_count(values.len())?;
                let expected = values.len().div_ceil(size);
                if scales.len() != expected {
                    return Err(DecodeError::ScaleCount {
                        found: scales.len(),
                        expected,
                        values: values.len(),
                        block: *block,
                    });
                }
                if let Some((block, &scale)) = scales
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !(s.is_finite() && **s >= 0.0))
                {
                    return Err(DecodeError::BadScale { block, scale });
                }
                if let Some(position) = values.iter().position(|&q| q == i8::MIN) {
                    return Err(DecodeError::Int8OutOfRange { position });
                }
                Ok(values
                    .chunks(size)
                    .zip(scales)
                    .flat_map(|(chunk, &scale)| chunk.iter().map(move |&q| f32::from(q) * scale))
                    .collect())
            }
        }
    }
}

/// Error feedback: per parameter set (a key such as the gate or one expert), what the codec
/// has not yet delivered, added to that set's next delta before encoding.
///
/// After each [`encode`](Self::encode), residual = delta + previous residual − decoded, so
/// over any number of rounds the decoded deltas plus the residual sum to the raw deltas.
///
/// Over a network an upload may never be applied (the link drops, the round closes first),
/// and then its residual is wrong: what it "delivered" was lost. So a device
/// [`stage`](Self::stage)s each upload's residuals, and [`commit`](Self::commit)s them once
/// the receiver confirms the upload or [`discard`](Self::discard)s them, which leaves the
/// residuals as they were before that upload.
#[derive(Debug, Clone)]
pub struct ErrorFeedback<K = String> {
    residuals: HashMap<K, Vec<f32>>,
    /// Residuals of encodings not yet confirmed; they replace `residuals` on commit.
    staged: HashMap<K, Vec<f32>>,
}

impl<K> Default for ErrorFeedback<K> {
    fn default() -> Self {
        Self {
            residuals: HashMap::new(),
            staged: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash> ErrorFeedback<K> {
    /// No residuals yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `delta` plus the residual held for `key`, and keeps what this encoding leaves
    /// out as the new residual. A residual of another length (the parameter set was resized)
    /// is dropped. On error the held residual is left as it was.
    pub fn encode(
        &mut self,
        key: K,
        delta: &[f32],
        config: CodecConfig,
    ) -> Result<EncodedDelta, EncodeError>
    where
        K: Clone,
    {
        let encoded = self.stage(key.clone(), delta, config)?;
        if let Some(residual) = self.staged.remove(&key) {
            self.residuals.insert(key, residual);
        }
        Ok(encoded)
    }

    /// Encodes like [`encode`](Self::encode), from the committed residual, but keeps the new
    /// residual aside until [`commit`](Self::commit); staging `key` again replaces it.
    pub fn stage(
        &mut self,
        key: K,
        delta: &[f32],
        config: CodecConfig,
    ) -> Result<EncodedDelta, EncodeError> {
        let mut carried = match self.residuals.get(&key) {
            Some(residual) if residual.len() == delta.len() => {
                delta.iter().zip(residual).map(|(d, r)| d + r).collect()
            }
            _ => delta.to_vec(),
        };
        let encoded = encode(&carried, config)?;
        let sent = encoded
            .decode(carried.len())
            .expect("what `encode` produces decodes: lengths match and values stay finite");
        for (c, s) in carried.iter_mut().zip(&sent) {
            *c -= s;
        }
        self.staged.insert(key, carried);
        Ok(encoded)
    }

    /// Whether some staged residual awaits [`commit`](Self::commit) or
    /// [`discard`](Self::discard).
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// The staged encodings were delivered: their residuals become the held ones.
    pub fn commit(&mut self) {
        self.residuals.extend(self.staged.drain());
    }

    /// The staged encodings were not delivered: forget their residuals, keeping the ones
    /// held before.
    pub fn discard(&mut self) {
        self.staged.clear();
    }

    /// What has not yet been delivered for `key`.
    pub fn residual<Q>(&self, key: &Q) -> Option<&[f32]>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.residuals.get(key).map(Vec::as_slice)
    }

    /// Drops and returns the held residual for `key`, and drops any staged one.
    pub fn forget<Q>(&mut self, key: &Q) -> Option<Vec<f32>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.staged.remove(key);
        self.residuals.remove(key)
    }

    /// Drops every residual, staged or held.
    pub fn clear(&mut self) {
        self.residuals.clear();
        self.staged.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Values in a realistic upload: the gate's or one expert's parameters.
    const LEN: usize = 330_000;

    /// Normal values with standard deviation 1e-3, like an SGD step (Box–Muller).
    fn normal_delta(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..len)
            .map(|_| {
                let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                let u2: f32 = rng.random();
                1e-3 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    fn int8_with_block(block: u32) -> CodecConfig {
        CodecConfig {
            values: ValueCodec::Int8 { block },
            top_k: None,
        }
    }

    /// Encodes, sends through postcard bytes, decodes.
    fn round_trip(delta: &[f32], config: CodecConfig) -> Vec<f32> {
        let encoded = encode(delta, config).unwrap();
        let bytes = postcard::to_stdvec(&encoded).unwrap();
        assert_eq!(bytes.len(), encoded.wire_len());
        let received: EncodedDelta = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(received, encoded);
        received.decode(delta.len()).unwrap()
    }

    #[test]
    fn f32_round_trip_is_bit_identical() {
        let mut delta = normal_delta(1000, 1);
        delta.extend([0.0, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, f32::MIN]);
        for config in [CodecConfig::LOSSLESS, CodecConfig::LOSSLESS.with_top_k(1.0)] {
            let back = round_trip(&delta, config);
            assert_eq!(back.len(), delta.len());
            assert!(
                delta
                    .iter()
                    .zip(&back)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
        assert!(round_trip(&[], CodecConfig::LOSSLESS).is_empty());
        assert!(round_trip(&[], CodecConfig::int8_top_k(0.1)).is_empty());
    }

    #[test]
    fn f16_relative_error_is_at_most_2_pow_minus_11() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // Log-uniform magnitudes across f16's normal range [2^-14, 65504], both signs.
        let delta: Vec<f32> = (0..100_000)
            .map(|_| {
                let magnitude = rng.random_range(-14.0_f32..15.9).exp2();
                if rng.random() { magnitude } else { -magnitude }
            })
            .collect();
        let back = round_trip(&delta, CodecConfig::F16);
        let worst = delta
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) / a).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 2.0_f32.powi(-11), "worst relative error {worst}");
        assert!(
            worst > 2.0_f32.powi(-12),
            "values went through f16: {worst}"
        );
    }

    #[test]
    fn f16_saturates_beyond_its_range() {
        let back = round_trip(&[1e6, -1e6, 65_504.0, 70_000.0], CodecConfig::F16);
        assert_eq!(back, [65_504.0, -65_504.0, 65_504.0, 65_504.0]);
    }

    #[test]
    fn int8_error_is_at_most_half_the_block_scale() {
        for block in [1, 64, DEFAULT_INT8_BLOCK, 1000] {
            // 10,007 values: no block divides it, so the last block is short.
            let mut delta = normal_delta(10_007, 3);
            let b = block as usize;
            delta[2 * b..3 * b].fill(0.0);
            let encoded = encode(&delta, int8_with_block(block)).unwrap();
            let EncodedValues::Int8 { scales, .. } = &encoded.values else {
                panic!("int8 config gave {:?}", encoded.values);
            };
            assert_eq!(scales.len(), delta.len().div_ceil(b));
            assert_eq!(scales[2], 0.0, "an all-zero block has scale 0");
            let back = round_trip(&delta, int8_with_block(block));
            for (i, (a, b)) in delta.iter().zip(&back).enumerate() {
                let scale = scales[i / block as usize];
                // Half a step, plus float rounding in x / scale and q × scale.
                assert!(
                    (a - b).abs() <= scale * (0.5 + 1e-4),
                    "block {block}, index {i}: {a} came back as {b} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn int8_keeps_extreme_magnitudes_finite() {
        let delta = [f32::MAX, -f32::MAX, 1e30, 0.0];
        let back = round_trip(&delta, CodecConfig::int8());
        assert!(back.iter().all(|v| v.is_finite()), "{back:?}");
        assert!((back[0] / f32::MAX - 1.0).abs() < 1e-6);
        assert_eq!(back[1], -back[0]);
    }

    #[test]
    fn top_k_sends_exactly_the_largest_magnitudes() {
        let delta = normal_delta(10_000, 4);
        let encoded = encode(&delta, CodecConfig::LOSSLESS.with_top_k(0.05)).unwrap();
        assert_eq!(encoded.index_gaps.as_ref().map(Vec::len), Some(500));
        let back = encoded.decode(delta.len()).unwrap();

        let mut by_magnitude: Vec<usize> = (0..delta.len()).collect();
        by_magnitude.sort_by(|&a, &b| delta[b].abs().total_cmp(&delta[a].abs()));
        let mut expected = by_magnitude[..500].to_vec();
        expected.sort_unstable();
        let sent: Vec<usize> = (0..delta.len()).filter(|&i| back[i] != 0.0).collect();
        assert_eq!(sent, expected);
        assert!(sent.iter().all(|&i| back[i] == delta[i]));
    }

    #[test]
    fn top_k_ties_go_to_the_lower_index() {
        // k = 3: both 2s, then one of the three 1s in magnitude: the one at index 0.
        let delta = [1.0, -2.0, -1.0, 1.0, 2.0];
        let encoded = encode(&delta, CodecConfig::LOSSLESS.with_top_k(0.6)).unwrap();
        assert_eq!(encoded.index_gaps, Some(vec![0, 1, 3]));
        assert_eq!(encoded.decode(5).unwrap(), [1.0, -2.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn kept_count_is_the_ceiling_of_the_decimal_product() {
        assert_eq!(kept_count(0.1, 330_000), 33_000);
        assert_eq!(kept_count(0.1, 330_001), 33_001);
        assert_eq!(kept_count(0.05, 330_000), 16_500);
        assert_eq!(kept_count(0.6, 5), 3);
        assert_eq!(kept_count(1e-9, 330_000), 1);
        assert_eq!(kept_count(1.0, 330_000), 330_000);
        assert_eq!(kept_count(0.5, 0), 0);
    }

    #[test]
    fn top_k_of_every_entry_is_sent_densely() {
        let encoded = encode(&[1.0, 2.0, 3.0], CodecConfig::int8_top_k(1.0)).unwrap();
        assert_eq!(encoded.index_gaps, None);
    }

    #[test]
    fn wire_sizes_for_a_330k_delta() {
        let delta = normal_delta(LEN, 5);
        let size = |text: &str| encode(&delta, text.parse().unwrap()).unwrap().wire_len();
        let f32_size = size("f32");
        println!("{LEN} values; postcard bytes and ratio to f32:");
        for text in [
            "f32",
            "f16",
            "int8:64",
            "int8:128",
            "int8",
            "f32+topk:0.1",
            "f16+topk:0.1",
            "int8+topk:0.1",
            "int8+topk:0.01",
        ] {
            let bytes = size(text);
            println!(
                "  {text:>15}: {bytes:>9} bytes, {:.3}×",
                f32_size as f64 / bytes as f64
            );
        }
        assert_eq!(f32_size, 4 * LEN + 8, "4 bytes a value plus a small header");
        let ratio = |text| f32_size as f64 / size(text) as f64;
        assert!(
            ratio("int8") >= 3.9,
            "int8 is only {:.3}× smaller",
            ratio("int8")
        );
        assert!(
            (1.99..=2.01).contains(&ratio("f16")),
            "f16 {:.3}×",
            ratio("f16")
        );
        // 10% of the values, with one-byte gaps: about 2 bytes a sent value against 1 + 4/256.
        let sparse = size("int8+topk:0.1");
        assert!(sparse * 4 < size("int8"), "int8+topk:0.1 is {sparse} bytes");
    }

    #[test]
    fn error_feedback_loses_nothing_over_rounds() {
        let len = 5_000;
        for text in ["int8+topk:0.1", "f16+topk:0.02", "int8:64", "f16"] {
            let config: CodecConfig = text.parse().unwrap();
            let mut feedback = ErrorFeedback::new();
            let mut raw = vec![0.0_f64; len];
            let mut decoded = vec![0.0_f64; len];
            for round in 0..8 {
                let delta = normal_delta(len, 100 + round);
                let encoded = feedback
                    .encode("expert 3".to_owned(), &delta, config)
                    .unwrap();
                let sent = encoded.decode(len).unwrap();
                for i in 0..len {
                    raw[i] += f64::from(delta[i]);
                    decoded[i] += f64::from(sent[i]);
                }
            }
            let residual = feedback.residual("expert 3").unwrap();
            assert!(
                residual.iter().any(|&r| r != 0.0),
                "{text}: lossy codecs leave a residual"
            );
            let worst = (0..len)
                .map(|i| (raw[i] - decoded[i] - f64::from(residual[i])).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-7, "{text}: sums differ by up to {worst}");
        }
    }

    #[test]
    fn staged_residuals_count_only_once_committed() {
        let mut feedback = ErrorFeedback::new();
        let half = CodecConfig::LOSSLESS.with_top_k(0.5);
        feedback
            .encode("gate", &[1.0, 2.0, 3.0, 4.0], half)
            .unwrap();
        let held = [1.0, 2.0, 0.0, 0.0];

        // An upload that was lost: its residual is discarded, the held one stays, and the
        // next encoding starts from it as if the lost upload had never been made.
        let lost = feedback.stage("gate", &[0.0, 0.0, 0.0, 9.0], half).unwrap();
        assert_eq!(lost.decode(4).unwrap(), [0.0, 2.0, 0.0, 9.0]);
        assert!(feedback.has_staged());
        assert_eq!(feedback.residual("gate"), Some(&held[..]));
        feedback.discard();
        assert!(!feedback.has_staged());
        assert_eq!(feedback.residual("gate"), Some(&held[..]));

        // A confirmed upload: its residual replaces the held one.
        let sent = feedback.stage("gate", &[0.0, 0.0, 0.0, 5.0], half).unwrap();
        assert_eq!(sent.decode(4).unwrap(), [0.0, 2.0, 0.0, 5.0]);
        let other = feedback.stage("expert 1", &[4.0, 1.0], half).unwrap();
        assert_eq!(other.decode(2).unwrap(), [4.0, 0.0]);
        feedback.commit();
        assert!(!feedback.has_staged());
        assert_eq!(feedback.residual("gate"), Some(&[1.0, 0.0, 0.0, 0.0][..]));
        assert_eq!(feedback.residual("expert 1"), Some(&[0.0, 1.0][..]));
    }

    #[test]
    fn error_feedback_adds_the_residual_and_resets_when_the_length_changes() {
        let mut feedback = ErrorFeedback::new();
        let half = CodecConfig::LOSSLESS.with_top_k(0.5);
        feedback
            .encode("gate", &[1.0, 2.0, 3.0, 4.0], half)
            .unwrap();
        assert_eq!(feedback.residual("gate"), Some(&[1.0, 2.0, 0.0, 0.0][..]));

        // The residual is added to the next delta, so what was held back goes out now.
        let encoded = feedback.encode("gate", &[0.0; 4], half).unwrap();
        assert_eq!(encoded.decode(4).unwrap(), [1.0, 2.0, 0.0, 0.0]);
        assert_eq!(feedback.residual("gate"), Some(&[0.0; 4][..]));

        // A delta of another length starts afresh.
        feedback
            .encode("gate", &[1.0, 2.0, 3.0, 4.0], half)
            .unwrap();
        let encoded = feedback.encode("gate", &[0.5, 0.25], half).unwrap();
        assert_eq!(encoded.decode(2).unwrap(), [0.5, 0.0]);
        assert_eq!(feedback.residual("gate"), Some(&[0.0, 0.25][..]));

        // Keys are independent, and can be forgotten.
        assert_eq!(feedback.residual("expert 0"), None);
        assert_eq!(feedback.forget("gate"), Some(vec![0.0, 0.25]));
        assert_eq!(feedback.residual("gate"), None);
    }

    #[test]
    fn error_feedback_keeps_the_residual_when_encoding_fails() {
        let mut feedback = ErrorFeedback::new();
        let half = CodecConfig::LOSSLESS.with_top_k(0.5);
        feedback.encode(7_u32, &[1.0, 2.0, 3.0, 4.0], half).unwrap();
        let err = feedback.encode(7, &[0.0, f32::NAN, 0.0, 0.0], half);
        assert!(matches!(err, Err(EncodeError::NonFinite { index: 1, .. })));
        assert_eq!(feedback.residual(&7), Some(&[1.0, 2.0, 0.0, 0.0][..]));
    }

    #[test]
    fn encode_rejects_non_finite_values_and_bad_configs() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut delta = vec![0.5; 10];
            delta[7] = bad;
            for config in [CodecConfig::LOSSLESS, CodecConfig::F16, CodecConfig::int8()] {
                let err = encode(&delta, config).unwrap_err();
                assert!(
                    matches!(err, EncodeError::NonFinite { index: 7, value } if value.to_bits() == bad.to_bits()),
                    "{err:?}"
                );
                assert!(err.to_string().contains("index 7"), "{err}");
            }
        }
        assert_eq!(
            encode(&[1.0], CodecConfig::int8_top_k(0.0)),
            Err(EncodeError::Config(CodecConfigError::TopKFraction(0.0)))
        );
        assert_eq!(
            encode(&[1.0], int8_with_block(0)),
            Err(EncodeError::Config(CodecConfigError::Int8Block(0)))
        );
    }

    /// Applies `corrupt` to a fresh encoding of a 1000-value delta and decodes it.
    fn corrupted(config: &str, corrupt: impl FnOnce(&mut EncodedDelta)) -> DecodeError {
        let mut encoded = encode(&normal_delta(1000, 6), config.parse().unwrap()).unwrap();
        corrupt(&mut encoded);
        encoded.decode(1000).unwrap_err()
    }

    fn f32_values(encoded: &mut EncodedDelta) -> &mut Vec<f32> {
        match &mut encoded.values {
            EncodedValues::F32(values) => values,
            other => panic!("expected f32 values, got {other:?}"),
        }
    }

    fn f16_bytes(encoded: &mut EncodedDelta) -> &mut Vec<u8> {
        match &mut encoded.values {
            EncodedValues::F16(bytes) => bytes,
            other => panic!("expected f16 values, got {other:?}"),
        }
    }

    fn int8_parts(encoded: &mut EncodedDelta) -> (&mut u32, &mut Vec<f32>, &mut Vec<i8>) {
        match &mut encoded.values {
            EncodedValues::Int8 {
                block,
                scales,
                values,
            } => (block, scales, values),
            other => panic!("expected int8 values, got {other:?}"),
        }
    }

    #[test]
    fn every_decode_error_is_reported_by_name() {
        let encoded = encode(&normal_delta(1000, 6), CodecConfig::LOSSLESS).unwrap();
        let err = encoded.decode(999).unwrap_err();
        assert_eq!(
            err,
            DecodeError::LengthMismatch {
                len: 1000,
                expected: 999
            }
        );
        assert_eq!(
            err.to_string(),
            "delta has 1000 values but 999 were expected"
        );

        let err = corrupted("f32", |e| {
            f32_values(e).pop();
        });
        assert_eq!(
            err,
            DecodeError::ValueCount {
                found: 999,
                expected: 1000
            }
        );
        let err = corrupted("f16", |e| f16_bytes(e).push(0));
        assert_eq!(err, DecodeError::OddF16Bytes { bytes: 2001 });
        let err = corrupted("f16", |e| f16_bytes(e).truncate(1998));
        assert_eq!(
            err,
            DecodeError::ValueCount {
                found: 999,
                expected: 1000
            }
        );
        // Top-k: one value per index.
        let err = corrupted("f32+topk:0.1", |e| {
            f32_values(e).pop();
        });
        assert_eq!(
            err,
            DecodeError::ValueCount {
                found: 99,
                expected: 100
            }
        );

        for block in [0, MAX_INT8_BLOCK + 1] {
            let err = corrupted("int8", |e| *int8_parts(e).0 = block);
            assert_eq!(err, DecodeError::Int8Block { block });
        }
        let err = corrupted("int8:64", |e| {
            int8_parts(e).1.pop();
        });
        assert_eq!(
            err,
            DecodeError::ScaleCount {
                found: 15,
                expected: 16,
                values: 1000,
                block: 64
            }
        );
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            let err = corrupted("int8:64", |e| int8_parts(e).1[3] = bad);
            assert!(
                matches!(err, DecodeError::BadScale { block: 3, scale } if scale.to_bits() == bad.to_bits()),
                "{err:?}"
            );
        }
        let err = corrupted("int8:64", |e| int8_parts(e).1[3] = f32::NAN);
        assert_eq!(err.to_string(), "int8 block 3 has scale NaN");
        let err = corrupted("int8", |e| int8_parts(e).2[5] = i8::MIN);
        assert_eq!(err, DecodeError::Int8OutOfRange { position: 5 });

        let err = corrupted("f32+topk:0.1", |e| {
            e.index_gaps.as_mut().unwrap().resize(1001, 1);
        });
        assert_eq!(
            err,
            DecodeError::TooManyIndices {
                count: 1001,
                len: 1000
            }
        );
        let err = corrupted("f32+topk:0.1", |e| e.index_gaps.as_mut().unwrap()[4] = 0);
        assert!(
            matches!(err, DecodeError::IndexNotIncreasing { position: 4, .. }),
            "{err:?}"
        );
        // The first gap is the first index itself, so 0 is fine there.
        let encoded = EncodedDelta {
            len: 3,
            index_gaps: Some(vec![0, 2]),
            values: EncodedValues::F32(vec![1.0, 2.0]),
        };
        assert_eq!(encoded.decode(3).unwrap(), [1.0, 0.0, 2.0]);

        let beyond = EncodedDelta {
            len: 330_000,
            index_gaps: Some(vec![812_345]),
            values: EncodedValues::F32(vec![1.0]),
        };
        let err = beyond.decode(330_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sparse index 812345 is beyond the delta length 330000"
        );
        // Gaps that would overflow a u32 are summed in a u64 and reported as such.
        let overflowing = EncodedDelta {
            len: 10,
            index_gaps: Some(vec![9, u32::MAX]),
            values: EncodedValues::F32(vec![1.0, 2.0]),
        };
        assert_eq!(
            overflowing.decode(10).unwrap_err(),
            DecodeError::IndexBeyondLength {
                index: 9 + u64::from(u32::MAX),
                len: 10
            }
        );

        let err = corrupted("f32", |e| f32_values(e)[17] = f32::NAN);
        assert!(
            matches!(err, DecodeError::NonFinite { index: 17, value } if value.is_nan()),
            "{err:?}"
        );
        let inf = f16::INFINITY.to_le_bytes();
        let err = corrupted("f16", |e| f16_bytes(e)[34..36].copy_from_slice(&inf));
        assert_eq!(
            err,
            DecodeError::NonFinite {
                index: 17,
                value: f32::INFINITY
            }
        );
        // A finite scale whose product with 127 is not.
        let err = corrupted("int8", |e| {
            let (_, scales, values) = int8_parts(e);
            scales[0] = f32::MAX;
            values[..256].fill(0);
            values[2] = 127;
        });
        assert_eq!(
            err,
            DecodeError::NonFinite {
                index: 2,
                value: f32::INFINITY
            }
        );
        // In a sparse delta the error names the dense index.
        let sparse = EncodedDelta {
            len: 10,
            index_gaps: Some(vec![3, 4]),
            values: EncodedValues::F32(vec![1.0, f32::NEG_INFINITY]),
        };
        assert_eq!(
            sparse.decode(10).unwrap_err(),
            DecodeError::NonFinite {
                index: 7,
                value: f32::NEG_INFINITY
            }
        );
    }

    #[test]
    fn truncated_bytes_fail_to_parse() {
        for text in ["f32", "f16", "int8:8", "int8:8+topk:0.2", "f16+topk:0.5"] {
            let encoded = encode(&normal_delta(300, 7), text.parse().unwrap()).unwrap();
            let bytes = postcard::to_stdvec(&encoded).unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    postcard::from_bytes::<EncodedDelta>(&bytes[..cut]).is_err(),
                    "{text} cut to {cut} of {} bytes parsed",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn huge_claimed_lengths_fail_without_allocating_them() {
        const U32_MAX_VARINT: [u8; 5] = [0xff, 0xff, 0xff, 0xff, 0x0f];
        // len = u32::MAX, then Some(gaps) claiming u32::MAX gaps, with three bytes behind.
        let mut sparse = U32_MAX_VARINT.to_vec();
        sparse.push(1);
        sparse.extend(U32_MAX_VARINT);
        sparse.extend([1, 2, 3]);
        assert!(postcard::from_bytes::<EncodedDelta>(&sparse).is_err());
        // len = u32::MAX, None, F32 claiming u32::MAX values.
        let mut dense = U32_MAX_VARINT.to_vec();
        dense.extend([0, 0]);
        dense.extend(U32_MAX_VARINT);
        dense.extend([0; 8]);
        assert!(postcard::from_bytes::<EncodedDelta>(&dense).is_err());
        // A well-formed delta claiming u32::MAX entries parses, but the receiver's own length
        // decides, and a mismatch is found before anything is allocated.
        let claim = EncodedDelta {
            len: u32::MAX,
            index_gaps: Some(vec![]),
            values: EncodedValues::F32(vec![]),
        };
        let parsed: EncodedDelta =
            postcard::from_bytes(&postcard::to_stdvec(&claim).unwrap()).unwrap();
        assert!(matches!(
            parsed.decode(LEN),
            Err(DecodeError::LengthMismatch { .. })
        ));
        // Even when it matches, a dense delta's values are counted before the output exists.
        let dense_claim = EncodedDelta {
            index_gaps: None,
            ..claim
        };
        assert!(matches!(
            dense_claim.decode(u32::MAX as usize),
            Err(DecodeError::ValueCount { found: 0, .. })
        ));
    }

    #[test]
    fn garbage_and_corrupted_bytes_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (mut parsed, mut rejected) = (0, 0);
        let mut try_bytes = |bytes: &[u8], expected_len: usize| {
            if let Ok(delta) = postcard::from_bytes::<EncodedDelta>(bytes) {
                parsed += 1;
                if delta.decode(expected_len).is_err() {
                    rejected += 1;
                }
                if delta.len <= 4096 {
                    let _ = delta.decode(delta.len as usize);
                }
            }
        };
        for _ in 0..20_000 {
            let len = rng.random_range(0..48);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            try_bytes(&bytes, 16);
        }
        for text in ["f32+topk:0.3", "f16+topk:0.3", "int8:4+topk:0.3", "int8:4"] {
            let encoded = encode(&normal_delta(40, 9), text.parse().unwrap()).unwrap();
            let bytes = postcard::to_stdvec(&encoded).unwrap();
            for _ in 0..5_000 {
                let mut mutated = bytes.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..mutated.len());
                    mutated[at] = rng.random();
                }
                try_bytes(&mutated, 40);
            }
        }
        assert!(
            parsed > 1000 && rejected > 100,
            "{parsed} parsed, {rejected} rejected"
        );
    }

    #[test]
    fn config_text_round_trips() {
        for text in [
            "f32",
            "f16",
            "int8",
            "int8:128",
            "int8:64+topk:0.05",
            "int8+topk:0.1",
            "f16+topk:0.05",
            "f32+topk:0.1",
            "f32+topk:1",
        ] {
            let config: CodecConfig = text.parse().unwrap();
            assert_eq!(config.to_string(), text);
            let bytes = postcard::to_stdvec(&config).unwrap();
            assert_eq!(postcard::from_bytes::<CodecConfig>(&bytes).unwrap(), config);
        }
        assert_eq!("int8+topk:0.1".parse(), Ok(CodecConfig::int8_top_k(0.1)));
        assert_eq!("int8:256".parse(), Ok(CodecConfig::int8()));
        assert_eq!(CodecConfig::int8().to_string(), "int8");
        assert_eq!(CodecConfig::default(), CodecConfig::LOSSLESS);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for fraction in [0.0, -0.1, 1.5, f32::NAN, f32::INFINITY] {
            let err = CodecConfig::int8_top_k(fraction).validate().unwrap_err();
            assert!(
                matches!(err, CodecConfigError::TopKFraction(f) if f.to_bits() == fraction.to_bits())
            );
        }
        for block in [0, MAX_INT8_BLOCK + 1] {
            assert_eq!(
                int8_with_block(block).validate(),
                Err(CodecConfigError::Int8Block(block))
            );
        }
        for block in [1, MAX_INT8_BLOCK] {
            assert_eq!(int8_with_block(block).with_top_k(1.0).validate(), Ok(()));
        }

        for text in [
            "",
            "f64",
            "INT8",
            "int8:",
            "int8:abc",
            "int8:-1",
            "f16:3",
            "int8+top:0.1",
            "int8+topk:x",
            "int8+topk:0.1+topk:0.2",
            "topk:0.1",
        ] {
            let err = text.parse::<CodecConfig>().unwrap_err();
            assert!(
                matches!(&err, CodecConfigError::Syntax { input, .. } if input == text),
                "{text:?} gave {err:?}"
            );
        }
        assert_eq!(
            "int8:0".parse::<CodecConfig>(),
            Err(CodecConfigError::Int8Block(0))
        );
        assert_eq!(
            "f32+topk:0".parse::<CodecConfig>(),
            Err(CodecConfigError::TopKFraction(0.0))
        );
        assert!(matches!(
            "f32+topk:NaN".parse::<CodecConfig>(),
            Err(CodecConfigError::TopKFraction(f)) if f.is_nan()
        ));
        // Deserialising validates too.
        let bytes = postcard::to_stdvec("int8:0").unwrap();
        assert!(postcard::from_bytes::<CodecConfig>(&bytes).is_err());
    }
}
