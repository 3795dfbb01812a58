//! A small pickle interpreter for the opcodes PyTorch's legacy serializer writes.
//!
//! Values live in an arena and the stack and memo hold indices into it, so shared
//! references (memo gets) cost nothing, containers keep Python's aliasing semantics when
//! they are filled after being memoised, and cyclic structures cannot leak. Every opcode
//! consumes at least one input byte and creates at most one arena entry; every length field
//! is checked against the bytes that remain before anything is allocated. Memory use is
//! therefore linear in the input, and no byte string makes the interpreter panic.

use std::collections::HashMap;

/// Index of a value in an [`Arena`].
pub(super) type Id = usize;

/// A decoded pickle value.
#[derive(Debug, Clone)]
pub(super) enum Value {
    None,
    Bool(bool),
    /// Python ints up to 128 bits (the legacy magic number needs 80).
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// Dicts and `collections.OrderedDict()`, in insertion order.
    Dict(Vec<(Id, Id)>),
    /// A `module.name` reference from GLOBAL / STACK_GLOBAL.
    Global {
        module: String,
        name: String,
    },
    /// The result of calling `callable(*args)` (REDUCE / NEWOBJ), never evaluated.
    Object {
        callable: Id,
        args: Id,
        state: Option<Id>,
    },
    /// A persistent id (PERSID / BINPERSID); the loader resolves it, not the pickle.
    PersistentId(Id),
}

/// Where decoding failed (absolute offset into the input) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PickleError {
    pub(super) offset: usize,
    pub(super) detail: String,
}

/// Storage for every value decoded from one or more pickles.
#[derive(Debug, Default)]
pub(super) struct Arena {
    values: Vec<Value>,
}

impl Arena {
    pub(super) fn get(&self, id: Id) -> &Value {
        &self.values[id]
    }

    fn push(&mut self, value: Value) -> Id {
        self.values.push(value);
        self.values.len() - 1
    }

    /// A short human-readable description for error messages (never recursive).
    pub(super) fn describe(&self, id: Id) -> String {
        match self.get(id) {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("str {s:?}"),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Tuple(t) => format!("tuple of {}", t.len()),
            Value::List(l) => format!("list of {}", l.len()),
            Value::Dict(d) => format!("dict of {}", d.len()),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Object { callable, .. } => {
                format!("call of {}", self.describe_global(*callable))
            }
            Value::PersistentId(_) => "persistent id".into(),
        }
    }

    fn describe_global(&self, id: Id) -> String {
        match self.get(id) {
            Value::Global { module, name } => format!("{module}.{name}"),
            _ => "a non-global".into(),
        }
    }

    pub(super) fn as_int(&self, id: Id) -> Option<i128> {
        match self.get(id) {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i128::from(*b)),
            _ => None,
        }
    }

    pub(super) fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_seq(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(items) | Value::List(items) => Some(items),
            _ => None,
        }
    }

    pub(super) fn is_global(&self, id: Id, module: &str, name: &str) -> bool {
        matches!(self.get(id), Value::Global { module: m, name: n } if m == module && n == name)
    }
}

// Opcodes (names as in CPython's pickletools).
const MARK: u8 = b'(';
const STOP: u8 = b'.';
const POP: u8 = b'0';
const POP_MARK: u8 = b'1';
const DUP: u8 = b'2';
const FLOAT: u8 = b'F';
const INT: u8 = b'I';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const LONG: u8 = b'L';
const BININT2: u8 = b'M';
const NONE: u8 = b'N';
const PERSID: u8 = b'P';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const BINSTRING: u8 = b'T';
const SHORT_BINSTRING: u8 = b'U';
const BINUNICODE: u8 = b'X';
const APPEND: u8 = b'a';
const BUILD: u8 = b'b';
const GLOBAL: u8 = b'c';
const DICT: u8 = b'd';
const EMPTY_DICT: u8 = b'}';
const APPENDS: u8 = b'e';
const GET: u8 = b'g';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const LIST: u8 = b'l';
const EMPTY_LIST: u8 = b']';
const PUT: u8 = b'p';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const SETITEM: u8 = b's';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const SETITEMS: u8 = b'u';
const BINFLOAT: u8 = b'G';
const BINBYTES: u8 = b'B';
const SHORT_BINBYTES: u8 = b'C';
const PROTO: u8 = 0x80;
const NEWOBJ: u8 = 0x81;
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const BINBYTES8: u8 = 0x8e;
const STACK_GLOBAL: u8 = 0x93;
const MEMOIZE: u8 = 0x94;
const FRAME: u8 = 0x95;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_at: usize,
    stack: Vec<Id>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    arena: &'a mut Arena,
}

