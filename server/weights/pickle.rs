//! A pickle reader that executes nothing.
//!
//! It understands the opcodes `torch.save` writes for a state dict (protocols 2-5) and
//! builds a [`Value`] tree. A `GLOBAL` outside the caller's allowlist stops the read with
//! [`PickleError::ForbiddenGlobal`]; `REDUCE` of an allowed global is recorded as a
//! [`Value::Call`] for the caller to interpret, except `collections.OrderedDict()` which
//! becomes a dict so `SETITEMS` can fill it.
//!
//! A pickle is a program: a few bytes can describe a value of any size or depth. What one
//! may cost is bounded, so a hostile file fails fast with [`PickleError::TooLarge`]:
//! - values are shared, never copied: a memo get or `DUP` clones an `Rc`, so a pickle
//!   that nests its own memoised tuples (2^n leaves from n opcodes) costs n;
//! - at most [`MAX_OPS`] opcodes run, and at most [`MAX_COPIED`] items are copied by the
//!   few opcodes that copy (`OrderedDict([...])`);
//! - tuples, calls and persistent ids nest at most [`MAX_DEPTH`] deep. Lists and dicts can
//!   be filled after they are nested, so their depth is not known when they are built:
//!   dropping a value is iterative, never recursive, whatever its depth;
//! - the lists and dicts of a pickle can refer to each other in a cycle (through the
//!   memo); they are emptied when the [`Pickled`] result drops, so no cycle outlives it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::rc::{Rc, Weak};

use super::clip;

/// Opcodes one pickle may run. A resnext101 state dict needs ~40k; a hostile pickle is
/// stopped before its values could take more than ~100 MB.
pub const MAX_OPS: usize = 1 << 20;
/// How deep tuples, calls and persistent ids may nest (a state dict needs 4).
pub const MAX_DEPTH: usize = 256;
/// Items the copying opcodes may copy in all.
pub const MAX_COPIED: usize = 1 << 22;

/// A list's items; shared because the memo can refer to a list later opcodes keep filling.
pub type List = Rc<ListItems>;
/// A dict's items in insertion order; shared like [`List`].
pub type Dict = Rc<DictItems>;
pub type ListItems = RefCell<Vec<Value>>;
pub type DictItems = RefCell<Vec<(Value, Value)>>;

/// A pickled value. Every payload is behind an `Rc`, so cloning a value is O(1).
#[derive(Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for `i64`, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(List),
    Dict(Dict),
    /// A reference to an allowed `module.name`.
    Global(Rc<Global>),
    /// An allowed global applied to arguments, left for the caller to interpret.
    Call(Rc<Global>, Rc<Seq>),
    /// The argument of `BINPERSID` (its one item): torch's storage references.
    PersistentId(Rc<Seq>),
}

/// The items of an immutable container, and how deep it nests.
pub struct Seq {
    depth: usize,
    items: Vec<Value>,
}

impl Seq {
    /// 1 + the deepest item's depth; lists and dicts count as 1 (see the module doc).
    pub fn depth(&self) -> usize {
        self.depth
    }
}

impl Deref for Seq {
    type Target = [Value];

    fn deref(&self) -> &[Value] {
        &self.items
    }
}

