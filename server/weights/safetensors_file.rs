//! safetensors, memory-mapped: the header is parsed in place and each tensor's pages
//! are handed back to the kernel once copied out, so the map never adds to the peak.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use super::{Builder, Bytes, DType, Entry, Storage, WeightsError};

/// An 8-byte little-endian header length followed by a JSON object.
pub(super) fn looks_like(head: &[u8]) -> bool {
    head.len() >= 9
        && head[8] == b'{'
        && u64::from_le_bytes(head[..8].try_into().unwrap_or([0xff; 8])) < (100 << 20)
}

fn dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        _ => return None,
    })
}

pub(super) fn read(
    path: &Path,
    file: &File,
    builder: &mut Builder,
) -> Result<memmap2::Mmap, WeightsError> {
    // SAFETY: the map is read-only; a writer truncating the file underneath us is the
    // same hazard every mmap-based loader (safetensors' own included) accepts.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| WeightsError::io(path, e))?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| WeightsError::malformed(path, format!("bad safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let mut tensors: Vec<_> = metadata.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in tensors {
        let dt = dtype(info.dtype).ok_or_else(|| {
            WeightsError::malformed(
                path,
                format!("tensor '{name}': dtype {:?} is not supported", info.dtype),
            )
        })?;
        let (start, end) = info.data_offsets;
        builder.storages.push(Storage {
            dtype: dt,
            bytes: Bytes::Mapped {
                offset: data_start + start,
                len: end - start,
            },
        });
        builder.entries.push((
            name,
            Entry {
                storage: builder.storages.len() - 1,
                offset: 0,
                strides: super::contiguous_strides(&info.shape),
                shape: info.shape.clone(),
            },
        ));
    }
    Ok(map)
}

/// Tells the kernel the pages of a tensor already copied out are no longer needed, so
/// they leave the resident set instead of doubling the peak while a model loads.
pub(super) fn release(map: &memmap2::Mmap, range: Range<usize>) {
    let page = 4096;
    let start = range.start.div_ceil(page) * page;
    let end = range.end / page * page;
    if end > start {
        // SAFETY: the map is a read-only, shared file mapping: dropped pages are read back
        // from the file on the next access, so no content can change or be lost. Advice
        // only: a failure changes nothing but memory use.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}
