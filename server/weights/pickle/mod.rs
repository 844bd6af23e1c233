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
//!
//! `value` is the value model, `pickled` the result that breaks its cycles,
//! `unpickler` the machine's state and bounds, `opcodes` what each opcode does.

mod opcodes;
mod pickled;
mod unpickler;
mod value;

pub use pickled::Pickled;
pub use value::{Dict, DictItems, Global, List, ListItems, Seq, Value};

use unpickler::Unpickler;

/// Opcodes one pickle may run. A resnext101 state dict needs ~40k; a hostile pickle is
/// stopped before its values could take more than ~100 MB.
pub const MAX_OPS: usize = 1 << 20;
/// How deep tuples, calls and persistent ids may nest (a state dict needs 4).
pub const MAX_DEPTH: usize = 256;
/// Items the copying opcodes may copy in all.
pub const MAX_COPIED: usize = 1 << 22;

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

/// Reads one pickle from the start of `data` and returns it with the bytes it used.
/// `allowed` decides which globals may appear at all.
pub fn load(
    data: &[u8],
    allowed: &dyn Fn(&Global) -> bool,
) -> Result<(Pickled, usize), PickleError> {
    Unpickler::new(data, allowed).run()
}

/// What the tests of every part of the reader share.
#[cfg(test)]
mod test_support {
    use super::Global;

    pub(super) fn allow_all(_: &Global) -> bool {
        true
    }

    /// `n` rounds of `t = (t, t)` through the memo: 2^n leaves from 7n bytes.
    pub(super) fn memo_bomb(n: usize) -> Vec<u8> {
        let mut p = b"\x80\x02Nq\x00".to_vec();
        for _ in 0..n {
            p.extend_from_slice(b"h\x00h\x00\x86q\x000");
        }
        p.extend_from_slice(b"h\x00.");
        p
    }

    /// Runs `f`, which must finish within a second: a hostile pickle fails fast.
    pub(super) fn within_a_second<T>(f: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let out = f();
        assert!(
            started.elapsed().as_millis() < 1000,
            "{:?}",
            started.elapsed()
        );
        out
    }
}
