//! Staging cost per image: a batch of float tensors given as little-endian bytes,
//! converted to f16 and checked finite with `model::stage_batch` on one thread, as a GPU
//! worker stages its batch. Tensors 4-byte aligned (as in a buffer of their own) and off
//! alignment by 1 and 2 bytes (as when sliced straight out of an HTTP/2 frame), the
//! offsets interleaved; the best of `reps` passes over a 64-image batch (38.5 MB, more
//! than a last-level cache) counts, so another process on the machine shows less.
//!
//!     cargo run --release --example staging -- [rounds] [reps]

use std::time::Instant;

use half::slice::HalfFloatSliceExt;
use resnet_serve::model::{stage_batch, InputView};
use resnet_serve::preprocess::INPUT_LEN;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IMAGES: usize = 64;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let reps: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let image_bytes = INPUT_LEN * 4;
    // Values in [0.5, 1): finite whatever the bytes' offset.
    let bytes: Vec<u8> = (0..IMAGES * image_bytes + 8)
        .map(|i| if i % 4 == 3 { 0x3f } else { (i % 251) as u8 })
        .collect();
    let aligned_at = (4 - bytes.as_ptr() as usize % 4) % 4;
    let mut staging = vec![half::f16::ZERO; IMAGES * INPUT_LEN];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mut best = [f64::MAX; 3];
    for _ in 0..rounds {
        for (slot, offset) in [0usize, 1, 2].into_iter().enumerate() {
            let start = aligned_at + offset;
            let images: Vec<InputView<'_>> = (0..IMAGES)
                .map(|i| InputView::LeBytes(&bytes[start + i * image_bytes..][..image_bytes]))
                .collect();
            for _ in 0..reps {
                let t = Instant::now();
                let rejected = pool.install(|| {
                    stage_batch(&mut staging, &images, half::f16::ZERO, |d, s| {
                        d.convert_from_f32_slice(s)
                    })
                });
                anyhow::ensure!(rejected.is_empty(), "values came out non-finite");
                best[slot] = best[slot].min(t.elapsed().as_secs_f64());
            }
        }
    }
    let us = |s: f64| s * 1e6 / IMAGES as f64;
    println!(
        "{}",
        serde_json::json!({
            "images": IMAGES,
            "us_per_image_aligned": us(best[0]),
            "us_per_image_offset_1": us(best[1]),
            "us_per_image_offset_2": us(best[2]),
        })
    );
    Ok(())
}
