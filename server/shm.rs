//! System shared-memory regions (Triton's `system_shared_memory` extension): a client on
//! the same host maps a POSIX shared-memory object, registers a window of it under a
//! name, and then points inputs (and KServe outputs) at that window instead of sending
//! their bytes. A 64-image batch of float tensors is 38.5 MB; through a region, what
//! crosses the socket is a few hundred bytes of references, and the server reads each
//! tensor once, where its batch is staged.
//!
//! The regions are shared with another process, which may write them at any time, so
//! they are mapped as raw memory ([`memmap2::MmapRaw`]) and only read or written through
//! its pointer. The client owns the contents: it must leave an input untouched until
//! its call is answered (values are still checked finite where the batch is staged),
//! and it must not shrink the object under a registered region: reading past the end of
//! a shared-memory object kills the reading process with SIGBUS. The object's size is
//! checked at registration and again (one fstat) before each window is handed out,
//! which leaves only a truncation racing the read itself.

use std::fs::OpenOptions;
use std::sync::Arc;

use dashmap::DashMap;
use memmap2::{MmapOptions, MmapRaw};
use prost::bytes::Bytes;

/// Where POSIX shared-memory objects live on Linux: `shm_open("/name")` opens
/// `/dev/shm/name`.
const SHM_DIR: &str = "/dev/shm";

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error(
        "system shared memory is disabled on this server (started with --shared-memory false)"
    )]
    Disabled,
    #[error("a shared memory region needs a name")]
    NoName,
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
        source: std::io::Error,
    },
    #[error("shared memory '{key}' holds {size} bytes; a region of {byte_size} bytes at offset {offset} runs past it")]
    PastObject {
        key: String,
        size: u64,
        offset: u64,
        byte_size: u64,
    },
    #[error("the object behind shared memory region '{name}' shrank to {size} bytes; unregister it and register it again")]
    Shrunk { name: String, size: u64 },
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
    map: MmapRaw,
    /// The object, to notice it shrinking under the window before it is read.
    file: std::fs::File,
}

impl Region {
    /// The start of `len` bytes at `offset` within the window, checked to lie inside it.
    pub fn range(&self, offset: u64, len: u64) -> Result<usize, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.byte_size => Ok(offset as usize),
            _ => Err(ShmError::OutOfRange {
                name: self.name.clone(),
                offset,
                len,
                byte_size: self.byte_size,
            }),
        }
    }

    /// Fails if the object no longer holds `end` bytes of the window (a client truncated
    /// it): touching them would stop the server with SIGBUS. A cheap check (one fstat)
    /// that closes all but a race with a truncation between it and the read.
    fn still_backed(&self, end: u64) -> Result<(), ShmError> {
        let size = self.file.metadata().map_or(0, |m| m.len());
        if self.offset + end <= size {
            Ok(())
        } else {
            Err(ShmError::Shrunk {
                name: self.name.clone(),
                size,
            })
        }
    }

    /// The start of `len` bytes at `offset`, checked to lie inside the window and still
    /// be backed by the object: what every access through the mapping goes through.
    fn accessible(&self, offset: u64, len: u64) -> Result<usize, ShmError> {
        let start = self.range(offset, len)?;
        self.still_backed(offset + len)?;
        Ok(start)
    }

    /// Copies `data` into the window at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let start = self.accessible(offset, data.len() as u64)?;
        // SAFETY: `accessible` checked start..start + len lies inside the mapping, which lives
        // as long as `self`; the memory is shared with another process, so it is written
        // through the raw pointer and never borrowed as a Rust reference.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(start),
                data.len(),
            )
        };
        Ok(())
    }
}

/// `len` bytes of a region, held as `Bytes` (what requests carry their inputs in): the
/// region stays mapped while any such slice lives, even after it is unregistered.
struct Window {
    region: Arc<Region>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `Region::accessible` checked the bounds when the window was made, and the
        // Arc keeps the mapping alive. Another process may write these bytes meanwhile
        // (the protocol makes that the client's error); they are plain bytes, so a
        // racing write can only change which values are read, and every value is
        // checked finite as the batch is staged.
        unsafe { std::slice::from_raw_parts(self.region.map.as_ptr().add(self.start), self.len) }
    }
}

/// The registered regions, by name. One per server, shared by both APIs.
#[derive(Debug)]
pub struct SharedMemory {
    enabled: bool,
    regions: DashMap<String, Arc<Region>>,
}

