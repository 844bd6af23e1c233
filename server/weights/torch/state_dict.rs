//! The torch objects in a pickled state dict: which globals it may name, where the state
//! dict sits (top level, or under `state_dict` / `model`), and each `_rebuild_tensor*`
//! call read as a tensor description, never executed.

use std::path::Path;

use super::super::pickle::{Global, Value};
use super::super::{clip, DType, WeightsError};

/// Dimensions a tensor may have (torch allows 64), and fields a storage reference may.
const MAX_DIMS: usize = 64;
const MAX_STORAGE_FIELDS: usize = 8;
/// How deep `state_dict` / `model` keys may nest around the state dict, and
/// `_rebuild_parameter` around a tensor.
const MAX_WRAPPING: usize = 8;

pub(super) fn storage_dtype(class: &str) -> Option<DType> {
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
pub(super) fn allowed_global(g: &Global) -> bool {
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

pub(super) fn no_globals(_: &Global) -> bool {
    false
}

/// A tensor as the pickle describes it, before its storage is located.
pub(super) struct PickledTensor {
    pub(super) name: String,
    pub(super) key: String,
    pub(super) dtype: DType,
    pub(super) numel: usize,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) strides: Vec<usize>,
}

/// Finds the state dict (top level, or under `state_dict` / `model`) and its tensors.
pub(super) fn collect_tensors(
    path: &Path,
    root: &Value,
) -> Result<Vec<PickledTensor>, WeightsError> {
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
    use super::super::super::{Checkpoint, WeightsError};
    use super::super::fixtures::{resnet18, zip_checkpoint};

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
