//! Loads a checkpoint into a model and prints the process's peak resident memory next
//! to the model's f32 size: the loading-memory figure in BENCHMARKS.md.
//!
//! `cargo run --release --example load_memory -- resnext101_32x16d FILE`

use candle_core::{DType, Device};
use resnet_serve::model::{Architecture, Classifier};
use resnet_serve::weights::Checkpoint;

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(arch), Some(file)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: load_memory ARCH FILE");
    };
    let arch = Architecture::ALL
        .into_iter()
        .find(|a| a.as_str() == arch)
        .ok_or_else(|| anyhow::anyhow!("unknown architecture {arch}"))?;
    let before = status_kib("VmRSS:").unwrap_or(0);
    let ck = Checkpoint::open(file)?;
    let format = ck.format();
    let model = Classifier::load(arch, &ck, &Device::Cpu, DType::F32)?;
    drop(ck);
    let peak = status_kib("VmHWM:").unwrap_or(0);
    let params: usize = resnet_serve::model::resnet::Layout::new(arch)
        .expected_shapes()
        .values()
        .map(|s| s.iter().product::<usize>())
        .sum();
    let model_kib = (params * 4 / 1024) as u64;
    println!(
        "{{\"model\":\"{arch}\",\"format\":\"{format}\",\"f32_size_mib\":{:.1},\"baseline_rss_mib\":{:.1},\"peak_rss_mib\":{:.1},\"peak_over_model\":{:.3},\"peak_minus_baseline_over_model\":{:.3}}}",
        model_kib as f64 / 1024.0,
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        peak as f64 / model_kib as f64,
        (peak - before) as f64 / model_kib as f64,
    );
    drop(model);
    Ok(())
}
