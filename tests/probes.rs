//! The plain-HTTP probes on the metrics port, through loading, serving and draining:
//! `/livez` answers throughout; `/readyz` only while every model is loaded and the
//! server is not draining, with the reason otherwise.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use resnet_client::proto::classifier_client::ClassifierClient;
use resnet_client::proto::{image, ClassifyRequest, FloatTensor, Image};
use resnet_serve::model::synthetic::SyntheticWeights;
use resnet_serve::model::{Architecture, Classifier, ModelError};
use resnet_serve::process::local::LocalServer;
use resnet_serve::process::server::{self, ServeOptions};
use resnet_serve::scheduler::{Backend, BackendInfo, BatchPolicy};

/// The seeded resnet18 behind a gate: a batch waits inside the worker until opened.
struct Gated {
    inner: Classifier,
    open: AtomicBool,
    entered: tokio::sync::Notify,
}

impl Backend for Gated {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        self.entered.notify_one();
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Backend::forward(&self.inner, pixels, n)
    }

    fn info(&self) -> BackendInfo {
        Backend::info(&self.inner)
    }
}

async fn eventually_readyz(addr: std::net::SocketAddr, code: u16) -> String {
    for _ in 0..300 {
        let (got, body) = common::http_get(addr, "/readyz").await;
        if got == code {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/readyz never answered {code}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_through_loading_serving_and_draining() {
    let arch = Architecture::Resnet18;
    let gate = Arc::new(Gated {
        inner: Classifier::load(
            arch,
            &SyntheticWeights::new(arch, 7),
            &Device::Cpu,
            DType::F32,
        )
        .expect("model"),
        open: AtomicBool::new(false),
        entered: tokio::sync::Notify::new(),
    });
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let backend: Arc<dyn Backend> = gate.clone();
    let loader: server::ModelLoader = Box::new(move || {
        let _ = wait.recv_timeout(Duration::from_secs(60));
        Ok(vec![("resnet18_swsl".to_string(), backend)])
    });
    let options = ServeOptions {
        policy: BatchPolicy::new(&[1], Duration::from_millis(1), 8).expect("policy"),
        preprocess_threads: 2,
        drain_timeout: Duration::from_secs(30),
        ..ServeOptions::default()
    };
    let server = LocalServer::start(options, loader).await.expect("bind");
    let probes = server.metrics_addr;

    // Loading: alive, not ready.
    let (code, body) = common::http_get(probes, "/livez").await;
    assert_eq!(code, 200, "{body}");
    let body = eventually_readyz(probes, 503).await;
    assert!(body.contains("loading"), "{body}");

    // Serving.
    release.send(()).expect("release");
    server.ready(Duration::from_secs(60)).await.expect("ready");
    let body = eventually_readyz(probes, 200).await;
    assert_eq!(body.trim(), "ready");

    // Draining, a request held inside the worker: alive, not ready, and why.
    let mut client = ClassifierClient::connect(server.url.clone())
        .await
        .expect("connect");
    let held = tokio::spawn(async move {
        client
            .classify(ClassifyRequest {
                model: "resnet18_swsl".into(),
                images: vec![Image {
                    kind: Some(image::Kind::Tensor(FloatTensor {
                        data: vec![0u8; 3 * 224 * 224 * 4].into(),
                    })),
                }],
                ..Default::default()
            })
            .await
    });
    gate.entered.notified().await;
    let stopping = tokio::spawn(server.stop());
    let body = eventually_readyz(probes, 503).await;
    assert!(body.contains("draining"), "{body}");
    let (code, _) = common::http_get(probes, "/livez").await;
    assert_eq!(code, 200, "alive while draining");
    gate.open.store(true, Ordering::SeqCst);
    held.await
        .expect("task")
        .expect("the held request is answered");
    stopping.await.expect("join").expect("clean shutdown");
}
