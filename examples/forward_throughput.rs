//! Prints one JSON line of forward-pass throughput for one model and batch size, for
//! `scripts/bench_compare.py` to interleave with PyTorch and ONNX Runtime.
//!
//! `cargo run --release --example forward_throughput -- resnet50 8 [seconds]`

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use resnet_serve::model::synthetic::{self, SyntheticWeights};
use resnet_serve::model::{Architecture, Classifier, INPUT_SIZE};

// The allocator the server binary ships with, so the numbers are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    resnet_serve::process::allocator::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let arch = Architecture::ALL
        .into_iter()
        .find(|a| Some(a.as_str()) == args.get(1).map(String::as_str))
        .ok_or_else(|| anyhow::anyhow!("usage: forward_throughput ARCH BATCH [SECONDS]"))?;
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seconds: f64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10.0);
    let model = Classifier::load(
        arch,
        &SyntheticWeights::new(arch, 7),
        &Device::Cpu,
        DType::F32,
    )?;
    let x = Tensor::from_vec(
        synthetic::input(7, batch, INPUT_SIZE),
        (batch, 3, INPUT_SIZE, INPUT_SIZE),
        &Device::Cpu,
    )?;
    model.forward(&x)?; // warm-up
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut runs = 0u32;
    while runs < 2 || start.elapsed() < budget {
        model.forward(&x)?;
        runs += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"engine\":\"candle\",\"model\":\"{arch}\",\"batch\":{batch},\"runs\":{runs},\"images_per_s\":{:.3}}}",
        f64::from(runs) * batch as f64 / elapsed
    );
    Ok(())
}
