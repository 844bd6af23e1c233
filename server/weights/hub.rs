//! torch.hub conventions: where the published files live and the `-<sha256 prefix>`
//! their names carry. torch.hub itself never checks that prefix; we do.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::WeightsError;

/// Where the twelve published checkpoints are served.
pub const DEFAULT_BASE_URL: &str =
    "https://dl.fbaipublicfiles.com/semiweaksupervision/model_files/";

/// The hash prefix in a file name like `semi_supervised_resnet18-d92f0530.pth`: at least
/// eight lowercase hex digits between the last `-` and the next `.`.
pub fn expected_hash_prefix(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let after = &name[name.rfind('-')? + 1..];
    let hex = &after[..after.find('.')?];
    let ok = (8..=64).contains(&hex.len())
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| hex.to_string())
}

/// Hex sha256 of everything `reader` yields.
pub fn sha256_hex(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Refuses a file whose name carries a hash prefix its content does not have.
pub fn verify_file_name_hash(path: &Path) -> Result<(), WeightsError> {
    let Some(expected) = expected_hash_prefix(path) else {
        return Ok(());
    };
    let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
    check_hash(&file, path, expected)
}

/// [`verify_file_name_hash`] of a file already open, called `path`.
pub fn verify_open_file(file: &File, path: &Path) -> Result<(), WeightsError> {
    let Some(expected) = expected_hash_prefix(path) else {
        return Ok(());
    };
    check_hash(file, path, expected)
}

fn check_hash(file: &File, path: &Path, expected: String) -> Result<(), WeightsError> {
    // Positioned reads: the file's own offset is left where it was.
    let reader = FileReader { file, at: 0 };
    let actual = sha256_hex(reader).map_err(|e| WeightsError::io(path, e))?;
    if actual.starts_with(&expected) {
        Ok(())
    } else {
        Err(WeightsError::HashMismatch {
            path: path.to_path_buf(),
            expected,
            actual,
        })
    }
}

/// `Read` by `pread` from an offset of its own.
struct FileReader<'a> {
    file: &'a File,
    at: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_parsing_follows_torch_hub_names() {
        let p = |s: &str| expected_hash_prefix(Path::new(s));
        assert_eq!(
            p("/c/semi_supervised_resnet18-d92f0530.pth").as_deref(),
            Some("d92f0530")
        );
        assert_eq!(
            p("semi_weakly_supervised_resnext101_32x16-f3559a9c.pth").as_deref(),
            Some("f3559a9c")
        );
        assert_eq!(p("resnet50.pth"), None);
        assert_eq!(p("my-model.pth"), None);
        assert_eq!(p("ckpt-1234.pth"), None, "too short to be a hash");
        assert_eq!(
            p("ckpt-DEADBEEF.pth"),
            None,
            "torch.hub's hashes are lowercase"
        );
    }

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(&b"abc"[..]).ok().as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
    }
}
