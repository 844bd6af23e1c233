//! KServe's model repository extension: models loaded and unloaded at run time, when
//! `--model-control` allows it (one load or unload at a time, a configured model reloaded
//! as it was configured).

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::error::ServeError;
use crate::model::ModelName;
use crate::proto::inference::{
    self as pb, model_repository_parameter::ParameterChoice as RepoParam,
};
use crate::scheduler::{BatchPolicy, ModelFactory, ModelHandle};

use super::describe;
use super::views::View;
use super::KServeService;

/// Run-time loading and unloading (KServe's model repository extension).
pub struct Repository {
    pub factory: ModelFactory,
    /// The policy of a model loaded without one of its own.
    pub policy: BatchPolicy,
    /// The policies of configured models that have their own (`[models.NAME]`), by
    /// served name: a reload keeps its own.
    pub policies: HashMap<String, BatchPolicy>,
    /// One load or unload at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Repository {
    pub fn new(factory: ModelFactory, policy: BatchPolicy) -> Self {
        Repository {
            factory,
            policy,
            policies: HashMap::new(),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// With the policies of the configured models that have their own.
    pub fn with_policies(mut self, policies: HashMap<String, BatchPolicy>) -> Self {
        self.policies = policies;
        self
    }
}

impl KServeService {
    pub(super) fn repository(&self) -> Result<&Arc<Repository>, ServeError> {
        self.repository.as_ref().ok_or_else(|| {
            ServeError::FailedPrecondition(
                "model control is disabled; start the server with --model-control to load and unload models".into(),
            )
        })
    }

    pub(super) async fn index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let only_ready = request.into_inner().ready;
        let mut models = Vec::new();
        let loaded = self.state.registry.names();
        for name in &loaded {
            for view in View::ALL {
                models.push(pb::repository_index_response::ModelIndex {
                    name: view.name(name),
                    version: describe::VERSION.into(),
                    state: "READY".into(),
                    reason: String::new(),
                });
            }
        }
        if self.repository.is_some() && !only_ready {
            // The hub names and the configured names, each once.
            let loadable: std::collections::BTreeSet<String> = ModelName::all()
                .map(|n| n.to_string())
                .chain(self.state.configured_models.iter().cloned())
                .collect();
            for name in loadable {
                if !loaded.contains(&name) {
                    models.push(pb::repository_index_response::ModelIndex {
                        name,
                        version: describe::VERSION.into(),
                        state: "UNAVAILABLE".into(),
                        reason: "unloaded".into(),
                    });
                }
            }
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    pub(super) async fn load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let repo = self.repository()?.clone();
        let r = request.into_inner();
        // A configured model (`--model`, `[models.NAME]`) by its served name, with what
        // it was configured with; any other hub name with the server's settings.
        let base = View::split(&r.model_name).0;
        let name = if self.state.configured_models.iter().any(|m| m == base) {
            base.to_string()
        } else {
            hub_name(&r.model_name, &self.state.configured_models)?.to_string()
        };
        // A file is named, never a path: the factory opens it in the operator's model
        // repository (`--model-repository`) or refuses it.
        let mut file = None;
        for (key, value) in &r.parameters {
            match (key.as_str(), value.parameter_choice.as_ref()) {
                ("file", Some(RepoParam::StringParam(f))) => file = Some(f.clone()),
                _ => {
                    return Err(ServeError::InvalidArgument(format!(
                        "unsupported load parameter '{}'; give 'file' (a file name in the server's model repository) or nothing (the weights cache)",
                        crate::weights::clip(key)
                    ))
                    .into())
                }
            }
        }
        let _busy = repo.busy.lock().await;
        let factory = repo.factory.clone();
        let model = name.clone();
        let started = std::time::Instant::now();
        let replicas = tokio::task::spawn_blocking(move || (factory.0)(&model, file.as_deref()))
            .await
            .map_err(|e| ServeError::Internal(format!("loading task failed: {e}")))?
            .map_err(|e| ServeError::InvalidArgument(format!("loading {name}: {e}")))?;
        if replicas.is_empty() {
            return Err(ServeError::Internal(format!("loading {name} gave no replicas")).into());
        }
        let key = name;
        let count = replicas.len();
        let policy = repo.policies.get(&key).unwrap_or(&repo.policy).clone();
        let handle = ModelHandle::spawn(&key, replicas, policy, self.state.metrics.for_model(&key));
        // Replacing an entry leaves requests already queued on the old copy to finish.
        self.state.registry.insert(handle);
        tracing::info!(model = %key, replicas = count, seconds = started.elapsed().as_secs_f64(), "loaded through the model repository API");
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    pub(super) async fn unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let repo = self.repository()?.clone();
        let r = request.into_inner();
        let base = View::split(&r.model_name).0.to_string();
        let _busy = repo.busy.lock().await;
        match self.state.registry.remove(&base) {
            // The handle drops here; the queue closes once in-flight requests let go, the
            // workers exit and the weights are freed.
            Some(_) => {
                tracing::info!(model = %base, "unloaded through the model repository API");
                Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
            }
            None => Err(ServeError::UnknownModel {
                name: crate::weights::clip(&r.model_name),
                available: self.state.registry.names().join(", "),
            }
            .into()),
        }
    }
}

fn hub_name(name: &str, configured: &[String]) -> Result<ModelName, ServeError> {
    let base = View::split(name).0;
    base.parse::<ModelName>()
        .map_err(|_| ServeError::UnknownModel {
            name: crate::weights::clip(name),
            // The configured names and the twelve hub names (the parse error would repeat
            // the client's string).
            available: configured
                .iter()
                .cloned()
                .chain(ModelName::all().map(|m| m.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}
