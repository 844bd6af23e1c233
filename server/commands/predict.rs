//! `resnet-serve predict`: the model card's example script as a tool. Loads one model,
//! preprocesses image files as torchvision does, and reports logits, probabilities or
//! labelled top-k per file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use resnet_serve::labels::{self, Scored};
use resnet_serve::model::{Classifier, ModelError, ModelName};
use resnet_serve::preprocess::{Input, PreprocessError, Preprocessor, INPUT_LEN};
use resnet_serve::weights::{Checkpoint, WeightsError};

/// What to report per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputKind {
    Logits,
    Probs,
    Topk,
}

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: PreprocessError,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One image's result.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub file: String,
    #[serde(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    Logits(Vec<f32>),
    Probs(Vec<f32>),
    Topk(Vec<Scored>),
}

/// Loads the model from `weights` on `device`.
pub fn load_model(
    model: ModelName,
    weights: &Path,
    device: &Device,
    dtype: DType,
) -> Result<Classifier, PredictError> {
    let checkpoint = Checkpoint::open(weights)?;
    Ok(Classifier::load(
        model.architecture,
        &checkpoint,
        device,
        dtype,
    )?)
}

/// Classifies `images` in batches of at most `batch_size`.
pub fn predict(
    classifier: &Classifier,
    images: &[PathBuf],
    output: OutputKind,
    top_k: usize,
    batch_size: usize,
) -> Result<Vec<Prediction>, PredictError> {
    let pre = Preprocessor::default();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(batch_size.max(1)) {
        let mut pixels = Vec::with_capacity(chunk.len() * INPUT_LEN);
        for path in chunk {
            let bytes = std::fs::read(path).map_err(|source| PredictError::Io {
                path: path.clone(),
                source,
            })?;
            let input =
                pre.prepare(Input::Encoded(&bytes))
                    .map_err(|source| PredictError::Image {
                        path: path.clone(),
                        source,
                    })?;
            input
                .view()
                .for_each_run(|run| pixels.extend_from_slice(run));
        }
        let logits = classifier.classify(&pixels, chunk.len())?;
        for (path, logits) in chunk.iter().zip(logits) {
            let output = match output {
                OutputKind::Logits => Output::Logits(logits),
                OutputKind::Probs => Output::Probs(labels::softmax(&logits)),
                OutputKind::Topk => Output::Topk(labels::top_k(&labels::softmax(&logits), top_k)),
            };
            out.push(Prediction {
                file: path.display().to_string(),
                output,
            });
        }
    }
    Ok(out)
}

/// Human-readable lines: top-k as `rank  score  label (index)`, vectors in full.
pub fn render_text(predictions: &[Prediction]) -> String {
    let mut s = String::new();
    for p in predictions {
        s.push_str(&p.file);
        s.push('\n');
        match &p.output {
            Output::Topk(top) => {
                for (rank, c) in top.iter().enumerate() {
                    s.push_str(&format!(
                        "  {}. {:.4}  {} ({})\n",
                        rank + 1,
                        c.score,
                        c.label,
                        c.index
                    ));
                }
            }
            Output::Logits(v) | Output::Probs(v) => {
                let values: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
                s.push_str(&format!("  {}\n", values.join(" ")));
            }
        }
    }
    s
}
