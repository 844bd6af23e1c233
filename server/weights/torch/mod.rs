//! PyTorch's two `torch.save` layouts.
//!
//! Legacy (PyTorch < 1.6, and the 2019 hub checkpoints): five pickles back to back
//! (magic number, protocol version, sys info, the object, the storage keys) followed by
//! each storage as an 8-byte element count and its raw little-endian elements, in the
//! order of the key list. Zip (PyTorch >= 1.6): `<dir>/data.pkl` holds the object and
//! `<dir>/data/<key>` each storage. In both, tensors are `_rebuild_tensor_v2` calls on a
//! persistent-id storage reference; nothing here executes them.
//!
//! `legacy` and `zipfile` read the two layouts, `state_dict` finds the tensors in
//! the pickle; this module registers what they found.
//!
//! Sizes come from the file, so each is checked against the caller's [`Limits`] before
//! anything is allocated or inflated: the pickled index, each storage (a zip member
//! inflates to at most the bytes its tensors need, whatever its header claims) and all
//! storages and tensors together.

mod legacy;
mod state_dict;
mod zipfile;

pub(super) use legacy::read_legacy;
pub(super) use zipfile::read_zip;

use std::collections::HashMap;
use std::path::Path;

use super::{clip, Builder, Bytes, Entry, Limits, Storage, WeightsError};
use state_dict::PickledTensor;

/// Registers each storage once (tensors may share one) and each tensor as a view of it.
fn add_tensors(
    path: &Path,
    tensors: Vec<PickledTensor>,
    mut located: HashMap<String, Bytes>,
    limits: &Limits,
    builder: &mut Builder,
) -> Result<(), WeightsError> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut total = 0u64;
    for t in tensors {
        let bad_storage = |what: &str| {
            WeightsError::malformed(path, format!("storage '{}' {what}", clip(&t.key)))
        };
        let overflow =
            || WeightsError::malformed(path, format!("tensor '{}': size overflows", clip(&t.name)));
        // Reading a tensor allocates its elements, which a zero stride can make far more
        // than its storage holds: the views count against the limits too.
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(overflow)?;
        let bytes = (numel as u64)
            .checked_mul(t.dtype.size() as u64)
            .ok_or_else(overflow)?;
        total = limits.add(path, total, bytes, "tensors")?;
        let storage_bytes = t.numel.checked_mul(t.dtype.size()).ok_or_else(overflow)?;
        let storage = match index.get(&t.key) {
            Some(&i) => i,
            None => {
                let bytes = located
                    .remove(&t.key)
                    .ok_or_else(|| bad_storage("has no data"))?;
                let available = match &bytes {
                    Bytes::File { len, .. } => *len as usize,
                    Bytes::Mapped { len, .. } => *len,
                    Bytes::Memory(b) => b.len(),
                };
                if available < storage_bytes {
                    return Err(bad_storage(&format!(
                        "holds {available} bytes, fewer than its {} elements",
                        t.numel
                    )));
                }
                builder.storages.push(Storage {
                    dtype: t.dtype,
                    bytes,
                });
                index.insert(t.key.clone(), builder.storages.len() - 1);
                builder.storages.len() - 1
            }
        };
        if builder.storages[storage].dtype != t.dtype {
            return Err(bad_storage("used with two dtypes"));
        }
        let last = t
            .shape
            .iter()
            .zip(&t.strides)
            .try_fold(t.offset, |at, (&d, &s)| {
                at.checked_add(d.saturating_sub(1).checked_mul(s)?)
            });
        if numel > 0 && last.is_none_or(|last| last >= t.numel) {
            return Err(WeightsError::malformed(
                path,
                format!(
                    "tensor '{}' reaches past its storage of {} elements",
                    clip(&t.name),
                    t.numel
                ),
            ));
        }
        builder.entries.push((
            t.name,
            Entry {
                storage,
                offset: t.offset,
                shape: t.shape,
                strides: t.strides,
            },
        ));
    }
    Ok(())
}

/// A state dict as `torch.save` writes it, for the tests of every part of the reader.
#[cfg(test)]
mod fixtures {
    use std::io::Write;

    use super::super::{Checkpoint, Limits};
    use crate::model::Architecture;

