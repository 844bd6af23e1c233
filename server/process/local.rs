//! A server on ephemeral loopback ports, serving in the background of the current tokio
//! runtime until stopped: what the integration tests, the client's tests and the
//! serving-path benchmark (`examples/server_overhead`) start, so that none of them
//! repeats how.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::process::server::{self, ModelLoader, RunError, ServeOptions};

/// A running server on `127.0.0.1`, gRPC and metrics each on a port of their own.
pub struct LocalServer {
    /// `http://127.0.0.1:PORT` for clients, `https://` when it serves TLS.
    pub url: String,
    /// The metrics endpoint (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl LocalServer {
    /// Binds both ports and starts serving; the models load in the background (see
    /// [`LocalServer::ready`]).
    pub async fn start(options: ServeOptions, loader: ModelLoader) -> std::io::Result<Self> {
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}", grpc.local_addr()?);
        let metrics_addr = metrics.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(options, loader, grpc, Some(metrics), async {
            let _ = stopped.await;
        }));
        Ok(LocalServer {
            url,
            metrics_addr,
            stop: Some(stop),
            task,
        })
    }

    /// Waits until the models are loaded and served (the whole server's gRPC health is
    /// SERVING; with TLS, `/readyz` answers 200), at most `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<(), RunError> {
        let give_up = tokio::time::Instant::now() + timeout;
        loop {
            if self.task.is_finished() {
                return Err(RunError::NotReady(
                    "the server stopped before it was ready".into(),
                ));
            }
            // Health, which answers without credentials when the server requires them;
            // with TLS, whose certificates this side does not hold, the plain-HTTP
            // readiness probe of the metrics port.
            let serving = if self.url.starts_with("https://") {
                readyz(self.metrics_addr).await
            } else {
                health_serving(&self.url).await
            };
            if serving {
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(RunError::NotReady(format!(
                    "{} was not ready after {timeout:?}",
                    self.url
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server (it drains first) and returns how its run ended.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| RunError::NotReady(format!("the server task failed: {e}")))?
    }
}

/// Whether the whole server's gRPC health at `url` (plaintext) says SERVING.
async fn health_serving(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Channel::from_shared(url.to_string()) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let whole_server = HealthCheckRequest {
        service: String::new(),
    };
    match HealthClient::new(channel).check(whole_server).await {
        Ok(r) => r.into_inner().status == ServingStatus::Serving as i32,
        Err(_) => false,
    }
}

/// Whether `GET /readyz` on the metrics port at `addr` answers 200.
async fn readyz(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.1 200")
}

impl Drop for LocalServer {
    /// A server dropped without [`LocalServer::stop`] is stopped without waiting for it.
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::scheduler::{Backend, BatchPolicy};

    #[tokio::test]
    async fn a_server_that_cannot_load_is_never_ready() {
        let options = ServeOptions {
            policy: BatchPolicy::new(&[1], Duration::from_millis(1), 4).expect("policy"),
            ..ServeOptions::default()
        };
        let loader: ModelLoader =
            Box::new(|| Err::<Vec<(String, Arc<dyn Backend>)>, _>("no weights".into()));
        let server = LocalServer::start(options, loader).await.expect("binds");
        let err = server
            .ready(Duration::from_secs(30))
            .await
            .expect_err("not ready");
        assert!(err.to_string().contains("stopped before"), "{err}");
        assert!(matches!(server.stop().await, Err(RunError::Load(_))));
    }
}
