//! Checkpoint files: the three formats a user holds, detected by content.
//!
//! [`Checkpoint::open`] reads only a file's index (the pickle or the safetensors header);
//! tensor data stays on disk until [`Checkpoint::read_f32`] or [`Checkpoint::read_raw`]
//! asks for one tensor, so loading the largest model holds little more than the model.
//!
//! - [`torch`]: PyTorch's legacy `torch.save` stream (the 2019 hub files) and the zip
//!   format of PyTorch >= 1.6, through the non-executing [`pickle`] reader.
//! - [`safetensors_file`]: safetensors, memory-mapped.
//! - [`hub`]: torch.hub's `-<sha256 prefix>` file names and the check torch.hub skips.
//! - [`download`]: the weights cache and the verified, resumable download.
//! - [`convert`]: any checkpoint to safetensors.
//! - [`repository`]: the model repository, the one directory run-time loads may read.
//!
//! A checkpoint's sizes come from the file. Each reader checks them against [`Limits`]
//! (what the model being loaded can hold, from its architecture) before it allocates or
//! inflates anything, and refuses a file past them with [`WeightsError::TooLarge`].

pub mod convert;
pub mod download;
pub mod hub;
pub mod inspect;
pub mod pickle;
pub mod repository;
pub mod safetensors_file;
pub mod torch;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};

use crate::model::resnet::Layout;
use crate::model::Architecture;

/// Everything that can go wrong reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a checkpoint this server reads (expected a torch.save file, legacy or zip, or safetensors)")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Pickle {
        path: PathBuf,
        #[source]
        source: pickle::PickleError,
    },
    #[error(
        "{path}: no tensors found (looked at the top level and under 'state_dict' and 'model')"
    )]
    NoStateDict { path: PathBuf },
    #[error("no tensor named '{0}' in the checkpoint")]
    MissingTensor(String),
    #[error("{path}: sha256 {actual} does not start with {expected}, the hash its file name carries; the file is corrupt or not what its name says")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Download(#[from] download::DownloadError),
    #[error("{path}: checkpoint {what} exceeds {limit}")]
    TooLarge {
        path: PathBuf,
        what: String,
        limit: String,
    },
}

/// What one checkpoint may make its reader hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of tensor data: the storages together, and the tensors viewing them
    /// together (a view can be larger than its storage).
    pub max_tensor_bytes: u64,
    /// Bytes of the index: the pickle, or the safetensors header.
    pub max_index_bytes: u64,
    /// The model the limits are for, for messages.
    pub model: &'static str,
}

impl Limits {
    /// A state dict's index is ~100 bytes a tensor (~100 KB for the largest model).
    const INDEX_BYTES: u64 = 16 << 20;
    /// Per tensor: buffers that are not parameters (`num_batches_tracked`) and padding.
    const SLACK_PER_TENSOR: u64 = 4096;

    /// What `arch`'s state dict holds: every tensor of the model definition in the widest
    /// dtype a checkpoint may store (8 bytes), plus a little per tensor.
    pub fn for_architecture(arch: Architecture) -> Limits {
        let shapes = Layout::new(arch).expected_shapes();
        let elements: u64 = shapes
            .values()
            .map(|s| s.iter().map(|&d| d as u64).product::<u64>())
            .sum();
        let tensors = shapes.len() as u64;
        Limits {
            max_tensor_bytes: elements * 8 + (2 * tensors + 64) * Self::SLACK_PER_TENSOR,
            max_index_bytes: Self::INDEX_BYTES,
            model: arch.as_str(),
        }
    }

    /// The largest any architecture this server serves needs: for files read without
    /// a model in mind (`inspect`, `convert`).
    pub fn any_architecture() -> Limits {
        let largest = Architecture::ALL
            .into_iter()
            .map(Limits::for_architecture)
            .max_by_key(|l| l.max_tensor_bytes)
            .unwrap_or(Limits {
                max_tensor_bytes: 0,
                max_index_bytes: Self::INDEX_BYTES,
                model: "",
            });
        Limits {
            model: "the largest model this server serves",
            ..largest
        }
    }

    /// The largest file: twice the tensor bytes (room for a training checkpoint's
    /// optimizer state beside the weights) and the index. Files are read in part, but
    /// the hash check of a torch.hub name reads all of one.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_tensor_bytes
            .saturating_mul(2)
            .saturating_add(self.max_index_bytes)
    }

    fn check_file(&self, path: &Path, file: &File) -> Result<(), WeightsError> {
        let len = file
            .metadata()
            .map_err(|e| WeightsError::io(path, e))?
            .len();
        if len > self.max_file_bytes() {
            return Err(self.exceeded(
                path,
                format!("file of {len} bytes"),
                format!(
                    "the {} bytes a {} checkpoint may take",
                    self.max_file_bytes(),
                    self.model
                ),
            ));
        }
        Ok(())
    }

    /// "the N bytes resnet18 can hold", for messages.
    fn holds(&self) -> String {
        format!(
            "the {} bytes {} can hold",
            self.max_tensor_bytes, self.model
        )
    }

    fn exceeded(&self, path: &Path, what: String, limit: String) -> WeightsError {
        WeightsError::TooLarge {
            path: path.to_path_buf(),
            what,
            limit,
        }
    }

    /// `total` storage bytes so far plus `len` more, refused past the limit.
    fn add_storage(&self, path: &Path, total: u64, len: u64) -> Result<u64, WeightsError> {
        match total.checked_add(len) {
            Some(t) if t <= self.max_tensor_bytes => Ok(t),
            _ => Err(self.exceeded(
                path,
                format!("storage data of more than {} bytes", total.max(len)),
                self.holds(),
            )),
        }
    }

    /// `total` bytes of tensors (as read) so far plus `len` more, refused past the limit.
    fn add_tensor(&self, path: &Path, total: u64, len: u64) -> Result<u64, WeightsError> {
        match total.checked_add(len) {
            Some(t) if t <= self.max_tensor_bytes => Ok(t),
            _ => Err(self.exceeded(
                path,
                format!("tensors of more than {} bytes", total.max(len)),
                self.holds(),
            )),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::any_architecture()
    }
}

