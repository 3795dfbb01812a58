//! Reader for PyTorch's legacy (pre-1.6, non-zip) `torch.save` format.
//!
//! Layout of such a file, all little-endian:
//!
//! 1. a pickle holding the magic number `0x1950a86a20f9469cfc6c`,
//! 2. a pickle holding the protocol version `1001`,
//! 3. a pickle holding a `sys_info` dict (`little_endian`, `type_sizes`, ...),
//! 4. the pickle of the saved object (here a state dict). Each tensor is a call of
//!    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose storage is
//!    a persistent id `("storage", torch.XStorage, key, location, numel, view)`,
//! 5. a pickle listing the storage keys in the order their data follows,
//! 6. for each key: a `u64` element count, then that many raw elements.
//!
//! Everything read from the file is validated (lengths, element counts, strides against
//! storage bounds) before it is used, so malformed input yields an [`ExportError`] and
//! never a panic or an unbounded allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ExportError;
use super::pickle::{self, Arena, Id, PickleError, Value};

/// The first pickle of every legacy checkpoint.
pub(super) const LEGACY_MAGIC: i128 = 0x1950_a86a_20f9_469c_fc6c;
/// The only legacy protocol version PyTorch ever wrote.
pub(super) const LEGACY_PROTOCOL: i128 = 1001;

/// Element types of legacy storages (`torch.FloatStorage` and friends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dtype {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::Bf16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element in the raw storage section (a `LongStorage` takes 8 bytes even
    /// when `sys_info` reports a 4-byte C `long`, as on Windows).
    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::Bf16)
    }

    fn name(self) -> &'static str {
        match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }
}

/// A tensor of the state dict: a strided view into one storage.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    dtype: Dtype,
    /// First element, counted from the start of the root storage.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    fn numel(&self) -> usize {
        // Validated not to overflow when the tensor was read.
        self.shape.iter().product()
    }
}

/// A storage declared by the pickle and located in the raw section.
#[derive(Debug, Clone)]
struct Storage {
    dtype: Dtype,
    numel: usize,
    /// Byte offset of element 0 in the file; set once the raw section is read.
    start: Option<usize>,
}

/// A decoded legacy checkpoint: the tensors of its state dict and the file bytes they view.
#[derive(Debug)]
pub(super) struct Checkpoint {
    path: PathBuf,
    data: Vec<u8>,
    /// State-dict order.
    order: Vec<String>,
    tensors: HashMap<String, TensorRef>,
    storages: HashMap<String, Storage>,
}

/// Shorthands for errors that name `path`.
struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn pickle(&self, e: PickleError) -> ExportError {
        ExportError::Pickle {
            path: self.path.to_owned(),
            offset: e.offset,
            detail: e.detail,
        }
    }

    fn format(&self, detail: impl Into<String>) -> ExportError {
        ExportError::Format {
            path: self.path.to_owned(),
            detail: detail.into(),
        }
    }

    fn not_legacy(&self, detail: impl Into<String>) -> ExportError {
        ExportError::NotLegacyTorch {
            path: self.path.to_owned(),
            detail: detail.into(),
        }
    }
}

/// A non-negative pickle int as `usize`.
fn uint(arena: &Arena, id: Id) -> Option<usize> {
    arena.as_int(id).and_then(|i| usize::try_from(i).ok())
}

fn dict_get<'a>(arena: &'a Arena, dict: Id, key: &str) -> Option<&'a Value> {
    match arena.get(dict) {
        Value::Dict(items) => items
            .iter()
            .find(|(k, _)| arena.as_str(*k) == Some(key))
            .map(|(_, v)| arena.get(*v)),
        _ => None,
    }
}

