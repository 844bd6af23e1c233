//! torchvision's `ResNet`: the stem, four stages of Basic or Bottleneck blocks (stride on
//! the 3x3 convolution, a 1x1 downsample on each stage's first block when the shape
//! changes), global average pooling and the classifier. One layout description
//! ([`Layout`]) names every parameter verbatim, decides its shape, and drives the build,
//! so the strict key check and the network cannot disagree.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::arch::{Architecture, Block};
use super::batchnorm::{self, BatchNorm};
use super::layers::{Conv, FoldedConv, Kernels, Linear};
use super::params::ParamSource;
use super::{ModelError, NUM_CLASSES};

/// One convolution and the batch-norm after it, by state-dict prefix.
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub conv: String,
    pub bn: String,
    pub in_ch: usize,
    pub out_ch: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
}

impl ConvBn {
    fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.out_ch,
            self.in_ch / self.groups,
            self.kernel,
            self.kernel,
        ]
    }
}

/// The convolutions of one residual block, in order, and its downsample.
#[derive(Debug, Clone)]
pub struct BlockLayout {
    pub convs: Vec<ConvBn>,
    pub downsample: Option<ConvBn>,
}

/// Every layer of a network, named as in torchvision's state dict.
#[derive(Debug, Clone)]
pub struct Layout {
    pub stem: ConvBn,
    pub blocks: Vec<BlockLayout>,
    pub features: usize,
}

impl Layout {
    pub fn new(arch: Architecture) -> Layout {
        let cb = |conv: String, bn: String, in_ch, out_ch, kernel, stride, groups| ConvBn {
            conv,
            bn,
            in_ch,
            out_ch,
            kernel,
            stride,
            groups,
        };
        let stem = cb("conv1".into(), "bn1".into(), 3, 64, 7, 2, 1);
        let expansion = arch.block().expansion();
        let mut blocks = Vec::new();
        let mut inplanes = 64;
        for (stage, (&count, planes)) in arch
            .layers()
            .iter()
            .zip([64usize, 128, 256, 512])
            .enumerate()
        {
            let stage_stride = if stage == 0 { 1 } else { 2 };
            for i in 0..count {
                let p = format!("layer{}.{i}", stage + 1);
                let stride = if i == 0 { stage_stride } else { 1 };
                let out = planes * expansion;
                let convs = match arch.block() {
                    Block::Basic => vec![
                        cb(
                            format!("{p}.conv1"),
                            format!("{p}.bn1"),
                            inplanes,
                            planes,
                            3,
                            stride,
                            1,
                        ),
                        cb(
                            format!("{p}.conv2"),
                            format!("{p}.bn2"),
                            planes,
                            planes,
                            3,
                            1,
                            1,
                        ),
                    ],
                    Block::Bottleneck => {
                        let width = planes * arch.width_per_group() / 64 * arch.groups();
                        vec![
                            cb(
                                format!("{p}.conv1"),
                                format!("{p}.bn1"),
                                inplanes,
                                width,
                                1,
                                1,
                                1,
                            ),
                            cb(
                                format!("{p}.conv2"),
                                format!("{p}.bn2"),
                                width,
                                width,
                                3,
                                stride,
                                arch.groups(),
                            ),
                            cb(
                                format!("{p}.conv3"),
                                format!("{p}.bn3"),
                                width,
                                out,
                                1,
                                1,
                                1,
                            ),
                        ]
                    }
                };
                let downsample = (i == 0 && (stride != 1 || inplanes != out)).then(|| {
                    cb(
                        format!("{p}.downsample.0"),
                        format!("{p}.downsample.1"),
                        inplanes,
                        out,
                        1,
                        stride,
                        1,
                    )
                });
                blocks.push(BlockLayout { convs, downsample });
                inplanes = out;
            }
        }
        Layout {
            stem,
            blocks,
            features: inplanes,
        }
    }

    fn conv_bns(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(
            self.blocks
                .iter()
                .flat_map(|b| b.convs.iter().chain(b.downsample.as_ref())),
        )
    }

