//! The unpickler's state, the reads of an opcode's arguments, and the stack, memo and
//! container operations the opcodes share, each bounded (see the module doc of
//! [`super`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::pickled::Containers;
use super::value::{Dict, Global, Seq, Value};
use super::{PickleError, MAX_COPIED, MAX_DEPTH};

/// The machine's state while one pickle runs.
pub(super) struct Unpickler<'a> {
    // First, so that on an error it empties the containers before the stack and memo
    // drop (see `Pickled`).
    pub(super) containers: Containers,
    data: &'a [u8],
    pub(super) pos: usize,
    pub(super) stack: Vec<Value>,
    /// Stack heights at each MARK.
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u32, Value>,
    allowed: &'a dyn Fn(&Global) -> bool,
    /// Items copied so far (see [`MAX_COPIED`]).
    copied: usize,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8], allowed: &'a dyn Fn(&Global) -> bool) -> Self {
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
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(super) fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn len_u32(&mut self) -> Result<usize, PickleError> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }

    pub(super) fn len_u64(&mut self) -> Result<usize, PickleError> {
        usize::try_from(u64::from_le_bytes(self.le()?))
            .map_err(|_| PickleError::Truncated(self.data.len()))
    }

    pub(super) fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    pub(super) fn malformed(&self, what: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            what: what.into(),
        }
    }

    pub(super) fn too_large(&self, what: &'static str, limit: usize) -> PickleError {
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
    pub(super) fn seq(&self, items: Vec<Value>) -> Result<Rc<Seq>, PickleError> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(self.too_large("levels of nesting", MAX_DEPTH));
        }
        Ok(Rc::new(Seq { depth, items }))
    }

    pub(super) fn tuple(&self, items: Vec<Value>) -> Result<Value, PickleError> {
        Ok(Value::Tuple(self.seq(items)?))
    }

    pub(super) fn new_list(&mut self, items: Vec<Value>) -> Value {
        let l = Rc::new(RefCell::new(items));
        self.containers.lists.push(Rc::downgrade(&l));
        Value::List(l)
    }

    pub(super) fn new_dict(&mut self) -> Value {
        let d: Dict = Rc::default();
        self.containers.dicts.push(Rc::downgrade(&d));
        Value::Dict(d)
    }

    pub(super) fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    pub(super) fn top(&mut self) -> Result<&mut Value, PickleError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            pos,
            what: "stack underflow".into(),
        })
    }

    /// Pops everything above the last MARK.
    pub(super) fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let at = self.marks.pop().ok_or_else(|| self.malformed("no MARK"))?;
        if at > self.stack.len() {
            return Err(self.malformed("MARK above stack"));
        }
        Ok(self.stack.split_off(at))
    }

    pub(super) fn global(&mut self, module: String, name: String) -> Result<Value, PickleError> {
        let g = Global { module, name };
        if (self.allowed)(&g) {
            Ok(Value::Global(Rc::new(g)))
        } else {
            Err(PickleError::ForbiddenGlobal(g))
        }
    }

    pub(super) fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => Err(self.malformed("string is not UTF-8")),
        }
    }

    pub(super) fn set_items(
        &mut self,
        target: &Value,
        items: Vec<Value>,
    ) -> Result<(), PickleError> {
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

    pub(super) fn append(&mut self, target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
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
    pub(super) fn ordered_dict(&mut self, args: &Seq) -> Result<Value, PickleError> {
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{allow_all, memo_bomb, within_a_second};
    use super::super::*;

    #[test]
    fn forbidden_global_is_refused_before_any_call() {
        // pickle.dumps of a reduce to os.system, protocol 2.
        let data = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
        let err = load(data, &|g| g.module == "collections").expect_err("must refuse");
        assert!(err.to_string().contains("posix.system"), "{err}");
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
        let err = within_a_second(|| load(&p, &allow_all).expect_err("too deep"));
        assert!(err.to_string().contains("exceeds"), "{err}");
        assert!(err.to_string().contains("nesting"), "{err}");
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
