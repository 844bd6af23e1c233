//! The zip `torch.save` file (PyTorch >= 1.6): `<dir>/data.pkl` holds the object and
//! `<dir>/data/<key>` each storage, stored (read in place) or deflated (inflated to what
//! its tensors need, never to what its header claims).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::super::pickle;
use super::super::{clip, Builder, Bytes, Limits, WeightsError};
use super::add_tensors;
use super::state_dict::{allowed_global, collect_tensors};

/// Reads a zip `torch.save` file's index.
pub(in crate::weights) fn read_zip(
    path: &Path,
    file: &File,
    limits: &Limits,
    builder: &mut Builder,
) -> Result<(), WeightsError> {
    let reader = file.try_clone().map_err(|e| WeightsError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(reader)
        .map_err(|e| WeightsError::malformed(path, format!("bad zip archive: {e}")))?;
    let pkl = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(|n| n.to_string())
        .ok_or_else(|| {
            WeightsError::malformed(
                path,
                "zip archive has no <dir>/data.pkl: not a torch.save file",
            )
        })?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(order) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        order
            .take(16)
            .read_to_string(&mut s)
            .map_err(|e| WeightsError::malformed(path, format!("byteorder: {e}")))?;
        if s.trim() != "little" {
            return Err(WeightsError::malformed(
                path,
                format!("byte order '{}' is not supported", s.trim()),
            ));
        }
    }
    let data = {
        let f = archive
            .by_name(&pkl)
            .map_err(|e| WeightsError::malformed(path, format!("reading {}: {e}", clip(&pkl))))?;
        let too_long = |claimed: u64| {
            limits.exceeded(
                path,
                format!("pickled index of {claimed} bytes"),
                format!("the {}-byte limit on an index", limits.max_index_bytes),
            )
        };
        if f.size() > limits.max_index_bytes {
            return Err(too_long(f.size()));
        }
        // Never more than the limit, whatever the member's header claims.
        let mut data = Vec::new();
        f.take(limits.max_index_bytes + 1)
            .read_to_end(&mut data)
            .map_err(|e| WeightsError::malformed(path, format!("reading {}: {e}", clip(&pkl))))?;
        if data.len() as u64 > limits.max_index_bytes {
            return Err(too_long(data.len() as u64));
        }
        data
    };
    let (root, _) =
        pickle::load(&data, &allowed_global).map_err(|source| WeightsError::Pickle {
            path: path.to_path_buf(),
            source,
        })?;
    let tensors = collect_tensors(path, &root)?;
    drop(root);
    // What the pickle says each storage holds, all checked before any member inflates.
    let mut needed: HashMap<&str, u64> = HashMap::new();
    let mut total = 0u64;
    for t in &tensors {
        if needed.contains_key(t.key.as_str()) {
            continue;
        }
        let len = (t.numel as u64)
            .checked_mul(t.dtype.size() as u64)
            .ok_or_else(|| WeightsError::malformed(path, "storage size overflows"))?;
        total = limits.add(path, total, len, "storage data")?;
        needed.insert(t.key.as_str(), len);
    }
    let mut located = HashMap::new();
    for (key, need) in needed {
        let member = format!("{prefix}data/{key}");
        let f = archive.by_name(&member).map_err(|e| {
            WeightsError::malformed(path, format!("storage {}: {e}", clip(&member)))
        })?;
        if f.size() > limits.max_tensor_bytes {
            return Err(limits.exceeded(
                path,
                format!("storage '{}' of {} bytes", clip(key), f.size()),
                limits.holds(),
            ));
        }
        let bytes = match (f.compression(), f.data_start()) {
            (zip::CompressionMethod::Stored, Some(offset)) => Bytes::File {
                offset,
                len: f.size(),
            },
            _ => {
                // Inflates what the tensors need and no more: a member's header may
                // understate what it inflates to. `need` is within the limits.
                let mut buf = Vec::with_capacity(usize::try_from(need).unwrap_or(0));
                f.take(need).read_to_end(&mut buf).map_err(|e| {
                    WeightsError::malformed(path, format!("storage {}: {e}", clip(&member)))
                })?;
                Bytes::Memory(Arc::from(buf))
            }
        };
        located.insert(key.to_string(), bytes);
    }
    add_tensors(path, tensors, located, limits, builder)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use super::super::super::{Checkpoint, Limits, WeightsError};
    use super::super::fixtures::{resnet18, state_dict_pickle, zip_checkpoint};

    /// `source`'s last member (deflated once), copied without inflating it after a new
    /// `data.pkl`.
    fn with_pickle(source: &std::path::Path, pickle: &[u8], out: &std::path::Path) {
        let mut src =
            zip::ZipArchive::new(std::fs::File::open(source).expect("open")).expect("archive");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(out).expect("create"));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).expect("pkl");
        zip.write_all(pickle).expect("pkl");
        let last = src.len() - 1;
        zip.raw_copy_file(src.by_index_raw(last).expect("member"))
            .expect("copy");
        zip.finish().expect("finish");
    }

    #[test]
    fn a_zip_bomb_is_refused_before_it_inflates() {
        // 1 GiB of zeros deflates to ~1 MiB. The pickle asks for all of it (a 1 GiB
        // storage), or for 4 KB of it: both are refused from the sizes alone.
        let dir = tempfile::tempdir().expect("tempdir");
        let gib = 1u64 << 30;
        let source = zip_checkpoint(dir.path(), &state_dict_pickle(1, &[1]), gib);
        assert!(std::fs::metadata(&source).expect("meta").len() < 2 << 20);
        let path = dir.path().join("bomb2.pth");
        for (numel, what) in [
            (gib / 4, "storage data"),
            (1024, "storage '0' of 1073741824 bytes"),
        ] {
            with_pickle(&source, &state_dict_pickle(numel, &[numel]), &path);
            let started = Instant::now();
            let err = Checkpoint::open_within(&path, resnet18()).expect_err("refused");
            let took = started.elapsed();
            assert!(matches!(err, WeightsError::TooLarge { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(what) && text.contains("exceeds"), "{text}");
            assert!(text.contains("resnet18 can hold"), "{text}");
            assert!(took.as_millis() < 500, "refused in {took:?}");
        }
    }

    #[test]
    fn a_member_inflates_to_what_its_tensors_need_and_no_more() {
        // The member holds 16 MiB; the pickle's storage holds 6 floats: only 24 bytes
        // are inflated (the rest is never read).
        let dir = tempfile::tempdir().expect("tempdir");
        let path = zip_checkpoint(dir.path(), &state_dict_pickle(6, &[2, 3]), 16 << 20);
        let ck = Checkpoint::open_within(&path, resnet18()).expect("opens");
        let Some(super::super::super::Bytes::Memory(b)) = ck.storages.first().map(|s| &s.bytes)
        else {
            panic!("a deflated member is read into memory")
        };
        assert_eq!(b.len(), 24);
    }

    #[test]
    fn a_pickled_index_past_the_limit_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits {
            max_index_bytes: 1 << 10,
            ..resnet18()
        };
        let mut pickle = state_dict_pickle(6, &[2, 3]);
        // A 2 KB string the pickle pushes and pops.
        let mut pad = b"X\x00\x08\x00\x00".to_vec();
        pad.resize(pad.len() + 2048, b'a');
        pad.push(b'0');
        pickle.splice(2..2, pad);
        let path = zip_checkpoint(dir.path(), &pickle, 24);
        assert!(Checkpoint::open_within(&path, resnet18()).is_ok());
        let err = Checkpoint::open_within(&path, limits).expect_err("refused");
        assert!(err.to_string().contains("pickled index"), "{err}");
    }
}
