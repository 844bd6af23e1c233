//! The checkpoint a model's path names: the file itself, or the one checkpoint in a
//! directory (what KServe mounts at `/mnt/models`), opened without blocking or leaving
//! the directory.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::SpecError;
use crate::weights::clip;
use crate::weights::repository::ModelRepository;

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
