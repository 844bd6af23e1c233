//! Where and how models are loaded: on which devices, in what precision, with how many
//! workers, warmed up how, and from where (a checkpoint file or a directory holding one,
//! or the weights cache), under the name they are served by. The
//! same for the models given at start-up and those loaded later through KServe's model
//! repository API, which may read only the operator's model repository, by file name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::model::{Architecture, Classifier, ModelName};
use crate::process::device::{self, Precision};
use crate::process::models::{self, Weights};
use crate::scheduler::Backend;
use crate::scheduler::ModelFactory;
use crate::weights::download::Downloader;
use crate::weights::repository::{ModelRepository, RepositoryError};
use crate::weights::{clip, Checkpoint, Limits};

/// Where and how models are loaded: the same for the models given at start-up and those
/// loaded later through KServe's repository API.
pub struct Placement {
    pub devices: Vec<candle_core::Device>,
    pub precision: Precision,
    /// Workers (replicas sharing one copy) per device.
    pub workers: usize,
    /// Batch sizes run once on a GPU before the model is served.
    pub warm_sizes: Vec<usize>,
    pub cache: Downloader,
    /// Threads the CPU compute of each model copy may use (its own pool); `None`: the
    /// process-wide pool, one thread per core. Fewer leave cores to image decoding.
    pub compute_threads: Option<usize>,
}

/// A model whose forward passes run on a thread pool of their own size.
struct Pooled {
    inner: Arc<dyn Backend>,
    pool: rayon::ThreadPool,
}

impl Backend for Pooled {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, crate::model::ModelError> {
        self.pool.install(|| self.inner.forward(pixels, n))
    }

    fn forward_images(
        &self,
        images: &[crate::model::InputView<'_>],
        size: usize,
    ) -> Result<crate::scheduler::Logits, crate::model::ModelError> {
        self.pool
            .install(|| self.inner.forward_images(images, size))
    }

    fn info(&self) -> crate::scheduler::BackendInfo {
        self.inner.info()
    }

    fn implementation(&self) -> String {
        self.inner.implementation()
    }
}

/// `backend` with its compute confined to `threads` threads.
pub fn with_threads(backend: Arc<dyn Backend>, threads: usize) -> Result<Arc<dyn Backend>, String> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("compute-{i}"))
        .build()
        .map_err(|e| format!("compute thread pool: {e}"))?;
    Ok(Arc::new(Pooled {
        inner: backend,
        pool,
    }))
}

impl Placement {
    /// One replica per device and worker; blocking (reads and maybe downloads weights).
    pub fn load(
        &self,
        name: ModelName,
        path: Option<PathBuf>,
    ) -> Result<Vec<Arc<dyn Backend>>, String> {
        let weights = match path {
            Some(path) => Weights::Path {
                path,
                architecture: Some(name.architecture),
            },
            None => Weights::Hub(name),
        };
        self.load_weights(&name.to_string(), &weights)
    }

    /// The model served as `served` from `weights`, one replica per device and worker;
    /// blocking. A checkpoint given without its architecture is read as the one its
    /// tensor shapes match; given with one, it must match it.
    pub fn load_weights(
        &self,
        served: &str,
        weights: &Weights,
    ) -> Result<Vec<Arc<dyn Backend>>, String> {
        let (checkpoint, given) = match weights {
            Weights::Hub(name) => {
                let path = self.cache.fetch(*name).map_err(|e| e.to_string())?;
                let checkpoint =
                    Checkpoint::open_within(&path, Limits::for_architecture(name.architecture))
                        .map_err(|e| e.to_string())?;
                (checkpoint, Some(name.architecture))
            }
            Weights::Path { path, architecture } => {
                let located = models::locate(path).map_err(|e| e.to_string())?;
                let limits =
                    architecture.map_or_else(Limits::any_architecture, Limits::for_architecture);
                let checkpoint = Checkpoint::from_file(located.file, &located.path, limits)
                    .map_err(|e| e.to_string())?;
                (checkpoint, *architecture)
            }
        };
        self.place_checked(served, given, &checkpoint)
    }

