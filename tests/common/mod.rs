//! Helpers shared by the integration tests: fixture paths and reading them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use resnet_serve::weights::Checkpoint;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// A fixture file of reference tensors (written by scripts/make_fixtures.py).
pub fn reference(rel: &str) -> Checkpoint {
    Checkpoint::open(fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// max |a - b| / max |b|: the parity measure of the issue tracker.
pub fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}
