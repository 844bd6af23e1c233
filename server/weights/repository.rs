//! The model repository: the one directory the operator lets KServe's
//! `RepositoryModelLoad` read (`--model-repository DIR`), by file name only.
//!
//! A client names a file, never a path: a name with a separator, `..`, a leading `.`, a
//! control character (NUL, newline ...) or more than 255 bytes is refused as such. The file is then resolved inside the
//! repository and must stay there: its canonical path (every symlink followed) must lie
//! under the repository's canonical path, it is opened without following a final
//! symlink, and on Linux the opened descriptor's own path is checked again, so a link
//! swapped in between cannot lead out. Every failure to find or open it (missing, a
//! directory, unreadable, a link leading out) is the same [`RepositoryError::NotFound`]:
//! a client learns nothing about the server's files outside the repository.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::clip;

/// The longest file name (Linux's NAME_MAX).
const MAX_NAME_BYTES: usize = 255;

/// Why a model file cannot be loaded from the repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepositoryError {
    #[error("'{0}' is not a model file name: name a file in the model repository (no '/', '\\', '..', control characters or leading '.'; at most 255 bytes)")]
    InvalidName(String),
    #[error("model file '{0}' not found in the model repository")]
    NotFound(String),
    #[error("this server loads models only by name from its weights cache: it has no --model-repository to name a file in")]
    NoRepository,
}

/// The directory run-time loads read from.
#[derive(Debug, Clone)]
pub struct ModelRepository {
    /// Canonical: every check compares canonical paths against it.
    root: PathBuf,
}

impl ModelRepository {
    /// The repository at `dir`, which must be a directory.
    pub fn new(dir: &Path) -> io::Result<ModelRepository> {
        let root = fs::canonicalize(dir)?;
        if !fs::metadata(&root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(ModelRepository { root })
    }

    /// The repository's canonical path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the regular file called `name` in the repository, for reading.
    pub fn open(&self, name: &str) -> Result<File, RepositoryError> {
        check_name(name)?;
        let not_found = || RepositoryError::NotFound(clip(name));
        let real = fs::canonicalize(self.root.join(name)).map_err(|_| not_found())?;
        if !real.starts_with(&self.root) {
            return Err(not_found());
        }
        // `real` has no symlinks left; O_NOFOLLOW refuses one swapped in since, and
        // O_NONBLOCK keeps a FIFO from blocking the open (it is refused just below).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&real)
            .map_err(|_| not_found())?;
        if !file.metadata().map_err(|_| not_found())?.is_file() || !self.holds(&file) {
            return Err(not_found());
        }
        Ok(file)
    }

    /// Whether the open `file` is really inside the repository (a directory on its path
    /// could have been swapped for a link between the checks and the open).
    #[cfg(target_os = "linux")]
    fn holds(&self, file: &File) -> bool {
        use std::os::fd::AsRawFd;
        fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .is_ok_and(|p| p.starts_with(&self.root))
    }

    #[cfg(not(target_os = "linux"))]
    fn holds(&self, _: &File) -> bool {
        true
    }
}

/// Refuses anything but a plain file name.
pub fn check_name(name: &str) -> Result<(), RepositoryError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || name.starts_with('.')
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
        || name.contains("..");
    if bad {
        // Escaped: the name goes into messages and logs.
        return Err(RepositoryError::InvalidName(
            clip(name).escape_debug().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_accepted() {
        for ok in [
            "resnet18.pth",
            "a b.safetensors",
            "x-d92f0530.pth",
            "é.pth",
            "a.b.c",
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "..x",
            "x..y",
            ".hidden",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\0b",
            "line\nbreak",
            "esc\u{1b}[31m",
            long.as_str(),
        ] {
            assert!(
                matches!(check_name(bad), Err(RepositoryError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert_eq!(check_name(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn messages_repeat_a_short_prefix() {
        let long = "é".repeat(1000);
        let e = check_name(&format!("/{long}")).expect_err("bad");
        let text = e.to_string();
        assert!(text.len() < 400, "{text}");
        assert!(text.contains("…"), "{text}");
        assert_eq!(clip("short"), "short");
        let e = check_name("a\nb\u{1b}").expect_err("control characters");
        assert!(e.to_string().starts_with("'a\\nb\\u{1b}' is not"), "{e}");
    }

    #[test]
    fn files_outside_or_not_regular_are_all_not_found_alike() {
        let outside = tempfile::tempdir().expect("tempdir");
        let secret = outside.path().join("secret.pth");
        fs::write(&secret, b"x").expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = ModelRepository::new(dir.path()).expect("repo");
        fs::write(dir.path().join("model.pth"), b"weights").expect("write");
        fs::create_dir(dir.path().join("sub")).expect("mkdir");
        fs::write(dir.path().join("sub").join("inner.pth"), b"w").expect("write");
        std::os::unix::fs::symlink(&secret, dir.path().join("escape.pth")).expect("link");
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).expect("link");
        std::os::unix::fs::symlink("sub/inner.pth", dir.path().join("inner.pth")).expect("link");
        std::os::unix::fs::symlink("gone.pth", dir.path().join("dangling.pth")).expect("link");

        let mut read = String::new();
        std::io::Read::read_to_string(&mut repo.open("model.pth").expect("opens"), &mut read)
            .expect("reads");
        assert_eq!(read, "weights");
        // A link that stays inside the repository is followed.
        assert!(repo.open("inner.pth").is_ok());
        for name in ["missing.pth", "sub", "escape.pth", "etc", "dangling.pth"] {
            assert_eq!(
                repo.open(name).map(|_| ()),
                Err(RepositoryError::NotFound(name.into())),
                "{name}"
            );
        }
        assert!(matches!(
            repo.open("../secret.pth"),
            Err(RepositoryError::InvalidName(_))
        ));
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("pipe.pth");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let repo = ModelRepository::new(dir.path()).expect("repo");
        assert_eq!(
            repo.open("pipe.pth").map(|_| ()),
            Err(RepositoryError::NotFound("pipe.pth".into()))
        );
    }

    #[test]
    fn the_repository_must_be_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        fs::write(&file, b"").expect("write");
        assert!(ModelRepository::new(&file).is_err());
        assert!(ModelRepository::new(&dir.path().join("none")).is_err());
    }
}