    /// [`Self::place`] with the architecture the checkpoint's tensor shapes match, which
    /// must be `given` when one is.
    fn place_checked(
        &self,
        served: &str,
        given: Option<Architecture>,
        checkpoint: &Checkpoint,
    ) -> Result<Vec<Arc<dyn Backend>>, String> {
        let detected = Architecture::detect(|k| checkpoint.info(k).map(|i| i.shape));
        let architecture = match (given, detected) {
            (Some(given), Some(found)) if given != found => {
                return Err(format!(
                    "{} holds a {found} checkpoint, not {given}",
                    checkpoint.path().display()
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(format!(
                    "{}: its tensors match none of the six architectures; give the architecture, as NAME=ARCH:PATH",
                    checkpoint.path().display()
                ))
            }
        };
        self.place(served, architecture, checkpoint)
    }

    /// One replica per device and worker of an opened checkpoint; blocking.
    fn place(
        &self,
        name: &str,
        architecture: Architecture,
        checkpoint: &Checkpoint,
    ) -> Result<Vec<Arc<dyn Backend>>, String> {
        let mut out: Vec<Arc<dyn Backend>> = Vec::new();
        for dev in &self.devices {
            let started = std::time::Instant::now();
            let model = Classifier::load(architecture, checkpoint, dev, self.precision.dtype())
                .map_err(|e| format!("{}: {e}", checkpoint.path().display()))?;
            // A GPU selects kernels and algorithms on first use of each shape; pay for
            // that now, before the model is served.
            if !dev.is_cpu() {
                model
                    .warm_up(&self.warm_sizes, self.workers)
                    .map_err(|e| format!("warming up {name} on {}: {e}", device::describe(dev)))?;
            }
            tracing::info!(
                model = %name,
                %architecture,
                checkpoint = %checkpoint.path().display(),
                device = %device::describe(dev),
                dtype = %self.precision,
                kernels = model.kernels().name(),
                cuda_graphs = ?model.graph_sizes(),
                seconds = started.elapsed().as_secs_f64(),
                "loaded"
            );
            let mut model: Arc<dyn Backend> = Arc::new(model);
            if let (Some(n), true) = (self.compute_threads, dev.is_cpu()) {
                model = with_threads(model, n)?;
            }
            for _ in 0..self.workers {
                out.push(model.clone());
            }
        }
        Ok(out)
    }
}

/// A model the operator configured (`--model`, a `[models.NAME]` table): its weights
/// and where and how it runs. RepositoryModelLoad of its name loads it as configured.
#[derive(Clone)]
pub struct Configured {
    pub weights: Weights,
    pub placement: Arc<Placement>,
}

impl Placement {
    /// Run-time loading by hub name, for `--model-control`: from a file named in
    /// `repository` (and nowhere else), or, with no file named, from the weights cache.
    /// Its errors name only what the client named: never a path on the server.
    pub fn factory(self: &Arc<Self>, repository: Option<Arc<ModelRepository>>) -> ModelFactory {
        self.factory_with(repository, HashMap::new())
    }

    /// [`Self::factory`] that also knows the configured models, by served name: such a
    /// name loads with its own placement, from its configured weights (or, with a file
    /// named, from that repository file, read as its architecture when that is known),
    /// whether it is a hub name or not. Other hub names load as [`Self::factory`]'s do.
    pub fn factory_with(
        self: &Arc<Self>,
        repository: Option<Arc<ModelRepository>>,
        configured: HashMap<String, Configured>,
    ) -> ModelFactory {
        let me = self.clone();
        ModelFactory(Arc::new(move |name: &str, file: Option<&str>| {
            if let Some(model) = configured.get(name) {
                let architecture = match &model.weights {
                    Weights::Hub(hub) => Some(hub.architecture),
                    Weights::Path { architecture, .. } => *architecture,
                };
                return match (file, &repository) {
                    (None, _) => model.placement.load_configured(name, &model.weights),
                    (Some(_), None) => Err(RepositoryError::NoRepository.to_string()),
                    (Some(file), Some(repository)) => {
                        model
                            .placement
                            .load_from(repository, name, architecture, file)
                    }
                };
            }
            let hub: ModelName = name
                .parse()
                .map_err(|_| format!("'{}' is not one of the twelve hub models", clip(name)))?;
            match (file, &repository) {
                (None, _) => me.load_cached(hub),
                (Some(_), None) => Err(RepositoryError::NoRepository.to_string()),
                (Some(file), Some(repository)) => {
                    me.load_from(repository, name, Some(hub.architecture), file)
                }
            }
        }))
    }

    /// `name` from the weights cache; the cache's paths stay in the server's log.
    fn load_cached(&self, name: ModelName) -> Result<Vec<Arc<dyn Backend>>, String> {
        self.load(name, None).map_err(|e| {
            tracing::warn!(model = %name, error = %e, "loading from the weights cache failed");
            format!("{name} could not be loaded from the server's weights cache (the server's log says why)")
        })
    }

    /// A configured model from its configured weights; their paths stay in the server's
    /// log.
    fn load_configured(
        &self,
        name: &str,
        weights: &Weights,
    ) -> Result<Vec<Arc<dyn Backend>>, String> {
        self.load_weights(name, weights).map_err(|e| {
            tracing::warn!(model = %name, error = %e, "loading a configured model failed");
            format!(
                "{} could not be loaded from its configured weights (the server's log says why)",
                clip(name)
            )
        })
    }

    /// The model served as `served` from the repository file `file` (called by its name
    /// alone in messages), read as `architecture` if given, else as the one its tensor
    /// shapes match.
    fn load_from(
        &self,
        repository: &ModelRepository,
        served: &str,
        architecture: Option<Architecture>,
        file: &str,
    ) -> Result<Vec<Arc<dyn Backend>>, String> {
        let opened = repository.open(file).map_err(|e| e.to_string())?;
        let shown = PathBuf::from(clip(file));
        let limits = architecture.map_or_else(Limits::any_architecture, Limits::for_architecture);
        let checkpoint =
            Checkpoint::from_file(opened, &shown, limits).map_err(|e| e.to_string())?;
        self.place_checked(served, architecture, &checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::BackendInfo;

    /// Reports, as its only logit, how many threads its forward pass could use.
    struct Probe;

    impl Backend for Probe {
        fn forward(&self, _: &[f32], n: usize) -> Result<Vec<Vec<f32>>, crate::model::ModelError> {
            Ok(vec![vec![rayon::current_num_threads() as f32]; n])
        }

        fn info(&self) -> BackendInfo {
            BackendInfo {
                architecture: "probe".into(),
                device: "cpu".into(),
                dtype: "f32".into(),
            }
        }
    }

    #[test]
    fn compute_runs_on_a_pool_of_the_asked_size() {
        for n in [1, 3] {
            let b = with_threads(Arc::new(Probe), n).expect("pool");
            assert_eq!(b.forward(&[], 1).ok(), Some(vec![vec![n as f32]]));
        }
    }
}
