//! PyTorch's two `torch.save` layouts.
//!
//! Legacy (PyTorch < 1.6, and the 2019 hub checkpoints): five pickles back to back
//! (magic number, protocol version, sys info, the object, the storage keys) followed by
//! each storage as an 8-byte element count and its raw little-endian elements, in the
//! order of the key list. Zip (PyTorch >= 1.6): `<dir>/data.pkl` holds the object and
//! `<dir>/data/<key>` each storage. In both, tensors are `_rebuild_tensor_v2` calls on a
//! persistent-id storage reference; nothing here executes them.
//!
//! Sizes come from the file, so each is checked against the caller's [`Limits`] before
//! anything is allocated or inflated: the pickled index, each storage (a zip member
//! inflates to at most the bytes its tensors need, whatever its header claims) and all
//! storages and tensors together.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::pickle::{self, Global, PickleError, Pickled, Value};
use super::{clip, Builder, Bytes, DType, Entry, Limits, Storage, WeightsError};

/// `0x1950a86a20f9469cfc6c` as pickled (LONG1, little-endian).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

/// Dimensions a tensor may have (torch allows 64), and fields a storage reference may.
const MAX_DIMS: usize = 64;
const MAX_STORAGE_FIELDS: usize = 8;
/// How deep `state_dict` / `model` keys may nest around the state dict, and
/// `_rebuild_parameter` around a tensor.
const MAX_WRAPPING: usize = 8;

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// The only globals a state dict needs.
fn allowed_global(g: &Global) -> bool {
    match g.module.as_str() {
        "collections" => g.name == "OrderedDict",
        "torch._utils" => matches!(
            g.name.as_str(),
            "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_parameter"
        ),
        "torch" => storage_dtype(&g.name).is_some(),
        _ => false,
    }
}

fn no_globals(_: &Global) -> bool {
    false
}

