//! What each opcode does: the dispatch loop over the pickle, bounded by [`MAX_OPS`].

use std::rc::Rc;

use super::unpickler::Unpickler;
use super::value::Value;
use super::{PickleError, Pickled, MAX_OPS};

impl Unpickler<'_> {
    pub(super) fn run(mut self) -> Result<(Pickled, usize), PickleError> {
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
                    return Ok((Pickled::new(containers, value), self.pos));
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
    use std::rc::Rc;

    use super::super::test_support::{allow_all, memo_bomb, within_a_second};
    use super::super::*;

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

    #[test]
    fn memo_gets_share_instead_of_copying() {
        // 2^200 leaves: any copy would never finish.
        within_a_second(|| {
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
        });
    }
}
