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
//! Around them: [`Checkpoint`] itself (`checkpoint`), the index every reader fills
//! (`index`), telling the format from the first bytes (`format`), the element types
//! (`dtype`), the limits below (`limits`) and the one error type (`error`).
//!
//! A checkpoint's sizes come from the file. Each reader checks them against [`Limits`]
//! (what the model being loaded can hold, from its architecture) before it allocates or
//! inflates anything, and refuses a file past them with [`WeightsError::TooLarge`].

mod checkpoint;
pub mod convert;
pub mod download;
mod dtype;
mod error;
mod format;
pub mod hub;
mod index;
pub mod inspect;
mod limits;
pub mod pickle;
pub mod repository;
pub mod safetensors_file;
pub mod torch;

pub use checkpoint::{Checkpoint, TensorInfo};
pub use dtype::DType;
pub use error::WeightsError;
pub use format::Format;
pub use limits::Limits;

// What the format readers (`torch`, `safetensors_file`) fill in, under the names they use.
use format::read_prefix;
use index::{contiguous_strides, Builder, Bytes, Entry, Storage};

/// A string from a file or a client as a message repeats it: at most 64 characters,
/// then "…" (a tensor name or a file name can be megabytes long).
pub fn clip(s: &str) -> String {
    const KEEP: usize = 64;
    match s.char_indices().nth(KEEP) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}
