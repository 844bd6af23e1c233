//! safetensors, memory-mapped: the header is parsed in place and each tensor's pages
//! are handed back to the kernel once copied out, so the map never adds to the peak.
//! The header's length and the tensors' sizes are checked against the [`Limits`] first.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use super::{Builder, Bytes, DType, Entry, Limits, Storage, WeightsError};

/// An 8-byte little-endian header length followed by a JSON object. (The length is
/// checked by [`read`], so an oversized header is refused as such, not as unknown.)
pub(super) fn looks_like(head: &[u8]) -> bool {
    head.len() >= 9 && head[8] == b'{'
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
    limits: &Limits,
    builder: &mut Builder,
) -> Result<memmap2::Mmap, WeightsError> {
    let mut len = [0u8; 8];
    super::read_prefix(file, &mut len).map_err(|e| WeightsError::io(path, e))?;
    let header = u64::from_le_bytes(len);
    if header > limits.max_index_bytes {
        return Err(limits.exceeded(
            path,
            format!("safetensors header of {header} bytes"),
            format!("the {}-byte limit on an index", limits.max_index_bytes),
        ));
    }
    // SAFETY: the map is read-only; a writer truncating the file underneath us is the
    // same hazard every mmap-based loader (safetensors' own included) accepts.
    let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| WeightsError::io(path, e))?;
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map)
        .map_err(|e| WeightsError::malformed(path, format!("bad safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let mut tensors: Vec<_> = metadata.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut total = 0u64;
    for (_, info) in &tensors {
        // safetensors has checked each range lies in the file and matches its shape.
        let (start, end) = info.data_offsets;
        total = limits.add(
            path,
            total,
            end.saturating_sub(start) as u64,
            "storage data",
        )?;
    }
    for (name, info) in tensors {
        let dt = dtype(info.dtype).ok_or_else(|| {
            WeightsError::malformed(
                path,
                format!(
                    "tensor '{}': dtype {:?} is not supported",
                    super::clip(&name),
                    info.dtype
                ),
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

#[cfg(test)]
mod tests {
    use super::super::{Checkpoint, Limits, WeightsError};
    use crate::model::Architecture;

    #[test]
    fn an_oversized_header_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big_header.safetensors");
        // Claims a 1 TiB header; holds a few bytes of it.
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{\"a\":");
        std::fs::write(&path, &bytes).expect("write");
        let err = Checkpoint::open(&path).expect_err("refused");
        assert!(matches!(err, WeightsError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("safetensors header of 1099511627776 bytes exceeds"),
            "{err}"
        );
    }

    #[test]
    fn tensors_past_what_the_model_holds_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.safetensors");
        // One f32 tensor of 32M elements (128 MiB, sparse on disk): more than resnet18
        // holds, less than the largest model.
        let n = 32usize << 20;
        let header = format!(
            "{{\"fc.weight\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[0,{}]}}}}",
            n * 4
        );
        let file = std::fs::File::create(&path).expect("create");
        let mut head = (header.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(header.as_bytes());
        std::os::unix::fs::FileExt::write_all_at(&file, &head, 0).expect("write");
        file.set_len((head.len() + n * 4) as u64).expect("extend");
        let resnet18 = Limits::for_architecture(Architecture::Resnet18);
        let err = Checkpoint::open_within(&path, resnet18).expect_err("refused");
        assert!(err.to_string().contains("resnet18 can hold"), "{err}");
        assert!(Checkpoint::open(&path).is_ok());
    }

    #[test]
    fn a_file_past_twice_what_the_model_holds_is_refused_before_it_is_hashed() {
        // A sparse file named like a torch.hub download: hashing it would read it all.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resnet18-0123abcd.safetensors");
        let resnet18 = Limits::for_architecture(Architecture::Resnet18);
        let file = std::fs::File::create(&path).expect("create");
        file.set_len(resnet18.max_file_bytes() + 1).expect("extend");
        let started = std::time::Instant::now();
        let err = Checkpoint::open_within(&path, resnet18).expect_err("refused");
        assert!(matches!(err, WeightsError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("checkpoint file of"), "{err}");
        assert!(
            started.elapsed().as_millis() < 100,
            "{:?}",
            started.elapsed()
        );
    }
}