/// `module.name` of a `GLOBAL` opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub module: String,
    pub name: String,
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Either part may be as long as the file: messages carry a prefix.
        write!(f, "{}.{}", clip(&self.module), clip(&self.name))
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// Items of a tuple or list (a shallow copy: each item is an `Rc` clone).
    pub fn as_seq(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(v) => Some(v.items.clone()),
            Value::List(v) => Some(v.borrow().clone()),
            _ => None,
        }
    }

    /// How many items [`Value::as_seq`] would copy, without copying them.
    pub fn seq_len(&self) -> Option<usize> {
        match self {
            Value::Tuple(v) => Some(v.len()),
            Value::List(v) => Some(v.borrow().len()),
            _ => None,
        }
    }

    /// A short name of the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Call(..) => "object",
            Value::PersistentId(_) => "persistent id",
        }
    }

    /// Nesting depth of an immutable container; 1 for a list or dict, 0 for the rest.
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::Call(_, s) | Value::PersistentId(s) => s.depth,
            Value::List(_) | Value::Dict(_) => 1,
            _ => 0,
        }
    }

    /// Moves this value's items into `out` if nothing else holds them.
    fn release_items(&mut self, out: &mut Vec<Value>) {
        match self {
            Value::Tuple(s) | Value::Call(_, s) | Value::PersistentId(s) => {
                if let Some(s) = Rc::get_mut(s) {
                    out.append(&mut s.items);
                }
            }
            // The registry of a `Pickled` may hold weak references: count strong ones.
            Value::List(l) if Rc::strong_count(l) == 1 => {
                if let Ok(mut items) = l.try_borrow_mut() {
                    out.append(&mut items);
                }
            }
            Value::Dict(d) if Rc::strong_count(d) == 1 => {
                if let Ok(mut items) = d.try_borrow_mut() {
                    for (k, v) in items.drain(..) {
                        out.push(k);
                        out.push(v);
                    }
                }
            }
            _ => {}
        }
    }

    fn fmt_depth(&self, f: &mut fmt::Formatter<'_>, depth: usize) -> fmt::Result {
        fn items<'a>(
            f: &mut fmt::Formatter<'_>,
            open: &str,
            close: &str,
            it: impl ExactSizeIterator<Item = &'a Value>,
            depth: usize,
        ) -> fmt::Result {
            f.write_str(open)?;
            let n = it.len();
            for (i, v) in it.take(8).enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                v.fmt_depth(f, depth)?;
            }
            if n > 8 {
                write!(f, ", … ({n} items)")?;
            }
            f.write_str(close)
        }
        if depth == 0 {
            return f.write_str("…");
        }
        let next = depth - 1;
        match self {
            Value::None => f.write_str("None"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::BigInt(b) => write!(f, "int({} bytes)", b.len()),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{:?}", clip(s)),
            Value::Bytes(b) => write!(f, "bytes({})", b.len()),
            Value::Tuple(s) => items(f, "(", ")", s.iter(), next),
            Value::List(l) => match l.try_borrow() {
                Ok(l) => items(f, "[", "]", l.iter(), next),
                Err(_) => f.write_str("[…]"),
            },
            Value::Dict(d) => match d.try_borrow() {
                Ok(d) => write!(f, "{{{} items}}", d.len()),
                Err(_) => f.write_str("{…}"),
            },
            Value::Global(g) => write!(f, "{g}"),
            Value::Call(g, args) => {
                write!(f, "{g}")?;
                items(f, "(", ")", args.iter(), next)
            }
            Value::PersistentId(s) => items(f, "pid(", ")", s.iter(), next),
        }
    }
}

/// At most a few levels and items: a value can be deep and wide.
impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_depth(f, 4)
    }
}

/// Iterative: a value nested a million deep (a pickle of a few MB) drops in a loop, not
/// in a million stack frames.
impl Drop for Value {
    fn drop(&mut self) {
        let mut pending = Vec::new();
        self.release_items(&mut pending);
        while let Some(mut v) = pending.pop() {
            v.release_items(&mut pending);
            // `v` drops here with no items left to recurse into.
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle ends early (at byte {0})")]
    Truncated(usize),
    #[error("pickle opcode 0x{op:02x} at byte {pos} is not one a state dict needs")]
    UnsupportedOpcode { op: u8, pos: usize },
    #[error("pickle names the global '{0}', which a checkpoint has no business calling; refusing to load it")]
    ForbiddenGlobal(Global),
    #[error("malformed pickle at byte {pos}: {what}")]
    Malformed { pos: usize, what: String },
    #[error("checkpoint pickle exceeds the reader's limit of {limit} {what} (at byte {pos})")]
    TooLarge {
        what: &'static str,
        limit: usize,
        pos: usize,
    },
}

/// A loaded pickle: its value, which it derefs to, and a weak reference to every list and
/// dict the pickle made, emptied when this drops so that no cycle among them outlives it.
pub struct Pickled {
    // Declared first, so dropped first: the containers are emptied while `value` (and
    // with it every container it reaches) is still alive. Only ever dropped.
    _containers: Containers,
    value: Value,
}

impl Deref for Pickled {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.value
    }
}

impl fmt::Debug for Pickled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

#[derive(Default)]
struct Containers {
    lists: Vec<Weak<ListItems>>,
    dicts: Vec<Weak<DictItems>>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        // Take every item out first, so that no container still holds another when the
        // items drop (each then drops iteratively, see `Value`'s `Drop`).
        let mut items = Vec::new();
        for list in self.lists.drain(..).filter_map(|w| w.upgrade()) {
            if let Ok(mut l) = list.try_borrow_mut() {
                items.append(&mut l);
            }
        }
        for dict in self.dicts.drain(..).filter_map(|w| w.upgrade()) {
            if let Ok(mut d) = dict.try_borrow_mut() {
                for (k, v) in d.drain(..) {
                    items.push(k);
                    items.push(v);
                }
            }
        }
    }
}

