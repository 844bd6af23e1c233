//! Traces through a real OTLP/gRPC receiver: the `resnet-serve` binary, run as an
//! operator runs it with an OTLP endpoint configured, exports its spans to a
//! `TraceService` served here. A call that carries a W3C `traceparent` gets its span in
//! the caller's trace, with `preprocess` and `queue` children, and the span of the batch
//! that computed it links to it. The batch processor's delay is set far past the test,
//! so every span that arrives was flushed by the drain on SIGTERM.
//!
//! The exporter's settings are process-wide, so each test runs its own server process
//! (with its own receiver), as tests/soak.rs does.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use resnet_client::proto::inference::model_infer_request::InferInputTensor;
use resnet_client::proto::inference::ModelInferRequest;
use resnet_client::proto::ClassifyRequest;
use resnet_client::{tensor, Client, Output};
use resnet_serve::model::Architecture;

/// What the receiver was sent.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Received {
    /// Every span received, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let requests = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = Vec::new();
        for request in requests {
            for resource in request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| string(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in resource.scope_spans {
                    for span in scope.spans {
                        out.push((service.clone(), span));
                    }
                }
            }
        }
        out
    }
}

/// An OTLP/gRPC receiver on an ephemeral loopback port.
async fn receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, received)
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// The binary serving a seeded resnet18, exporting traces as `configure` sets it up
/// (every other OTEL_ variable of the test's environment removed); its directory
/// (weights and log) lives as long as it does.
struct Served {
    process: testkit::binary::Served,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(configure: impl FnOnce(&mut Command)) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let weights = dir.path().join("resnet18.safetensors");
        testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
        let log = dir.path().join("server.log");
        let process =
            testkit::binary::Served::start(env!("CARGO_BIN_EXE_resnet-serve"), &log, |command| {
                command
                    .arg("--model")
                    .arg(format!("resnet18_swsl={}", weights.display()))
                    .args(["--batch-sizes", "1,2,4", "--max-queue-delay-ms", "1"])
                    .args(["--drain-timeout-s", "10"])
                    .env("RUST_LOG", "info,resnet_serve=debug");
                for (name, _) in std::env::vars() {
                    if name.starts_with("OTEL_") {
                        command.env_remove(name);
                    }
                }
                // Nothing is exported on a timer within the test: what arrives was
                // flushed at shutdown.
                command.env("OTEL_BSP_SCHEDULE_DELAY", "600000");
                configure(command);
            });
        Served { process, _dir: dir }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// Connects once the server lists its model (loaded), returning the model's name:
    /// no call is made that would leave spans behind.
    async fn ready(&self) -> (Client, String) {
        self.process
            .ready_when(|client| async move {
                let name = client.list_models().await.ok()?.first()?.name.clone();
                Some((client, name))
            })
            .await
    }