    /// `{'fc.weight': <f32 tensor of `shape` on storage '0' of `numel` elements>}` as
    /// `torch.save` pickles it (protocol 2).
    pub(super) fn state_dict_pickle(numel: u64, shape: &[u64]) -> Vec<u8> {
        let mut p = b"\x80\x02}X\x09\x00\x00\x00fc.weightctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu\x8a\x08".to_vec();
        p.extend_from_slice(&numel.to_le_bytes());
        p.extend_from_slice(b"tQK\x00(");
        for d in shape {
            p.extend_from_slice(b"\x8a\x08");
            p.extend_from_slice(&d.to_le_bytes());
        }
        p.extend_from_slice(b"t(");
        let mut stride = 1u64;
        let mut strides = Vec::new();
        for d in shape.iter().rev() {
            strides.push(stride);
            stride = stride.saturating_mul(*d);
        }
        for s in strides.iter().rev() {
            p.extend_from_slice(b"\x8a\x08");
            p.extend_from_slice(&s.to_le_bytes());
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRs.");
        p
    }

    /// A legacy `torch.save` stream whose storage '0' claims `numel` floats and holds 64
    /// bytes of them.
    pub(super) fn legacy_checkpoint(dir: &std::path::Path, numel: u64) -> std::path::PathBuf {
        let path = dir.join("legacy.pth");
        let mut bytes =
            b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
        bytes.extend_from_slice(&state_dict_pickle(numel, &[numel]));
        bytes.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
        bytes.extend_from_slice(&numel.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        std::fs::write(&path, &bytes).expect("write");
        path
    }

    /// A zip `torch.save` file whose storage '0' is `zeros` zero bytes, deflated.
    pub(super) fn zip_checkpoint(
        dir: &std::path::Path,
        pickle: &[u8],
        zeros: u64,
    ) -> std::path::PathBuf {
        let path = dir.join("bomb.pth");
        let file = std::fs::File::create(&path).expect("create");
        let mut zip = zip::ZipWriter::new(file);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).expect("pkl");
        zip.write_all(pickle).expect("pkl");
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(9))
            .large_file(zeros >= u32::MAX as u64);
        zip.start_file("archive/data/0", deflated).expect("member");
        let chunk = vec![0u8; 1 << 20];
        let mut left = zeros;
        while left > 0 {
            let n = left.min(chunk.len() as u64);
            zip.write_all(&chunk[..n as usize]).expect("zeros");
            left -= n;
        }
        zip.finish().expect("finish");
        path
    }

    pub(super) fn resnet18() -> Limits {
        Limits::for_architecture(Architecture::Resnet18)
    }

    #[test]
    fn the_pickle_writer_here_makes_a_checkpoint_that_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = zip_checkpoint(dir.path(), &state_dict_pickle(6, &[2, 3]), 24);
        let ck = Checkpoint::open_within(&path, resnet18()).expect("opens");
        assert_eq!(ck.read_f32("fc.weight").expect("reads"), vec![0.0; 6]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Checkpoint;
    use super::fixtures::{resnet18, state_dict_pickle, zip_checkpoint};

    #[test]
    fn views_are_bounded_like_storages() {
        let dir = tempfile::tempdir().expect("tempdir");
        // One float viewed 2^40 times (stride 0): reading it would allocate 4 TiB.
        let mut p = state_dict_pickle(1, &[1 << 40]);
        let stride_1 = [b"\x8a\x08".as_slice(), &1u64.to_le_bytes()].concat();
        let stride_0 = [b"\x8a\x08".as_slice(), &0u64.to_le_bytes()].concat();
        let at = p
            .windows(stride_1.len())
            .rposition(|w| w == stride_1)
            .expect("stride");
        p.splice(at..at + stride_1.len(), stride_0);
        let path = zip_checkpoint(dir.path(), &p, 4);
        let err = Checkpoint::open_within(&path, resnet18()).expect_err("refused");
        assert!(err.to_string().contains("tensors of more than"), "{err}");
        // Sizes whose product overflows.
        let path = zip_checkpoint(dir.path(), &state_dict_pickle(4, &[1 << 40, 1 << 40]), 16);
        let err = Checkpoint::open_within(&path, resnet18()).expect_err("refused");
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