/// A tensor as the pickle describes it, before its storage is located.
struct PickledTensor {
    name: String,
    key: String,
    dtype: DType,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Reads a legacy `torch.save` stream's index.
pub(super) fn read_legacy(
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
        total = limits.add_storage(path, total, len)?;
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

/// Reads a zip `torch.save` file's index.
pub(super) fn read_zip(
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
        total = limits.add_storage(path, total, len)?;
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
        total = limits.add_tensor(path, total, bytes)?;
        let storage_bytes = t.numel.checked_mul(t.dtype.size()).ok_or_else(overflow)?;
        let storage = match index.get(&t.key) {
            Some(&i) => i,
            None => {
                let bytes = located.remove(&t.key).ok_or_else(|| {
                    WeightsError::malformed(path, format!("storage '{}' has no data", clip(&t.key)))
                })?;
                let available = match &bytes {
                    Bytes::File { len, .. } => *len as usize,
                    Bytes::Mapped { len, .. } => *len,
                    Bytes::Memory(b) => b.len(),
                };
                if available < storage_bytes {
                    return Err(WeightsError::malformed(
                        path,
                        format!(
                            "storage '{}' holds {available} bytes, fewer than its {} elements",
                            clip(&t.key),
                            t.numel
                        ),
                    ));
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
            return Err(WeightsError::malformed(
                path,
                format!("storage '{}' used with two dtypes", clip(&t.key)),
            ));
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

/// Finds the state dict (top level, or under `state_dict` / `model`) and its tensors.
fn collect_tensors(path: &Path, root: &Value) -> Result<Vec<PickledTensor>, WeightsError> {
    let dict = find_state_dict(root, MAX_WRAPPING).ok_or_else(|| WeightsError::NoStateDict {
        path: path.to_path_buf(),
    })?;
    let mut out = Vec::new();
    for (k, v) in dict {
        let Some(name) = k.as_str() else { continue };
        if let Some(t) = tensor(path, name, &v, MAX_WRAPPING)? {
            out.push(t);
        }
    }
    Ok(out)
}

fn dict_items(v: &Value) -> Option<Vec<(Value, Value)>> {
    match v {
        Value::Dict(d) => Some(d.borrow().clone()),
        _ => None,
    }
}

fn is_tensor(v: &Value) -> bool {
    matches!(v, Value::Call(g, _) if g.module == "torch._utils")
}

/// `depth` bounds the search: a dict can hold itself under `model`.
fn find_state_dict(root: &Value, depth: usize) -> Option<Vec<(Value, Value)>> {
    let items = dict_items(root)?;
    for key in ["state_dict", "model"] {
        if let Some((_, inner)) = items.iter().find(|(k, _)| k.as_str() == Some(key)) {
            if let Some(found) = depth
                .checked_sub(1)
                .and_then(|depth| find_state_dict(inner, depth))
            {
                return Some(found);
            }
        }
    }
    items.iter().any(|(_, v)| is_tensor(v)).then_some(items)
}

fn usize_seq(v: &Value) -> Option<Vec<usize>> {
    if v.seq_len()? > MAX_DIMS {
        return None;
    }
    v.as_seq()?
        .iter()
        .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()))
        .collect()
}

/// Interprets one `_rebuild_tensor*` call; `None` for a value that is not a tensor.
/// `depth` bounds how many `_rebuild_parameter` calls may wrap one another.
fn tensor(
    path: &Path,
    name: &str,
    v: &Value,
    depth: usize,
) -> Result<Option<PickledTensor>, WeightsError> {
    let bad =
        |what: &str| WeightsError::malformed(path, format!("tensor '{}': {what}", clip(name)));
    let Value::Call(g, args) = v else {
        return Ok(None);
    };
    if g.module != "torch._utils" {
        return Ok(None);
    }
    if g.name == "_rebuild_parameter" {
        let inner = args.first().ok_or_else(|| bad("parameter without data"))?;
        let depth = depth
            .checked_sub(1)
            .ok_or_else(|| bad("parameters nested too deep"))?;
        return tensor(path, name, inner, depth);
    }
    let [storage, offset, size, stride, ..] = &args[..] else {
        return Err(bad("too few rebuild arguments"));
    };
    let Value::PersistentId(pid) = storage else {
        return Err(bad("storage is not a persistent reference"));
    };
    let pid = pid
        .first()
        .filter(|p| p.seq_len().is_some_and(|n| n <= MAX_STORAGE_FIELDS))
        .and_then(Value::as_seq)
        .ok_or_else(|| bad("storage reference is not a short tuple"))?;
    let [tag, class, key, _location, numel, rest @ ..] = &pid[..] else {
        return Err(bad("storage reference has too few fields"));
    };
    if tag.as_str() != Some("storage") {
        return Err(bad("persistent id is not a storage"));
    }
    let Value::Global(class) = class else {
        return Err(bad("storage type is not a class"));
    };
    let dtype =
        storage_dtype(&class.name).ok_or_else(|| bad(&format!("unsupported storage {class}")))?;
    let key = key
        .as_str()
        .ok_or_else(|| bad("storage key is not a string"))?
        .to_string();
    let numel = numel
        .as_int()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad("storage size is not a count"))?;
    let mut offset = offset
        .as_int()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad("storage offset is not a count"))?;
    // Very old writers: a view of a larger storage, `(view_key, view_offset, view_size)`.
    if let Some(Value::Tuple(view)) = rest.first() {
        if let [_, view_offset, _] = &view[..] {
            offset = view_offset
                .as_int()
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| offset.checked_add(n))
                .ok_or_else(|| bad("bad storage view"))?;
        }
    }
    let shape = usize_seq(size).ok_or_else(|| bad("size is not a tuple of counts"))?;
    let strides = usize_seq(stride).ok_or_else(|| bad("stride is not a tuple of counts"))?;
    if strides.len() != shape.len() {
        return Err(bad("size and stride differ in length"));
    }
    Ok(Some(PickledTensor {
        name: name.to_string(),
        key,
        dtype,
        numel,
        offset,
        shape,
        strides,
    }))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use super::super::{Checkpoint, Limits, WeightsError};
    use crate::model::Architecture;

    /// `{'fc.weight': <f32 tensor of `shape` on storage '0' of `numel` elements>}` as
    /// `torch.save` pickles it (protocol 2).
    fn state_dict_pickle(numel: u64, shape: &[u64]) -> Vec<u8> {
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

    /// A zip `torch.save` file whose storage '0' is `zeros` zero bytes, deflated.
    fn zip_checkpoint(dir: &std::path::Path, pickle: &[u8], zeros: u64) -> std::path::PathBuf {
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

    fn resnet18() -> Limits {
        Limits::for_architecture(Architecture::Resnet18)
    }

    #[test]
    fn the_pickle_writer_here_makes_a_checkpoint_that_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = zip_checkpoint(dir.path(), &state_dict_pickle(6, &[2, 3]), 24);
        let ck = Checkpoint::open_within(&path, resnet18()).expect("opens");
        assert_eq!(ck.read_f32("fc.weight").expect("reads"), vec![0.0; 6]);
    }

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
        let Some(super::super::Bytes::Memory(b)) = ck.storages.first().map(|s| &s.bytes) else {
            panic!("a deflated member is read into memory")
        };
        assert_eq!(b.len(), 24);
    }

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

    #[test]
    fn a_legacy_storage_larger_than_the_model_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("legacy.pth");
        let mut bytes =
            b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}.".to_vec();
        let numel = 1u64 << 30;
        bytes.extend_from_slice(&state_dict_pickle(numel, &[numel]));
        bytes.extend_from_slice(b"\x80\x02]X\x01\x00\x00\x000a.");
        bytes.extend_from_slice(&numel.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 64]);
        std::fs::write(&path, &bytes).expect("write");
        let err = Checkpoint::open_within(&path, resnet18()).expect_err("refused");
        assert!(matches!(err, WeightsError::TooLarge { .. }), "{err}");
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

    #[test]
    fn a_self_containing_state_dict_is_not_searched_forever() {
        // d = {}; d['model'] = d
        let dir = tempfile::tempdir().expect("tempdir");
        let pickle = b"\x80\x02}q\x00X\x05\x00\x00\x00modelh\x00s.";
        let path = zip_checkpoint(dir.path(), pickle, 0);
        let err = Checkpoint::open_within(&path, resnet18()).expect_err("no tensors");
        assert!(matches!(err, WeightsError::NoStateDict { .. }), "{err}");
    }
}