    /// SIGTERM, then waits for the drain to end the process successfully.
    fn stop(&mut self) {
        self.process.sigterm();
        let status = self
            .process
            .wait_exit(Duration::from_secs(30), "after SIGTERM");
        assert!(status.success(), "{status}: {}", self.log());
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-{CALLER_SPAN_ID}-01")
}

/// The call's span (named `name`, in `trace_id` under the caller's span) with its
/// `preprocess` and `queue` children and a `batch` span linked to it; returns the call's
/// span and the batch's.
fn check_trace(spans: &[(String, Span)], name: &str, trace_id: &str) -> (Span, Span) {
    let shown = || {
        spans
            .iter()
            .map(|(_, s)| format!("{} {}", s.name, hex::encode(&s.trace_id)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let trace = hex::decode(trace_id).expect("hex");
    let caller = hex::decode(CALLER_SPAN_ID).expect("hex");
    let call = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == name && s.trace_id == trace)
        .unwrap_or_else(|| panic!("no {name} span in the caller's trace among:\n{}", shown()))
        .clone();
    assert_eq!(
        call.parent_span_id, caller,
        "the caller's span is its parent"
    );
    assert_eq!(call.kind, SpanKind::Server as i32);
    for child in ["preprocess", "queue"] {
        assert!(
            spans.iter().any(|(_, s)| s.name == child
                && s.trace_id == trace
                && s.parent_span_id == call.span_id),
            "no {child} span under the call among:\n{}",
            shown()
        );
    }
    let batch = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| {
            s.name == "batch"
                && s.links
                    .iter()
                    .any(|l| l.trace_id == trace && l.span_id == call.span_id)
        })
        .unwrap_or_else(|| panic!("no batch span links to the call among:\n{}", shown()))
        .clone();
    assert_ne!(batch.trace_id, trace, "a batch is a trace of its own");
    (call, batch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classify_call_joins_the_callers_trace_and_its_batch_links_to_it() {
    let (collector, received) = receiver().await;
    let mut server = Served::start(|c| {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"));
    });
    let (client, model) = server.ready().await;
    let mut request = client.request(ClassifyRequest {
        model: String::new(),
        images: vec![tensor(&vec![0.25f32; 3 * 224 * 224])],
        output: Some(Output::TopK(1).spec()),
        request_id: String::new(),
    });
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", traceparent(TRACE_ID).parse().expect("ascii"));
    metadata.insert("tracestate", "vendor=opaque".parse().expect("ascii"));
    metadata.insert("x-request-id", "otlp-classify-1".parse().expect("ascii"));
    let reply = client.stub().classify(request).await.expect("classified");
    assert_eq!(
        reply
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("otlp-classify-1")
    );
    assert!(
        received.spans().is_empty(),
        "nothing goes out before the batch processor's delay or the shutdown flush"
    );
    server.stop();

    let spans = received.spans();
    let (call, batch) = check_trace(&spans, "resnet_serve.v1.Classifier/Classify", TRACE_ID);
    assert!(
        spans.iter().all(|(service, _)| service == "resnet-serve"),
        "the default service name"
    );
    assert_eq!(
        string(&call.attributes, "request_id").as_deref(),
        Some("otlp-classify-1")
    );
    assert_eq!(string(&call.attributes, "model"), Some(model.clone()));
    assert_eq!(int(&call.attributes, "rpc.grpc.status_code"), Some(0));
    assert_eq!(
        string(&call.attributes, "rpc.method").as_deref(),
        Some("Classify")
    );
    assert_eq!(string(&batch.attributes, "model"), Some(model));
    assert_eq!(int(&batch.attributes, "batch_size"), Some(1));
    assert_eq!(int(&batch.attributes, "padded_size"), Some(1));
    // The worker's log line for that batch names the request.
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("batch") && l.contains("requests=otlp-classify-1")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kserve_call_joins_the_callers_trace_through_the_flag() {
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let (collector, received) = receiver().await;
    let mut server = Served::start(|c| {
        c.args(["--otlp-endpoint", &format!("http://{collector}")])
            .env("OTEL_SERVICE_NAME", "classifier-east");
    });
    let (client, model) = server.ready().await;
    let values = vec![0.5f32; 3 * 224 * 224];
    let mut request = client.request(ModelInferRequest {
        model_name: model.clone(),
        id: "from-the-body".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![2, 3, 224, 224],
            ..Default::default()
        }],
        raw_input_contents: vec![values
            .iter()
            .chain(values.iter())
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()],
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", traceparent(TRACE).parse().expect("ascii"));
    metadata.insert("x-request-id", "otlp-kserve-1".parse().expect("ascii"));
    let reply = client
        .kserve_stub()
        .model_infer(request)
        .await
        .expect("inferred");
    assert_eq!(
        reply
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("otlp-kserve-1")
    );
    assert_eq!(reply.into_inner().id, "from-the-body");
    // A call with no trace context starts a trace of its own, its id the request's.
    let mut plain = client.request(ModelInferRequest {
        model_name: "no-such-model".into(),
        id: "untraced-7".into(),
        ..Default::default()
    });
    plain
        .metadata_mut()
        .insert("traceparent", "not a traceparent".parse().expect("ascii"));
    let refused = client
        .kserve_stub()
        .model_infer(plain)
        .await
        .expect_err("no such model");
    assert_eq!(refused.code(), tonic::Code::NotFound);
    server.stop();

    let spans = received.spans();
    let (call, batch) = check_trace(&spans, "inference.GRPCInferenceService/ModelInfer", TRACE);
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "classifier-east"),
        "OTEL_SERVICE_NAME names the service"
    );
    assert_eq!(
        string(&call.attributes, "request_id").as_deref(),
        Some("otlp-kserve-1")
    );
    assert_eq!(string(&call.attributes, "model"), Some(model.clone()));
    assert_eq!(int(&call.attributes, "rpc.grpc.status_code"), Some(0));
    assert_eq!(string(&batch.attributes, "model"), Some(model));
    assert_eq!(int(&batch.attributes, "batch_size"), Some(2));
    let untraced = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| string(&s.attributes, "request_id").as_deref() == Some("untraced-7"))
        .expect("the refused call's span");
    assert_ne!(untraced.trace_id, hex::decode(TRACE).expect("hex"));
    assert!(untraced.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        int(&untraced.attributes, "rpc.grpc.status_code"),
        Some(tonic::Code::NotFound as i64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_the_spans_never_a_call() {
    // Nothing listens there.
    let down = format!("http://127.0.0.1:{}", testkit::binary::free_port());
    let mut server = Served::start(|c| {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", &down)
            // Export attempts while serving, not only at the end.
            .env("OTEL_BSP_SCHEDULE_DELAY", "50");
    });
    let (client, _) = server.ready().await;
    for i in 0..3 {
        let mut request = client.request(ClassifyRequest {
            model: String::new(),
            images: vec![tensor(&vec![0.25f32; 3 * 224 * 224])],
            output: Some(Output::TopK(1).spec()),
            request_id: String::new(),
        });
        request
            .metadata_mut()
            .insert("traceparent", traceparent(TRACE_ID).parse().expect("ascii"));
        client
            .stub()
            .classify(request)
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The final flush gives up within its bound rather than holding the exit.
    let started = Instant::now();
    server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "exit took {:?}: {}",
        started.elapsed(),
        server.log()
    );
}