/// Decodes one pickle starting at `start`; returns the unpickled value and the offset just
/// past its STOP opcode.
pub(super) fn load(
    data: &[u8],
    start: usize,
    arena: &mut Arena,
) -> Result<(Id, usize), PickleError> {
    let mut m = Machine {
        data,
        pos: start,
        op_at: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        arena,
    };
    m.run()
}

impl Machine<'_> {
    fn fail<T>(&self, detail: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            offset: self.op_at,
            detail: detail.into(),
        })
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], PickleError> {
        let left = self.data.len().saturating_sub(self.pos);
        if n > left {
            return Err(PickleError {
                offset: self.op_at,
                detail: format!("truncated: {what} needs {n} bytes but only {left} remain"),
            });
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], PickleError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, PickleError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length field checked against the remaining input before anything is allocated.
    fn len_field(&mut self, raw: u64, what: &str) -> Result<usize, PickleError> {
        let left = self.data.len().saturating_sub(self.pos);
        match usize::try_from(raw) {
            Ok(n) if n <= left => Ok(n),
            _ => self.fail(format!(
                "truncated: {what} declares {raw} bytes but only {left} remain"
            )),
        }
    }

    /// A newline-terminated text argument (protocol 0 opcodes), without the newline.
    fn line(&mut self, what: &str) -> Result<String, PickleError> {
        let rest = &self.data[self.pos.min(self.data.len())..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail(format!("truncated: {what} has no terminating newline"));
        };
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn push(&mut self, value: Value) {
        let id = self.arena.push(value);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        self.stack
            .pop()
            .map_or_else(|| self.fail("stack underflow"), Ok)
    }

    fn top(&self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.fail("stack underflow");
        }
        self.stack
            .last()
            .copied()
            .map_or_else(|| self.fail("stack underflow"), Ok)
    }

    /// Pops everything above the most recent MARK, and the mark itself.
    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let Some(height) = self.marks.pop() else {
            return self.fail("no MARK on the stack");
        };
        Ok(self.stack.split_off(height.min(self.stack.len())))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.fail(format!("memo key {key} was never stored")),
        }
    }

    fn text_u64(&self, text: &str, what: &str) -> Result<u64, PickleError> {
        text.trim()
            .parse()
            .map_or_else(|_| self.fail(format!("bad {what} argument {text:?}")), Ok)
    }

    fn long_bytes(&self, bytes: &[u8]) -> Result<i128, PickleError> {
        if bytes.len() > 16 {
            return self.fail(format!("integer of {} bytes is too large", bytes.len()));
        }
        let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut full = [fill; 16];
        full[..bytes.len()].copy_from_slice(bytes);
        Ok(i128::from_le_bytes(full))
    }

    fn dict_target(&mut self, under: Id) -> Result<&mut Vec<(Id, Id)>, PickleError> {
        let offset = self.op_at;
        let found = self.arena.describe(under);
        match &mut self.arena.values[under] {
            Value::Dict(items) => Ok(items),
            _ => Err(PickleError {
                offset,
                detail: format!("cannot set items on {found}"),
            }),
        }
    }

    fn list_target(&mut self, under: Id) -> Result<&mut Vec<Id>, PickleError> {
        let offset = self.op_at;
        let found = self.arena.describe(under);
        match &mut self.arena.values[under] {
            Value::List(items) => Ok(items),
            _ => Err(PickleError {
                offset,
                detail: format!("cannot append to {found}"),
            }),
        }
    }

    fn pairs(&self, flat: Vec<Id>) -> Result<Vec<(Id, Id)>, PickleError> {
        if !flat.len().is_multiple_of(2) {
            return self.fail("odd number of stack items for dict keys and values");
        }
        Ok(flat.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
    }

    fn run(&mut self) -> Result<(Id, usize), PickleError> {
        loop {
            self.op_at = self.pos;
            let op = self.u8("opcode")?;
            match op {
                PROTO => {
                    let version = self.u8("PROTO")?;
                    if version > 5 {
                        return self.fail(format!("unsupported pickle protocol {version}"));
                    }
                }
                FRAME => {
                    self.u64("FRAME")?;
                }
                STOP => {
                    let result = self.pop()?;
                    return Ok((result, self.pos));
                }
                MARK => self.marks.push(self.stack.len()),
                POP => {
                    self.pop()?;
                }
                POP_MARK => {
                    self.pop_mark()?;
                }
                DUP => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                NONE => self.push(Value::None),
                NEWTRUE => self.push(Value::Bool(true)),
                NEWFALSE => self.push(Value::Bool(false)),
                INT => {
                    let text = self.line("INT")?;
                    let value = match text.as_str() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        t => match t.parse::<i128>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => return self.fail(format!("bad INT argument {t:?}")),
                        },
                    };
                    self.push(value);
                }
                LONG => {
                    let text = self.line("LONG")?;
                    match text.trim_end_matches('L').parse::<i128>() {
                        Ok(i) => self.push(Value::Int(i)),
                        Err(_) => return self.fail(format!("bad LONG argument {text:?}")),
                    }
                }
                BININT => {
                    let v = i32::from_le_bytes(self.array("BININT")?);
                    self.push(Value::Int(v.into()));
                }
                BININT1 => {
                    let v = self.u8("BININT1")?;
                    self.push(Value::Int(v.into()));
                }
                BININT2 => {
                    let v = u16::from_le_bytes(self.array("BININT2")?);
                    self.push(Value::Int(v.into()));
                }
                LONG1 => {
                    let n = usize::from(self.u8("LONG1 length")?);
                    let bytes = self.take(n, "LONG1")?.to_vec();
                    let v = self.long_bytes(&bytes)?;
                    self.push(Value::Int(v));
                }
                LONG4 => {
                    let raw = i32::from_le_bytes(self.array("LONG4 length")?);
                    if raw < 0 {
                        return self.fail("negative LONG4 length");
                    }
                    let n = self.len_field(raw.unsigned_abs().into(), "LONG4")?;
                    let bytes = self.take(n, "LONG4")?.to_vec();
                    let v = self.long_bytes(&bytes)?;
                    self.push(Value::Int(v));
                }
                FLOAT => {
                    let text = self.line("FLOAT")?;
                    match text.trim().parse::<f64>() {
                        Ok(f) => self.push(Value::Float(f)),
                        Err(_) => return self.fail(format!("bad FLOAT argument {text:?}")),
                    }
                }
                BINFLOAT => {
                    let v = f64::from_be_bytes(self.array("BINFLOAT")?);
                    self.push(Value::Float(v));
                }
                BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                    let raw = match op {
                        SHORT_BINUNICODE => u64::from(self.u8("SHORT_BINUNICODE length")?),
                        BINUNICODE => u64::from(self.u32("BINUNICODE length")?),
                        _ => self.u64("BINUNICODE8 length")?,
                    };
                    let n = self.len_field(raw, "string")?;
                    let bytes = self.take(n, "string")?;
                    match std::str::from_utf8(bytes) {
                        Ok(s) => {
                            let s = s.to_owned();
                            self.push(Value::Str(s));
                        }
                        Err(_) => return self.fail("string is not valid UTF-8"),
                    }
                }
                BINSTRING | SHORT_BINSTRING => {
                    // Python 2 `str`: bytes, read as Latin-1-ish text via lossy UTF-8.
                    let raw = if op == SHORT_BINSTRING {
                        u64::from(self.u8("SHORT_BINSTRING length")?)
                    } else {
                        u64::from(self.u32("BINSTRING length")?)
                    };
                    let n = self.len_field(raw, "string")?;
                    let s = String::from_utf8_lossy(self.take(n, "string")?).into_owned();
                    self.push(Value::Str(s));
                }
                BINBYTES | SHORT_BINBYTES | BINBYTES8 => {
                    let raw = match op {
                        SHORT_BINBYTES => u64::from(self.u8("SHORT_BINBYTES length")?),
                        BINBYTES => u64::from(self.u32("BINBYTES length")?),
                        _ => self.u64("BINBYTES8 length")?,
                    };
                    let n = self.len_field(raw, "bytes")?;
                    let bytes = self.take(n, "bytes")?.to_vec();
                    self.push(Value::Bytes(bytes));
                }
                EMPTY_TUPLE => self.push(Value::Tuple(Vec::new())),
                TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items));
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1) + 1;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items));
                }
                EMPTY_LIST => self.push(Value::List(Vec::new())),
                LIST => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                APPEND => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.list_target(list)?.push(item);
                }
                APPENDS => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.list_target(list)?.extend(items);
                }
                EMPTY_DICT => self.push(Value::Dict(Vec::new())),
                DICT => {
                    let flat = self.pop_mark()?;
                    let pairs = self.pairs(flat)?;
                    self.push(Value::Dict(pairs));
                }
                SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?;
                    self.dict_target(dict)?.push((key, value));
                }
                SETITEMS => {
                    let flat = self.pop_mark()?;
                    let pairs = self.pairs(flat)?;
                    let dict = self.top()?;
                    self.dict_target(dict)?.extend(pairs);
                }
                GLOBAL => {
                    let module = self.line("GLOBAL module")?;
                    let name = self.line("GLOBAL name")?;
                    self.push(Value::Global { module, name });
                }
                STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.arena.as_str(module), self.arena.as_str(name)) {
                        (Some(module), Some(name)) => {
                            let (module, name) = (module.to_owned(), name.to_owned());
                            self.push(Value::Global { module, name });
                        }
                        _ => return self.fail("STACK_GLOBAL needs two strings"),
                    }
                }
                REDUCE | NEWOBJ => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let no_args = self.arena.as_seq(args).is_some_and(<[Id]>::is_empty);
                    if no_args && self.arena.is_global(callable, "collections", "OrderedDict") {
                        self.push(Value::Dict(Vec::new()));
                    } else {
                        self.push(Value::Object {
                            callable,
                            args,
                            state: None,
                        });
                    }
                }
                BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    // Objects keep their state; a dict's state (e.g. an OrderedDict's
                    // `_metadata` attribute) carries nothing a loader needs.
                    if let Value::Object { state: slot, .. } = &mut self.arena.values[target] {
                        *slot = Some(state);
                    }
                }
                PERSID => {
                    let text = self.line("PERSID")?;
                    let pid = self.arena.push(Value::Str(text));
                    self.push(Value::PersistentId(pid));
                }
                BINPERSID => {
                    let pid = self.pop()?;
                    self.push(Value::PersistentId(pid));
                }
                PUT => {
                    let text = self.line("PUT")?;
                    let key = self.text_u64(&text, "PUT")?;
                    self.memo_put(key)?;
                }
                BINPUT => {
                    let key = self.u8("BINPUT")?;
                    self.memo_put(key.into())?;
                }
                LONG_BINPUT => {
                    let key = self.u32("LONG_BINPUT")?;
                    self.memo_put(key.into())?;
                }
                MEMOIZE => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?;
                }
                GET => {
                    let text = self.line("GET")?;
                    let key = self.text_u64(&text, "GET")?;
                    self.memo_get(key)?;
                }
                BINGET => {
                    let key = self.u8("BINGET")?;
                    self.memo_get(key.into())?;
                }
                LONG_BINGET => {
                    let key = self.u32("LONG_BINGET")?;
                    self.memo_get(key.into())?;
                }
                other => return self.fail(format!("unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<(Arena, Id, usize), PickleError> {
        let mut arena = Arena::default();
        let (id, end) = load(bytes, 0, &mut arena)?;
        Ok((arena, id, end))
    }

    #[test]
    fn decodes_scalars_and_strings() {
        let (a, id, end) = run(b"\x80\x02K\x07.").unwrap();
        assert_eq!(a.as_int(id), Some(7));
        assert_eq!(end, 5);
        let (a, id, _) = run(b"\x80\x02X\x03\x00\x00\x00abc.").unwrap();
        assert_eq!(a.as_str(id), Some("abc"));
        let (a, id, _) = run(b"J\xfe\xff\xff\xff.").unwrap();
        assert_eq!(a.as_int(id), Some(-2));
        let (a, id, _) = run(b"\x8a\x01\xff.").unwrap();
        assert_eq!(a.as_int(id), Some(-1));
        let (a, id, _) = run(b"I01\n.").unwrap();
        assert_eq!(a.as_int(id), Some(1));
        let (a, id, _) = run(b"G?\xf8\x00\x00\x00\x00\x00\x00.").unwrap();
        assert_eq!(a.describe(id), "float 1.5");
    }

    #[test]
    fn decodes_the_legacy_magic_number() {
        let bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
        let (a, id, end) = run(bytes).unwrap();
        assert_eq!(a.as_int(id), Some(0x1950_a86a_20f9_469c_fc6c));
        assert_eq!(end, bytes.len());
    }

    #[test]
    fn memoised_containers_alias() {
        // d = {}; memo[0] = d; d["k"] = 1; return (d, memo[0])
        let bytes = b"\x80\x02}q\x00X\x01\x00\x00\x00kK\x01sh\x00\x86.";
        let (a, id, _) = run(bytes).unwrap();
        let items = a.as_seq(id).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], items[1]);
        assert!(matches!(a.get(items[1]), Value::Dict(d) if d.len() == 1));
    }

    #[test]
    fn ordered_dict_reduce_becomes_a_dict() {
        // OrderedDict() filled by SETITEMS, then BUILD with a state dict (like `_metadata`).
        let bytes = b"\x80\x02ccollections\nOrderedDict\nq\x00)R(X\x01\x00\x00\x00aK\x02u}b.";
        let (a, id, _) = run(bytes).unwrap();
        assert!(matches!(a.get(id), Value::Dict(d) if d.len() == 1));
        // Any other callable stays an unevaluated object that keeps its BUILD state.
        let bytes = b"\x80\x02cmod\nCls\n)R}b.";
        let (a, id, _) = run(bytes).unwrap();
        assert!(matches!(a.get(id), Value::Object { state: Some(_), .. }));
        assert_eq!(a.describe(id), "call of mod.Cls");
    }

    #[test]
    fn errors_are_typed_with_offsets() {
        let err = run(b"\x80\x02X\xff\xff\xff\x7fab.").unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(err.detail.contains("truncated"), "{}", err.detail);
        let err = run(b"\x80\x02K\x01\xfe.").unwrap_err();
        assert_eq!(err.offset, 4);
        assert!(err.detail.contains("opcode 0xfe"), "{}", err.detail);
        let err = run(b"\x80\x02h\x05.").unwrap_err();
        assert!(err.detail.contains("memo"), "{}", err.detail);
        let err = run(b"\x80\x02.").unwrap_err();
        assert!(err.detail.contains("underflow"), "{}", err.detail);
        let err = run(b"\x80\x02(t(K\x01K\x02u.").unwrap_err();
        assert!(err.detail.contains("cannot set items"), "{}", err.detail);
        let err = run(b"\x80\x02K\x01").unwrap_err();
        assert!(err.detail.contains("truncated"), "{}", err.detail);
        let err = run(b"\x80\x02\x8b\x00\x00\x00\x80.").unwrap_err();
        assert!(err.detail.contains("negative"), "{}", err.detail);
        let err = run(b"\x80\x02cfoo\nbar").unwrap_err();
        assert!(err.detail.contains("newline"), "{}", err.detail);
    }
}