/// Reads one pickle from the start of `data` and returns it with the bytes it used.
/// `allowed` decides which globals may appear at all.
pub fn load(
    data: &[u8],
    allowed: &dyn Fn(&Global) -> bool,
) -> Result<(Pickled, usize), PickleError> {
    Unpickler {
        containers: Containers::default(),
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        allowed,
        copied: 0,
    }
    .run()
}

struct Unpickler<'a> {
    // First, so that on an error it empties the containers before the stack and memo
    // drop (see `Pickled`).
    containers: Containers,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    allowed: &'a dyn Fn(&Global) -> bool,
    /// Items copied so far (see [`MAX_COPIED`]).
    copied: usize,
}

impl Unpickler<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u32(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize, PickleError> {
        usize::try_from(u64::from_le_bytes(self.le()?))
            .map_err(|_| PickleError::Truncated(self.data.len()))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn malformed(&self, what: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            what: what.into(),
        }
    }

    fn too_large(&self, what: &'static str, limit: usize) -> PickleError {
        PickleError::TooLarge {
            what,
            limit,
            pos: self.pos,
        }
    }

    /// Counts `n` items copied against [`MAX_COPIED`].
    fn copy(&mut self, n: usize) -> Result<(), PickleError> {
        self.copied = self.copied.saturating_add(n);
        if self.copied > MAX_COPIED {
            return Err(self.too_large("items copied", MAX_COPIED));
        }
        Ok(())
    }

    /// An immutable container of `items`, refused past [`MAX_DEPTH`].
    fn seq(&self, items: Vec<Value>) -> Result<Rc<Seq>, PickleError> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(self.too_large("levels of nesting", MAX_DEPTH));
        }
        Ok(Rc::new(Seq { depth, items }))
    }

    fn tuple(&self, items: Vec<Value>) -> Result<Value, PickleError> {
        Ok(Value::Tuple(self.seq(items)?))
    }

    fn new_list(&mut self, items: Vec<Value>) -> Value {
        let l = Rc::new(RefCell::new(items));
        self.containers.lists.push(Rc::downgrade(&l));
        Value::List(l)
    }

    fn new_dict(&mut self) -> Value {
        let d: Dict = Rc::default();
        self.containers.dicts.push(Rc::downgrade(&d));
        Value::Dict(d)
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            pos,
            what: "stack underflow".into(),
        })
    }

    /// Pops everything above the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let at = self.marks.pop().ok_or_else(|| self.malformed("no MARK"))?;
        if at > self.stack.len() {
            return Err(self.malformed("MARK above stack"));
        }
        Ok(self.stack.split_off(at))
    }

    fn global(&mut self, module: String, name: String) -> Result<Value, PickleError> {
        let g = Global { module, name };
        if (self.allowed)(&g) {
            Ok(Value::Global(Rc::new(g)))
        } else {
            Err(PickleError::ForbiddenGlobal(g))
        }
    }

    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => Err(self.malformed("string is not UTF-8")),
        }
    }

    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        let Value::Dict(d) = target else {
            return Err(self.malformed(format!("SETITEM on a {}", target.kind())));
        };
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("odd number of dict items"));
        }
        let mut d = d
            .try_borrow_mut()
            .map_err(|_| self.malformed("dict in use"))?;
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        match target {
            Value::List(l) => {
                l.try_borrow_mut()
                    .map_err(|_| self.malformed("list in use"))?
                    .extend(items);
                Ok(())
            }
            other => Err(self.malformed(format!("APPEND on a {}", other.kind()))),
        }
    }

    /// `collections.OrderedDict(args)`: a dict, filled from `[(k, v), ...]` if given.
    fn ordered_dict(&mut self, args: &Seq) -> Result<Value, PickleError> {
        let d = self.new_dict();
        if let Some(items) = args.first() {
            let n = items
                .seq_len()
                .ok_or_else(|| self.malformed("OrderedDict argument"))?;
            // Copies every pair: a pickle could pass the same long list a million times.
            self.copy(n.saturating_mul(2))?;
            let pairs = items.as_seq().unwrap_or_default();
            let mut flat = Vec::with_capacity(pairs.len() * 2);
            for p in &pairs {
                let pair = match p {
                    Value::Tuple(s) => s.items.clone(),
                    Value::List(l) => l.borrow().clone(),
                    _ => Vec::new(),
                };
                match &pair[..] {
                    [k, v] => flat.extend([k.clone(), v.clone()]),
                    _ => return Err(self.malformed("OrderedDict item is not a pair")),
                }
            }
            self.set_items(&d, flat)?;
        }
        Ok(d)
    }

    fn run(mut self) -> Result<(Pickled, usize), PickleError> {
        for _ in 0..MAX_OPS {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.malformed(format!("pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => {
                    let value = self.pop()?;
                    let containers = std::mem::take(&mut self.containers);
                    return Ok((
                        Pickled {
                            _containers: containers,
                            value,
                        },
                        self.pos,
                    ));
                }
                b'(' => self.marks.push(self.stack.len()),
                b')' => {
                    let t = self.tuple(Vec::new())?;
                    self.stack.push(t);
                }
                b']' => {
                    let l = self.new_list(Vec::new());
                    self.stack.push(l);
                }
                b'}' => {
                    let d = self.new_dict();
                    self.stack.push(d);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.stack.push(t);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let t = self.tuple(items)?;
                    self.stack.push(t);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let l = self.new_list(items);
                    self.stack.push(l);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.new_dict();
                    self.set_items(&d, items)?;
                    self.stack.push(d);
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?;
                }
                b'q' => {
                    let i = u32::from(self.u8()?);
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.le()?);
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.malformed("memo overflow"))?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        u32::from(self.u8()?)
                    } else {
                        u32::from_le_bytes(self.le()?)
                    };
                    // Shared, not copied (see the module doc).
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| self.malformed(format!("memo key {i} unset")))?;
                    self.stack.push(v);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.stack.push(Value::Int(i64::from(v)));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        usize::from(self.u8()?)
                    } else {
                        self.len_u32()?
                    };
                    let bytes = self.take(n)?;
                    let v = long_value(bytes);
                    self.stack.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.len_u32()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'T' | b'U' => {
                    // Python 2 `str`: bytes, read as Latin-1 like `encoding='latin1'`.
                    let n = if op == b'T' {
                        self.len_u32()?
                    } else {
                        usize::from(self.u8()?)
                    };
                    let s: String = self.take(n)?.iter().map(|&b| char::from(b)).collect();
                    self.stack.push(Value::Str(Rc::from(s)));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.len_u32()?,
                        b'C' => usize::from(self.u8()?),
                        _ => self.len_u64()?,
                    };
                    let v = Rc::from(self.take(n)?);
                    self.stack.push(Value::Bytes(v));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(module), Some(name)) = (module.as_str(), name.as_str()) else {
                        return Err(self.malformed("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(module.to_string(), name.to_string())?;
                    self.stack.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let Value::Global(g) = &func else {
                        return Err(self.malformed(format!("REDUCE on a {}", func.kind())));
                    };
                    let Value::Tuple(args) = &args else {
                        return Err(self.malformed("REDUCE arguments are not a tuple"));
                    };
                    let v = if g.module == "collections" && g.name == "OrderedDict" {
                        self.ordered_dict(args)?
                    } else {
                        Value::Call(g.clone(), args.clone())
                    };
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: torch sets `_metadata` on a state dict this way; the values
                    // we need never depend on it.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(target, Value::Dict(_)) {
                        let kind = target.kind();
                        return Err(self.malformed(format!("BUILD on a {kind}")));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = Value::PersistentId(self.seq(vec![pid])?);
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                _ => return Err(PickleError::UnsupportedOpcode { op, pos: at }),
            }
        }
        Err(self.too_large("opcodes", MAX_OPS))
    }
}

