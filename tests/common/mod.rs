//! Helpers shared by the integration tests: fixture paths and reading them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use resnet_serve::model::synthetic::SyntheticWeights;
use resnet_serve::model::{Architecture, ParamSource};
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

/// The seeded synthetic weights of the fixtures, saved as a user's safetensors checkpoint.
pub fn write_synthetic_checkpoint(arch: Architecture, path: &Path) {
    let source = SyntheticWeights::new(arch, 7);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = source
        .names()
        .into_iter()
        .map(|n| {
            let shape = source.shape(&n).expect("shape");
            let data = source.read_f32(&n).expect("data");
            (
                n,
                shape,
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = tensors.iter().map(|(n, shape, bytes)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .expect("view");
        (n.clone(), view)
    });
    safetensors::serialize_to_file(views, None, path).expect("write");
}
