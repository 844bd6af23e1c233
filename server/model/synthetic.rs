//! Seeded synthetic weights and inputs, bit-identical to `scripts/make_fixtures.py`.
//!
//! Element `i` of the tensor named `key` is `lo + (hi - lo) * u`, where `u` takes the top
//! 53 bits of `splitmix64(fnv1a64(key) + (i + 1) * 0x9E3779B97F4A7C15)`. A counter-based
//! generator lets PyTorch and this crate build the same 194M-parameter model from a
//! seed, so parity tests need only the reference logits, never the weights.

use std::collections::BTreeMap;

use super::arch::Architecture;
use super::params::ParamSource;
use super::resnet::Layout;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values in `[lo, hi)` for `key`.
pub fn uniform(key: &str, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let h = fnv1a64(key);
    (0..n as u64)
        .map(|i| {
            let z = splitmix64(h.wrapping_add((i + 1).wrapping_mul(GOLDEN)));
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            (lo + (hi - lo) * u) as f32
        })
        .collect()
}

/// The value range of one state-dict entry (see the Python twin for the reasoning).
fn range(name: &str, shape: &[usize]) -> (f64, f64) {
    if name.ends_with("running_mean") {
        (-0.1, 0.1)
    } else if name.ends_with("running_var") {
        (0.5, 1.5)
    } else if name == "fc.bias" {
        (-0.05, 0.05)
    } else if name == "fc.weight" {
        let bound = 3.0 * (3.0 / shape[1] as f64).sqrt();
        (-bound, bound)
    } else if shape.len() == 4 {
        let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
        let bound = (6.0 / fan_in).sqrt();
        (-bound, bound)
    } else if name.ends_with("weight") {
        (0.2, 0.6)
    } else {
        (-0.1, 0.1)
    }
}

/// A model's worth of synthetic parameters, generated tensor by tensor on request.
#[derive(Debug, Clone)]
pub struct SyntheticWeights {
    seed: u64,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl SyntheticWeights {
    pub fn new(arch: Architecture, seed: u64) -> Self {
        SyntheticWeights {
            seed,
            shapes: Layout::new(arch).expected_shapes(),
        }
    }
}

impl ParamSource for SyntheticWeights {
    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, Box<dyn std::error::Error + Send + Sync>> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| format!("no synthetic tensor '{name}'"))?;
        let (lo, hi) = range(name, shape);
        Ok(uniform(
            &format!("{}/{name}", self.seed),
            shape.iter().product(),
            lo,
            hi,
        ))
    }
}

/// A synthetic input batch `[batch, 3, size, size]`, values in `[-2, 2)`.
pub fn input(seed: u64, batch: usize, size: usize) -> Vec<f32> {
    uniform(&format!("{seed}/input"), batch * 3 * size * size, -2.0, 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_matches_the_python_twin() {
        // Values printed by scripts/make_fixtures.py's fnv1a64("abc") and
        // uniform("k", 4, 0.0, 1.0).
        assert_eq!(fnv1a64("abc"), 0xe71fa2190541574b);
        let v = uniform("k", 4, 0.0, 1.0);
        assert_eq!(
            v,
            vec![0.087_015_65, 0.511_284_8, 0.926_120_04, 0.060_517_836]
        );
    }
}