impl Checkpoint {
    /// Decodes a legacy checkpoint held in `data`; `path` only names the file in errors.
    pub(super) fn parse(path: &Path, data: Vec<u8>) -> Result<Self, ExportError> {
        let cx = Ctx { path };
        if data.starts_with(b"PK\x03\x04") {
            return Err(cx.not_legacy(
                "it is a zip archive (the torch >= 1.6 format); re-save it with \
                 `_use_new_zipfile_serialization=False` or use a zip-format reader",
            ));
        }
        let mut arena = Arena::default();

        let (magic, pos) = pickle::load(&data, 0, &mut arena).map_err(|e| {
            cx.not_legacy(format!(
                "no magic-number pickle at the start (byte {}: {})",
                e.offset, e.detail
            ))
        })?;
        if arena.as_int(magic) != Some(LEGACY_MAGIC) {
            return Err(cx.not_legacy(format!(
                "bad magic number: found {}, expected 0x1950a86a20f9469cfc6c",
                arena.describe(magic)
            )));
        }

        let (version, pos) = pickle::load(&data, pos, &mut arena).map_err(|e| cx.pickle(e))?;
        if arena.as_int(version) != Some(LEGACY_PROTOCOL) {
            return Err(cx.format(format!(
                "legacy protocol version is {}, expected {LEGACY_PROTOCOL}",
                arena.describe(version)
            )));
        }

        let (sys_info, pos) = pickle::load(&data, pos, &mut arena).map_err(|e| cx.pickle(e))?;
        if let Some(Value::Bool(false)) = dict_get(&arena, sys_info, "little_endian") {
            return Err(cx.format("the checkpoint was saved big-endian, which is not supported"));
        }

        let (root, pos) = pickle::load(&data, pos, &mut arena).map_err(|e| cx.pickle(e))?;
        let (keys, pos) = pickle::load(&data, pos, &mut arena).map_err(|e| cx.pickle(e))?;

        let mut checkpoint = Self {
            path: path.to_owned(),
            data: Vec::new(),
            order: Vec::new(),
            tensors: HashMap::new(),
            storages: HashMap::new(),
        };
        checkpoint.read_state_dict(&cx, &arena, root)?;
        checkpoint.locate_storages(&cx, &arena, keys, &data, pos)?;
        checkpoint.data = data;
        Ok(checkpoint)
    }

    /// Collects the tensors of the state dict (the root dict, or its `state_dict` entry).
    fn read_state_dict(
        &mut self,
        cx: &Ctx<'_>,
        arena: &Arena,
        root: Id,
    ) -> Result<(), ExportError> {
        let is_tensor = |id: Id| rebuild_args(arena, id).is_some();
        let Value::Dict(mut items) = arena.get(root).clone() else {
            return Err(cx.format(format!(
                "the saved object is a {}, not a state dict",
                arena.describe(root)
            )));
        };
        if !items.iter().any(|&(_, v)| is_tensor(v)) {
            let nested = items.iter().find(|&&(k, v)| {
                arena.as_str(k) == Some("state_dict") && matches!(arena.get(v), Value::Dict(_))
            });
            if let Some(&(_, v)) = nested
                && let Value::Dict(inner) = arena.get(v)
            {
                items = inner.clone();
            }
        }
        for (k, v) in items {
            if !is_tensor(v) {
                continue;
            }
            let Some(key) = arena.as_str(k) else {
                return Err(cx.format(format!(
                    "a state-dict key is a {}, not a string",
                    arena.describe(k)
                )));
            };
            let tensor = self.read_tensor(cx, arena, key, v)?;
            if self.tensors.insert(key.to_owned(), tensor).is_some() {
                return Err(cx.format(format!("state-dict key {key:?} appears twice")));
            }
            self.order.push(key.to_owned());
        }
        if self.tensors.is_empty() {
            return Err(cx.format("the state dict holds no tensors"));
        }
        Ok(())
    }

