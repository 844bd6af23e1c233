//! The value model: what a pickle builds, shared instead of copied, dropped without
//! recursion however deep it nests.

use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;
use std::rc::Rc;

use super::super::clip;

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
    pub(super) depth: usize,
    pub(super) items: Vec<Value>,
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
    pub(super) fn depth(&self) -> usize {
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::super::load;
    use super::super::test_support::allow_all;
    use super::*;

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
}
