//! An opened checkpoint: its index in memory, its tensor data on disk until a tensor is
//! asked for, then read (and gathered from its strided view) into a contiguous buffer.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::read_prefix;
use super::index::{contiguous_strides, normalise_names, Builder, Bytes, Entry, Storage};
use super::{hub, safetensors_file, torch, DType, Format, Limits, WeightsError};

/// What a caller may ask about a tensor without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened checkpoint: its index, and a handle on its bytes.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    file: File,
    mmap: Option<memmap2::Mmap>,
    /// Visible to the format readers' tests, which look at how a storage was read.
    pub(super) storages: Vec<Storage>,
    entries: BTreeMap<String, Entry>,
}

impl Checkpoint {
    /// Opens a checkpoint of any supported format, found by content, after checking the
    /// torch.hub hash its file name may carry; within [`Limits::any_architecture`].
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint, WeightsError> {
        Self::open_within(path, Limits::default())
    }

    /// [`Checkpoint::open`] for a model whose size is known: a file claiming more than
    /// `limits` is refused before anything is allocated for it.
    pub fn open_within(path: impl AsRef<Path>, limits: Limits) -> Result<Checkpoint, WeightsError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
        Self::from_file(file, path, limits)
    }

    /// Opens without the file-name hash check (for callers that just verified it).
    pub fn open_unverified(path: &Path) -> Result<Checkpoint, WeightsError> {
        let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
        Self::read(file, path, &Limits::default())
    }

    /// A checkpoint already open (from the model repository): `name` is what it is
    /// called in messages and [`Checkpoint::path`], and whose hash prefix is checked.
    pub fn from_file(file: File, name: &Path, limits: Limits) -> Result<Checkpoint, WeightsError> {
        // Before the hash, which reads the whole file.
        limits.check_file(name, &file)?;
        hub::verify_open_file(&file, name)?;
        Self::read(file, name, &limits)
    }

    fn read(file: File, path: &Path, limits: &Limits) -> Result<Checkpoint, WeightsError> {
        limits.check_file(path, &file)?;
        let mut head = [0u8; Format::HEAD];
        let n = read_prefix(&file, &mut head).map_err(|e| WeightsError::io(path, e))?;
        let format = Format::detect(&head[..n]).ok_or_else(|| WeightsError::UnknownFormat {
            path: path.to_path_buf(),
        })?;
        let mut builder = Builder::default();
        let mmap = match format {
            Format::TorchZip => {
                torch::read_zip(path, &file, limits, &mut builder)?;
                None
            }
            Format::Safetensors => Some(safetensors_file::read(path, &file, limits, &mut builder)?),
            Format::TorchLegacy => {
                torch::read_legacy(path, &file, limits, &mut builder)?;
                None
            }
        };
        let entries = normalise_names(builder.entries);
        if entries.is_empty() {
            return Err(WeightsError::NoStateDict {
                path: path.to_path_buf(),
            });
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            format,
            file,
            mmap,
            storages: builder.storages,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        let e = self.entries.get(name)?;
        Some(TensorInfo {
            dtype: self.storages[e.storage].dtype,
            shape: e.shape.clone(),
        })
    }

    /// One tensor, contiguous (row-major), converted to f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, WeightsError> {
        let (dtype, raw) = self.read_raw(name)?;
        Ok(raw
            .chunks_exact(dtype.size())
            .map(|c| dtype.to_f32(c))
            .collect())
    }

    /// One tensor, contiguous (row-major), in its stored dtype, as little-endian bytes.
    pub fn read_raw(&self, name: &str) -> Result<(DType, Vec<u8>), WeightsError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor(name.to_string()))?;
        let storage = &self.storages[e.storage];
        let size = storage.dtype.size();
        let numel: usize = e.shape.iter().product();
        if numel == 0 {
            return Ok((storage.dtype, Vec::new()));
        }
        // The span of storage elements this view touches.
        let last: usize = e
            .shape
            .iter()
            .zip(&e.strides)
            .map(|(&d, &s)| (d - 1) * s)
            .sum();
        let span = last + 1;
        let bytes = self.storage_bytes(storage, e.offset * size, span * size)?;
        let contiguous = e.strides == contiguous_strides(&e.shape);
        if contiguous {
            return Ok((storage.dtype, bytes));
        }
        let mut out = Vec::with_capacity(numel * size);
        let mut index = vec![0usize; e.shape.len()];
        for _ in 0..numel {
            let at: usize = index.iter().zip(&e.strides).map(|(i, s)| i * s).sum();
            out.extend_from_slice(&bytes[at * size..(at + 1) * size]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < e.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok((storage.dtype, out))
    }

    /// Reads `len` bytes at `start` within a storage, checking they exist.
    fn storage_bytes(
        &self,
        storage: &Storage,
        start: usize,
        len: usize,
    ) -> Result<Vec<u8>, WeightsError> {
        let too_short =
            || WeightsError::malformed(&self.path, "a tensor reaches past the end of its storage");
        let end = start.checked_add(len).ok_or_else(too_short)?;
        match &storage.bytes {
            Bytes::File { offset, len: total } => {
                if end as u64 > *total {
                    return Err(too_short());
                }
                let mut buf = vec![0u8; len];
                self.file
                    .read_exact_at(&mut buf, offset + start as u64)
                    .map_err(|e| WeightsError::io(&self.path, e))?;
                Ok(buf)
            }
            Bytes::Mapped { offset, len: total } => {
                if end > *total {
                    return Err(too_short());
                }
                let map = self.mmap.as_ref().ok_or_else(too_short)?;
                let range = offset + start..offset + end;
                let bytes = map.get(range.clone()).ok_or_else(too_short)?.to_vec();
                safetensors_file::release(map, range);
                Ok(bytes)
            }
            Bytes::Memory(data) => Ok(data.get(start..end).ok_or_else(too_short)?.to_vec()),
        }
    }
}
