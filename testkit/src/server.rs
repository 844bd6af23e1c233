//! The library's server on ephemeral loopback ports (`127.0.0.1:0`, through
//! [`resnet_serve::process::local::LocalServer`]): [`TestServer`] in the test's own tokio
//! runtime, [`BlockingServer`] on a runtime thread of its own for tests that block (the
//! client's CLI run as a child process, its library on a runtime of the test's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use resnet_client::proto::classifier_client::ClassifierClient;
use resnet_client::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use resnet_serve::process::local::LocalServer;
use resnet_serve::process::server::{ModelLoader, RunError, ServeOptions};
use resnet_serve::scheduler::{Backend, BatchPolicy};
use tonic::transport::Channel;

/// The name the test model is served under.
pub const MODEL: &str = "resnet18_swsl";

/// How long a server may take to load its models before the test fails.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// Options with batch sizes `sizes`, a queue delay of `delay_ms` and a queue of
/// `capacity` images, on two preprocessing threads; the rest as the defaults.
pub fn options(sizes: &[usize], delay_ms: u64, capacity: usize) -> ServeOptions {
    ServeOptions {
        policy: BatchPolicy::new(sizes, Duration::from_millis(delay_ms), capacity).expect("policy"),
        preprocess_threads: 2,
        ..ServeOptions::default()
    }
}

/// A loader that serves each of `replicas` as [`MODEL`] (one model on several replicas,
/// as on several GPUs, when there are more than one).
pub fn replicas_loader(replicas: Vec<Arc<dyn Backend>>) -> ModelLoader {
    Box::new(move || {
        Ok(replicas
            .into_iter()
            .map(|b| (MODEL.to_string(), b))
            .collect())
    })
}

/// A running server in this process, and clients for it.
pub struct TestServer {
    server: LocalServer,
    /// `http://127.0.0.1:PORT`, `https://` when it serves TLS.
    pub url: String,
    /// The metrics and probes port.
    pub metrics_addr: SocketAddr,
}

impl TestServer {
    /// Serves `backend` as [`MODEL`]; returns once it is ready.
    pub async fn start(options: ServeOptions, backend: Arc<dyn Backend>) -> TestServer {
        Self::start_replicas(options, vec![backend]).await
    }

    /// One model served by several replicas; returns once it is ready.
    pub async fn start_replicas(
        options: ServeOptions,
        replicas: Vec<Arc<dyn Backend>>,
    ) -> TestServer {
        let server = Self::spawn(options, replicas_loader(replicas)).await;
        server.ready().await;
        server
    }

    /// Starts serving what `loader` loads, without waiting for it (see
    /// [`TestServer::ready`]).
    pub async fn spawn(options: ServeOptions, loader: ModelLoader) -> TestServer {
        let server = LocalServer::start(options, loader).await.expect("bind");
        TestServer {
            url: server.url.clone(),
            metrics_addr: server.metrics_addr,
            server,
        }
    }

    /// Waits until the models are loaded and served; fails the test after two minutes.
    pub async fn ready(&self) {
        self.ready_within(READY_WITHIN).await.expect("ready");
    }

    /// Waits at most `timeout` until the models are served, or says why not.
    pub async fn ready_within(&self, timeout: Duration) -> Result<(), RunError> {
        self.server.ready(timeout).await
    }

    /// A connected channel (plaintext servers only).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// Our API's generated client.
    pub async fn client(&self) -> ClassifierClient<Channel> {
        ClassifierClient::connect(self.url.clone())
            .await
            .expect("connect")
    }

    /// KServe's generated client, taking replies up to the server's message limit.
    pub async fn kserve(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::connect(self.url.clone())
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20)
    }

    /// The classifier service's health status (-1 when it cannot be asked).
    pub async fn health(&self) -> i32 {
        health(&self.url).await
    }

    /// The Prometheus text of the metrics endpoint.
    pub async fn metrics(&self) -> String {
        crate::metrics::scrape(self.metrics_addr).await
    }

    /// The sum of the samples whose lines start with `prefix`, e.g.
    /// `resnet_serve_batches_total{` (see [`crate::metrics::sum`]).
    pub async fn metric(&self, prefix: &str) -> f64 {
        crate::metrics::sum(&self.metrics().await, prefix)
    }

    /// Stops the server (it drains first) and asserts that it shut down cleanly.
    pub async fn stop(self) {
        self.shutdown().await.expect("clean shutdown");
    }

    /// Stops the server (it drains first) and returns how its run ended.
    pub async fn shutdown(self) -> Result<(), RunError> {
        self.server.stop().await
    }
}

/// The classifier service's health status at `url` (-1 when it cannot be asked).
pub async fn health(url: &str) -> i32 {
    let channel = Channel::from_shared(url.to_string())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "resnet_serve.v1.Classifier".into(),
    })
    .await
    .map(|r| r.into_inner().status)
    .unwrap_or(-1)
}

/// A [`TestServer`] on a runtime thread of its own, so that blocking callers (a child
/// process, a runtime of the test's) can call it; stopped and joined when dropped.
pub struct BlockingServer {
    /// `http://127.0.0.1:PORT`, `https://` when it serves TLS.
    pub grpc: String,
    /// The metrics port, `127.0.0.1:PORT`.
    pub metrics: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlockingServer {
    /// Serves `backend` as [`MODEL`] with `options`; returns once it is ready.
    pub fn start(options: ServeOptions, backend: Arc<dyn Backend>) -> BlockingServer {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let server = TestServer::start(options, backend).await;
                ready_tx
                    .send((server.url.clone(), server.metrics_addr.to_string()))
                    .expect("ready");
                let _ = stopped.await;
                server.shutdown().await.expect("server runs");
            });
        });
        let (grpc, metrics) = ready_rx.recv().expect("addresses");
        BlockingServer {
            grpc,
            metrics,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The program at `bin` (a client CLI) with `--endpoint` set to this server.
    pub fn command(&self, bin: impl Into<PathBuf>) -> Command {
        let mut c = Command::new(bin.into());
        c.args(["--endpoint", &self.grpc]);
        c
    }

    /// Starts the drain without waiting for it (the drop waits).
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for BlockingServer {
    fn drop(&mut self) {
        self.begin_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
