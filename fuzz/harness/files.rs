//! Fuzz harnesses for the parsers a checkpoint file or an encoded image reaches: one
//! function per target, each feeding arbitrary bytes to the server's own entry points.
//!
//! Shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`) and the corpus replay in
//! the test suite (`tests/fuzz_corpus.rs`), both of which include this file with
//! `#[path]`, so the replay runs exactly what was fuzzed. A harness returns normally for
//! every input the parser refuses cleanly; a panic, an abort, a hang or an unbounded
//! allocation is a finding. The request parsers are in `requests.rs`, kept apart so that
//! the file targets keep building while the request APIs change.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

use std::sync::OnceLock;

use resnet_serve::model::{Architecture, Classifier};
use resnet_serve::preprocess::{Input, Preprocessor};
use resnet_serve::weights::{pickle, Checkpoint, Limits};

/// The non-executing pickle reader on its own, every global allowed (the allowlist is a
/// predicate; allowing all reaches the most opcodes), then the accessors the torch
/// readers walk the result with.
pub fn pickle(data: &[u8]) {
    let Ok((value, used)) = pickle::load(data, &|_| true) else {
        return;
    };
    assert!(
        used <= data.len(),
        "pickle used {used} of {} bytes",
        data.len()
    );
    let _ = (value.kind(), value.as_str(), value.as_int());
    if let Some(items) = value.as_seq() {
        for item in items.iter().take(64) {
            let _ = (
                item.kind(),
                item.as_str(),
                item.as_int(),
                item.as_seq().map(|s| s.len()),
            );
        }
    }
}

/// A scratch file for the checkpoint readers, which read files (by design: tensor data
/// stays on disk): one per process and thread (the replay test runs targets on several
/// threads at once), on tmpfs where there is one.
fn scratch_path() -> PathBuf {
    thread_local! {
        static PATH: PathBuf = {
            let dir = Some(PathBuf::from("/dev/shm"))
                .filter(|d| d.is_dir())
                .unwrap_or_else(std::env::temp_dir);
            let thread = format!("{:?}", std::thread::current().id());
            let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
            dir.join(format!("resnet-serve-fuzz-{}-{thread}.ckpt", std::process::id()))
        };
    }
    PATH.with(Clone::clone)
}

/// The per-architecture limits a checkpoint is read within, computed once (each is a
/// walk of the architecture's whole state dict: computed per input, it was most of the
/// time an input took).
fn limits(arch: Architecture) -> Limits {
    static LIMITS: OnceLock<Vec<(Architecture, Limits)>> = OnceLock::new();
    LIMITS
        .get_or_init(|| {
            Architecture::ALL
                .into_iter()
                .map(|a| (a, Limits::for_architecture(a)))
                .collect()
        })
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, l)| *l)
        .expect("every architecture has its limits")
}

/// A checkpoint of any format (legacy `torch.save`, zip `.pth`, safetensors: the three
/// targets differ by their seed corpora), read as `RepositoryModelLoad` reads one: opened
/// within the limits of the architecture the last byte picks
/// ([`Checkpoint::from_file`]), then every tensor read as `convert` and `inspect` read
/// them, then that architecture built from it.
pub fn checkpoint(data: &[u8]) {
    let arch =
        Architecture::ALL[usize::from(data.last().copied().unwrap_or(0)) % Architecture::ALL.len()];
    let path = scratch_path();
    {
        let mut f = std::fs::File::create(&path).expect("scratch file");
        f.write_all(data).expect("scratch file");
    }
    let file = std::fs::File::open(&path).expect("scratch file");
    if let Ok(ckpt) = Checkpoint::from_file(file, &path, limits(arch)) {
        let names: Vec<String> = ckpt.names().map(str::to_string).collect();
        assert_eq!(names.len(), ckpt.len());
        for name in &names {
            let info = ckpt.info(name).expect("a listed tensor has its info");
            if let Ok((dtype, raw)) = ckpt.read_raw(name) {
                assert_eq!(dtype, info.dtype);
                assert_eq!(
                    Some(raw.len()),
                    info.numel().checked_mul(dtype.size()),
                    "tensor '{name}' read as {} bytes",
                    raw.len()
                );
            }
        }
        let _ = Classifier::load(
            arch,
            &ckpt,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// An encoded image through the whole preprocessing path (decode, resize, crop,
/// normalise), under the server's default limits.
pub fn image(data: &[u8]) {
    let p = Preprocessor::default();
    if let Ok(input) = p.prepare(Input::Encoded(data)) {
        assert_eq!(
            input.into_values().len(),
            resnet_serve::preprocess::INPUT_LEN
        );
    }
}

/// Largest pixel buffer [`raw_frame`] makes up, so one input stays within milliseconds.
const MAX_MADE_UP_RGB: usize = 1 << 20;

/// A raw RGB8 frame: width and height are the first 4 + 4 bytes (little-endian). When the
/// ninth byte is even the pixels are the bytes after it, whatever their count (the size
/// check is what is fuzzed); when it is odd they are those bytes repeated to exactly the
/// size the frame needs (up to [`MAX_MADE_UP_RGB`]), so that frames of every size and
/// aspect ratio reach the resize and crop.
pub fn raw_frame(data: &[u8]) {
    let Some((head, rest)) = data.split_at_checked(9) else {
        return;
    };
    let width = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let height = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let needed = (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3))
        .filter(|&n| head[8] % 2 == 1 && n <= MAX_MADE_UP_RGB);
    let made_up: Vec<u8>;
    let rgb = match needed {
        Some(n) => {
            made_up = rest.iter().copied().chain([0x80]).cycle().take(n).collect();
            &made_up[..]
        }
        None => rest,
    };
    let p = Preprocessor::default();
    if let Ok(input) = p.prepare(Input::Raw { width, height, rgb }) {
        assert_eq!(
            input.into_values().len(),
            resnet_serve::preprocess::INPUT_LEN
        );
    }
}
