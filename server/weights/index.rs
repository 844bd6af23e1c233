//! A checkpoint's index as every format reader builds it: flat typed storages, and each
//! tensor a strided view of one of them, under its state-dict name.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::DType;

/// Where a storage's bytes live.
#[derive(Debug, Clone)]
pub(super) enum Bytes {
    /// A byte range of the checkpoint file, read on demand.
    File { offset: u64, len: u64 },
    /// A byte range of the memory map (safetensors).
    Mapped { offset: usize, len: usize },
    /// Already in memory (a compressed zip member).
    Memory(Arc<[u8]>),
}

/// A flat, typed buffer several tensors may view.
#[derive(Debug, Clone)]
pub(super) struct Storage {
    pub(super) dtype: DType,
    pub(super) bytes: Bytes,
}

/// One tensor: a strided view into a storage.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) storage: usize,
    /// In elements.
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    /// In elements.
    pub(super) strides: Vec<usize>,
}

/// Collects storages and tensor entries while a format reader walks a file.
#[derive(Default)]
pub(super) struct Builder {
    pub(super) storages: Vec<Storage>,
    pub(super) entries: Vec<(String, Entry)>,
}

/// The strides of a row-major tensor of `shape`, in elements.
pub(super) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Drops a `module.` prefix that every key carries (DataParallel checkpoints).
pub(super) fn normalise_names(entries: Vec<(String, Entry)>) -> BTreeMap<String, Entry> {
    let all_prefixed = !entries.is_empty() && entries.iter().all(|(k, _)| k.starts_with("module."));
    entries
        .into_iter()
        .map(|(k, e)| match k.strip_prefix("module.") {
            Some(rest) if all_prefixed => (rest.to_string(), e),
            _ => (k, e),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }

    #[test]
    fn module_prefix_is_dropped_only_when_universal() {
        let e = || Entry {
            storage: 0,
            offset: 0,
            shape: vec![],
            strides: vec![],
        };
        let all = normalise_names(vec![("module.a".into(), e()), ("module.b".into(), e())]);
        assert_eq!(all.keys().cloned().collect::<Vec<_>>(), vec!["a", "b"]);
        let some = normalise_names(vec![("module.a".into(), e()), ("b".into(), e())]);
        assert_eq!(
            some.keys().cloned().collect::<Vec<_>>(),
            vec!["b", "module.a"]
        );
    }
}
