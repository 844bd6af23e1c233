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

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::model::{Architecture, ModelName};
use crate::process::device::Precision;
use crate::weights::clip;
use crate::weights::repository::ModelRepository;

/// The longest served name: a DNS-1123 label's limit.
pub const MAX_NAME_LEN: usize = 63;

/// Endings reserved for the KServe views of a model (`NAME_frame`, `NAME_image`).
const RESERVED_SUFFIXES: [&str; 2] = ["_frame", "_image"];

/// File endings taken for checkpoints when a directory is given.
pub const CHECKPOINT_EXTENSIONS: [&str; 5] = ["pth", "pt", "safetensors", "bin", "ckpt"];

/// Entries of a model directory looked at, at most: the directory is the operator's,
/// but a mount of the wrong volume should fail, not be listed for minutes.
const MAX_DIR_ENTRIES: usize = 10_000;

/// Names shown in an error about a directory's files.
const NAMES_SHOWN: usize = 8;

/// Endings of what a download or an editor leaves while it writes (`weights download`'s
/// `X.part` among them): never a directory's checkpoint, nor its "only file".
const TEMPORARY_SUFFIXES: [&str; 5] = [".part", ".partial", ".tmp", ".temp", "~"];

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

/// One `--model` spec: a served name and its weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub weights: Weights,
}

impl FromStr for ModelSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let spec = spec.trim();
        let Some((name, rest)) = spec.split_once('=') else {
            let hub = spec
                .parse::<ModelName>()
                .map_err(|_| SpecError::NotHub(clip(spec)))?;
            return Ok(ModelSpec {
                name: spec.to_string(),
                weights: Weights::Hub(hub),
            });
        };
        let (name, rest) = (name.trim(), rest.trim());
        check_name(name)?;
        if rest.is_empty() {
            return Err(SpecError::NoWeights(name.to_string()));
        }
        let weights = if let Ok(hub) = rest.parse::<ModelName>() {
            Weights::Hub(hub)
        } else if let Some((arch, path)) = rest
            .split_once(':')
            .and_then(|(a, p)| Some((parse_architecture(a).ok()?, p)))
        {
            Weights::Path {
                path: PathBuf::from(path),
                architecture: Some(arch),
            }
        } else {
            // A hub name keeps meaning its architecture (`resnet50_swsl=/m/r50.pth`).
            Weights::Path {
                path: PathBuf::from(rest),
                architecture: name.parse::<ModelName>().ok().map(|m| m.architecture),
            }
        };
        Ok(ModelSpec {
            name: name.to_string(),
            weights,
        })
    }
}

/// One model's table in the TOML file (`[models.NAME]`): its weights, and settings that
/// replace the flags' for it alone.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// A checkpoint file or a directory holding one.
    pub path: Option<PathBuf>,
    /// The architecture (or a hub name) `path` holds; told from the file when absent.
    pub arch: Option<String>,
    /// A hub model to serve from the weights cache, when there is no `path`.
    pub hub: Option<String>,
    pub batch_sizes: Option<Vec<usize>>,
    pub max_queue_delay_ms: Option<u64>,
    pub queue_capacity: Option<usize>,
    /// Where this model runs (`cpu`, `cuda`, `cuda:1` ...), as `--device`.
    pub device: Option<String>,
    pub dtype: Option<Precision>,
    pub workers_per_device: Option<usize>,
    pub compute_threads: Option<usize>,
}

