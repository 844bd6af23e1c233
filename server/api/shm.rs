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

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use dashmap::DashMap;
use prost::bytes::Bytes;

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

/// One registered window of a shared-memory object.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    /// The object's name as given to `shm_open`.
    pub key: String,
    /// Where the window starts in the object.
    pub offset: u64,
    pub byte_size: u64,
    /// The object, open for reading and writing: every access is one `pread` or
    /// `pwrite` on it, which a shrunk object answers with a short count, not a signal.
    file: File,
}

impl Region {
    /// The start of `len` bytes at `offset` within the window, checked to lie inside it.
    pub fn range(&self, offset: u64, len: u64) -> Result<usize, ShmError> {
        let out_of_range = || ShmError::OutOfRange {
            name: clip(&self.name),
            offset,
            len,
            byte_size: self.byte_size,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.byte_size => {
                usize::try_from(offset).map_err(|_| out_of_range())
            }
            _ => Err(out_of_range()),
        }
    }

    /// Where `len` bytes at `offset` in the window lie in the object, checked to lie
    /// inside the window (and so inside the object as it was registered).
    fn position(&self, offset: u64, len: u64) -> Result<u64, ShmError> {
        self.range(offset, len)?;
        self.offset
            .checked_add(offset)
            .ok_or_else(|| ShmError::OutOfRange {
                name: clip(&self.name),
                offset,
                len,
                byte_size: self.byte_size,
            })
    }

    fn io_error(&self, source: io::Error) -> ShmError {
        ShmError::Io {
            name: clip(&self.name),
            source,
        }
    }

    /// The error for an object found shorter than the window, with its size now.
    fn shrunk(&self) -> ShmError {
        ShmError::Shrunk {
            name: clip(&self.name),
            size: self.file.metadata().map_or(0, |m| m.len()),
        }
    }

    /// Copies `len` bytes at `offset` in the window out of the object. A short read
    /// means the object shrank under the window.
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ShmError> {
        let at = self.position(offset, len)?;
        let len = usize::try_from(len).map_err(|_| ShmError::OutOfRange {
            name: clip(&self.name),
            offset,
            len,
            byte_size: self.byte_size,
        })?;
        // Read into spare capacity rather than a zeroed buffer: zeroing would be one more
        // pass over every tensor's bytes.
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let pos = at
                .checked_add(buf.len() as u64)
                .and_then(|p| libc::off_t::try_from(p).ok())
                .ok_or_else(|| self.shrunk())?;
            let spare = buf.spare_capacity_mut();
            // SAFETY: pread writes at most `spare.len()` bytes through a pointer to the
            // vector's spare capacity, which holds that many (no reference to
            // uninitialised bytes is made); only the count it wrote is added to the length.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    pos,
                )
            };
            match usize::try_from(n) {
                Ok(0) => return Err(self.shrunk()),
                // SAFETY: the kernel initialised these `n` bytes (n <= spare.len()).
                Ok(n) => unsafe { buf.set_len(buf.len() + n) },
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(self.io_error(e));
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Copies `data` into the window at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let len = data.len() as u64;
        let at = self.position(offset, len)?;
        // A write past the object's end would grow it back rather than fail, so its size
        // is checked first; a truncation racing that check can only regrow the client's
        // own object, up to the window it registered.
        let size = self.file.metadata().map_err(|e| self.io_error(e))?.len();
        if at.checked_add(len).is_none_or(|end| end > size) {
            return Err(ShmError::Shrunk {
                name: clip(&self.name),
                size,
            });
        }
        self.file
            .write_all_at(data, at)
            .map_err(|e| self.io_error(e))
    }
}

/// Bytes of shared memory copied out for requests that still hold them, and the most
/// allowed.
#[derive(Debug)]
struct Copies {
    held: AtomicU64,
    max: u64,
}

