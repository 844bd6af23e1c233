//! Which of the three layouts a file holds, told from its first bytes, not its name.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::safetensors_file;

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

impl Format {
    /// Bytes [`Format::detect`] looks at.
    pub(super) const HEAD: usize = 16;

    /// The layout a file starting with `head` has, if it is one this server reads.
    pub(super) fn detect(head: &[u8]) -> Option<Format> {
        if head.starts_with(b"PK\x03\x04") {
            Some(Format::TorchZip)
        } else if safetensors_file::looks_like(head) {
            Some(Format::Safetensors)
        } else if head.starts_with(&[0x80, 0x02]) {
            Some(Format::TorchLegacy)
        } else {
            None
        }
    }
}

/// Reads up to `buf.len()` bytes from the start of the file.
pub(super) fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