impl ModelSettings {
    /// The weights this table names, if it names any.
    fn weights(&self, name: &str) -> Result<Option<Weights>, SpecError> {
        let setting = |what: String| SpecError::Setting {
            name: name.to_string(),
            what,
        };
        let architecture = self
            .arch
            .as_deref()
            .map(parse_architecture)
            .transpose()
            .map_err(|e| setting(format!("arch: {e}")))?;
        match (&self.path, &self.hub) {
            (Some(_), Some(_)) => Err(setting("give `path` or `hub`, not both".into())),
            (Some(path), None) => Ok(Some(Weights::Path {
                path: path.clone(),
                architecture: architecture
                    .or_else(|| name.parse::<ModelName>().ok().map(|m| m.architecture)),
            })),
            (None, Some(hub)) => {
                if architecture.is_some() {
                    return Err(setting(
                        "`arch` goes with `path`; a hub model has its own".into(),
                    ));
                }
                hub.parse::<ModelName>()
                    .map(|h| Some(Weights::Hub(h)))
                    .map_err(|_| setting(format!("hub: {}", SpecError::NotHub(clip(hub)))))
            }
            (None, None) if architecture.is_some() => {
                Err(setting("`arch` needs a `path` to read".into()))
            }
            (None, None) => Ok(None),
        }
    }
}

/// A model to serve: its name, weights and own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub name: String,
    pub weights: Weights,
    pub settings: ModelSettings,
}

/// The models to serve. `specs` are the `--model` specs (command line or environment)
/// and, when they are empty, the file's `model` list; `tables` the file's
/// `[models.NAME]` tables. With `--model` given, those specs are the models served
/// (their weights win over a table's) and the tables only lend settings; otherwise every
/// spec and every table is served. Names must be distinct.
pub fn plan(
    specs: &[String],
    from_command_line: bool,
    tables: &BTreeMap<String, ModelSettings>,
) -> Result<Vec<Planned>, SpecError> {
    let mut out: Vec<Planned> = Vec::new();
    for spec in specs {
        let spec: ModelSpec = spec.parse()?;
        if out.iter().any(|p| p.name == spec.name) {
            return Err(SpecError::Duplicate(spec.name));
        }
        let settings = tables.get(&spec.name).cloned().unwrap_or_default();
        // A table's own weights are checked even where the spec's win.
        settings.weights(&spec.name)?;
        out.push(Planned {
            name: spec.name,
            weights: spec.weights,
            settings,
        });
    }
    for (name, settings) in tables {
        if out.iter().any(|p| &p.name == name) {
            continue;
        }
        check_name(name)?;
        if from_command_line {
            tracing::warn!(model = %name, "[models.{name}] in the config file is not served: --model names the models");
            continue;
        }
        let weights = match settings.weights(name)? {
            Some(w) => w,
            None => Weights::Hub(
                name.parse::<ModelName>()
                    .map_err(|_| SpecError::NoWeights(name.clone()))?,
            ),
        };
        out.push(Planned {
            name: name.clone(),
            weights,
            settings: settings.clone(),
        });
    }
    Ok(out)
}

/// A checkpoint opened for reading, and what it is called in messages.
#[derive(Debug)]
pub struct Located {
    pub file: File,
    pub path: PathBuf,
}

/// `path` opened for reading: the file itself, which must be a regular file, or for a
/// directory the one checkpoint in it ([`checkpoint_in`]).
pub fn locate(path: &Path) -> Result<Located, SpecError> {
    let cannot =
        |e: std::io::Error| SpecError::Directory(format!("cannot read {}: {e}", path.display()));
    let not_regular = || {
        SpecError::Directory(format!(
            "{} is not a regular file or a directory",
            path.display()
        ))
    };
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if meta.is_dir() {
        return checkpoint_in(path);
    }
    if !meta.is_file() {
        return Err(not_regular());
    }
    // As `ModelRepository::open`: O_NONBLOCK keeps a FIFO swapped in since from blocking
    // the open (the load would hang), and what was opened is checked again. Links are
    // followed: the path is the operator's own (Kubernetes mounts are links).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(not_regular());
    }
    Ok(Located {
        file,
        path: path.to_path_buf(),
    })
}

