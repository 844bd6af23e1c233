//! Where models run and in what precision: `--device auto|cpu|cuda|cuda:N[,cuda:M…]` and
//! `--dtype f32|f16|bf16`, resolved to Candle devices. Each resolved device gets its own
//! copy of every model and its own worker(s); they share the model's queue.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device '{0}': expected auto, cpu, cuda or cuda:N (comma-separated for several GPUs)")]
    Parse(String),
    #[error("'{0}' needs a CUDA build of resnet-serve (cargo feature `cuda`); this one runs on cpu only")]
    NoCudaBuild(String),
    #[error("no CUDA device is available for '{0}'")]
    NoCudaDevice(String),
    #[error("cuda:{index} does not exist: {count} CUDA device(s) visible")]
    NoSuchGpu { index: usize, count: usize },
    #[error("--dtype {0} runs on CUDA devices only; use f32 on cpu")]
    DtypeOnCpu(Precision),
    #[error("opening {device}: {source}")]
    Open {
        device: String,
        #[source]
        source: candle_core::Error,
    },
}

/// What `--device` asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// Every visible GPU in a CUDA build with a driver, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// Every visible GPU.
    AllCuda,
    /// These GPU ordinals.
    Cuda(Vec<usize>),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "auto" => return Ok(DeviceSpec::Auto),
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => return Ok(DeviceSpec::AllCuda),
            _ => {}
        }
        let mut ordinals = Vec::new();
        for part in s.split(',') {
            let index = part
                .trim()
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .ok_or_else(|| DeviceError::Parse(s.to_string()))?;
            if !ordinals.contains(&index) {
                ordinals.push(index);
            }
        }
        Ok(DeviceSpec::Cuda(ordinals))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::AllCuda => f.write_str("cuda"),
            DeviceSpec::Cuda(v) => {
                let parts: Vec<String> = v.iter().map(|i| format!("cuda:{i}")).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// `--dtype`: the precision weights and activations use on the device. Batch-norm is
/// folded in f32 before the cast either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// How many CUDA devices the driver shows; 0 in a cpu-only build or without a driver.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        // The driver library is loaded on first use; a machine without one answers 0.
        std::panic::catch_unwind(|| {
            candle_core::cuda::cudarc::driver::CudaContext::device_count().unwrap_or(0)
        })
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// The devices `spec` names, opened, checked against `precision`.
pub fn resolve(spec: &DeviceSpec, precision: Precision) -> Result<Vec<Device>, DeviceError> {
    let ordinals = match spec {
        DeviceSpec::Cpu => None,
        DeviceSpec::Auto => {
            let n = cuda_device_count();
            (n > 0).then(|| (0..n).collect::<Vec<_>>())
        }
        DeviceSpec::AllCuda | DeviceSpec::Cuda(_) => {
            if !cfg!(feature = "cuda") {
                return Err(DeviceError::NoCudaBuild(spec.to_string()));
            }
            let count = cuda_device_count();
            if count == 0 {
                return Err(DeviceError::NoCudaDevice(spec.to_string()));
            }
            match spec {
                DeviceSpec::Cuda(v) => {
                    if let Some(&index) = v.iter().find(|&&i| i >= count) {
                        return Err(DeviceError::NoSuchGpu { index, count });
                    }
                    Some(v.clone())
                }
                _ => Some((0..count).collect()),
            }
        }
    };
    match ordinals {
        None => {
            if precision != Precision::F32 {
                return Err(DeviceError::DtypeOnCpu(precision));
            }
            Ok(vec![Device::Cpu])
        }
        Some(ordinals) => ordinals
            .into_iter()
            .map(|i| {
                Device::new_cuda(i).map_err(|source| DeviceError::Open {
                    device: format!("cuda:{i}"),
                    source,
                })
            })
            .collect(),
    }
}

/// A short name for logs and `GetModel`: `cpu` or `cuda:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Auto));
        assert_eq!("cpu".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>().ok(), Some(DeviceSpec::AllCuda));
        assert_eq!(
            "cuda:1, cuda:0,cuda:1".parse::<DeviceSpec>().ok(),
            Some(DeviceSpec::Cuda(vec![1, 0]))
        );
        for bad in ["", "gpu0", "cuda:", "cuda:x", "cuda:0,cpu", "tpu"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
        assert_eq!(
            "cuda:0,cuda:3"
                .parse::<DeviceSpec>()
                .map(|d| d.to_string())
                .ok(),
            Some("cuda:0,cuda:3".to_string())
        );
    }

    #[test]
    fn cpu_takes_f32_only() {
        assert!(matches!(
            resolve(&DeviceSpec::Cpu, Precision::F32).as_deref(),
            Ok([Device::Cpu])
        ));
        let err = resolve(&DeviceSpec::Cpu, Precision::F16).expect_err("f16 on cpu");
        assert!(err.to_string().contains("--dtype f16"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_falls_back_on_auto_and_refuses_cuda() {
        assert!(matches!(
            resolve(&DeviceSpec::Auto, Precision::F32).as_deref(),
            Ok([Device::Cpu])
        ));
        let err = resolve(&DeviceSpec::Cuda(vec![0]), Precision::F32).expect_err("no cuda");
        assert!(err.to_string().contains("CUDA build"), "{err}");
    }
}
