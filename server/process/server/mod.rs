//! Putting it together: health and reflection, the classifier service, the metrics
//! endpoint, model loading, and a graceful drain on shutdown.
//!
//! Its parts: `options` holds what the operator sets ([`ServeOptions`]);
//! `connections` is what the listeners do to each connection (Nagle off, a lingering
//! close) and the jittered connection age; `routes` builds the services; this file
//! starts them on the port, installs the models once loaded, and drains.

mod connections;
mod options;
mod routes;

pub(crate) use connections::nodelay;
use connections::{accepted, jittered};
pub use options::ServeOptions;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::api::classifier::ClassifierService;
use crate::api::state::State;
use crate::process::metrics::Metrics;
use crate::process::registry::Registry;
use crate::proto::classifier_server::ClassifierServer;
pub use crate::scheduler::ModelFactory;
use crate::scheduler::{Backend, ModelHandle};

/// Loads the models (on a blocking thread, while health says NOT_SERVING). Entries that
/// share a name are replicas of one model (one per device, say): they share its queue.
pub type ModelLoader = Box<dyn FnOnce() -> Result<Vec<(String, Arc<dyn Backend>)>, String> + Send>;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("loading models: {0}")]
    Load(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tls(#[from] crate::process::tls::TlsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A [`crate::process::local::LocalServer`] that did not come up.
    #[error("{0}")]
    NotReady(String),
}

/// Serves on `listener` (and metrics on `metrics_listener`) until `shutdown` resolves,
/// then drains: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish
/// within `drain_timeout`.
pub async fn run(
    options: ServeOptions,
    loader: ModelLoader,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let metrics = Metrics::new();
    let registry = Registry::new();
    let state = routes::state(&options, registry.clone(), &metrics);
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let (reflection, reflection_v1alpha) = routes::reflection()?;
    let classifier = routes::classifier(&options, &state, &metrics);
    let kserve = routes::kserve(&options, &state, &metrics);

    // Read before anything is served: files that cannot be read or used stop it here.
    let tls = options
        .tls
        .clone()
        .map(|o| crate::process::tls::Tls::load(o, &metrics))
        .transpose()?;
    let _tls_watch = tls.clone().map(|t| AbortOnDrop(tokio::spawn(t.watch())));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let closes = crate::process::linger::Closes::default();
    let mut builder = tonic::transport::Server::builder()
        // Requests of float tensors run to tens of MiB; HTTP/2's default 64 KiB window
        // would cost a WINDOW_UPDATE round trip per 64 KiB received.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        // Lets clients send DATA frames of up to the stream window (8 MiB) instead of
        // 16 KiB: a 64-image tensor request is a few frames rather than ~2,400, and
        // since `Classify` and `ModelInfer` decode straight from the frames
        // (server/api/unary/), a tensor is copied only when it straddles two of them:
        // ~6% of tensors at 8 MiB against ~56% at 1 MiB.
        .max_frame_size(8 << 20)
        // Each open stream holds a task and buffers: one connection may not open
        // an unbounded number (h2's default).
        .max_concurrent_streams(Some(options.max_concurrent_streams));
    if let Some(age) = options.max_connection_age {
        // Graceful: GOAWAY, then the connection's calls in flight finish (no grace
        // deadline, as gRPC's MAX_CONNECTION_AGE_GRACE defaults to none).
        builder = builder.max_connection_age(jittered(age));
    }
    let router = builder
        .layer(crate::api::auth::AuthLayer(
            options
                .auth_tokens
                .clone()
                .map(|tokens| crate::api::auth::Guard::new(tokens, options.auth_open, &metrics)),
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(classifier)
        .add_service(kserve);
    let stopped = async {
        let _ = stop_rx.await;
    };
    let closes_of_grpc = closes.clone();
    let grpc = tokio::spawn(async move {
        match tls {
            // tonic stops on the end of the TLS stream, not on `stopped`: tonic would
            // drop the stream, and with it connections already handshaken and waiting
            // in it (see `Tls::incoming`). A signal that never comes still makes the
            // shutdown graceful: every connection served is sent GOAWAY and its calls
            // finish.
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        tls.incoming(listener, stopped, closes_of_grpc),
                        std::future::pending::<()>(),
                    )
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(accepted(listener, closes_of_grpc), stopped)
                    .await
            }
        }
    });
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics_listener.map(|l| {
        let probed = state.clone();
        let ready: crate::process::metrics::Readiness = Arc::new(move || probed.readiness());
        tokio::spawn(crate::process::metrics::serve(
            metrics.clone(),
            l,
            ready,
            async {
                let _ = metrics_stop_rx.await;
            },
        ))
    });

    let loaded = tokio::task::spawn_blocking(loader)
        .await
        .map_err(|e| RunError::Load(e.to_string()))?
        .map_err(RunError::Load)?;
    install(loaded, &registry, &options, &metrics)?;
    state.loaded.store(true, Ordering::SeqCst);
    state.ready.store(true, Ordering::SeqCst);
    set_health(&health, ServingStatus::Serving).await;
    tracing::info!("ready");

    shutdown.await;
    drain(&state, &health, options.drain_timeout).await;
    let _ = stop_tx.send(());
    let _ = metrics_stop_tx.send(());
    grpc.await.map_err(|e| RunError::Load(e.to_string()))??;
    // Exiting now would reset the connections still closing, and with them requests
    // their clients sent after the GOAWAY (crate::process::linger).
    closes.finished().await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    Ok(())
}

/// Puts the loaded models into `registry`, each with its batcher (entries that share a
/// name are one model's replicas), and sets the default model.
fn install(
    loaded: Vec<(String, Arc<dyn Backend>)>,
    registry: &Registry,
    options: &ServeOptions,
    metrics: &Metrics,
) -> Result<(), RunError> {
    let mut models: Vec<(String, Vec<Arc<dyn Backend>>)> = Vec::new();
    for (name, backend) in loaded {
        match models.iter_mut().find(|(n, _)| *n == name) {
            Some((_, replicas)) => replicas.push(backend),
            None => models.push((name, vec![backend])),
        }
    }
    for (name, replicas) in models {
        let count = replicas.len();
        let handle = ModelHandle::spawn(
            &name,
            replicas,
            options
                .model_policies
                .get(&name)
                .unwrap_or(&options.policy)
                .clone(),
            metrics.for_model(&name),
        );
        tracing::info!(model = %name, device = %handle.info().device, replicas = count, "serving");
        registry.insert(handle);
    }
    if let Some(d) = &options.default_model {
        if registry.get(d).is_none() {
            return Err(RunError::Load(format!(
                "default model '{d}' is not among the loaded models"
            )));
        }
        registry.set_default(d);
    }
    Ok(())
}

/// The drain: health NOT_SERVING and new requests UNAVAILABLE at once, then the
/// requests in flight get `timeout` to finish.
async fn drain(
    state: &State,
    health: &tonic_health::server::HealthReporter,
    timeout: std::time::Duration,
) {
    tracing::info!(in_flight = state.in_flight.count(), "draining");
    state.draining.store(true, Ordering::SeqCst);
    state.ready.store(false, Ordering::SeqCst);
    set_health(health, ServingStatus::NotServing).await;
    if tokio::time::timeout(timeout, state.in_flight.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = state.in_flight.count(),
            "drain deadline passed; closing anyway"
        );
    }
}

/// The whole server ("") and the classifier service report the same status.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <ClassifierServer<ClassifierService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
