//! The plain-HTTP probes on the metrics port, through loading, serving and draining:
//! `/livez` answers throughout; `/readyz` only while every model is loaded and the
//! server is not draining, with the reason otherwise.

use std::sync::Arc;
use std::time::Duration;

use resnet_client::proto::{image, ClassifyRequest, FloatTensor, Image};
use resnet_serve::process::server::{ModelLoader, ServeOptions};
use resnet_serve::scheduler::Backend;
use testkit::backends::Gated;
use testkit::wire::http_get;
use testkit::TestServer;

async fn eventually_readyz(addr: std::net::SocketAddr, code: u16) -> String {
    for _ in 0..300 {
        let (got, body) = http_get(addr, "/readyz").await;
        if got == code {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/readyz never answered {code}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_through_loading_serving_and_draining() {
    let gate = Gated::new(testkit::resnet18());
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let backend: Arc<dyn Backend> = gate.clone();
    let loader: ModelLoader = Box::new(move || {
        let _ = wait.recv_timeout(Duration::from_secs(60));
        Ok(vec![("resnet18_swsl".to_string(), backend)])
    });
    let options = ServeOptions {
        drain_timeout: Duration::from_secs(30),
        ..testkit::server::options(&[1], 1, 8)
    };
    let server = TestServer::spawn(options, loader).await;
    let probes = server.metrics_addr;

    // Loading: alive, not ready.
    let (code, body) = http_get(probes, "/livez").await;
    assert_eq!(code, 200, "{body}");
    let body = eventually_readyz(probes, 503).await;
    assert!(body.contains("loading"), "{body}");

    // Serving.
    release.send(()).expect("release");
    server.ready().await;
    let body = eventually_readyz(probes, 200).await;
    assert_eq!(body.trim(), "ready");

    // Draining, a request held inside the worker: alive, not ready, and why.
    let mut client = server.client().await;
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
    gate.entered().await;
    let stopping = tokio::spawn(server.shutdown());
    let body = eventually_readyz(probes, 503).await;
    assert!(body.contains("draining"), "{body}");
    let (code, _) = http_get(probes, "/livez").await;
    assert_eq!(code, 200, "alive while draining");
    gate.open();
    held.await
        .expect("task")
        .expect("the held request is answered");
    stopping.await.expect("join").expect("clean shutdown");
}
