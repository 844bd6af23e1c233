//! The committed fixtures (`tests/fixtures/`), the seeded synthetic resnet18 every
//! server test serves, and files made from them: the synthetic checkpoint a user would
//! pass with `--model`, and a zip bomb that is otherwise a real checkpoint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};
use resnet_serve::model::synthetic::SyntheticWeights;
use resnet_serve::model::{Architecture, Classifier, ParamSource};
use resnet_serve::weights::Checkpoint;

/// The seed of the synthetic weights the fixtures were computed with
/// (scripts/make_fixtures.py).
pub const SEED: u64 = 7;

/// The repository's root (the server package's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ sits in the repository")
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// The bytes of `tests/fixtures/images/<name>`.
pub fn image_bytes(name: &str) -> Vec<u8> {
    let path = fixture(&format!("images/{name}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
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

/// The seeded synthetic resnet18 on the CPU in f32, loaded once per test binary: the
/// model is read-only, so every server of a test binary can share it.
pub fn resnet18() -> Arc<Classifier> {
    static MODEL: OnceLock<Arc<Classifier>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let arch = Architecture::Resnet18;
            Arc::new(
                Classifier::load(
                    arch,
                    &SyntheticWeights::new(arch, SEED),
                    &Device::Cpu,
                    DType::F32,
                )
                .expect("model"),
            )
        })
        .clone()
}

/// The seeded synthetic weights of the fixtures, saved as a user's safetensors checkpoint.
pub fn write_synthetic_checkpoint(arch: Architecture, path: &Path) {
    let source = SyntheticWeights::new(arch, SEED);
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

/// A zip bomb that is a real checkpoint: torch.save's `mixed_zip.pth` fixture with its
/// first storage member replaced by 1 GiB of zeros, deflated (~1 MiB on disk, ~2 s to
/// write). Returns the replaced member's name.
pub fn write_zip_bomb(path: &Path) -> String {
    use std::io::{Read, Write};
    let source = std::fs::File::open(fixture("checkpoints/mixed_zip.pth")).expect("fixture");
    let mut source = zip::ZipArchive::new(source).expect("zip");
    let mut out = zip::ZipWriter::new(std::fs::File::create(path).expect("create"));
    let mut replaced = None;
    for i in 0..source.len() {
        let mut member = source.by_index(i).expect("member");
        let name = member.name().expect("name").to_string();
        if replaced.is_none() && name.contains("/data/") {
            let deflated = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .compression_level(Some(9));
            out.start_file(&name, deflated).expect("start");
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..1024 {
                out.write_all(&zeros).expect("zeros");
            }
            replaced = Some(name);
        } else {
            let mut bytes = Vec::new();
            member.read_to_end(&mut bytes).expect("read");
            let stored = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            out.start_file(&name, stored).expect("start");
            out.write_all(&bytes).expect("write");
        }
    }
    out.finish().expect("finish");
    replaced.expect("a storage member")
}
