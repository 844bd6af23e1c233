//! Writes a model's architecture with seeded synthetic weights (`server/model/synthetic.rs`, the ones the
//! tests and parity fixtures use) as a safetensors checkpoint a user's server can load,
//! for benchmarks and soak runs on a machine without the published checkpoints:
//!
//!     cargo run --release --example synthetic_checkpoint -- resnet18_swsl /tmp/resnet18.safetensors
//!     resnet-serve --model resnet18_swsl=/tmp/resnet18.safetensors
//!
//! The seed is the fixtures' (7) unless a third argument gives another.

use anyhow::{bail, Context};
use resnet_serve::model::params::ParamSource;
use resnet_serve::model::synthetic::SyntheticWeights;
use resnet_serve::model::ModelName;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (arch, path, seed) = match args.as_slice() {
        [a, p] => (a, p, 7),
        [a, p, s] => (a, p, s.parse().context("the seed is an integer")?),
        _ => bail!(
            "usage: synthetic_checkpoint MODEL OUT.safetensors [SEED] (MODEL: e.g. resnet18_swsl)"
        ),
    };
    let arch = arch
        .parse::<ModelName>()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .architecture;
    let source = SyntheticWeights::new(arch, seed);
    let mut tensors = Vec::new();
    for name in source.names() {
        let shape = source
            .shape(&name)
            .context("a synthetic tensor has a shape")?;
        let data = source
            .read_f32(&name)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in &tensors {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .with_context(|| name.clone())?;
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, None, std::path::Path::new(path))
        .with_context(|| format!("writing {path}"))?;
    println!(
        "wrote {} tensors ({arch:?}, seed {seed}) to {path}",
        tensors.len()
    );
    Ok(())
}
