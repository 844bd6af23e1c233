//! PyTorch's two `torch.save` layouts.
//!
//! Legacy (PyTorch < 1.6, and the 2019 hub checkpoints): five pickles back to back
//! (magic number, protocol version, sys info, the object, the storage keys) followed by
//! each storage as an 8-byte element count and its raw little-endian elements, in the
//! order of the key list. Zip (PyTorch >= 1.6): `<dir>/data.pkl` holds the object and
//! `<dir>/data/<key>` each storage. In both, tensors are `_rebuild_tensor_v2` calls on a
//! persistent-id storage reference; nothing here executes them.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::pickle::{self, Global, PickleError, Value};
use super::{Builder, Bytes, DType, Entry, Storage, WeightsError};

/// `0x1950a86a20f9469cfc6c` as pickled (LONG1, little-endian).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

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
    builder: &mut Builder,
) -> Result<(), WeightsError> {
    let file_len = file
        .metadata()
        .map_err(|e| WeightsError::io(path, e))?
        .len();
    // The pickles sit at the front and are small next to the storages: read a window
    // and widen it only if they do not fit.
    let mut window = 1u64 << 20;
    let (root, keys, data_start) = loop {
        let n = window.min(file_len) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| WeightsError::io(path, e))?;
        match legacy_header(&buf) {
            Ok(found) => break found,
            Err(LegacyError::Pickle(PickleError::Truncated(_))) if (n as u64) < file_len => {
                window *= 8
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
    let dtypes: HashMap<&str, DType> = tensors.iter().map(|t| (t.key.as_str(), t.dtype)).collect();
    let mut located = HashMap::new();
    let mut pos = data_start as u64;
    for key in &keys {
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, pos).map_err(|_| {
            WeightsError::malformed(
                path,
                format!("file ends before storage '{key}' (truncated?)"),
            )
        })?;
        let numel = u64::from_le_bytes(count);
        let dtype = *dtypes.get(key.as_str()).ok_or_else(|| {
            WeightsError::malformed(
                path,
                format!("storage '{key}' is listed but no tensor uses it"),
            )
        })?;
        let len = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| WeightsError::malformed(path, "storage size overflows"))?;
        let start = pos + 8;
        if start + len > file_len {
            return Err(WeightsError::malformed(
                path,
                format!("storage '{key}' needs {len} bytes at {start} but the file has {file_len} (truncated?)"),
            ));
        }
        located.insert(key.clone(), Bytes::File { offset: start, len });
        pos = start + len;
    }
    add_tensors(path, tensors, located, builder)
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
fn legacy_header(buf: &[u8]) -> Result<(Value, Vec<String>, usize), LegacyError> {
    let (magic, mut pos) = pickle::load(buf, &no_globals)?;
    if !matches!(&magic, Value::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err(LegacyError::Format(
            "wrong magic number: not a torch.save file".into(),
        ));
    }
    let (protocol, n) = pickle::load(&buf[pos..], &no_globals)?;
    pos += n;
    if protocol.as_int() != Some(LEGACY_PROTOCOL) {
        return Err(LegacyError::Format(format!(
            "torch.save protocol {protocol:?}, expected {LEGACY_PROTOCOL}"
        )));
    }
    let (sys_info, n) = pickle::load(&buf[pos..], &no_globals)?;
    pos += n;
    if let Value::Dict(d) = &sys_info {
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
    if let Ok(mut order) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        order
            .read_to_string(&mut s)
            .map_err(|e| WeightsError::malformed(path, format!("byteorder: {e}")))?;
        if s.trim() != "little" {
            return Err(WeightsError::malformed(
                path,
                format!("byte order '{}' is not supported", s.trim()),
            ));
        }
    }
    let mut data = Vec::new();
    archive
        .by_name(&pkl)
        .and_then(|mut f| f.read_to_end(&mut data).map_err(Into::into))
        .map_err(|e| WeightsError::malformed(path, format!("reading {pkl}: {e}")))?;
    let (root, _) =
        pickle::load(&data, &allowed_global).map_err(|source| WeightsError::Pickle {
            path: path.to_path_buf(),
            source,
        })?;
    let tensors = collect_tensors(path, &root)?;
    let mut located = HashMap::new();
    for t in &tensors {
        if located.contains_key(&t.key) {
            continue;
        }
        let member = format!("{prefix}data/{}", t.key);
        let mut f = archive
            .by_name(&member)
            .map_err(|e| WeightsError::malformed(path, format!("storage {member}: {e}")))?;
        let bytes = match (f.compression(), f.data_start()) {
            (zip::CompressionMethod::Stored, Some(offset)) => Bytes::File {
                offset,
                len: f.size(),
            },
            _ => {
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)
                    .map_err(|e| WeightsError::malformed(path, format!("storage {member}: {e}")))?;
                Bytes::Memory(Arc::from(buf))
            }
        };
        located.insert(t.key.clone(), bytes);
    }
    add_tensors(path, tensors, located, builder)
}