/// LONG1/LONG4 payload: little-endian two's complement.
fn long_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(bytes);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(Rc::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_all(_: &Global) -> bool {
        true
    }

    #[test]
    fn reads_protocol2_dict_with_memo() {
        // pickle.dumps({'a': 1, 'b': [2.5, 'x'], 'c': (True, None)}, protocol=2)
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x04eX\x01\x00\x00\x00cq\x05\x88N\x86q\x06u.";
        let (v, used) = load(data, &allow_all).expect("valid pickle");
        assert_eq!(used, data.len());
        let Value::Dict(d) = &*v else {
            panic!("not a dict")
        };
        let d = d.borrow();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].0.as_str(), Some("a"));
        assert_eq!(d[0].1.as_int(), Some(1));
        let list = d[1].1.as_seq().expect("list");
        assert!(matches!(list[0], Value::Float(f) if f == 2.5));
        assert_eq!(list[1].as_str(), Some("x"));
        assert!(
            matches!(&d[2].1, Value::Tuple(t) if matches!(t[..], [Value::Bool(true), Value::None]))
        );
    }

    #[test]
    fn big_ints_and_negative_longs() {
        // pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2): torch's legacy magic number.
        let magic = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
        let (v, _) = load(magic, &allow_all).expect("valid");
        assert!(
            matches!(&*v, Value::BigInt(b) if b[..] == [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19])
        );
        // pickle.dumps(-300) is BININT; pickle.dumps(-(1 << 40)) a negative LONG1.
        let (v, _) = load(b"\x80\x02J\xd4\xfe\xff\xff.", &allow_all).expect("valid");
        assert_eq!(v.as_int(), Some(-300));
        let (v, _) = load(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\xff.", &allow_all).expect("valid");
        assert_eq!(v.as_int(), Some(-(1 << 40)));
    }

    #[test]
    fn forbidden_global_is_refused_before_any_call() {
        // pickle.dumps of a reduce to os.system, protocol 2.
        let data = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
        let err = load(data, &|g| g.module == "collections").expect_err("must refuse");
        assert!(err.to_string().contains("posix.system"), "{err}");
    }

    #[test]
    fn truncated_and_unknown_opcodes_fail_cleanly() {
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01";
        assert!(matches!(
            load(data, &allow_all),
            Err(PickleError::Truncated(_))
        ));
        assert!(matches!(
            load(b"\x80\x02\xff.", &allow_all),
            Err(PickleError::UnsupportedOpcode { op: 0xff, pos: 2 })
        ));
        // A huge declared length must not allocate, just fail.
        assert!(matches!(
            load(b"\x80\x02X\xff\xff\xff\xff", &allow_all),
            Err(PickleError::Truncated(_))
        ));
        assert!(load(b"\x80\x02s.", &allow_all).is_err());
    }

    /// `n` rounds of `t = (t, t)` through the memo: 2^n leaves from 7n bytes.
    fn memo_bomb(n: usize) -> Vec<u8> {
        let mut p = b"\x80\x02Nq\x00".to_vec();
        for _ in 0..n {
            p.extend_from_slice(b"h\x00h\x00\x86q\x000");
        }
        p.extend_from_slice(b"h\x00.");
        p
    }

    #[test]
    fn memo_gets_share_instead_of_copying() {
        // 2^200 leaves: any copy would never finish.
        let started = std::time::Instant::now();
        let (v, _) = load(&memo_bomb(200), &allow_all).expect("loads");
        let Value::Tuple(t) = &*v else {
            panic!("not a tuple")
        };
        assert_eq!(t.depth(), 200);
        let (Value::Tuple(a), Value::Tuple(b)) = (&t[0], &t[1]) else {
            panic!("not a pair of tuples")
        };
        assert!(Rc::ptr_eq(a, b), "both halves are one shared tuple");
        // Debug output stays short however large the value.
        assert!(format!("{:?}", *v).len() < 1000);
        assert!(
            started.elapsed().as_millis() < 1000,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn nesting_past_the_limit_is_refused() {
        let err = load(&memo_bomb(MAX_DEPTH + 1), &allow_all).expect_err("too deep");
        assert!(
            matches!(
                err,
                PickleError::TooLarge {
                    limit: MAX_DEPTH,
                    ..
                }
            ),
            "{err}"
        );
        // A million TUPLE1s around one empty tuple: refused at the limit, in linear time.
        let mut p = b"\x80\x02)".to_vec();
        p.resize(p.len() + 1_000_000, 0x85);
        p.push(b'.');
        let started = std::time::Instant::now();
        let err = load(&p, &allow_all).expect_err("too deep");
        assert!(err.to_string().contains("exceeds"), "{err}");
        assert!(err.to_string().contains("nesting"), "{err}");
        assert!(
            started.elapsed().as_millis() < 1000,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn deep_lists_drop_without_recursion() {
        // Lists are filled after they nest, so their depth is not refused: 150,000 lists
        // each inside the next. Dropping them recursively would overflow this thread's
        // stack; the iterative drop does not.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..150_000 {
            p.extend_from_slice(b"(h\x00lq\x000");
        }
        p.extend_from_slice(b"h\x00.");
        let (v, _) = load(&p, &allow_all).expect("loads");
        assert_eq!(v.seq_len(), Some(1));
        drop(v);
        // The same chain as a bare value, with no `Pickled` to empty its lists first.
        let mut chain = Value::List(Rc::default());
        for _ in 0..1_000_000 {
            chain = Value::List(Rc::new(RefCell::new(vec![chain])));
        }
        drop(chain);
    }

    #[test]
    fn cycles_do_not_outlive_the_result() {
        // l = []; l.append(l)
        let (v, _) = load(b"\x80\x02]q\x00h\x00a.", &allow_all).expect("loads");
        let Value::List(l) = &*v else {
            panic!("not a list")
        };
        let weak = Rc::downgrade(l);
        assert!(matches!(&l.borrow()[0], Value::List(inner) if Rc::ptr_eq(inner, l)));
        drop(v);
        assert!(weak.upgrade().is_none(), "the cycle was broken and freed");
    }

    #[test]
    fn opcodes_and_copies_are_bounded() {
        // NONE, POP forever: no value grows, but the work does.
        let mut p = b"\x80\x02".to_vec();
        for _ in 0..=MAX_OPS / 2 {
            p.extend_from_slice(b"N0");
        }
        p.extend_from_slice(b"N.");
        let err = load(&p, &allow_all).expect_err("too many opcodes");
        assert!(
            matches!(err, PickleError::TooLarge { limit: MAX_OPS, .. }),
            "{err}"
        );
        // OrderedDict(pairs) of one memoised list of 1000 pairs, 3000 times: each call
        // copies the pairs.
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00](".to_vec();
        for _ in 0..1000 {
            p.extend_from_slice(b"K\x01K\x02\x86");
        }
        p.extend_from_slice(b"eq\x010");
        for _ in 0..3000 {
            p.extend_from_slice(b"h\x00h\x01\x85R0");
        }
        p.extend_from_slice(b"N.");
        let err = load(&p, &allow_all).expect_err("too much copying");
        assert!(
            matches!(
                err,
                PickleError::TooLarge {
                    limit: MAX_COPIED,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn long_global_names_are_clipped_in_messages() {
        let mut p = b"\x80\x02c".to_vec();
        p.extend(std::iter::repeat_n(b'm', 100_000));
        p.extend_from_slice(b"\nsystem\n.");
        let err = load(&p, &|_| false).expect_err("forbidden");
        assert!(err.to_string().len() < 300, "{}", err.to_string().len());
    }
}
