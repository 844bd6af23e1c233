//! The legacy `torch.save` stream (PyTorch < 1.6, the 2019 hub files): five pickles back
//! to back, then each storage as an 8-byte element count and its raw elements, in the
//! order of the key list.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::super::pickle::{self, PickleError, Pickled, Value};
use super::super::{clip, Builder, Bytes, DType, Limits, WeightsError};
use super::add_tensors;
use super::state_dict::{allowed_global, collect_tensors, no_globals};

/// `0x1950a86a20f9469cfc6c` as pickled (LONG1, little-endian).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

/// Reads a legacy `torch.save` stream's index.
pub(in crate::weights) fn read_legacy(
    path: &Path,
    file: &File,
    limits: &Limits,
    builder: &mut Builder,
) -> Result<(), WeightsError> {
    let file_len = file
        .metadata()
        .map_err(|e| WeightsError::io(path, e))?
        .len();
    // The pickles sit at the front and are small next to the storages: read a window
    // and widen it only if they do not fit.
    let mut window = (1u64 << 20).min(limits.max_index_bytes);
    let (root, keys, data_start) = loop {
        let n = usize::try_from(window.min(file_len))
            .map_err(|_| WeightsError::malformed(path, "file too large for this machine"))?;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| WeightsError::io(path, e))?;
        match legacy_header(&buf) {
            Ok(found) => break found,
            Err(LegacyError::Pickle(PickleError::Truncated(_)))
                if (n as u64) < file_len && window < limits.max_index_bytes =>
            {
                window = window.saturating_mul(8).min(limits.max_index_bytes)
            }
            Err(LegacyError::Pickle(PickleError::Truncated(_))) if (n as u64) < file_len => {
                return Err(limits.exceeded(
                    path,
                    format!("pickled index is longer than {window} bytes"),
                    format!("the {}-byte limit on an index", limits.max_index_bytes),
                ))
            }
            Err(LegacyError::Pickle(PickleError::Truncated(_))) => {
                return Err(WeightsError::malformed(
                    path,
                    "file ends inside its pickled header (truncated?)",
                ))
            }
            Err(LegacyError::Pickle(source)) => {
                return Err(WeightsError::Pickle {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(LegacyError::Format(what)) => return Err(WeightsError::malformed(path, what)),
        }
    };
    let tensors = collect_tensors(path, &root)?;
    drop(root);
    let dtypes: HashMap<&str, DType> = tensors.iter().map(|t| (t.key.as_str(), t.dtype)).collect();
    let mut located = HashMap::new();
    let mut pos = data_start as u64;
    let mut total = 0u64;
    for key in &keys {
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, pos).map_err(|_| {
            WeightsError::malformed(
                path,
                format!("file ends before storage '{}' (truncated?)", clip(key)),
            )
        })?;
        let numel = u64::from_le_bytes(count);
        let dtype = *dtypes.get(key.as_str()).ok_or_else(|| {
            WeightsError::malformed(
                path,
                format!("storage '{}' is listed but no tensor uses it", clip(key)),
            )
        })?;
        let len = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| WeightsError::malformed(path, "storage size overflows"))?;
        total = limits.add(path, total, len, "storage data")?;
        let start = pos + 8;
        if start.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(WeightsError::malformed(
                path,
                format!("storage '{}' needs {len} bytes at {start} but the file has {file_len} (truncated?)", clip(key)),
            ));
        }
        located.insert(key.clone(), Bytes::File { offset: start, len });
        pos = start + len;
    }
    add_tensors(path, tensors, located, limits, builder)
}

enum LegacyError {
    Pickle(PickleError),
    Format(String),
}

impl From<PickleError> for LegacyError {
    fn from(e: PickleError) -> Self {
        LegacyError::Pickle(e)
    }
}

/// Parses the five pickles; returns the object, the storage keys and where data starts.
fn legacy_header(buf: &[u8]) -> Result<(Pickled, Vec<String>, usize), LegacyError> {
    let (magic, mut pos) = pickle::load(buf, &no_globals)?;
    if !matches!(&*magic, Value::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err(LegacyError::Format(
            "wrong magic number: not a torch.save file".into(),
        ));
    }
    let (protocol, n) = pickle::load(&buf[pos..], &no_globals)?;
    pos += n;
    if protocol.as_int() != Some(LEGACY_PROTOCOL) {
        return Err(LegacyError::Format(format!(
            "torch.save protocol {:?}, expected {LEGACY_PROTOCOL}",
            *protocol
        )));
    }
    let (sys_info, n) = pickle::load(&buf[pos..], &no_globals)?;
    pos += n;
    if let Value::Dict(d) = &*sys_info {
        let big_endian = d
            .borrow()
            .iter()
            .any(|(k, v)| k.as_str() == Some("little_endian") && matches!(v, Value::Bool(false)));
        if big_endian {
            return Err(LegacyError::Format(
                "big-endian checkpoints are not supported".into(),
            ));
        }
    }
    let (object, n) = pickle::load(&buf[pos..], &allowed_global)?;
    pos += n;
    let (keys, n) = pickle::load(&buf[pos..], &no_globals)?;
    pos += n;
    let keys = keys
        .as_seq()
        .and_then(|items| {
            items
                .iter()
                .map(|k| k.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| LegacyError::Format("storage key list is not a list of strings".into()))?;
    Ok((object, keys, pos))
}

#[cfg(test)]
mod tests {
    use super::super::super::{Checkpoint, WeightsError};
    use super::super::fixtures::{legacy_checkpoint, resnet18};

    #[test]
    fn a_legacy_storage_larger_than_the_model_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = legacy_checkpoint(dir.path(), 1 << 30);
        let err = Checkpoint::open_within(&path, resnet18()).expect_err("refused");
        assert!(matches!(err, WeightsError::TooLarge { .. }), "{err}");
    }
}
