//! GFLOP/s of single CPU convolutions in the shapes resnet50 and resnext50_32x4d run,
//! per implementation this CPU supports (AVX-512, AVX2, gemm): the numbers behind kernel
//! work on `server/model/cpu/`.
//!
//! `cargo run --release --example conv_layers -- [batch] [seconds per layer]`

use std::time::Instant;

use candle_core::{Device, Tensor};
use resnet_serve::model::cpu::{CpuConv, CpuKernels};
use resnet_serve::model::layers::FoldedConv;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(8);
    let seconds: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    // (name, out, in, k, stride, groups, input side)
    let layers = [
        ("l1 1x1 64->64", 64, 64, 1, 1, 1, 56),
        ("l1 3x3 64", 64, 64, 3, 1, 1, 56),
        ("l1 1x1 64->256", 256, 64, 1, 1, 1, 56),
        ("l1 1x1 256->64", 64, 256, 1, 1, 1, 56),
        ("l2 3x3 128", 128, 128, 3, 1, 1, 28),
        ("l3 3x3 256", 256, 256, 3, 1, 1, 14),
        ("l3 1x1 1024->256", 256, 1024, 1, 1, 1, 14),
        ("l4 3x3 512", 512, 512, 3, 1, 1, 7),
        ("l4 1x1 512->2048", 2048, 512, 1, 1, 1, 7),
        // resnext50_32x4d's grouped 3x3s (4, 8, 16, 32 channels a group; the first of a
        // stage strided), then resnext101_32x8d's (8, 16, 32, 64).
        ("x l1 3x3 g32 (4)", 128, 128, 3, 1, 32, 56),
        ("x l2 3x3 g32 (8)", 256, 256, 3, 1, 32, 28),
        ("x l2 3x3 g32 (8) s2", 256, 256, 3, 2, 32, 56),
        ("x l3 3x3 g32 (16)", 512, 512, 3, 1, 32, 14),
        ("x l4 3x3 g32 (32)", 1024, 1024, 3, 1, 32, 7),
        ("x8 l1 3x3 g32 (8)", 256, 256, 3, 1, 32, 56),
        ("x8 l2 3x3 g32 (16)", 512, 512, 3, 1, 32, 28),
        ("x8 l3 3x3 g32 (32)", 1024, 1024, 3, 1, 32, 14),
        ("x8 l4 3x3 g32 (64)", 2048, 2048, 3, 1, 32, 7),
        ("stem 7x7", 64, 3, 7, 2, 1, 224),
        // resnext50_32x4d's 1x1s: the wide inputs of its last two stages (1024, 2048
        // channels) are where a full tile's rows stop fitting in L1 (direct.rs).
        ("x 1x1 64->128 @56", 128, 64, 1, 1, 1, 56),
        ("x 1x1 128->256 @56", 256, 128, 1, 1, 1, 56),
        ("x 1x1 256->128 @56", 128, 256, 1, 1, 1, 56),
        ("x 1x1 256->512 @28", 512, 256, 1, 1, 1, 28),
        ("x 1x1 512->256 @28", 256, 512, 1, 1, 1, 28),
        ("x 1x1 512->1024 @14", 1024, 512, 1, 1, 1, 14),
        ("x 1x1 1024->512 @14", 512, 1024, 1, 1, 1, 14),
        ("x 1x1 1024->2048 @7", 2048, 1024, 1, 1, 1, 7),
        ("x 1x1 2048->1024 @7", 1024, 2048, 1, 1, 1, 7),
    ];
    for (name, o, i, k, stride, groups, side) in layers {
        let ipg = i / groups;
        let folded = FoldedConv {
            weight: (0..o * ipg * k * k)
                .map(|v| (v % 7) as f32 * 0.01)
                .collect(),
            bias: vec![0.1; o],
            shape: [o, ipg, k, k],
            stride,
            padding: k / 2,
            groups,
        };
        let x = Tensor::ones(
            (batch, side, side, i),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        let out_side = (side + 2 * (k / 2) - k) / stride + 1;
        let flops = 2.0 * (batch * out_side * out_side * o * ipg * k * k) as f64;
        let mut row = format!("{name:<22}");
        for which in CpuKernels::supported() {
            let conv = CpuConv::with_kernels(folded.clone(), which)?;
            conv.forward(&x, None, true)?;
            let (mut runs, start) = (0u32, Instant::now());
            while runs < 3 || start.elapsed().as_secs_f64() < seconds {
                conv.forward(&x, None, true)?;
                runs += 1;
            }
            let gflops = flops * runs as f64 / start.elapsed().as_secs_f64() / 1e9;
            row += &format!(" {:>14} {gflops:7.1}", conv.implementation());
        }
        println!("{row}");
    }
    Ok(())
}
