//! A pickle reader that executes nothing.
//!
//! It understands the opcodes `torch.save` writes for a state dict (protocols 2-5) and
//! builds a [`Value`] tree. A `GLOBAL` outside the caller's allowlist stops the read with
//! [`PickleError::ForbiddenGlobal`]; `REDUCE` of an allowed global is recorded as a
//! [`Value::Call`] for the caller to interpret, except `collections.OrderedDict()` which
//! becomes a dict so `SETITEMS` can fill it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A pickled value. Lists and dicts are shared (`Rc`) because the memo can refer to a
/// container that later opcodes keep filling.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for `i64`, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A reference to an allowed `module.name`.
    Global(Global),
    /// An allowed global applied to arguments, left for the caller to interpret.
    Call(Global, Vec<Value>),
    /// The argument of `BINPERSID`: torch's storage references.
    PersistentId(Box<Value>),
}

/// `module.name` of a `GLOBAL` opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub module: String,
    pub name: String,
}

impl std::fmt::Display for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
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

    /// Items of a tuple or list.
    pub fn as_seq(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(v) => Some(v.clone()),
            Value::List(v) => Some(v.borrow().clone()),
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
}

/// Reads one pickle from the start of `data` and returns it with the bytes it used.
/// `allowed` decides which globals may appear at all.
pub fn load(data: &[u8], allowed: &dyn Fn(&Global) -> bool) -> Result<(Value, usize), PickleError> {
    Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        allowed,
    }
    .run()
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    allowed: &'a dyn Fn(&Global) -> bool,
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
            Ok(Value::Global(g))
        } else {
            Err(PickleError::ForbiddenGlobal(g))
        }
    }

    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(s.to_string())),
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
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(self.malformed(format!("APPEND on a {}", other.kind()))),
        }
    }

    fn run(mut self) -> Result<(Value, usize), PickleError> {
        loop {
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
                    let v = self.pop()?;
                    return Ok((v, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err(self.malformed("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::default());
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
                    let bytes = self.take(n)?.to_vec();
                    self.stack.push(long_value(bytes));
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
                    let s = self.take(n)?.iter().map(|&b| char::from(b)).collect();
                    self.stack.push(Value::Str(s));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.len_u32()?,
                        b'C' => usize::from(self.u8()?),
                        _ => self.len_u64()?,
                    };
                    let v = self.take(n)?.to_vec();
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
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.malformed("STACK_GLOBAL needs two strings"));
                    };
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let Value::Global(g) = func else {
                        return Err(self.malformed(format!("REDUCE on a {}", func.kind())));
                    };
                    let Value::Tuple(args) = args else {
                        return Err(self.malformed("REDUCE arguments are not a tuple"));
                    };
                    let v = if g.module == "collections" && g.name == "OrderedDict" {
                        let d = Value::Dict(Rc::default());
                        if let Some(items) = args.first() {
                            // OrderedDict([(k, v), ...])
                            let pairs = items
                                .as_seq()
                                .ok_or_else(|| self.malformed("OrderedDict argument"))?;
                            let mut flat = Vec::with_capacity(pairs.len() * 2);
                            for p in pairs {
                                match p.as_seq().as_deref() {
                                    Some([k, v]) => flat.extend([k.clone(), v.clone()]),
                                    _ => {
                                        return Err(self.malformed("OrderedDict item is not a pair"))
                                    }
                                }
                            }
                            self.set_items(&d, flat)?;
                        }
                        d
                    } else {
                        Value::Call(g, args)
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
                    self.stack.push(Value::PersistentId(Box::new(pid)));
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
    }
}

/// LONG1/LONG4 payload: little-endian two's complement.
fn long_value(bytes: Vec<u8>) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(&bytes);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(bytes)
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
        let Value::Dict(d) = v else {
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
            matches!(v, Value::BigInt(ref b) if b == &[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19])
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
}