impl Copies {
    fn reserve(self: &Arc<Self>, len: u64) -> Result<Held, ShmError> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(len).filter(|&total| total <= self.max)
            })
            .map_err(|_| ShmError::Busy { len, max: self.max })?;
        Ok(Held {
            copies: self.clone(),
            len,
        })
    }
}

/// A reservation against [`Copies`], returned when dropped.
#[derive(Debug)]
struct Held {
    copies: Arc<Copies>,
    len: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.copies.held.fetch_sub(self.len, Ordering::AcqRel);
    }
}

/// A window's bytes as read for a request, held as `Bytes` (what requests carry their
/// inputs in); their reservation is returned when the last slice of them drops.
struct Copied {
    data: Vec<u8>,
    _held: Held,
}

impl AsRef<[u8]> for Copied {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// The registered regions, by name. One per server, shared by both APIs.
#[derive(Debug)]
pub struct SharedMemory {
    enabled: bool,
    limits: Limits,
    /// Read on every request that names a region, so a concurrent map.
    regions: DashMap<String, Arc<Region>>,
    /// The registered windows' bytes, summed. Every registration and removal changes the
    /// map and this sum under this lock, so the caps hold however calls race; a
    /// `std::sync::Mutex`, never held across an await.
    registered: Mutex<u64>,
    copies: Arc<Copies>,
}

impl SharedMemory {
    /// Regions under the default [`Limits`]; `enabled` false refuses every call.
    pub fn new(enabled: bool) -> Self {
        SharedMemory::with_limits(enabled, Limits::default())
    }

