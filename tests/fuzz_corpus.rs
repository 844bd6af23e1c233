//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same harness
//! functions the libFuzzer targets run (`fuzz/harness/`), so every input a fuzzer
//! found interesting, and every crash it once found, is checked by a plain `cargo test`:
//! none may panic. A target whose corpus directory is missing or empty fails the test,
//! so the replay cannot silently check nothing.

#[path = "../fuzz/harness/files.rs"]
mod files;
#[path = "../fuzz/harness/requests.rs"]
mod requests;

/// A harness: one input, which it must handle without panicking.
type Harness = fn(&[u8]);

/// Every target, by the name of its binary and of its corpus directory.
const TARGETS: &[(&str, Harness)] = &[
    ("pickle", files::pickle),
    ("torch_legacy", files::checkpoint),
    ("torch_zip", files::checkpoint),
    ("safetensors", files::checkpoint),
    ("image", files::image),
    ("raw_frame", files::raw_frame),
    ("request_frames", requests::request_frames),
    ("kserve_tensors", requests::kserve_tensors),
    ("message_reader", requests::message_reader),
    ("grpc_timeout", requests::grpc_timeout),
];

use std::path::PathBuf;

/// `fuzz/corpus/`, one directory per target.
fn corpus_root() -> PathBuf {
    testkit::fixtures::repo_root().join("fuzz/corpus")
}

fn corpus_dir(target: &str) -> PathBuf {
    corpus_root().join(target)
}

/// The files of one target's corpus, sorted (so a failure names the same file each run).
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "fuzz corpus {} is empty: the replay would check nothing",
        dir.display()
    );
    files
}

fn replay(target: &str) {
    let (_, run) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no harness for target {target}"));
    for file in corpus(target) {
        let data = std::fs::read(&file).expect("corpus file");
        // Named on failure: the panic message alone does not say which input it was.
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} panicked", file.display());
    }
}

#[test]
fn every_target_has_a_corpus_and_a_test() {
    let dirs: Vec<String> = std::fs::read_dir(corpus_root())
        .expect("fuzz/corpus")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for (name, _) in TARGETS {
        assert!(
            dirs.iter().any(|d| d == name),
            "no corpus for target {name}"
        );
    }
    for d in &dirs {
        assert!(
            TARGETS.iter().any(|(name, _)| name == d),
            "corpus {d} belongs to no target"
        );
    }
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*
    };
}

replay_tests!(
    pickle,
    torch_legacy,
    torch_zip,
    safetensors,
    image,
    raw_frame,
    request_frames,
    kserve_tensors,
    message_reader,
    grpc_timeout,
);
