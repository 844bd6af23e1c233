//! What goes wrong reading a checkpoint: one error type for every format and for the
//! torch.hub checks and downloads around them.

use std::path::{Path, PathBuf};

use super::{download, pickle};

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

impl WeightsError {
    pub(super) fn io(path: &Path, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(super) fn malformed(path: &Path, what: impl Into<String>) -> Self {
        WeightsError::Malformed {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}