impl SharedMemory {
    pub fn new(enabled: bool) -> Self {
        SharedMemory {
            enabled,
            regions: DashMap::new(),
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

    /// Maps `byte_size` bytes of the object `key` from `offset`, under `name`.
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
        if byte_size == 0 {
            return Err(ShmError::Empty);
        }
        let file_name = key
            .strip_prefix('/')
            .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
            .ok_or_else(|| ShmError::BadKey(key.to_string()))?;
        let open_error = |source| ShmError::Open {
            key: key.to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(std::path::Path::new(SHM_DIR).join(file_name))
            .map_err(open_error)?;
        let size = file.metadata().map_err(open_error)?.len();
        if offset.checked_add(byte_size).is_none_or(|end| end > size) {
            return Err(ShmError::PastObject {
                key: key.to_string(),
                size,
                offset,
                byte_size,
            });
        }
        // The whole window must be addressable in this process.
        let len = usize::try_from(byte_size).map_err(|_| ShmError::PastObject {
            key: key.to_string(),
            size,
            offset,
            byte_size,
        })?;
        let map = MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&file)
            .map_err(open_error)?;
        let region = Arc::new(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            byte_size,
            map,
            file,
        });
        match self.regions.entry(name.to_string()) {
            dashmap::Entry::Occupied(_) => Err(ShmError::AlreadyRegistered(name.to_string())),
            dashmap::Entry::Vacant(v) => {
                v.insert(region);
                Ok(())
            }
        }
    }

    /// Forgets the region `name`, or every region when `name` is empty. Unknown names
    /// are not an error (so a client's clean-up may run twice). Requests already holding
    /// its bytes keep the mapping until they finish.
    pub fn unregister(&self, name: &str) -> Result<(), ShmError> {
        self.check_enabled()?;
        if name.is_empty() {
            self.regions.clear();
        } else {
            self.regions.remove(name);
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
            .ok_or_else(|| ShmError::NotFound(name.to_string()))
    }

    /// `len` bytes at `offset` in region `name`, without copying them.
    pub fn bytes(&self, name: &str, offset: u64, len: u64) -> Result<Bytes, ShmError> {
        let region = self.region(name)?;
        let start = region.accessible(offset, len)?;
        Ok(Bytes::from_owner(Window {
            region,
            start,
            len: len as usize,
        }))
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
            let name = format!("resnet-serve-test-{tag}-{}", std::process::id());
            std::fs::write(std::path::Path::new(SHM_DIR).join(&name), data).expect("write shm");
            Object(name)
        }

        /// `size` bytes holding 0, 1, 2, ... (mod 256).
        pub(crate) fn new(tag: &str, size: usize) -> Object {
            Object::with(tag, &(0..size).map(|i| i as u8).collect::<Vec<u8>>())
        }

        /// Its name as given to `shm_open`.
        pub(crate) fn key(&self) -> String {
            format!("/{}", self.0)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(std::path::Path::new(SHM_DIR).join(&self.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_objects::Object;
    use super::*;

    #[test]
    fn a_registered_window_is_read_and_written_in_place() {
        let obj = Object::new("rw", 10_000);
        let shm = SharedMemory::new(true);
        shm.register("r", &obj.key(), 5000, 4000).expect("register");
        // Window offset 5000 + 10 -> object byte 5010.
        let b = shm.bytes("r", 10, 4).expect("bytes");
        assert_eq!(&b[..], &[(5010 % 256) as u8, 147, 148, 149]);
        let region = shm.region("r").expect("region");
        region.write(3996, &[9, 9, 9, 9]).expect("write");
        let file = std::fs::read(std::path::Path::new(SHM_DIR).join(&obj.0)).expect("read");
        assert_eq!(&file[8996..9000], &[9, 9, 9, 9]);
        assert_eq!(file[8995], (8995 % 256) as u8);
        // An object shrunk under its window fails cleanly instead of faulting.
        let shrunk = SharedMemory::new(true);
        shrunk
            .register("s", &obj.key(), 0, 10_000)
            .expect("register");
        std::fs::OpenOptions::new()
            .write(true)
            .open(std::path::Path::new(SHM_DIR).join(&obj.0))
            .and_then(|f| f.set_len(9_000))
            .expect("truncate");
        assert!(shrunk.bytes("s", 0, 9_000).is_ok());
        assert!(matches!(
            shrunk.bytes("s", 8_000, 1_001),
            Err(ShmError::Shrunk { size: 9_000, .. })
        ));
        assert!(shrunk.region("s").expect("s").write(9_999, &[1]).is_err());
        // A slice outlives its region's registration.
        shm.unregister("r").expect("unregister");
        assert_eq!(b[1], 147);
        assert!(matches!(shm.bytes("r", 0, 1), Err(ShmError::NotFound(_))));
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
        shm.unregister("b").expect("unknown names are no error");
        shm.unregister("").expect("all");
        assert!(shm.status("").expect("all").is_empty());
    }

    #[test]
    fn a_disabled_server_refuses_every_call() {
        let obj = Object::new("off", 16);
        let shm = SharedMemory::new(false);
        assert!(matches!(
            shm.register("a", &obj.key(), 0, 16),
            Err(ShmError::Disabled)
        ));
        assert!(matches!(shm.status(""), Err(ShmError::Disabled)));
        assert!(matches!(shm.bytes("a", 0, 1), Err(ShmError::Disabled)));
    }
}