impl WeightsError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn malformed(path: &Path, what: impl Into<String>) -> Self {
        WeightsError::Malformed {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// A string from a file or a client as a message repeats it: at most 64 characters,
/// then "…" (a tensor name or a file name can be megabytes long).
pub fn clip(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// How a checkpoint file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save(..., _use_new_zipfile_serialization=False)`: the 2019 hub files.
    TorchLegacy,
    /// `torch.save` of PyTorch >= 1.6.
    TorchZip,
    Safetensors,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::TorchLegacy => "torch legacy (torch.save, pre-1.6 stream)",
            Format::TorchZip => "torch zip (torch.save, >= 1.6)",
            Format::Safetensors => "safetensors",
        })
    }
}

/// Element types a checkpoint may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// One little-endian element as f32 (`b` is exactly `size()` bytes).
    fn to_f32(self, b: &[u8]) -> f32 {
        let a2 = || [b[0], b[1]];
        let a4 = || [b[0], b[1], b[2], b[3]];
        let a8 = || [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
        match self {
            DType::F64 => f64::from_le_bytes(a8()) as f32,
            DType::F32 => f32::from_le_bytes(a4()),
            DType::F16 => f16::from_le_bytes(a2()).to_f32(),
            DType::BF16 => bf16::from_le_bytes(a2()).to_f32(),
            DType::I64 => i64::from_le_bytes(a8()) as f32,
            DType::I32 => i32::from_le_bytes(a4()) as f32,
            DType::I16 => i16::from_le_bytes(a2()) as f32,
            DType::I8 => b[0] as i8 as f32,
            DType::U8 | DType::Bool => f32::from(b[0]),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        };
        f.write_str(s)
    }
}

/// Where a storage's bytes live.
#[derive(Debug, Clone)]
enum Bytes {
    /// A byte range of the checkpoint file, read on demand.
    File { offset: u64, len: u64 },
    /// A byte range of the memory map (safetensors).
    Mapped { offset: usize, len: usize },
    /// Already in memory (a compressed zip member).
    Memory(Arc<[u8]>),
}

/// A flat, typed buffer several tensors may view.
#[derive(Debug, Clone)]
struct Storage {
    dtype: DType,
    bytes: Bytes,
}

/// One tensor: a strided view into a storage.
#[derive(Debug, Clone)]
struct Entry {
    storage: usize,
    /// In elements.
    offset: usize,
    shape: Vec<usize>,
    /// In elements.
    strides: Vec<usize>,
}

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
    storages: Vec<Storage>,
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
        let mut head = [0u8; 16];
        let n = read_prefix(&file, &mut head).map_err(|e| WeightsError::io(path, e))?;
        let head = &head[..n];
        let mut builder = Builder::default();
        let (format, mmap) = if head.starts_with(b"PK\x03\x04") {
            torch::read_zip(path, &file, limits, &mut builder)?;
            (Format::TorchZip, None)
        } else if safetensors_file::looks_like(head) {
            let mmap = safetensors_file::read(path, &file, limits, &mut builder)?;
            (Format::Safetensors, Some(mmap))
        } else if head.starts_with(&[0x80, 0x02]) {
            torch::read_legacy(path, &file, limits, &mut builder)?;
            (Format::TorchLegacy, None)
        } else {
            return Err(WeightsError::UnknownFormat {
                path: path.to_path_buf(),
            });
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

/// Collects storages and tensor entries while a format reader walks a file.
#[derive(Default)]
struct Builder {
    storages: Vec<Storage>,
    entries: Vec<(String, Entry)>,
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Reads up to `buf.len()` bytes from the start of the file.
fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Drops a `module.` prefix that every key carries (DataParallel checkpoints).
fn normalise_names(entries: Vec<(String, Entry)>) -> BTreeMap<String, Entry> {
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

    #[test]
    fn dtype_conversion() {
        assert_eq!(DType::F16.to_f32(&f16::from_f32(1.5).to_le_bytes()), 1.5);
        assert_eq!(
            DType::BF16.to_f32(&bf16::from_f32(-2.0).to_le_bytes()),
            -2.0
        );
        assert_eq!(DType::I64.to_f32(&(-7i64).to_le_bytes()), -7.0);
        assert_eq!(DType::I8.to_f32(&[0xff]), -1.0);
    }
}