    pub fn with_limits(enabled: bool, limits: Limits) -> Self {
        SharedMemory {
            enabled,
            limits,
            regions: DashMap::new(),
            registered: Mutex::new(0),
            copies: Arc::new(Copies {
                held: AtomicU64::new(0),
                max: limits.max_bytes,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn check_enabled(&self) -> Result<(), ShmError> {
        if self.enabled {
            Ok(())
        } else {
            Err(ShmError::Disabled)
        }
    }

    /// Opens the object `key` and registers `byte_size` bytes of it from `offset` under
    /// `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), ShmError> {
        self.check_enabled()?;
        if name.is_empty() {
            return Err(ShmError::NoName);
        }
        if let Some(long) = [name, key].into_iter().find(|s| s.len() > MAX_NAME) {
            return Err(ShmError::NameTooLong(long.len()));
        }
        if byte_size == 0 {
            return Err(ShmError::Empty);
        }
        let file_name = key
            .strip_prefix('/')
            .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
            .ok_or_else(|| ShmError::BadKey(key.to_string()))?;
        let file = open_object(key, &std::path::Path::new(SHM_DIR).join(file_name))?;
        let size = file
            .metadata()
            .map_err(|source| ShmError::Open {
                key: key.to_string(),
                source,
            })?
            .len();
        if offset.checked_add(byte_size).is_none_or(|end| end > size) {
            return Err(ShmError::PastObject {
                key: key.to_string(),
                size,
                offset,
                byte_size,
            });
        }
        let region = Arc::new(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            byte_size,
            file,
        });
        let mut registered = self
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.regions.contains_key(name) {
            return Err(ShmError::AlreadyRegistered(name.to_string()));
        }
        if self.regions.len() >= self.limits.max_regions {
            return Err(ShmError::TooManyRegions {
                max: self.limits.max_regions,
            });
        }
        let total = registered
            .checked_add(byte_size)
            .filter(|&t| t <= self.limits.max_bytes)
            .ok_or(ShmError::TooManyBytes {
                byte_size,
                registered: *registered,
                max: self.limits.max_bytes,
            })?;
        self.regions.insert(name.to_string(), region);
        *registered = total;
        Ok(())
    }

    /// Forgets the region `name`, or every region when `name` is empty. Unknown names
    /// are not an error (so a client's clean-up may run twice). Requests already holding
    /// copies of its bytes keep them until they finish.
    pub fn unregister(&self, name: &str) -> Result<(), ShmError> {
        self.check_enabled()?;
        let mut registered = self
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if name.is_empty() {
            self.regions.clear();
            *registered = 0;
        } else if let Some((_, region)) = self.regions.remove(name) {
            *registered = registered.saturating_sub(region.byte_size);
        }
        Ok(())
    }

    /// The region `name`, or every region when `name` is empty.
    pub fn status(&self, name: &str) -> Result<Vec<Arc<Region>>, ShmError> {
        self.check_enabled()?;
        if name.is_empty() {
            let mut all: Vec<_> = self.regions.iter().map(|r| r.value().clone()).collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            return Ok(all);
        }
        Ok(vec![self.region(name)?])
    }

    pub fn region(&self, name: &str) -> Result<Arc<Region>, ShmError> {
        self.check_enabled()?;
        self.regions
            .get(name)
            .map(|r| r.value().clone())
            .ok_or_else(|| ShmError::NotFound(clip(name)))
    }

    /// A copy of `len` bytes at `offset` in region `name`, read now: the request holding
    /// it sees nothing the client does to the object afterwards.
    pub fn bytes(&self, name: &str, offset: u64, len: u64) -> Result<Bytes, ShmError> {
        let region = self.region(name)?;
        region.range(offset, len)?;
        let held = self.copies.reserve(len)?;
        let data = region.read(offset, len)?;
        Ok(Bytes::from_owner(Copied { data, _held: held }))
    }
}

/// Opens `path` for reading and writing if it is a regular file, without following a
/// symbolic link or blocking on a FIFO.
fn open_object(key: &str, path: &std::path::Path) -> Result<File, ShmError> {
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
    use super::test_objects::Object;
    use super::*;

    fn limits(max_regions: usize, max_bytes: u64) -> Limits {
        Limits {
            max_regions,
            max_bytes,
        }
    }

    fn truncate(obj: &Object, len: u64) {
        OpenOptions::new()
            .write(true)
            .open(obj.path())
            .and_then(|f| f.set_len(len))
            .expect("truncate");
    }

    #[test]
    fn a_window_is_read_as_a_copy_and_written_in_place() {
        let obj = Object::new("rw", 10_000);
        let shm = SharedMemory::new(true);
        shm.register("r", &obj.key(), 5000, 4000).expect("register");
        // Window offset 5000 + 10 -> object byte 5010.
        let b = shm.bytes("r", 10, 4).expect("bytes");
        assert_eq!(&b[..], &[(5010 % 256) as u8, 147, 148, 149]);
        let region = shm.region("r").expect("region");
        region.write(3996, &[9, 9, 9, 9]).expect("write");
        let file = std::fs::read(obj.path()).expect("read");
        assert_eq!(&file[8996..9000], &[9, 9, 9, 9]);
        assert_eq!(file[8995], (8995 % 256) as u8);
        // What was read is the request's own: later writes to the object, its
        // truncation or its region's removal do not reach it.
        region.write(11, &[0]).expect("write");
        truncate(&obj, 0);
        shm.unregister("r").expect("unregister");
        assert_eq!(&b[..], &[(5010 % 256) as u8, 147, 148, 149]);
        assert!(matches!(shm.bytes("r", 0, 1), Err(ShmError::NotFound(_))));
    }

    #[test]
    fn an_object_truncated_under_its_region_fails_cleanly() {
        let obj = Object::new("shrunk", 10_000);
        let shm = SharedMemory::new(true);
        shm.register("s", &obj.key(), 1000, 9_000)
            .expect("register");
        let region = shm.region("s").expect("s");
        // Partly shrunk: the part of the window still backed reads, the rest fails.
        truncate(&obj, 9_000);
        assert_eq!(shm.bytes("s", 0, 8_000).expect("backed").len(), 8_000);
        assert!(matches!(
            shm.bytes("s", 7_000, 1_001),
            Err(ShmError::Shrunk { size: 9_000, .. })
        ));
        // Gone to nothing: every read and write fails with a status, no signal, and a
        // refused write does not grow the object back.
        truncate(&obj, 0);
        for (offset, len) in [(0, 1), (0, 9_000), (8_999, 1)] {
            let err = shm.bytes("s", offset, len).expect_err("shrunk");
            assert!(matches!(err, ShmError::Shrunk { size: 0, .. }), "{err}");
        }
        assert!(matches!(
            region.write(0, &[1; 16]),
            Err(ShmError::Shrunk { size: 0, .. })
        ));
        assert_eq!(std::fs::metadata(obj.path()).expect("stat").len(), 0);
        // Its copies' reservations were returned: the whole cap is free again.
        assert_eq!(shm.copies.held.load(Ordering::Acquire), 0);
        // Grown back, it reads again.
        truncate(&obj, 10_000);
        assert_eq!(shm.bytes("s", 0, 9_000).expect("regrown").len(), 9_000);
    }

    #[test]
    fn reads_and_writes_racing_truncations_fail_cleanly() {
        // Through a mapping, a read racing a truncation died of SIGBUS; here each access
        // either completes or fails, however the two interleave.
        const SIZE: u64 = 1 << 20;
        let obj = Object::new("race", SIZE as usize);
        let shm = SharedMemory::new(true);
        shm.register("r", &obj.key(), 0, SIZE).expect("register");
        let region = shm.region("r").expect("r");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (mut ok, mut shrunk) = (0, 0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = OpenOptions::new()
                    .write(true)
                    .open(obj.path())
                    .expect("open");
                while !stop.load(Ordering::Relaxed) {
                    // Long enough whole that some reads complete, short enough that
                    // others are cut off halfway.
                    file.set_len(SIZE).expect("regrow");
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    file.set_len(SIZE / 3).expect("shrink");
                    file.set_len(0).expect("truncate");
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            });
            for i in 0..2_000u64 {
                let offset = (i * 4096) % (SIZE / 2);
                for result in [
                    shm.bytes("r", offset, SIZE / 2).map(|b| b.len()),
                    region.write(offset, &[1; 4096]).map(|()| 4096),
                ] {
                    match result {
                        Ok(_) => ok += 1,
                        Err(ShmError::Shrunk { .. }) => shrunk += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(ok + shrunk, 4_000);
        assert_eq!(shm.copies.held.load(Ordering::Acquire), 0);
    }

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

    #[test]
    fn regions_and_their_bytes_are_capped() {
        let obj = Object::new("caps", 4096);
        let shm = SharedMemory::with_limits(true, limits(2, 3000));
        shm.register("a", &obj.key(), 0, 1000).expect("a");
        assert!(matches!(
            shm.register("b", &obj.key(), 0, 2001),
            Err(ShmError::TooManyBytes {
                byte_size: 2001,
                registered: 1000,
                max: 3000
            })
        ));
        shm.register("b", &obj.key(), 0, 2000)
            .expect("b fits exactly");
        assert!(matches!(
            shm.register("c", &obj.key(), 0, 1),
            Err(ShmError::TooManyRegions { max: 2 })
        ));
        // A name in use is ALREADY_EXISTS, not a cap.
        assert!(matches!(
            shm.register("a", &obj.key(), 0, 1),
            Err(ShmError::AlreadyRegistered(_))
        ));
        shm.unregister("b").expect("unregister");
        shm.register("c", &obj.key(), 0, 2000).expect("room again");
        shm.unregister("").expect("all");
        shm.register("d", &obj.key(), 0, 3000)
            .expect("all the room");

        // Copies held by requests count against the same bytes until they are dropped.
        let first = shm.bytes("d", 0, 2000).expect("first copy");
        let slice = first.slice(0..10);
        drop(first);
        assert!(matches!(
            shm.bytes("d", 0, 1001),
            Err(ShmError::Busy {
                len: 1001,
                max: 3000
            })
        ));
        drop(slice);
        shm.bytes("d", 0, 3000)
            .expect("returned when its last slice drops");
        assert_eq!(shm.copies.held.load(Ordering::Acquire), 0);
    }

    #[test]
    fn bounds_names_and_keys_are_checked() {
        let obj = Object::new("bounds", 4096);
        let shm = SharedMemory::new(true);
        assert!(matches!(
            shm.register("a", &obj.key(), 4000, 100),
            Err(ShmError::PastObject { size: 4096, .. })
        ));
        assert!(matches!(
            shm.register("a", &obj.key(), u64::MAX, 2),
            Err(ShmError::PastObject { .. })
        ));
        assert!(matches!(
            shm.register("a", &obj.key(), 0, 0),
            Err(ShmError::Empty)
        ));
        assert!(matches!(
            shm.register("", &obj.key(), 0, 1),
            Err(ShmError::NoName)
        ));
        let long = "n".repeat(MAX_NAME + 1);
        assert!(matches!(
            shm.register(&long, &obj.key(), 0, 1),
            Err(ShmError::NameTooLong(256))
        ));
        assert!(matches!(
            shm.register("a", &format!("/{long}"), 0, 1),
            Err(ShmError::NameTooLong(257))
        ));
        for key in [obj.0.as_str(), "/", "/..", "/a/b", "/../etc/passwd"] {
            assert!(
                matches!(shm.register("a", key, 0, 1), Err(ShmError::BadKey(_))),
                "{key}"
            );
        }
        assert!(matches!(
            shm.register("a", "/resnet-serve-test-no-such-object", 0, 1),
            Err(ShmError::Open { .. })
        ));
        shm.register("a", &obj.key(), 96, 4000)
            .expect("fits exactly");
        assert!(matches!(
            shm.register("a", &obj.key(), 0, 1),
            Err(ShmError::AlreadyRegistered(_))
        ));
        assert!(shm.bytes("a", 3999, 1).is_ok());
        assert!(matches!(
            shm.bytes("a", 3999, 2),
            Err(ShmError::OutOfRange { .. })
        ));
        assert!(matches!(
            shm.bytes("a", u64::MAX, 2),
            Err(ShmError::OutOfRange { .. })
        ));
        assert!(shm.region("a").expect("a").write(4000, &[1]).is_err());
        assert_eq!(shm.status("").expect("all").len(), 1);
        assert!(matches!(shm.status("b"), Err(ShmError::NotFound(_))));
        // A client's name is echoed cut short.
        let missing = shm.bytes(&"x".repeat(10_000), 0, 1).expect_err("unknown");
        assert!(missing.to_string().len() < 200, "{missing}");
        shm.unregister("b").expect("unknown names are no error");
        shm.unregister("").expect("all");
        assert!(shm.status("").expect("all").is_empty());
    }

    #[test]
    fn off_unless_enabled() {
        assert!(!crate::process::server::ServeOptions::default().shared_memory);
        let obj = Object::new("off", 16);
        let shm = SharedMemory::new(false);
        assert!(!shm.enabled());
        assert!(matches!(
            shm.register("a", &obj.key(), 0, 16),
            Err(ShmError::Disabled)
        ));
        assert!(matches!(shm.status(""), Err(ShmError::Disabled)));
        assert!(matches!(shm.bytes("a", 0, 1), Err(ShmError::Disabled)));
        assert!(matches!(shm.unregister(""), Err(ShmError::Disabled)));
    }

    #[test]
    fn the_default_byte_cap_is_at_most_a_quarter_of_memory() {
        let max = default_max_bytes();
        assert!(max > 0 && max <= DEFAULT_MAX_BYTES, "{max}");
        if let Some(ram) = physical_memory() {
            assert!(max <= ram / 4, "{max} of {ram}");
        }
    }
}
