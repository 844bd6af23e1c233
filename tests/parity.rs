//! Architecture parity with PyTorch: each of the six architectures behind the twelve
//! hub names, built from the seeded synthetic weights PyTorch also built, must give
//! PyTorch's (float64) logits within max|d| / max|ref| <= 1e-4, on every CPU kernel
//! implementation this CPU supports (AVX-512, AVX2, the portable GEMMs), each forced in
//! turn.

use candle_core::{DType, Device, Tensor};
use resnet_serve::model::cpu::CpuKernels;
use resnet_serve::model::synthetic::{self, SyntheticWeights};
use resnet_serve::model::{Architecture, Classifier, ModelName};

/// The seed and per-architecture inputs of scripts/make_fixtures.py.
const SEED: u64 = 7;
const TOLERANCE: f32 = 1e-4;

fn input_of(arch: Architecture) -> (usize, usize) {
    match arch {
        Architecture::Resnet18 | Architecture::Resnet50 | Architecture::Resnext50_32x4d => (2, 224),
        Architecture::Resnext101_32x4d => (1, 224),
        Architecture::Resnext101_32x8d => (1, 160),
        Architecture::Resnext101_32x16d => (1, 128),
    }
}

/// [`check_on`] for every implementation this CPU runs; the ones it cannot are named in
/// the output, and the set run must be the CPU's whole supported set.
fn check(arch: Architecture) {
    let mut ran = Vec::new();
    for which in CpuKernels::CONCRETE {
        if !which.runs_here() {
            println!("{arch}: NOT RUN on {}: this CPU lacks it", which.name());
            continue;
        }
        which.scope(|| check_on(arch, which)).expect("supported");
        ran.push(which);
    }
    assert_eq!(ran, CpuKernels::supported(), "{arch}");
}

fn check_on(arch: Architecture, which: CpuKernels) {
    let reference = testkit::fixtures::reference("arch_parity.safetensors");
    let want = reference
        .read_f32(&format!("{arch}.logits"))
        .expect("reference logits");
    let model = Classifier::load(
        arch,
        &SyntheticWeights::new(arch, SEED),
        &Device::Cpu,
        DType::F32,
    )
    .expect("builds");
    // Forced, every convolution runs on the named kernels (all resnet shapes are
    // covered), so a fallback cannot pass for the implementation under test.
    let direct = match which {
        CpuKernels::Avx512 => "avx512-direct",
        CpuKernels::Avx2 => "avx2-direct",
        _ => "gemm",
    };
    let used = model.implementation();
    assert!(
        used.starts_with(&format!("{direct}=")) && !used.contains(' '),
        "{arch} forced to {}: ran {used}",
        which.name()
    );
    let (batch, size) = input_of(arch);
    let x = Tensor::from_vec(
        synthetic::input(SEED, batch, size),
        (batch, 3, size, size),
        &Device::Cpu,
    )
    .expect("input");
    let got: Vec<f32> = model
        .forward(&x)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
        .expect("forward");
    // Realistic activations: logits neither collapsed nor exploding.
    let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        (0.5..50.0).contains(&spread),
        "{arch}: reference logits max |.| = {spread}"
    );
    let err = testkit::relative_error(&got, &want);
    println!("{arch} on {used}: max|d|/max|ref| = {err:.2e}");
    assert!(
        err <= TOLERANCE,
        "{arch} on {used}: relative error {err:.3e} > {TOLERANCE:e}"
    );
}

#[test]
fn resnet18_matches_pytorch() {
    check(Architecture::Resnet18);
}

#[test]
fn resnet50_matches_pytorch() {
    check(Architecture::Resnet50);
}

#[test]
fn resnext50_32x4d_matches_pytorch() {
    check(Architecture::Resnext50_32x4d);
}

#[test]
fn resnext101_32x4d_matches_pytorch() {
    check(Architecture::Resnext101_32x4d);
}

#[test]
fn resnext101_32x8d_matches_pytorch() {
    check(Architecture::Resnext101_32x8d);
}

#[test]
fn resnext101_32x16d_matches_pytorch() {
    check(Architecture::Resnext101_32x16d);
}

#[test]
fn all_twelve_hub_names_map_onto_the_checked_architectures() {
    let archs: std::collections::HashSet<_> = ModelName::all().map(|m| m.architecture).collect();
    assert_eq!(archs.len(), Architecture::ALL.len());
    assert_eq!(ModelName::all().count(), 12);
}

#[test]
fn a_batch_equals_its_images_run_alone() {
    let arch = Architecture::Resnet18;
    let model = Classifier::load(
        arch,
        &SyntheticWeights::new(arch, SEED),
        &Device::Cpu,
        DType::F32,
    )
    .expect("builds");
    let n = 3;
    let pixels = synthetic::input(SEED + 1, n, 224);
    let batched = model.classify(&pixels, n).expect("batch");
    let per = pixels.len() / n;
    for i in 0..n {
        let alone = model
            .classify(&pixels[i * per..(i + 1) * per], 1)
            .expect("single");
        let err = testkit::relative_error(&batched[i], &alone[0]);
        assert!(err <= 1e-5, "image {i}: batch vs alone {err:.3e}");
    }
}

#[test]
fn strict_loading_names_the_bad_key_and_both_shapes() {
    // resnet50's weights offered as resnext50_32x4d: same keys, different shapes.
    let wrong = SyntheticWeights::new(Architecture::Resnet50, SEED);
    let err = Classifier::load(
        Architecture::Resnext50_32x4d,
        &wrong,
        &Device::Cpu,
        DType::F32,
    )
    .expect_err("must refuse")
    .to_string();
    assert!(
        err.contains("'layer1.0.bn1.bias' has shape [64], expected [128]"),
        "{err}"
    );
    assert!(err.contains("and 168 more"), "{err}");
    // resnet18 offered as resnet50: keys missing and unexpected.
    let wrong = SyntheticWeights::new(Architecture::Resnet18, SEED);
    let err = Classifier::load(Architecture::Resnet50, &wrong, &Device::Cpu, DType::F32)
        .expect_err("must refuse")
        .to_string();
    assert!(
        err.contains("missing key 'layer1.0.conv3.weight' (expected shape [256, 64, 1, 1])"),
        "{err}"
    );
}
