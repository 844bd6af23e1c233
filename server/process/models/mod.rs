//! What the server serves: each model's served name, where its weights come from, and
//! the settings it has of its own.
//!
//! A `--model` spec is one of:
//!
//! | spec | served as | weights |
//! |---|---|---|
//! | `HUB` (`resnet50_swsl`) | `HUB` | the hub model, from the weights cache |
//! | `HUB=PATH` | `HUB` | `PATH`, read as `HUB`'s architecture |
//! | `NAME=PATH` | `NAME` | `PATH`, its architecture told by its tensor shapes |
//! | `NAME=ARCH:PATH` | `NAME` | `PATH`, read as `ARCH` (an architecture or a hub name) |
//! | `NAME=HUB` | `NAME` | the hub model, from the weights cache |
//!
//! `PATH` is a checkpoint file, or a directory holding exactly one (what KServe mounts at
//! `/mnt/models`): see [`checkpoint_in`]. A `NAME` is 1 to 63 characters of lowercase
//! letters, digits, `-` and `_`, starting and ending with a letter or digit: a
//! Kubernetes/KServe name (DNS-1123 label) or one of the hub names, which have
//! underscores. It may not end in `_frame` or `_image`, which name the KServe views of
//! a model ([`crate::api::kserve::views`]).
//!
//! The TOML file's `[models.NAME]` tables ([`ModelSettings`]) give a model its weights
//! (`path`, `arch`, `hub`) and its own batching, queue and placement; a setting a table
//! leaves out comes from the flags, which are every model's defaults.
//!
//! `spec` reads a `--model` spec, `plan` merges the specs with the tables, `locate`
//! finds the checkpoint a path names; names and architectures are checked here.

mod locate;
mod plan;
mod spec;

pub use locate::{checkpoint_in, locate, Located, CHECKPOINT_EXTENSIONS};
pub use plan::{plan, ModelSettings, Planned};
pub use spec::ModelSpec;

use std::path::PathBuf;

use crate::model::{Architecture, ModelName};
use crate::weights::clip;

/// The longest served name: a DNS-1123 label's limit.
pub const MAX_NAME_LEN: usize = 63;

/// Endings reserved for the KServe views of a model (`NAME_frame`, `NAME_image`).
const RESERVED_SUFFIXES: [&str; 2] = ["_frame", "_image"];

/// A model spec or setting that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("model name '{name}' {why}; a name is 1 to {MAX_NAME_LEN} lowercase letters, digits, '-' or '_', starting and ending with a letter or digit (e.g. resnet50-swsl)")]
    BadName { name: String, why: &'static str },
    #[error("'{0}' is not one of the twelve hub models; serve a checkpoint under a name of your choosing with NAME=PATH or NAME=ARCH:PATH")]
    NotHub(String),
    #[error("'{0}' is not an architecture (resnet18, resnet50, resnext50_32x4d, resnext101_32x4d, resnext101_32x8d, resnext101_32x16d) or a hub name")]
    UnknownArchitecture(String),
    #[error(
        "model '{0}' has no weights: give NAME=PATH, or in its [models.{0}] table `path` or `hub`"
    )]
    NoWeights(String),
    #[error("model '{0}' is given twice")]
    Duplicate(String),
    #[error("[models.{name}]: {what}")]
    Setting { name: String, what: String },
    #[error("{0}")]
    Directory(String),
}

/// Checks a served name (see the module docs for the rule).
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let bad = |why| {
        Err(SpecError::BadName {
            name: clip(name),
            why,
        })
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("is too long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return bad("has a character other than a-z, 0-9, '-' and '_'");
    }
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !alnum(name.bytes().next()) || !alnum(name.bytes().last()) {
        return bad("does not start and end with a letter or digit");
    }
    if RESERVED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return bad("ends in _frame or _image, which name the KServe views of a model");
    }
    Ok(())
}

/// An architecture by torchvision's name (`resnext50_32x4d`), or the architecture of a
/// hub name (`resnext50_32x4d_swsl`).
pub fn parse_architecture(s: &str) -> Result<Architecture, SpecError> {
    let s = s.trim();
    Architecture::ALL
        .into_iter()
        .find(|a| a.as_str() == s)
        .or_else(|| s.parse::<ModelName>().ok().map(|m| m.architecture))
        .ok_or_else(|| SpecError::UnknownArchitecture(clip(s)))
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// A published hub model, from the weights cache (downloaded on first use).
    Hub(ModelName),
    /// A checkpoint file, or a directory holding one; the architecture when it was given
    /// (else it is told from the checkpoint's tensor shapes).
    Path {
        path: PathBuf,
        architecture: Option<Architecture>,
    },
}

/// What the tests of specs and tables share.
#[cfg(test)]
mod test_support {
    use std::path::PathBuf;

    use super::Weights;
    use crate::model::Architecture;

    pub(super) fn path(p: &str, architecture: Option<Architecture>) -> Weights {
        Weights::Path {
            path: PathBuf::from(p),
            architecture,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kubernetes_labels_or_hub_names() {
        for good in [
            "resnet50",
            "resnet50-swsl",
            "resnext101_32x16d_swsl",
            "a",
            "0cats",
            &"x".repeat(63),
        ] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("Resnet50", "character"),
            ("resnet.50", "character"),
            ("res net", "character"),
            ("-resnet", "start and end"),
            ("resnet_", "start and end"),
            ("cats_image", "_frame or _image"),
            ("cats_frame", "_frame or _image"),
            (&"x".repeat(64), "too long"),
        ] {
            let err = check_name(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
