//! The registered regions, by name ([`SharedMemory`], one per server): registration
//! under the caps on regions and bytes, look-up on every request that names a region,
//! and the account of the bytes requests hold copied out of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use dashmap::DashMap;
use prost::bytes::Bytes;

use super::object::open_object;
use super::{clip, Limits, Region, ShmError, MAX_NAME, SHM_DIR};

/// Bytes of shared memory copied out for requests that still hold them, and the most
/// allowed.
#[derive(Debug)]
pub(super) struct Copies {
    pub(super) held: AtomicU64,
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
    pub(super) copies: Arc<Copies>,
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

#[cfg(test)]
mod tests {
    use super::super::test_objects::Object;
    use super::*;

    fn limits(max_regions: usize, max_bytes: u64) -> Limits {
        Limits {
            max_regions,
            max_bytes,
        }
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
}
