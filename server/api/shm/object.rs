//! Opening the object a registration names: only a regular file on a tmpfs, reached
//! without following a symbolic link or blocking on a FIFO.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use super::ShmError;

/// Opens `path` for reading and writing if it is a regular file, without following a
/// symbolic link or blocking on a FIFO.
pub(super) fn open_object(key: &str, path: &std::path::Path) -> Result<File, ShmError> {
    let open_error = |source| ShmError::Open {
        key: key.to_string(),
        source,
    };
    let not_regular = |kind| ShmError::NotRegular {
        key: key.to_string(),
        kind,
    };
    // Looked at first, so a FIFO or device is never even opened; the open below checks
    // again on the file it got, in case the entry was swapped in between.
    let entry = std::fs::symlink_metadata(path).map_err(open_error)?;
    if !entry.file_type().is_file() {
        return Err(not_regular(kind(&entry.file_type())));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => not_regular("a symbolic link"),
            Some(libc::EISDIR) => not_regular("a directory"),
            _ => open_error(e),
        })?;
    let file_type = file.metadata().map_err(open_error)?.file_type();
    if !file_type.is_file() {
        return Err(not_regular(kind(&file_type)));
    }
    // POSIX shared memory is a tmpfs (glibc's shm_open looks for one). Where /dev/shm
    // shares a filesystem with other files, a hard link in it could name any of them.
    if !on_tmpfs(&file).map_err(open_error)? {
        return Err(not_regular("a file outside a tmpfs"));
    }
    Ok(file)
}

/// Whether `file` lies on a tmpfs.
fn on_tmpfs(file: &File) -> io::Result<bool> {
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct it is given on success (checked before reading
    // it) and reads nothing else; the descriptor is open for the call's duration.
    if unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    let fs = unsafe { fs.assume_init() };
    Ok(fs.f_type == libc::TMPFS_MAGIC)
}

/// What a file that is not a regular file is, for the refusal's message.
fn kind(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "an unknown kind of file"
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_objects::Object;
    use super::super::SharedMemory;
    use super::*;

    #[test]
    fn a_symbolic_link_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, [7u8; 64]).expect("target");
        let link = Object(format!("resnet-serve-test-link-{}", std::process::id()));
        std::os::unix::fs::symlink(&target, link.path()).expect("symlink");
        // A link to a real shared-memory object is no better.
        let obj = Object::new("linked", 64);
        let link_to_obj = Object(format!("resnet-serve-test-link2-{}", std::process::id()));
        std::os::unix::fs::symlink(obj.path(), link_to_obj.path()).expect("symlink");
        let shm = SharedMemory::new(true);
        for key in [link.key(), link_to_obj.key()] {
            let err = shm.register("l", &key, 0, 64).expect_err("a link");
            assert!(
                matches!(
                    err,
                    ShmError::NotRegular {
                        kind: "a symbolic link",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("symbolic link"), "{err}");
        }
        assert!(shm.status("").expect("status").is_empty());
        assert_eq!(std::fs::read(&target).expect("target"), [7u8; 64]);
    }

    #[test]
    fn only_regular_files_on_a_tmpfs_are_opened() {
        let dir = Object(format!("resnet-serve-test-dir-{}", std::process::id()));
        std::fs::create_dir(dir.path()).expect("dir");
        let fifo = Object(format!("resnet-serve-test-fifo-{}", std::process::id()));
        let c_path = std::ffi::CString::new(fifo.path().into_os_string().into_encoded_bytes())
            .expect("path");
        // SAFETY: a valid NUL-terminated path; mkfifo reads nothing else.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let socket = Object(format!("resnet-serve-test-sock-{}", std::process::id()));
        let _listener = std::os::unix::net::UnixListener::bind(socket.path()).expect("bind");
        let shm = SharedMemory::new(true);
        for (obj, kind) in [
            (&dir, "a directory"),
            (&fifo, "a FIFO"),
            (&socket, "a socket"),
        ] {
            let err = shm.register("x", &obj.key(), 0, 1).expect_err(kind);
            assert!(
                matches!(&err, ShmError::NotRegular { kind: k, .. } if *k == kind),
                "{kind}: {err}"
            );
        }
        // The checks on the opened file itself: a FIFO reached past the first look.
        let err = open_object("/fifo", &fifo.path()).expect_err("fifo");
        assert!(matches!(err, ShmError::NotRegular { .. }), "{err}");
        // A regular file that is no shared-memory object (as a hard link in a /dev/shm
        // that is not a tmpfs of its own could name): refused before any write.
        let comm = std::path::Path::new("/proc/self/comm");
        let before = std::fs::read(comm).expect("comm");
        let err = open_object("/comm", comm).expect_err("procfs");
        assert!(
            matches!(
                err,
                ShmError::NotRegular {
                    kind: "a file outside a tmpfs",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(comm).expect("comm"), before);
        assert!(shm.status("").expect("status").is_empty());
    }
}
