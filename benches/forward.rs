//! Forward-pass throughput (images/s) on CPU for resnet18, resnet50 and resnext50_32x4d
//! at batch 1, 8 and 32, on synthetic weights (speed does not depend on the values).
//! `scripts/bench_compare.py` puts these next to PyTorch, ONNX Runtime and OpenVINO in one
//! run.
//!
//! `RESNET_SERVE_CPU_KERNELS=avx2 cargo bench --bench forward` measures one forced
//! implementation (the group is then named `forward-avx2`, so it is not compared with
//! `auto`'s baseline by mistake); unset, the server's choice (`auto`) runs.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use resnet_serve::model::cpu::CpuKernels;
use resnet_serve::model::synthetic::{self, SyntheticWeights};
use resnet_serve::model::{Architecture, Classifier, INPUT_SIZE};

fn forward(c: &mut Criterion) {
    let kernels = match CpuKernels::from_env() {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    };
    let mut group = c.benchmark_group(match kernels {
        CpuKernels::Auto => "forward".to_string(),
        k => format!("forward-{}", k.name()),
    });
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for arch in [
        Architecture::Resnet18,
        Architecture::Resnet50,
        Architecture::Resnext50_32x4d,
    ] {
        let model = match Classifier::load(
            arch,
            &SyntheticWeights::new(arch, 7),
            &Device::Cpu,
            DType::F32,
        ) {
            Ok(m) => m,
            Err(e) => panic!("building {arch}: {e}"),
        };
        eprintln!("{arch}: {}", model.implementation());
        for batch in [1usize, 8, 32] {
            let x = Tensor::from_vec(
                synthetic::input(7, batch, INPUT_SIZE),
                (batch, 3, INPUT_SIZE, INPUT_SIZE),
                &Device::Cpu,
            );
            let Ok(x) = x else { panic!("input tensor") };
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(arch.as_str(), batch), &x, |b, x| {
                b.iter(|| model.forward(x).map(|t| t.dims().to_vec()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
