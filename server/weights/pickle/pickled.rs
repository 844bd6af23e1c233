//! The result of a load: its value, and the registry that empties the pickle's lists and
//! dicts when it drops, so that no cycle among them outlives it.

use std::fmt;
use std::ops::Deref;
use std::rc::Weak;

use super::value::{DictItems, ListItems, Value};

/// A loaded pickle: its value, which it derefs to, and a weak reference to every list and
/// dict the pickle made, emptied when this drops so that no cycle among them outlives it.
pub struct Pickled {
    // Declared first, so dropped first: the containers are emptied while `value` (and
    // with it every container it reaches) is still alive. Only ever dropped.
    _containers: Containers,
    value: Value,
}

impl Pickled {
    pub(super) fn new(containers: Containers, value: Value) -> Pickled {
        Pickled {
            _containers: containers,
            value,
        }
    }
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

/// A weak reference to every list and dict one pickle made.
#[derive(Default)]
pub(super) struct Containers {
    pub(super) lists: Vec<Weak<ListItems>>,
    pub(super) dicts: Vec<Weak<DictItems>>,
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

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::super::load;
    use super::super::test_support::allow_all;
    use super::*;

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
}
