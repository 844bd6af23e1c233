//! System shared-memory regions (Triton's `system_shared_memory` extension): a client on
//! the same host writes a POSIX shared-memory object, registers a window of it under a
//! name, and then points inputs (and KServe outputs) at that window instead of sending
//! their bytes. A 64-image batch of float tensors is 38.5 MB; through a region, what
//! crosses the socket is a few hundred bytes of references.
//!
//! Off unless the operator turns it on (`--shared-memory`, [`SharedMemory::new`]): a
//! registration makes the server open a file of this host's `/dev/shm` on a client's
//! word. The key names one entry of `/dev/shm`; it is opened with `O_NOFOLLOW` and
//! checked with `fstat` to be a regular file on a tmpfs, so a symbolic link (which could
//! point the server's writes at any file it may write), a directory, a FIFO, a socket,
//! a device or a hard link to a file elsewhere is refused, never followed. Regions are capped in number and in registered bytes
//! ([`Limits`]).
//!
//! The object belongs to another process, which may write, shrink or remove it at any
//! moment. A region therefore keeps only the open file and is never mapped: through a
//! mapping, a truncation racing a read kills the reading process with SIGBUS. Inputs are
//! read with `pread` when their request arrives, into a buffer the server owns (what the
//! batch later stages), so an object shrunk at any moment costs only a short read
//! (FAILED_PRECONDITION for that request) and nothing the client does after arrival
//! reaches the request. Those copies count against the same byte cap while their
//! requests hold them (RESOURCE_EXHAUSTED past it), so shared memory never costs the
//! server more than the cap. Outputs are written with `pwrite`.

mod object;
mod region;
mod registry;

use std::io;

pub use region::Region;
pub use registry::SharedMemory;

/// Where POSIX shared-memory objects live on Linux: `shm_open("/name")` opens
/// `/dev/shm/name`.
const SHM_DIR: &str = "/dev/shm";

/// Longest region name or key accepted, in bytes (a key's file name can be no longer).
const MAX_NAME: usize = 255;

/// How much of a client's string an error message repeats.
const ECHO: usize = 64;

/// Default for [`Limits::max_regions`].
pub const DEFAULT_MAX_REGIONS: usize = 64;

/// Ceiling of the default [`Limits::max_bytes`].
const DEFAULT_MAX_BYTES: u64 = 4 << 30;

/// What clients may make the server hold through shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Regions registered at once (each keeps one file open).
    pub max_regions: usize,
    /// Bytes registered at once (the windows' sizes summed); the copies of inputs held
    /// by requests in flight are bounded by the same amount.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_regions: DEFAULT_MAX_REGIONS,
            max_bytes: default_max_bytes(),
        }
    }
}

/// 4 GiB, or a quarter of this machine's memory where that is less: the copies of
/// shared inputs are real memory.
pub fn default_max_bytes() -> u64 {
    physical_memory().map_or(DEFAULT_MAX_BYTES, |ram| (ram / 4).min(DEFAULT_MAX_BYTES))
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn physical_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// At most [`ECHO`] bytes of a client's string, for messages and logs.
fn clip(s: &str) -> String {
    if s.len() <= ECHO {
        return s.to_string();
    }
    let mut end = ECHO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error(
        "system shared memory is disabled on this server (the operator enables it with --shared-memory true)"
    )]
    Disabled,
    #[error("a shared memory region needs a name")]
    NoName,
    #[error("a shared memory region's name or key may hold at most {MAX_NAME} bytes; got {0}")]
    NameTooLong(usize),
    #[error("shared memory region '{0}' is already registered; unregister it first")]
    AlreadyRegistered(String),
    #[error("no shared memory region '{0}' is registered")]
    NotFound(String),
    #[error(
        "shared memory key '{0}' is not a POSIX shared-memory name (\"/name\": one leading '/', no other, not '.' or '..')"
    )]
    BadKey(String),
    #[error("cannot open shared memory '{key}': {source}")]
    Open {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("shared memory '{key}' is {kind}, not a shared-memory object (a regular file in /dev/shm); refused")]
    NotRegular { key: String, kind: &'static str },
    #[error("shared memory '{key}' holds {size} bytes; a region of {byte_size} bytes at offset {offset} runs past it")]
    PastObject {
        key: String,
        size: u64,
        offset: u64,
        byte_size: u64,
    },
    #[error("this server allows {max} shared memory regions at once (--shared-memory-max-regions); unregister one first")]
    TooManyRegions { max: usize },
    #[error("registering {byte_size} bytes of shared memory would pass this server's limit of {max} ({registered} registered; --shared-memory-max-mib)")]
    TooManyBytes {
        byte_size: u64,
        registered: u64,
        max: u64,
    },
    #[error("shared memory copies held by requests in flight are at this server's limit of {max} bytes; {len} more do not fit, retry")]
    Busy { len: u64, max: u64 },
    #[error("the object behind shared memory region '{name}' shrank to {size} bytes; unregister it and register it again")]
    Shrunk { name: String, size: u64 },
    #[error("shared memory region '{name}': {source}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("a shared memory region needs a byte_size above 0")]
    Empty,
    #[error(
        "{len} bytes at offset {offset} run past shared memory region '{name}' ({byte_size} bytes)"
    )]
    OutOfRange {
        name: String,
        offset: u64,
        len: u64,
        byte_size: u64,
    },
}

/// Shared-memory objects for tests, removed when dropped.
#[cfg(test)]
pub(crate) mod test_objects {
    use super::SHM_DIR;

    /// A shared-memory object holding `data`.
    pub(crate) struct Object(pub(crate) String);

    impl Object {
        pub(crate) fn with(tag: &str, data: &[u8]) -> Object {
            let object = Object(format!("resnet-serve-test-{tag}-{}", std::process::id()));
            std::fs::write(object.path(), data).expect("write shm");
            object
        }

        /// `size` bytes holding 0, 1, 2, ... (mod 256).
        pub(crate) fn new(tag: &str, size: usize) -> Object {
            Object::with(tag, &(0..size).map(|i| i as u8).collect::<Vec<u8>>())
        }

        /// Its name as given to `shm_open`.
        pub(crate) fn key(&self) -> String {
            format!("/{}", self.0)
        }

        pub(crate) fn path(&self) -> std::path::PathBuf {
            std::path::Path::new(SHM_DIR).join(&self.0)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let path = self.path();
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir(&path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_byte_cap_is_at_most_a_quarter_of_memory() {
        let max = default_max_bytes();
        assert!(max > 0 && max <= DEFAULT_MAX_BYTES, "{max}");
        if let Some(ram) = physical_memory() {
            assert!(max <= ram / 4, "{max} of {ram}");
        }
    }
}