/// Registers each storage once (tensors may share one) and each tensor as a view of it.
fn add_tensors(
    path: &Path,
    tensors: Vec<PickledTensor>,
    mut located: HashMap<String, Bytes>,
    builder: &mut Builder,
) -> Result<(), WeightsError> {
    let mut index: HashMap<String, usize> = HashMap::new();
    for t in tensors {
        let storage = match index.get(&t.key) {
            Some(&i) => i,
            None => {
                let bytes = located.remove(&t.key).ok_or_else(|| {
                    WeightsError::malformed(path, format!("storage '{}' has no data", t.key))
                })?;
                let available = match &bytes {
                    Bytes::File { len, .. } => *len as usize,
                    Bytes::Mapped { len, .. } => *len,
                    Bytes::Memory(b) => b.len(),
                };
                if available < t.numel * t.dtype.size() {
                    return Err(WeightsError::malformed(
                        path,
                        format!(
                            "storage '{}' holds {available} bytes, fewer than its {} elements",
                            t.key, t.numel
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
                format!("storage '{}' used with two dtypes", t.key),
            ));
        }
        let span = t
            .shape
            .iter()
            .zip(&t.strides)
            .map(|(&d, &s)| d.saturating_sub(1) * s)
            .sum::<usize>();
        if t.shape.iter().all(|&d| d > 0) && t.offset + span >= t.numel {
            return Err(WeightsError::malformed(
                path,
                format!(
                    "tensor '{}' reaches past its storage of {} elements",
                    t.name, t.numel
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
    let dict = find_state_dict(root).ok_or_else(|| WeightsError::NoStateDict {
        path: path.to_path_buf(),
    })?;
    let mut out = Vec::new();
    for (k, v) in dict {
        let Some(name) = k.as_str() else { continue };
        if let Some(t) = tensor(path, name, &v)? {
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

fn find_state_dict(root: &Value) -> Option<Vec<(Value, Value)>> {
    let items = dict_items(root)?;
    for key in ["state_dict", "model"] {
        if let Some((_, inner)) = items.iter().find(|(k, _)| k.as_str() == Some(key)) {
            if let Some(found) = find_state_dict(inner) {
                return Some(found);
            }
        }
    }
    items.iter().any(|(_, v)| is_tensor(v)).then_some(items)
}

fn usize_seq(v: &Value) -> Option<Vec<usize>> {
    v.as_seq()?
        .iter()
        .map(|x| x.as_int().and_then(|i| usize::try_from(i).ok()))
        .collect()
}

/// Interprets one `_rebuild_tensor*` call; `None` for a value that is not a tensor.
fn tensor(path: &Path, name: &str, v: &Value) -> Result<Option<PickledTensor>, WeightsError> {
    let bad = |what: &str| WeightsError::malformed(path, format!("tensor '{name}': {what}"));
    let Value::Call(g, args) = v else {
        return Ok(None);
    };
    if g.module != "torch._utils" {
        return Ok(None);
    }
    if g.name == "_rebuild_parameter" {
        let inner = args.first().ok_or_else(|| bad("parameter without data"))?;
        return tensor(path, name, inner);
    }
    let [storage, offset, size, stride, ..] = &args[..] else {
        return Err(bad("too few rebuild arguments"));
    };
    let Value::PersistentId(pid) = storage else {
        return Err(bad("storage is not a persistent reference"));
    };
    let pid = pid
        .as_seq()
        .ok_or_else(|| bad("storage reference is not a tuple"))?;
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
    if let Some(view) = rest.first().and_then(Value::as_seq) {
        if let [_, view_offset, _] = &view[..] {
            offset += view_offset
                .as_int()
                .and_then(|n| usize::try_from(n).ok())
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
