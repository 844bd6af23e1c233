//! One registered window of a client's shared-memory object, read with `pread` into a
//! buffer the server owns and written with `pwrite`, each access checked to lie inside
//! the window; an object that shrank under it answers with an error, never a signal.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::{clip, ShmError};

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
    pub(super) file: File,
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
    pub(super) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ShmError> {
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

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::sync::atomic::Ordering;

    use super::super::test_objects::Object;
    use super::super::SharedMemory;
    use super::*;

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
}