    fn read_tensor(
        &mut self,
        cx: &Ctx<'_>,
        arena: &Arena,
        key: &str,
        id: Id,
    ) -> Result<TensorRef, ExportError> {
        let bad = |what: &str| cx.format(format!("tensor {key:?}: {what}"));
        let args = rebuild_args(arena, id).ok_or_else(|| bad("not a tensor"))?;
        let Value::PersistentId(pid) = arena.get(args[0]) else {
            return Err(bad(&format!(
                "storage argument is a {}",
                arena.describe(args[0])
            )));
        };
        let pid = arena
            .as_seq(*pid)
            .ok_or_else(|| bad("storage persistent id is not a tuple"))?;
        if pid.len() < 5 || arena.as_str(pid[0]) != Some("storage") {
            return Err(bad(
                "storage persistent id is not (\"storage\", type, key, location, size, ...)",
            ));
        }
        let Value::Global { name: class, .. } = arena.get(pid[1]) else {
            return Err(bad(&format!(
                "storage type is a {}",
                arena.describe(pid[1])
            )));
        };
        let dtype =
            Dtype::from_storage_class(class).ok_or_else(|| ExportError::UnsupportedDtype {
                path: cx.path.to_owned(),
                key: key.to_owned(),
                dtype: class.clone(),
            })?;
        let storage_key = arena
            .as_str(pid[2])
            .ok_or_else(|| bad("storage key is not a string"))?;
        let root_numel =
            uint(arena, pid[4]).ok_or_else(|| bad("storage size is not a non-negative int"))?;

        // Optional view metadata: (view_key, element offset into the root, view size).
        let (view_offset, view_numel) = match pid.get(5).map(|&v| (v, arena.get(v))) {
            None | Some((_, Value::None)) => (0, root_numel),
            Some((v, _)) => {
                let view = arena
                    .as_seq(v)
                    .filter(|s| s.len() == 3)
                    .ok_or_else(|| bad("malformed view metadata"))?;
                let off = uint(arena, view[1])
                    .ok_or_else(|| bad("view offset is not a non-negative int"))?;
                let n = uint(arena, view[2])
                    .ok_or_else(|| bad("view size is not a non-negative int"))?;
                (off, n)
            }
        };
        let view_end = view_offset
            .checked_add(view_numel)
            .filter(|&end| end <= root_numel);
        let view_end = view_end.ok_or_else(|| bad("storage view extends past its storage"))?;

        let offset =
            uint(arena, args[1]).ok_or_else(|| bad("storage offset is not a non-negative int"))?;
        let ints = |id: Id, what: &str| -> Result<Vec<usize>, ExportError> {
            let seq = arena
                .as_seq(id)
                .ok_or_else(|| bad(&format!("{what} is not a tuple")))?;
            seq.iter()
                .map(|&d| {
                    uint(arena, d)
                        .ok_or_else(|| bad(&format!("{what} holds a non-int or negative entry")))
                })
                .collect()
        };
        let shape = ints(args[2], "size")?;
        let stride = ints(args[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(bad("size and stride have different lengths"));
        }

        // Bounds: the last element reachable through the strides must lie inside the view,
        // and a tensor may not hold more elements than its view (no stride-0 blow-ups).
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let numel = numel
            .filter(|&n| n <= view_numel)
            .ok_or_else(|| bad("more elements than its storage holds"))?;
        let start = view_offset
            .checked_add(offset)
            .ok_or_else(|| bad("storage offset overflows"))?;
        if numel > 0 {
            let last = shape.iter().zip(&stride).try_fold(start, |acc, (&d, &s)| {
                (d - 1)
                    .checked_mul(s)
                    .and_then(|step| acc.checked_add(step))
            });
            if last.is_none_or(|last| last >= view_end) {
                return Err(bad("size and stride reach past the end of its storage"));
            }
        }

        match self.storages.get(storage_key) {
            Some(s) if s.dtype != dtype || s.numel != root_numel => {
                return Err(bad(&format!(
                    "storage {storage_key:?} is declared both as {} x {} and as {} x {}",
                    s.numel,
                    s.dtype.name(),
                    root_numel,
                    dtype.name()
                )));
            }
            Some(_) => {}
            None => {
                self.storages.insert(
                    storage_key.to_owned(),
                    Storage {
                        dtype,
                        numel: root_numel,
                        start: None,
                    },
                );
            }
        }
        Ok(TensorRef {
            storage: storage_key.to_owned(),
            dtype,
            offset: start,
            shape,
            stride,
        })
    }

    /// Walks the raw storage section that follows the key-list pickle.
    fn locate_storages(
        &mut self,
        cx: &Ctx<'_>,
        arena: &Arena,
        keys: Id,
        data: &[u8],
        mut pos: usize,
    ) -> Result<(), ExportError> {
        let keys = arena.as_seq(keys).ok_or_else(|| {
            cx.format(format!(
                "the storage key list is a {}",
                arena.describe(keys)
            ))
        })?;
        for &k in keys {
            let key = arena
                .as_str(k)
                .ok_or_else(|| cx.format(format!("a storage key is a {}", arena.describe(k))))?;
            let Some(storage) = self.storages.get_mut(key) else {
                return Err(cx.format(format!(
                    "storage {key:?} is listed but no tensor uses it, so its element size is unknown"
                )));
            };
            if storage.start.is_some() {
                return Err(cx.format(format!("storage {key:?} is listed twice")));
            }
            let truncated = |needed: usize, available: usize| ExportError::StorageTruncated {
                path: cx.path.to_owned(),
                key: key.to_owned(),
                offset: pos,
                needed,
                available,
            };
            let available = data.len().saturating_sub(pos);
            let Some(header) = data.get(pos..pos + 8) else {
                return Err(truncated(8, available));
            };
            let mut count = [0u8; 8];
            count.copy_from_slice(header);
            let count = u64::from_le_bytes(count);
            if usize::try_from(count).ok() != Some(storage.numel) {
                return Err(cx.format(format!(
                    "storage {key:?} has {count} elements in the data section but {} in the pickle",
                    storage.numel
                )));
            }
            let bytes = storage.numel.saturating_mul(storage.dtype.size());
            if bytes > available - 8 {
                return Err(truncated(bytes.saturating_add(8), available));
            }
            storage.start = Some(pos + 8);
            pos += 8 + bytes;
        }
        if let Some((key, _)) = self.storages.iter().find(|(_, s)| s.start.is_none()) {
            return Err(cx.format(format!(
                "storage {key:?} is used by a tensor but has no data in the file"
            )));
        }
        if pos != data.len() {
            return Err(cx.format(format!(
                "{} unexpected bytes after the last storage",
                data.len() - pos
            )));
        }
        Ok(())
    }

    /// The file this checkpoint was read from.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor keys in state-dict order.
    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    pub(super) fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    fn tensor(&self, key: &str) -> Result<&TensorRef, ExportError> {
        self.tensors
            .get(key)
            .ok_or_else(|| ExportError::MissingTensor {
                path: self.path.clone(),
                key: key.to_owned(),
            })
    }

    pub(super) fn shape(&self, key: &str) -> Result<&[usize], ExportError> {
        Ok(&self.tensor(key)?.shape)
    }

    /// Number of floating-point elements over all tensors (buffers such as
    /// `num_batches_tracked` are int64 and excluded).
    pub(super) fn parameter_count(&self) -> usize {
        self.tensors
            .values()
            .filter(|t| t.dtype.is_float())
            .map(TensorRef::numel)
            .sum()
    }

    /// The tensor `key` in row-major order as `f64`, after checking its shape is `expected`.
    pub(super) fn tensor_f64(
        &self,
        key: &str,
        expected: &[usize],
    ) -> Result<Vec<f64>, ExportError> {
        let t = self.tensor(key)?;
        if t.shape != expected {
            return Err(ExportError::UnexpectedShape {
                path: self.path.clone(),
                key: key.to_owned(),
                expected: format!("{expected:?}"),
                found: t.shape.clone(),
            });
        }
        let storage = &self.storages[&t.storage];
        let base = storage.start.unwrap_or(0);
        let read: fn(&[u8]) -> f64 = match t.dtype {
            Dtype::F32 => |b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Dtype::F64 => |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            other => {
                return Err(ExportError::UnsupportedDtype {
                    path: self.path.clone(),
                    key: key.to_owned(),
                    dtype: other.name().to_owned(),
                });
            }
        };
        let size = t.dtype.size();
        let numel = t.numel();
        let mut out = Vec::with_capacity(numel);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            // In bounds: checked against the storage when the tensor was read.
            let element = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let at = base + element * size;
            out.push(read(&self.data[at..at + size]));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(out)
    }
}

/// The arguments of a `_rebuild_tensor_v2` / `_rebuild_tensor` call (at least storage,
/// offset, size, stride), looking through one `_rebuild_parameter` wrapper.
fn rebuild_args(arena: &Arena, id: Id) -> Option<&[Id]> {
    let direct = |id: Id| -> Option<&[Id]> {
        let Value::Object { callable, args, .. } = arena.get(id) else {
            return None;
        };
        let rebuild = arena.is_global(*callable, "torch._utils", "_rebuild_tensor_v2")
            || arena.is_global(*callable, "torch._utils", "_rebuild_tensor");
        arena
            .as_seq(*args)
            .filter(|args| rebuild && args.len() >= 4)
    };
    if let Some(args) = direct(id) {
        return Some(args);
    }
    let Value::Object { callable, args, .. } = arena.get(id) else {
        return None;
    };
    if !arena.is_global(*callable, "torch._utils", "_rebuild_parameter") {
        return None;
    }
    direct(*arena.as_seq(*args)?.first()?)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Builds small pickles by hand (protocol 2 opcodes only).
    #[derive(Default)]
    pub(in super::super) struct PickleWriter {
        pub(in super::super) bytes: Vec<u8>,
    }

    impl PickleWriter {
        pub(in super::super) fn new() -> Self {
            Self {
                bytes: vec![0x80, 2],
            }
        }
        pub(in super::super) fn op(&mut self, op: &[u8]) -> &mut Self {
            self.bytes.extend_from_slice(op);
            self
        }
        pub(in super::super) fn int(&mut self, v: u32) -> &mut Self {
            if v < 256 {
                self.op(&[b'K', v as u8])
            } else {
                self.op(b"J").op(&v.to_le_bytes())
            }
        }
        pub(in super::super) fn str(&mut self, s: &str) -> &mut Self {
            self.op(b"X")
                .op(&(s.len() as u32).to_le_bytes())
                .op(s.as_bytes())
        }
        pub(in super::super) fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b"c")
                .op(module.as_bytes())
                .op(b"\n")
                .op(name.as_bytes())
                .op(b"\n")
        }
        pub(in super::super) fn ints(&mut self, v: &[u32]) -> &mut Self {
            self.op(b"(");
            for &x in v {
                self.int(x);
            }
            self.op(b"t")
        }
        pub(in super::super) fn stop(&mut self) -> Vec<u8> {
            self.op(b".");
            std::mem::take(&mut self.bytes)
        }
    }

    /// One tensor of a hand-built checkpoint.
    pub(in super::super) struct FakeTensor<'a> {
        pub(in super::super) key: &'a str,
        pub(in super::super) storage: &'a str,
        pub(in super::super) shape: &'a [u32],
        pub(in super::super) stride: &'a [u32],
        pub(in super::super) offset: u32,
    }

    /// A legacy checkpoint holding `tensors` over float storages `storages` (key, values).
    pub(in super::super) fn fake_checkpoint(
        tensors: &[FakeTensor<'_>],
        storages: &[(&str, Vec<f32>)],
    ) -> Vec<u8> {
        let mut out = PickleWriter::new()
            .op(b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")
            .stop();
        out.extend(PickleWriter::new().op(b"M\xe9\x03").stop());
        out.extend(
            PickleWriter::new()
                .op(b"}(")
                .str("little_endian")
                .op(b"\x88u")
                .stop(),
        );
        let mut w = PickleWriter::new();
        w.global("collections", "OrderedDict").op(b")R(");
        for t in tensors {
            let numel = storages
                .iter()
                .find(|(k, _)| *k == t.storage)
                .map_or(0, |(_, v)| v.len());
            w.str(t.key)
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b"(");
            w.op(b"(")
                .str("storage")
                .global("torch", "FloatStorage")
                .str(t.storage)
                .str("cpu");
            w.int(numel as u32).op(b"NtQ");
            w.int(t.offset).ints(t.shape).ints(t.stride).op(b"\x89");
            w.global("collections", "OrderedDict").op(b")Rt").op(b"R");
        }
        w.op(b"u}b");
        out.extend(w.stop());
        let mut w = PickleWriter::new();
        w.op(b"](");
        for (k, _) in storages {
            w.str(k);
        }
        w.op(b"e");
        out.extend(w.stop());
        for (_, values) in storages {
            out.extend((values.len() as u64).to_le_bytes());
            for v in values {
                out.extend(v.to_le_bytes());
            }
        }
        out
    }

    fn sample() -> Vec<u8> {
        fake_checkpoint(
            &[
                // A 2x3 view stored transposed (column-major), like the real checkpoint.
                FakeTensor {
                    key: "w",
                    storage: "7",
                    shape: &[2, 3],
                    stride: &[1, 2],
                    offset: 0,
                },
                FakeTensor {
                    key: "b",
                    storage: "9",
                    shape: &[2],
                    stride: &[1],
                    offset: 1,
                },
            ],
            &[
                ("7", vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]),
                ("9", vec![0.0, -1.0, -2.0]),
            ],
        )
    }

    #[test]
    fn reads_a_hand_built_checkpoint() {
        let path = Path::new("sample.pth");
        let c = Checkpoint::parse(path, sample()).unwrap();
        assert_eq!(c.keys().collect::<Vec<_>>(), ["w", "b"]);
        assert_eq!(c.shape("w").unwrap(), [2, 3]);
        assert_eq!(
            c.tensor_f64("w", &[2, 3]).unwrap(),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(c.tensor_f64("b", &[2]).unwrap(), [-1.0, -2.0]);
        assert_eq!(c.parameter_count(), 8);
        assert!(c.contains("b") && !c.contains("c"));
        let err = c.tensor_f64("w", &[3, 2]).unwrap_err();
        assert!(
            matches!(err, ExportError::UnexpectedShape { ref key, .. } if key == "w"),
            "{err}"
        );
        assert!(err.to_string().contains("sample.pth"), "{err}");
        let err = c.tensor_f64("c", &[1]).unwrap_err();
        assert!(
            matches!(err, ExportError::MissingTensor { ref key, .. } if key == "c"),
            "{err}"
        );
    }

    #[test]
    fn rejects_files_that_are_not_legacy_checkpoints() {
        let path = Path::new("x.pth");
        for bytes in [
            &b""[..],
            b"PK\x03\x04rest",
            b"\x80\x02K\x05.",
            b"hello world",
        ] {
            let err = Checkpoint::parse(path, bytes.to_vec()).unwrap_err();
            assert!(matches!(err, ExportError::NotLegacyTorch { .. }), "{err}");
        }
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let full = sample();
        for len in 0..full.len() {
            let err = Checkpoint::parse(Path::new("t.pth"), full[..len].to_vec()).unwrap_err();
            assert!(
                matches!(
                    err,
                    ExportError::NotLegacyTorch { .. }
                        | ExportError::Pickle { .. }
                        | ExportError::StorageTruncated { .. }
                ),
                "length {len}: {err}"
            );
        }
        let err =
            Checkpoint::parse(Path::new("t.pth"), full[..full.len() - 1].to_vec()).unwrap_err();
        assert!(
            matches!(err, ExportError::StorageTruncated { ref key, .. } if key == "9"),
            "{err}"
        );
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let full = sample();
        // Deterministic xorshift so failures reproduce.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = full.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            if let Ok(c) = Checkpoint::parse(Path::new("c.pth"), bytes) {
                for key in c.keys().map(str::to_owned).collect::<Vec<_>>() {
                    let shape = c.shape(&key).unwrap().to_vec();
                    let _ = c.tensor_f64(&key, &shape);
                }
            }
        }
    }

    #[test]
    fn huge_length_fields_do_not_allocate() {
        let mut bytes = sample();
        // Claim a 4 GiB string where the state dict's first key is.
        let at = bytes
            .windows(5)
            .position(|w| w == b"X\x01\x00\x00\x00")
            .unwrap();
        bytes[at + 1..at + 5].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Checkpoint::parse(Path::new("h.pth"), bytes).unwrap_err();
        assert!(
            matches!(err, ExportError::Pickle { offset, .. } if offset == at),
            "{err}"
        );
    }

    #[test]
    fn strides_outside_the_storage_are_rejected() {
        let bytes = fake_checkpoint(
            &[FakeTensor {
                key: "w",
                storage: "1",
                shape: &[2, 2],
                stride: &[2, 2],
                offset: 0,
            }],
            &[("1", vec![0.0; 4])],
        );
        let err = Checkpoint::parse(Path::new("s.pth"), bytes).unwrap_err();
        assert!(matches!(err, ExportError::Format { .. }), "{err}");
        assert!(err.to_string().contains("past the end"), "{err}");
        // Stride 0 may not blow a 1-element storage up to many elements.
        let bytes = fake_checkpoint(
            &[FakeTensor {
                key: "w",
                storage: "1",
                shape: &[1000],
                stride: &[0],
                offset: 0,
            }],
            &[("1", vec![0.0])],
        );
        let err = Checkpoint::parse(Path::new("s.pth"), bytes).unwrap_err();
        assert!(err.to_string().contains("more elements"), "{err}");
    }

    #[test]
    fn unsupported_dtypes_are_reported() {
        let mut bytes = sample();
        let at = bytes
            .windows(12)
            .position(|w| w == b"FloatStorage")
            .unwrap();
        bytes[at..at + 12].copy_from_slice(b"QuintStorage");
        let err = Checkpoint::parse(Path::new("d.pth"), bytes).unwrap_err();
        assert!(
            matches!(err, ExportError::UnsupportedDtype { ref dtype, .. } if dtype == "QuintStorage"),
            "{err}"
        );
    }
}