    /// Every state-dict key the network needs, with its shape (`num_batches_tracked`,
    /// which inference never reads, excluded).
    pub fn expected_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let mut out = BTreeMap::new();
        for c in self.conv_bns() {
            out.insert(format!("{}.weight", c.conv), c.weight_shape());
            for t in ["weight", "bias", "running_mean", "running_var"] {
                out.insert(format!("{}.{t}", c.bn), vec![c.out_ch]);
            }
        }
        out.insert("fc.weight".into(), vec![NUM_CLASSES, self.features]);
        out.insert("fc.bias".into(), vec![NUM_CLASSES]);
        out
    }
}

/// Compares a source's keys and shapes with the layout's; lists every difference.
fn check_strict(
    arch: Architecture,
    layout: &Layout,
    source: &dyn ParamSource,
) -> Result<(), ModelError> {
    let expected = layout.expected_shapes();
    let mut problems = Vec::new();
    for (name, shape) in &expected {
        match source.shape(name) {
            None => problems.push(format!("missing key '{name}' (expected shape {shape:?})")),
            Some(found) if &found != shape => {
                problems.push(format!("'{name}' has shape {found:?}, expected {shape:?}"))
            }
            Some(_) => {}
        }
    }
    for name in source.names() {
        if !expected.contains_key(&name) && !name.ends_with("num_batches_tracked") {
            let shape = source.shape(&name).unwrap_or_default();
            problems.push(format!("unexpected key '{name}' (shape {shape:?})"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let total = problems.len();
    let mut text = problems.into_iter().take(8).collect::<Vec<_>>().join("; ");
    if total > 8 {
        text.push_str(&format!("; and {} more", total - 8));
    }
    Err(ModelError::Mismatch {
        arch,
        problems: text,
    })
}

fn read(source: &dyn ParamSource, name: &str) -> Result<Vec<f32>, ModelError> {
    source.read_f32(name).map_err(|source| ModelError::Read {
        name: name.to_string(),
        source,
    })
}

fn fold(source: &dyn ParamSource, c: &ConvBn) -> Result<FoldedConv, ModelError> {
    let mut weight = read(source, &format!("{}.weight", c.conv))?;
    let p = |t: &str| read(source, &format!("{}.{t}", c.bn));
    let (gamma, beta, mean, var) = (
        p("weight")?,
        p("bias")?,
        p("running_mean")?,
        p("running_var")?,
    );
    let bias = batchnorm::fold(
        &mut weight,
        &BatchNorm {
            gamma: &gamma,
            beta: &beta,
            mean: &mean,
            var: &var,
        },
    );
    let shape = c.weight_shape();
    Ok(FoldedConv {
        weight,
        bias,
        shape: [shape[0], shape[1], shape[2], shape[3]],
        stride: c.stride,
        padding: c.kernel / 2,
        groups: c.groups,
    })
}

#[derive(Debug)]
struct ResidualBlock {
    /// All but the last run with ReLU; the last adds the shortcut first.
    convs: Vec<Conv>,
    downsample: Option<Conv>,
}

/// A built network on one device.
#[derive(Debug)]
pub struct ResNet {
    kernels: Kernels,
    dtype: DType,
    stem: Conv,
    blocks: Vec<ResidualBlock>,
    fc: Linear,
}

impl ResNet {
    pub fn load(
        arch: Architecture,
        source: &dyn ParamSource,
        device: &Device,
        dtype: DType,
        kernels: Kernels,
    ) -> Result<ResNet, ModelError> {
        let layout = Layout::new(arch);
        check_strict(arch, &layout, source)?;
        let conv = |c: &ConvBn| -> Result<Conv, ModelError> {
            Ok(Conv::new(fold(source, c)?, device, dtype, kernels)?)
        };
        let stem = conv(&layout.stem)?;
        let mut blocks = Vec::with_capacity(layout.blocks.len());
        for b in &layout.blocks {
            blocks.push(ResidualBlock {
                convs: b.convs.iter().map(conv).collect::<Result<_, _>>()?,
                downsample: b.downsample.as_ref().map(conv).transpose()?,
            });
        }
        let fc = Linear::new(
            read(source, "fc.weight")?,
            read(source, "fc.bias")?,
            [NUM_CLASSES, layout.features],
            device,
            dtype,
            kernels,
        )?;
        Ok(ResNet {
            kernels,
            dtype,
            stem,
            blocks,
            fc,
        })
    }

    /// Logits in the model's dtype for an NCHW f32 batch on the model's device.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels == Kernels::Cpu && rayon::current_thread_index().is_none() {
            // Every CPU layer is a parallel loop on the rayon pool. Called from outside
            // the pool, each of those ~60 loops would park this thread and wake it when
            // done (a futex round trip per layer); run the whole pass on a pool thread
            // instead, so only the pass as a whole crosses threads. The caller's kernel
            // choice goes along: the pools read it when they run (tests force one per
            // thread, and a pool thread has none of its own).
            let choice = super::cpu::CpuKernels::current().map_err(candle_core::Error::wrap)?;
            return rayon::scope(|_| {
                choice
                    .scope(|| self.forward_on_this_thread(x))
                    .map_err(candle_core::Error::wrap)?
            });
        }
        self.forward_on_this_thread(x)
    }

    fn forward_on_this_thread(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.kernels;
        let x = k.enter(x, self.dtype)?;
        let mut x = k.max_pool_3x3_s2(&self.stem.forward(&x, true)?)?;
        for b in &self.blocks {
            let shortcut = match &b.downsample {
                Some(d) => d.forward(&x, false)?,
                None => x.clone(),
            };
            let (last, rest) = b
                .convs
                .split_last()
                .ok_or_else(|| candle_core::Error::Msg("empty block".into()))?;
            let mut y = x;
            for c in rest {
                y = c.forward(&y, true)?;
            }
            x = last.forward_add_relu(&y, &shortcut)?;
        }
        self.fc.forward(&k.global_avg_pool(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(arch: Architecture) -> usize {
        Layout::new(arch)
            .expected_shapes()
            .iter()
            .filter(|(k, _)| !k.contains("running_"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        // torchvision's documented counts (sum of p.numel() over model.parameters()).
        assert_eq!(params(Architecture::Resnet18), 11_689_512);
        assert_eq!(params(Architecture::Resnet50), 25_557_032);
        assert_eq!(params(Architecture::Resnext50_32x4d), 25_028_904);
        assert_eq!(params(Architecture::Resnext101_32x8d), 88_791_336);
    }

    #[test]
    fn layout_names_match_torchvision() {
        let shapes = Layout::new(Architecture::Resnext101_32x4d).expected_shapes();
        assert_eq!(shapes["conv1.weight"], vec![64, 3, 7, 7]);
        assert_eq!(shapes["layer1.0.downsample.0.weight"], vec![256, 64, 1, 1]);
        assert_eq!(shapes["layer2.0.conv2.weight"], vec![256, 8, 3, 3]);
        assert_eq!(shapes["layer3.22.bn3.running_var"], vec![1024]);
        assert_eq!(shapes["fc.weight"], vec![1000, 2048]);
        assert!(!shapes.contains_key("layer1.1.downsample.0.weight"));
        let r18 = Layout::new(Architecture::Resnet18).expected_shapes();
        assert!(
            !r18.contains_key("layer1.0.downsample.0.weight"),
            "resnet18's layer1 keeps its shape"
        );
        assert_eq!(r18["layer2.0.downsample.0.weight"], vec![128, 64, 1, 1]);
    }

    #[test]
    fn detects_every_architecture_from_its_shapes() {
        for arch in Architecture::ALL {
            let shapes = Layout::new(arch).expected_shapes();
            assert_eq!(Architecture::detect(|k| shapes.get(k).cloned()), Some(arch));
        }
    }
}