/// The one checkpoint in `dir` (not in its subdirectories): the one file ending in a
/// checkpoint extension (`.pth`, `.pt`, `.safetensors`, `.bin`, `.ckpt`), or failing that
/// its only file. Hidden entries (`.git`, `..data`, `.~lock`) and what a download or an
/// editor leaves while it writes (`X.part`, `*.partial`, `*.tmp`, `*.temp`, `*~`) are
/// passed over, and a file is opened only inside the directory (a symbolic link leading
/// out of it is not followed: see [`ModelRepository`]). None or several is an error that
/// names what it found, and what it passed over.
pub fn checkpoint_in(dir: &Path) -> Result<Located, SpecError> {
    let fail = |what: String| SpecError::Directory(format!("{}: {what}", dir.display()));
    let repository = ModelRepository::new(dir).map_err(|e| fail(e.to_string()))?;
    let entries = std::fs::read_dir(repository.root()).map_err(|e| fail(e.to_string()))?;
    let mut files: Vec<String> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    let mut temporary: Vec<String> = Vec::new();
    for (seen, entry) in entries.enumerate() {
        if seen == MAX_DIR_ENTRIES {
            return Err(fail(format!(
                "more than {MAX_DIR_ENTRIES} entries; name the checkpoint file itself"
            )));
        }
        let entry = entry.map_err(|e| fail(e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // An interrupted download's `X.part` would otherwise be "the only file", and
        // fail later as a checkpoint that does not parse.
        let lower = name.to_ascii_lowercase();
        if TEMPORARY_SUFFIXES.iter().any(|s| lower.ends_with(s)) {
            temporary.push(name);
            continue;
        }
        // A regular file, or a link to one inside the directory.
        if repository.open(&name).is_ok() {
            files.push(name);
        } else {
            others.push(name);
        }
    }
    files.sort();
    others.sort();
    temporary.sort();
    let checkpoints: Vec<&String> = files
        .iter()
        .filter(|f| {
            Path::new(f.as_str())
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| CHECKPOINT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    let chosen = match (checkpoints.as_slice(), files.as_slice()) {
        ([one], _) => (*one).clone(),
        ([], [only]) => only.clone(),
        ([], _) => {
            let skipped = shown(temporary.iter().cloned());
            let found = match (files.is_empty() && others.is_empty(), temporary.is_empty()) {
                (true, true) => "it is empty".to_string(),
                (true, false) => format!(
                    "it holds only unfinished downloads or temporary files, skipped: {skipped}"
                ),
                (false, no_temporary) => {
                    let mut found = format!(
                        "found {}",
                        shown(
                            files.iter().map(|f| f.to_string()).chain(
                                others
                                    .iter()
                                    .map(|o| format!("{o} (not a file in the directory)"))
                            )
                        )
                    );
                    if !no_temporary {
                        found.push_str(&format!(
                            "; skipped as unfinished downloads or temporary files: {skipped}"
                        ));
                    }
                    found
                }
            };
            return Err(fail(format!(
                "no checkpoint file (.{}) in the directory: {found}",
                CHECKPOINT_EXTENSIONS.join(", .")
            )));
        }
        (several, _) => {
            return Err(fail(format!(
                "{} checkpoint files ({}); name one, e.g. NAME={}",
                several.len(),
                shown(several.iter().map(|s| s.to_string())),
                repository.root().join(several[0]).display()
            )))
        }
    };
    let file = repository
        .open(&chosen)
        .map_err(|e| fail(format!("{chosen}: {e}")))?;
    Ok(Located {
        file,
        path: repository.root().join(chosen),
    })
}

/// The first few names, and how many more.
fn shown(names: impl Iterator<Item = String>) -> String {
    let names: Vec<String> = names.collect();
    let mut out = names
        .iter()
        .take(NAMES_SHOWN)
        .map(|n| clip(n))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        out.push_str(&format!(" and {} more", names.len() - NAMES_SHOWN));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Result<ModelSpec, SpecError> {
        s.parse()
    }

    fn path(p: &str, architecture: Option<Architecture>) -> Weights {
        Weights::Path {
            path: PathBuf::from(p),
            architecture,
        }
    }

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

    #[test]
    fn the_spec_grammar() {
        let r50 = |t| ModelName {
            architecture: Architecture::Resnet50,
            training: t,
        };
        use crate::model::Training::*;
        assert_eq!(
            spec("resnet50_swsl"),
            Ok(ModelSpec {
                name: "resnet50_swsl".into(),
                weights: Weights::Hub(r50(SemiWeaklySupervised))
            })
        );
        // The hub name with a path keeps its architecture (the grammar before names).
        assert_eq!(
            spec("resnet50_swsl=/a/b=c.pth").map(|s| s.weights),
            Ok(path("/a/b=c.pth", Some(Architecture::Resnet50)))
        );
        assert_eq!(
            spec(" resnet50 = /mnt/models ").map(|s| (s.name, s.weights)),
            Ok(("resnet50".into(), path("/mnt/models", None)))
        );
        assert_eq!(
            spec("cats=resnext101_32x8d:/m/x.pth").map(|s| s.weights),
            Ok(path("/m/x.pth", Some(Architecture::Resnext101_32x8d)))
        );
        assert_eq!(
            spec("cats=resnet18_ssl:/m/x.pth").map(|s| s.weights),
            Ok(path("/m/x.pth", Some(Architecture::Resnet18)))
        );
        // Not an architecture before the colon: all of it is the path.
        assert_eq!(
            spec("cats=weights:v2.pth").map(|s| s.weights),
            Ok(path("weights:v2.pth", None))
        );
        assert_eq!(
            spec("resnet50-ssl=resnet50_ssl").map(|s| (s.name, s.weights)),
            Ok(("resnet50-ssl".into(), Weights::Hub(r50(SemiSupervised))))
        );
        assert!(matches!(spec("resnet34_ssl"), Err(SpecError::NotHub(_))));
        assert!(matches!(spec("my-model"), Err(SpecError::NotHub(_))));
        assert!(matches!(
            spec("Cats=/x.pth"),
            Err(SpecError::BadName { .. })
        ));
        assert!(matches!(spec("cats="), Err(SpecError::NoWeights(_))));
        assert!(matches!(spec("=x.pth"), Err(SpecError::BadName { .. })));
    }

    fn tables(toml_text: &str) -> Result<BTreeMap<String, ModelSettings>, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn tables_give_weights_and_settings_and_unknown_keys_are_named() {
        let t = tables(
            "[resnet50]\npath = \"/mnt/models\"\nbatch_sizes = [1, 4]\nmax_queue_delay_ms = 3\n\
             queue_capacity = 32\ndevice = \"cpu\"\nworkers_per_device = 2\n\
             [cats]\nhub = \"resnet18_ssl\"\n[resnet18_swsl]\nqueue_capacity = 8\n",
        )
        .expect("parses");
        let planned = plan(&[], false, &t).expect("plan");
        let names: Vec<&str> = planned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cats", "resnet18_swsl", "resnet50"]);
        assert_eq!(planned[2].weights, path("/mnt/models", None));
        assert_eq!(planned[2].settings.batch_sizes, Some(vec![1, 4]));
        assert_eq!(planned[2].settings.workers_per_device, Some(2));
        assert!(matches!(planned[0].weights, Weights::Hub(_)));
        assert!(matches!(planned[1].weights, Weights::Hub(_)));

        // --model names what is served; a table with its name lends its settings.
        let planned = plan(&["resnet50=/other.pth".into()], true, &t).expect("plan");
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].weights, path("/other.pth", None));
        assert_eq!(planned[0].settings.queue_capacity, Some(32));

        let err = tables("[m]\npath = \"/x\"\nbatch_size = [1]\n")
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("batch_size"), "names the key: {err}");
        for (text, want) in [
            ("[m]\npath = \"/x\"\nhub = \"resnet18_ssl\"\n", "not both"),
            ("[m]\narch = \"resnet18\"\n", "needs a `path`"),
            (
                "[m]\npath = \"/x\"\narch = \"resnet34\"\n",
                "not an architecture",
            ),
            ("[m]\nhub = \"resnet34_ssl\"\n", "not one of the twelve"),
            ("[m]\nqueue_capacity = 3\n", "has no weights"),
            ("[Bad]\nhub = \"resnet18_ssl\"\n", "lowercase"),
        ] {
            let err = plan(&[], false, &tables(text).expect("parses"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let err = plan(&["a=/x".into(), "a=/y".into()], true, &BTreeMap::new())
            .expect_err("twice")
            .to_string();
        assert!(err.contains("given twice"), "{err}");
    }

    #[test]
    fn a_directory_must_hold_exactly_one_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let err = checkpoint_in(d).expect_err("empty").to_string();
        assert!(err.contains("it is empty"), "{err}");
        std::fs::write(d.join("README.md"), "x").expect("write");
        std::fs::write(d.join("config.json"), "x").expect("write");
        std::fs::create_dir(d.join(".git")).expect("mkdir");
        std::fs::create_dir(d.join("sub")).expect("mkdir");
        let err = checkpoint_in(d).expect_err("none").to_string();
        assert!(
            err.contains("no checkpoint file")
                && err.contains("README.md, config.json, sub (not a file"),
            "{err}"
        );
        std::fs::write(d.join("model.safetensors"), "x").expect("write");
        let found = checkpoint_in(d).expect("one");
        assert!(found.path.ends_with("model.safetensors"), "{found:?}");
        assert_eq!(locate(d).expect("dir").path, found.path);
        std::fs::write(d.join("other.PTH"), "x").expect("write");
        let err = checkpoint_in(d).expect_err("two").to_string();
        assert!(
            err.contains("2 checkpoint files (model.safetensors, other.PTH)"),
            "{err}"
        );
        // A lone file of any name is taken; a link out of the directory is not.
        let lone = tempfile::tempdir().expect("tempdir");
        std::fs::write(lone.path().join("weights"), "x").expect("write");
        assert!(checkpoint_in(lone.path())
            .expect("lone")
            .path
            .ends_with("weights"));
        let linked = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(d.join("model.safetensors"), linked.path().join("m.pth"))
            .expect("symlink");
        let err = checkpoint_in(linked.path())
            .expect_err("link out")
            .to_string();
        assert!(err.contains("m.pth (not a file in the directory)"), "{err}");
        let err = locate(&d.join("missing.pth"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing.pth"), "{err}");
    }

    #[test]
    fn unfinished_downloads_and_temporary_files_are_passed_over() {
        // `weights download` interrupted: its `.part` is not the directory's only file.
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("resnet50_swsl-16a12f1b.part"), "x").expect("write");
        let err = checkpoint_in(d).expect_err("only a .part").to_string();
        assert!(
            err.contains("no checkpoint file")
                && err.contains(
                    "holds only unfinished downloads or temporary files, skipped: resnet50_swsl-16a12f1b.part"
                ),
            "{err}"
        );
        std::fs::write(d.join("notes.txt"), "x").expect("write");
        std::fs::write(d.join("config.json"), "x").expect("write");
        let err = checkpoint_in(d).expect_err("no checkpoint").to_string();
        assert!(
            err.contains("found config.json, notes.txt; skipped as unfinished downloads or temporary files: resnet50_swsl-16a12f1b.part"),
            "{err}"
        );
        std::fs::remove_file(d.join("notes.txt")).expect("rm");
        std::fs::remove_file(d.join("config.json")).expect("rm");
        // Beside a lone file of any name, they do not make it one of several.
        for temporary in ["weights.tmp", "weights.PARTIAL", "weights~", "x.temp"] {
            std::fs::write(d.join(temporary), "x").expect("write");
        }
        std::fs::write(d.join(".~lock.weights#"), "x").expect("write");
        std::fs::write(d.join("weights"), "x").expect("write");
        let found = checkpoint_in(d).expect("the lone file");
        assert!(found.path.ends_with("weights"), "{found:?}");
    }

    #[test]
    fn a_path_that_is_not_a_regular_file_fails_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("model.pth");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path; mkfifo reads it and nothing else.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        // Opening a FIFO with no writer blocks: on a thread, so a regression fails here
        // instead of hanging the test run.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(locate(&path).map(|l| l.path));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("locate returns at once, not blocked on the FIFO");
        let err = result.expect_err("a FIFO").to_string();
        assert!(
            err.contains("model.pth is not a regular file or a directory"),
            "{err}"
        );
    }
}
