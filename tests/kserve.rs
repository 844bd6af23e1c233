//! The KServe v2 / Triton protocol end to end: a real server on 127.0.0.1:0 serving a
//! synthetic resnet18 checkpoint, called through our own generated `inference` stubs
//! (the client crate's) and through Python's tritonclient.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use resnet_client::proto::classifier_client::ClassifierClient;
use resnet_client::proto::inference::{
    grpc_inference_service_client::GrpcInferenceServiceClient as KClient,
    infer_parameter::ParameterChoice, model_config::SchedulingChoice,
    model_infer_request::InferRequestedOutputTensor, model_repository_parameter, InferParameter,
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelReadyRequest, ModelRepositoryParameter, ModelStatisticsRequest, RepositoryIndexRequest,
    RepositoryModelLoadRequest, RepositoryModelUnloadRequest, ServerLiveRequest,
    ServerMetadataRequest,
};
use resnet_client::proto::{image, ClassifyRequest, EncodedImage, Image, OutputKind, OutputSpec};
use resnet_serve::model::synthetic;
use resnet_serve::model::Architecture;
use resnet_serve::process::device::Precision;
use resnet_serve::process::placement::Placement;
use resnet_serve::process::server::{self, ModelFactory, ServeOptions};
use resnet_serve::scheduler::{Backend, BatchPolicy};
use resnet_serve::weights::download::Downloader;
use resnet_serve::weights::repository::ModelRepository;
use testkit::backends::{Alive, Tracked};
use testkit::kserve::{f32s, input, raw_f32};
use testkit::TestServer;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const MODEL: &str = "resnet18_ssl";
const IMAGE_LEN: usize = 3 * 224 * 224;

/// How a test server lets clients load models.
#[derive(Clone, Copy, PartialEq)]
enum Control {
    Off,
    /// `--model-control` alone: hub names from the weights cache.
    CacheOnly,
    /// `--model-control --model-repository <dir>/repo`, which holds the served weights.
    Repository,
}

struct KServer {
    server: TestServer,
    /// Replicas loaded through the repository API and not yet freed.
    alive: Arc<Alive>,
    dir: tempfile::TempDir,
}

impl KServer {
    async fn start(model_control: bool) -> KServer {
        Self::start_with(if model_control {
            Control::Repository
        } else {
            Control::Off
        })
        .await
    }

    async fn start_with(control: Control) -> KServer {
        Self::start_options(control, false).await
    }

    /// With `refuse_non_finite`, as `--kserve-refuse-non-finite`.
    async fn start_options(control: Control, refuse_non_finite: bool) -> KServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).expect("mkdir");
        let weights = repo.join("resnet18.safetensors");
        testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
        let alive = Arc::new(Alive::default());
        let placement = Arc::new(Placement {
            devices: vec![Device::Cpu],
            precision: Precision::F32,
            workers: 1,
            warm_sizes: vec![],
            // Nothing is downloaded in these tests: a closed port answers any attempt.
            cache: Downloader::from_env(
                Some(dir.path().join("cache")),
                Some("http://127.0.0.1:9".into()),
            ),
            compute_threads: None,
        });
        let options = ServeOptions {
            policy: BatchPolicy::new(&[1, 2, 4, 8], Duration::from_millis(2), 64).expect("policy"),
            preprocess_threads: 2,
            model_factory: (control != Control::Off).then(|| {
                let repository = (control == Control::Repository)
                    .then(|| Arc::new(ModelRepository::new(&repo).expect("repository")));
                let real = placement.factory(repository);
                let alive = alive.clone();
                ModelFactory(Arc::new(move |name, path| {
                    let replicas = (real.0)(name, path)?;
                    Ok(replicas
                        .into_iter()
                        .map(|inner| Arc::new(Tracked::new(inner, &alive)) as Arc<dyn Backend>)
                        .collect())
                }))
            }),
            // tritonclient_check.py exercises the shared-memory extension.
            shared_memory: true,
            kserve_refuse_non_finite: refuse_non_finite,
            ..ServeOptions::default()
        };
        let loader: server::ModelLoader = Box::new(move || {
            let replicas =
                placement.load(MODEL.parse().map_err(|e| format!("{e}"))?, Some(weights))?;
            Ok(replicas
                .into_iter()
                .map(|b| (MODEL.to_string(), b))
                .collect())
        });
        let server = TestServer::spawn(options, loader).await;
        server.ready().await;
        KServer { server, alive, dir }
    }

    async fn kserve(&self) -> KClient<Channel> {
        self.server.kserve().await
    }

    async fn ours(&self) -> ClassifierClient<Channel> {
        self.server.client().await
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

/// Our API's tensor images for a flat run of `3 x 224 x 224` inputs.
fn tensor_images(values: &[f32]) -> Vec<Image> {
    values
        .chunks_exact(IMAGE_LEN)
        .map(|v| Image {
            kind: Some(image::Kind::Tensor(resnet_client::proto::FloatTensor {
                data: raw_f32(v).into(),
            })),
        })
        .collect()
}

/// An FP32 request for `n` seeded synthetic images.
fn tensor_request(model: &str, seed: u64, n: usize) -> (ModelInferRequest, Vec<f32>) {
    let values = synthetic::input(seed, n, 224);
    (
        ModelInferRequest {
            model_name: model.into(),
            id: format!("req-{seed}"),
            inputs: vec![input("input", "FP32", vec![n as i64, 3, 224, 224])],
            raw_input_contents: vec![raw_f32(&values).into()],
            ..Default::default()
        },
        values,
    )
}

fn output(name: &str, classes: Option<i64>) -> InferRequestedOutputTensor {
    let mut parameters = HashMap::new();
    if let Some(k) = classes {
        parameters.insert(
            "classification".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(k)),
            },
        );
    }
    InferRequestedOutputTensor {
        name: name.into(),
        parameters,
    }
}

fn named_output(r: &ModelInferResponse, name: &str) -> (Vec<i64>, Vec<u8>) {
    let i = r
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"));
    (
        r.outputs[i].shape.clone(),
        r.raw_output_contents[i].to_vec(),
    )
}

/// Our own API's logits for the same images.
async fn classify_logits(server: &KServer, images: Vec<Image>) -> Vec<Vec<f32>> {
    server
        .ours()
        .await
        .classify(ClassifyRequest {
            model: MODEL.into(),
            images,
            output: Some(OutputSpec {
                kind: OutputKind::Logits as i32,
                top_k: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("classify")
        .into_inner()
        .results
        .into_iter()
        .map(|c| c.values)
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    testkit::relative_error(a, b) <= 1e-5
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_rpcs_answer_what_triton_would() {
    let server = KServer::start(false).await;
    let mut c = server.kserve().await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .expect("live")
            .into_inner()
            .live
    );
    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("server metadata")
        .into_inner();
    assert_eq!(meta.name, "resnet-serve");
    for ext in [
        "classification",
        "model_configuration",
        "schedule_policy",
        "statistics",
    ] {
        assert!(meta.extensions.iter().any(|e| e == ext), "{ext}");
    }
    assert!(
        !meta.extensions.iter().any(|e| e == "model_repository"),
        "off unless --model-control"
    );
    let m = c
        .model_metadata(ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("model metadata")
        .into_inner();
    assert_eq!(m.versions, vec!["1"]);
    assert_eq!(
        (
            m.inputs[0].name.as_str(),
            m.inputs[0].datatype.as_str(),
            m.inputs[0].shape.clone()
        ),
        ("input", "FP32", vec![-1, 3, 224, 224])
    );
    let outs: Vec<_> = m
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str(), o.shape.clone()))
        .collect();
    // One output, as Triton's image clients require of a classifier.
    assert_eq!(outs, vec![("logits", "FP32", vec![-1, 1000])]);
    for (view, name, datatype, shape) in [
        ("_frame", "frame", "UINT8", vec![-1, -1, -1, 3]),
        ("_image", "image", "BYTES", vec![-1, 1]),
    ] {
        let m = c
            .model_metadata(ModelMetadataRequest {
                name: format!("{MODEL}{view}"),
                version: "1".into(),
            })
            .await
            .expect("view metadata")
            .into_inner();
        assert_eq!(
            (
                m.inputs[0].name.as_str(),
                m.inputs[0].datatype.as_str(),
                m.inputs[0].shape.clone()
            ),
            (name, datatype, shape)
        );
    }
    let config = testkit::kserve::model_config(&mut c, MODEL).await;
    assert_eq!(
        config.max_batch_size, 64,
        "the per-request image limit (128) bounded by the model's queue (64)"
    );
    assert_eq!(config.input[0].dims, vec![3, 224, 224]);
    assert_eq!(
        config.input[0].format,
        resnet_client::proto::inference::model_input::Format::Nchw as i32
    );
    assert_eq!(config.output.len(), 1);
    assert_eq!(
        (
            config.output[0].name.as_str(),
            config.output[0].dims.clone()
        ),
        ("logits", vec![1000])
    );
    let Some(SchedulingChoice::DynamicBatching(db)) = config.scheduling_choice else {
        panic!("dynamic batching expected");
    };
    assert_eq!(db.preferred_batch_size, vec![1, 2, 4, 8]);
    assert_eq!(db.max_queue_delay_microseconds, 2000);
    assert_eq!((db.priority_levels, db.default_priority_level), (2, 2));
    assert_eq!(config.instance_group[0].count, 1);
    let ready = |name: &str, version: &str| {
        let mut c = c.clone();
        let req = ModelReadyRequest {
            name: name.into(),
            version: version.into(),
        };
        async move { c.model_ready(req).await.expect("ready").into_inner().ready }
    };
    assert!(ready(MODEL, "").await);
    assert!(ready(&format!("{MODEL}_image"), "1").await);
    assert!(!ready("resnet50_swsl", "").await);
    assert!(!ready(MODEL, "2").await);
    let err = c
        .model_metadata(ModelMetadataRequest {
            name: "resnet50_swsl".into(),
            version: String::new(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let stats = c
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.model_stats.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_matches_our_api_for_every_input_kind() {
    let server = KServer::start(false).await;
    let mut c = server.kserve().await;
    // FP32 tensors, raw contents: the same logits as Classify; a request that names no
    // output gets the one listed, the logits.
    let (req, values) = tensor_request(MODEL, 3, 2);
    let r = c.model_infer(req).await.expect("infer").into_inner();
    assert_eq!(r.outputs.len(), 1, "{:?}", r.outputs);
    assert_eq!(
        (
            r.model_name.as_str(),
            r.model_version.as_str(),
            r.id.as_str()
        ),
        (MODEL, "1", "req-3")
    );
    let (shape, raw) = named_output(&r, "logits");
    assert_eq!(shape, vec![2, 1000]);
    let logits = f32s(&raw);
    let images = tensor_images(&values);
    let want = classify_logits(&server, images).await;
    assert!(close(&logits[..1000], &want[0]) && close(&logits[1000..], &want[1]));
    // The probabilities, named though not listed: the softmax of the logits.
    let (mut req, _) = tensor_request(MODEL, 3, 2);
    req.outputs = vec![output("probabilities", None), output("logits", None)];
    let r = c.model_infer(req).await.expect("infer").into_inner();
    let probs = f32s(&named_output(&r, "probabilities").1);
    let sum: f32 = probs[..1000].iter().sum();
    assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    let softmax = resnet_serve::labels::softmax(&logits[..1000]);
    assert!(close(&probs[..1000], &softmax));
    assert_eq!(f32s(&named_output(&r, "logits").1), logits);
    // Typed contents give the same answer.
    let (mut typed, _) = tensor_request(MODEL, 3, 2);
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: values.clone(),
        ..Default::default()
    });
    typed.outputs = vec![output("logits", None)];
    let r = c.model_infer(typed).await.expect("typed").into_inner();
    assert_eq!(r.outputs.len(), 1, "only the requested output");
    assert!(close(&f32s(&r.raw_output_contents[0])[..1000], &want[0]));

    // BYTES: encoded images, as our API's encoded input.
    let jpeg = std::fs::read(testkit::fixture("images/chelsea_q90.jpg")).expect("fixture");
    let mut raw = Vec::new();
    for _ in 0..2 {
        raw.extend_from_slice(&(jpeg.len() as u32).to_le_bytes());
        raw.extend_from_slice(&jpeg);
    }
    let r = c
        .model_infer(ModelInferRequest {
            model_name: format!("{MODEL}_image"),
            inputs: vec![input("image", "BYTES", vec![2, 1])],
            outputs: vec![output("logits", None)],
            raw_input_contents: vec![raw.into()],
            ..Default::default()
        })
        .await
        .expect("bytes")
        .into_inner();
    let want = classify_logits(
        &server,
        vec![Image {
            kind: Some(image::Kind::Encoded(EncodedImage { data: jpeg.into() })),
        }],
    )
    .await;
    let got = f32s(&r.raw_output_contents[0]);
    assert!(close(&got[..1000], &want[0]) && close(&got[1000..], &want[0]));

    // UINT8 frames.
    let frame: Vec<u8> = (0..40 * 30 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let r = c
        .model_infer(ModelInferRequest {
            model_name: format!("{MODEL}_frame"),
            inputs: vec![input("frame", "UINT8", vec![1, 30, 40, 3])],
            outputs: vec![output("logits", None)],
            raw_input_contents: vec![frame.clone().into()],
            ..Default::default()
        })
        .await
        .expect("frame")
        .into_inner();
    let want = classify_logits(
        &server,
        vec![Image {
            kind: Some(image::Kind::Raw(resnet_client::proto::RawFrame {
                width: 40,
                height: 30,
                rgb: frame.into(),
            })),
        }],
    )
    .await;
    assert!(close(&f32s(&r.raw_output_contents[0]), &want[0]));

    // The classification extension: "score:index:label", best first.
    let (mut req, _) = tensor_request(MODEL, 3, 2);
    req.outputs = vec![output("logits", Some(3))];
    let r = c
        .model_infer(req)
        .await
        .expect("classification")
        .into_inner();
    assert_eq!(
        (r.outputs[0].datatype.as_str(), r.outputs[0].shape.clone()),
        ("BYTES", vec![2, 3])
    );
    let raw = &r.raw_output_contents[0];
    let len = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    let first = String::from_utf8_lossy(&raw[4..4 + len]).to_string();
    let parts: Vec<&str> = first.splitn(3, ':').collect();
    let best = logits[..1000]
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    assert_eq!(parts[1], best.0.to_string(), "{first}");
    assert!(
        (parts[0].parse::<f32>().expect("score") - best.1).abs() < 1e-5,
        "{first}"
    );
    assert_eq!(parts[2], resnet_serve::labels::label(best.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_codes_triton_clients_expect() {
    let server = KServer::start(false).await;
    let mut c = server.kserve().await;
    let code = |req: ModelInferRequest| {
        let mut c = c.clone();
        async move { c.model_infer(req).await.expect_err("must fail") }
    };
    let (mut wrong_type, _) = tensor_request(MODEL, 1, 1);
    wrong_type.inputs[0].datatype = "FP16".into();
    let e = code(wrong_type).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("datatype FP16, expected FP32"),
        "{}",
        e.message()
    );
    let (mut wrong_shape, _) = tensor_request(MODEL, 1, 1);
    wrong_shape.inputs[0].shape = vec![1, 224, 224, 3];
    assert_eq!(code(wrong_shape).await.code(), Code::InvalidArgument);
    let (mut short, _) = tensor_request(MODEL, 1, 2);
    short.raw_input_contents[0].truncate(IMAGE_LEN * 4);
    let e = code(short).await;
    assert!(
        e.message().contains("needs 1204224 bytes"),
        "{}",
        e.message()
    );
    let (mut wrong_name, _) = tensor_request(MODEL, 1, 1);
    wrong_name.inputs[0].name = "INPUT__0".into();
    assert_eq!(code(wrong_name).await.code(), Code::InvalidArgument);
    let (mut bad_output, _) = tensor_request(MODEL, 1, 1);
    bad_output.outputs = vec![output("OUTPUT__0", None)];
    assert_eq!(code(bad_output).await.code(), Code::InvalidArgument);
    let (mut too_many_classes, _) = tensor_request(MODEL, 1, 1);
    too_many_classes.outputs = vec![output("logits", Some(1001))];
    assert_eq!(code(too_many_classes).await.code(), Code::InvalidArgument);
    let (unknown, _) = tensor_request("resnet50_swsl", 1, 1);
    assert_eq!(code(unknown).await.code(), Code::NotFound);
    let (mut version, _) = tensor_request(MODEL, 1, 1);
    version.model_version = "3".into();
    assert_eq!(code(version).await.code(), Code::NotFound);
    let (mut priority, _) = tensor_request(MODEL, 1, 1);
    priority.parameters.insert(
        "priority".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Uint64Param(7)),
        },
    );
    assert_eq!(code(priority).await.code(), Code::InvalidArgument);
    // The `timeout` parameter (microseconds) is a deadline like grpc-timeout.
    let (mut timeout, _) = tensor_request(MODEL, 1, 1);
    timeout.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(1)),
        },
    );
    assert_eq!(code(timeout).await.code(), Code::DeadlineExceeded);
    // More images than the queue holds (64): refused whole, at once, as no retry could
    // be queued.
    let frames = vec![0u8; 65 * 4 * 4 * 3];
    let flood = ModelInferRequest {
        model_name: format!("{MODEL}_frame"),
        inputs: vec![input("frame", "UINT8", vec![65, 4, 4, 3])],
        raw_input_contents: vec![frames.into()],
        ..Default::default()
    };
    let e = code(flood).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 64 images"), "{}", e.message());
    // A high-priority request is served like any other.
    let (mut urgent, _) = tensor_request(MODEL, 1, 1);
    urgent.parameters.insert(
        "priority".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(1)),
        },
    );
    c.model_infer(urgent).await.expect("priority 1");
    // Repository control is off by default.
    let e = c
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "resnet50_swsl".into(),
            ..Default::default()
        })
        .await
        .expect_err("disabled");
    assert_eq!(e.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_infer_answers_in_order_with_errors_per_response() {
    let server = KServer::start(false).await;
    let mut c = server.kserve().await;
    let (good1, _) = tensor_request(MODEL, 1, 1);
    let (mut bad, _) = tensor_request(MODEL, 2, 1);
    bad.inputs[0].shape = vec![1, 3, 10, 10];
    let (good2, _) = tensor_request(MODEL, 3, 2);
    let requests = tokio_stream::iter(vec![good1, bad, good2]);
    let mut responses = c
        .model_stream_infer(requests)
        .await
        .expect("stream")
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = responses.next().await {
        got.push(r.expect("message"));
    }
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0].infer_response.as_ref().map(|r| r.id.as_str()),
        Some("req-1")
    );
    assert!(got[1].infer_response.is_none());
    assert!(
        got[1].error_message.contains("must have shape"),
        "{}",
        got[1].error_message
    );
    let third = got[2].infer_response.as_ref().expect("third");
    assert_eq!(
        (third.id.as_str(), named_output(third, "logits").0),
        ("req-3", vec![2, 1000])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_count_what_was_sent() {
    let server = KServer::start(false).await;
    let mut c = server.kserve().await;
    for (seed, n) in [(1, 1), (2, 3), (3, 2)] {
        let (req, _) = tensor_request(MODEL, seed, n);
        c.model_infer(req).await.expect("infer");
    }
    let (mut bad, _) = tensor_request(MODEL, 9, 1);
    bad.inputs[0].datatype = "INT8".into();
    c.model_infer(bad).await.expect_err("bad");
    let s = c
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("stats")
        .into_inner()
        .model_stats
        .remove(0);
    let is = s.inference_stats.expect("inference stats");
    let count = |d: Option<resnet_client::proto::inference::StatisticDuration>| {
        d.map(|d| (d.count, d.ns > 0))
    };
    assert_eq!(count(is.success), Some((3, true)));
    assert_eq!(count(is.fail), Some((1, true)));
    assert_eq!(s.inference_count, 6, "images computed");
    assert_eq!(count(is.compute_infer), Some((6, true)));
    // Gathering the batch's images is its input time, apart from the forward pass.
    assert_eq!(count(is.compute_input), Some((6, true)));
    assert_eq!(is.queue.map(|d| d.count), Some(6));
    let executions: u64 = s
        .batch_stats
        .iter()
        .map(|b| b.compute_infer.as_ref().map_or(0, |d| d.count))
        .sum();
    assert_eq!(executions, s.execution_count);
    assert!(
        s.execution_count >= 3 && s.execution_count <= 6,
        "{}",
        s.execution_count
    );
    assert!(s
        .batch_stats
        .iter()
        .all(|b| [1, 2, 4, 8].contains(&b.batch_size)));
    assert!(s.last_inference > 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_load_and_unload_at_run_time_when_allowed() {
    let server = KServer::start(true).await;
    let mut c = server.kserve().await;
    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("meta")
        .into_inner();
    assert!(meta.extensions.iter().any(|e| e == "model_repository"));
    let index = c
        .repository_index(RepositoryIndexRequest::default())
        .await
        .expect("index")
        .into_inner()
        .models;
    let state = |name: &str| {
        index
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.state.clone())
    };
    assert_eq!(state(MODEL).as_deref(), Some("READY"));
    assert_eq!(state(&format!("{MODEL}_image")).as_deref(), Some("READY"));
    assert_eq!(state("resnet18_swsl").as_deref(), Some("UNAVAILABLE"));
    // Load another name from a file in the model repository.
    c.repository_model_load(load_file("resnet18_swsl", "resnet18.safetensors"))
        .await
        .expect("load");
    let (req, _) = tensor_request("resnet18_swsl", 4, 1);
    c.model_infer(req).await.expect("served after load");
    assert_eq!(server.alive.count(), 1);
    // From the cache, which has nothing and cannot download here: a clear error.
    let e = c
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "resnet50_ssl".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing to load");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("resnet50_ssl"), "{}", e.message());
    let e = c
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "resnet34".into(),
            ..Default::default()
        })
        .await
        .expect_err("not a hub name");
    assert_eq!(e.code(), Code::NotFound);
    // Unload: gone from the index's ready list, inference NOT_FOUND.
    c.repository_model_unload(RepositoryModelUnloadRequest {
        model_name: "resnet18_swsl".into(),
        ..Default::default()
    })
    .await
    .expect("unload");
    let ready = c
        .model_ready(ModelReadyRequest {
            name: "resnet18_swsl".into(),
            version: String::new(),
        })
        .await
        .expect("ready")
        .into_inner()
        .ready;
    assert!(!ready);
    let (req, _) = tensor_request("resnet18_swsl", 4, 1);
    assert_eq!(
        c.model_infer(req).await.expect_err("unloaded").code(),
        Code::NotFound
    );
    let e = c
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "resnet18_swsl".into(),
            ..Default::default()
        })
        .await
        .expect_err("twice");
    assert_eq!(e.code(), Code::NotFound);
    let ready_only = c
        .repository_index(RepositoryIndexRequest {
            ready: true,
            ..Default::default()
        })
        .await
        .expect("index")
        .into_inner()
        .models;
    assert_eq!(ready_only.len(), 3, "resnet18_ssl and its two views");
    server.stop().await;
}

/// A RepositoryModelLoad of `model` from `file` in the model repository.
fn load_file(model: &str, file: &str) -> RepositoryModelLoadRequest {
    load_with(model, "file", file)
}

fn load_with(model: &str, key: &str, value: &str) -> RepositoryModelLoadRequest {
    let mut parameters = HashMap::new();
    parameters.insert(
        key.to_string(),
        ModelRepositoryParameter {
            parameter_choice: Some(model_repository_parameter::ParameterChoice::StringParam(
                value.to_string(),
            )),
        },
    );
    RepositoryModelLoadRequest {
        model_name: model.into(),
        parameters,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_control_reads_only_the_repository_and_only_by_file_name() {
    let server = KServer::start(true).await;
    let mut c = server.kserve().await;
    let root = server.dir.path();
    let repo = root.join("repo");
    // Outside the repository: a valid checkpoint, reached by a link from inside.
    let outside = root.join("outside.safetensors");
    std::fs::copy(repo.join("resnet18.safetensors"), &outside).expect("copy");
    std::os::unix::fs::symlink(&outside, repo.join("escape.safetensors")).expect("link");
    std::os::unix::fs::symlink("/etc/passwd", repo.join("passwd")).expect("link");
    std::fs::create_dir(repo.join("subdir")).expect("mkdir");
    let root_text = root.display().to_string();
    let hides_the_server = |message: &str| {
        !message.contains(&root_text)
            && !["such file", "directory", "denied", "os error"]
                .iter()
                .any(|w| message.to_lowercase().contains(w))
    };
    // Paths, and anything but a plain name, are refused as names.
    let outside_text = outside.display().to_string();
    for name in [
        "../outside.safetensors",
        "/etc/passwd",
        outside_text.as_str(),
        ".hidden",
        "a\\b",
        "nul\0byte",
        "",
    ] {
        let e = c
            .repository_model_load(load_file("resnet18_swsl", name))
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {}", e.message());
        assert!(
            e.message().contains("is not a model file name"),
            "{name}: {}",
            e.message()
        );
    }
    // Missing, a directory, a link leading out: one message, naming only the name.
    for name in [
        "missing.safetensors",
        "subdir",
        "escape.safetensors",
        "passwd",
    ] {
        let e = c
            .repository_model_load(load_file("resnet18_swsl", name))
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::InvalidArgument, "{name}");
        assert_eq!(
            e.message(),
            format!("loading resnet18_swsl: model file '{name}' not found in the model repository")
        );
    }
    // A hostile file inside is refused by its sizes, at once, naming only the file.
    let mut header = (1u64 << 40).to_le_bytes().to_vec();
    header.extend_from_slice(b"{}");
    std::fs::write(repo.join("huge_header.safetensors"), header).expect("write");
    let started = std::time::Instant::now();
    let e = c
        .repository_model_load(load_file("resnet18_swsl", "huge_header.safetensors"))
        .await
        .expect_err("hostile");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("huge_header.safetensors: checkpoint safetensors header of")
            && e.message().contains("exceeds"),
        "{}",
        e.message()
    );
    assert!(hides_the_server(e.message()), "{}", e.message());
    // A 1 MiB checkpoint whose storage inflates to 1 GiB: refused from its sizes.
    testkit::fixtures::write_zip_bomb(&repo.join("bomb.pth"));
    let before = testkit::wait::peak_rss();
    let started = std::time::Instant::now();
    let e = c
        .repository_model_load(load_file("resnet18_swsl", "bomb.pth"))
        .await
        .expect_err("bomb");
    let took = started.elapsed();
    let grew = testkit::wait::peak_rss().saturating_sub(before);
    eprintln!(
        "zip bomb refused through RepositoryModelLoad in {took:?}; peak RSS grew {grew} bytes"
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("loading resnet18_swsl: bomb.pth: checkpoint storage")
            && e.message().contains("exceeds")
            && e.message().contains("resnet18 can hold"),
        "{}",
        e.message()
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(grew < 64 << 20, "peak RSS grew {grew} bytes");
    // A path parameter is not a thing; long strings come back cut short.
    let e = c
        .repository_model_load(load_with("resnet18_swsl", "path", &outside_text))
        .await
        .expect_err("path");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("'file'"), "{}", e.message());
    let long = "x".repeat(100_000);
    for request in [
        load_file("resnet18_swsl", &long),
        load_file(&long, "resnet18.safetensors"),
        load_with("resnet18_swsl", &long, "x"),
    ] {
        let e = c.repository_model_load(request).await.expect_err("long");
        assert!(e.message().len() < 1000, "{}", e.message().len());
        assert!(e.message().contains("…"), "{}", e.message());
    }
    let e = c
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: long.clone(),
            ..Default::default()
        })
        .await
        .expect_err("long");
    assert!(e.message().len() < 1000, "{}", e.message().len());
    // What is in the repository loads, by name.
    c.repository_model_load(load_file("resnet18_swsl", "resnet18.safetensors"))
        .await
        .expect("load");
    let (req, _) = tensor_request("resnet18_swsl", 4, 1);
    c.model_infer(req).await.expect("served after load");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_control_without_a_repository_names_no_files() {
    let server = KServer::start_with(Control::CacheOnly).await;
    let mut c = server.kserve().await;
    let e = c
        .repository_model_load(load_file("resnet18_swsl", "resnet18.safetensors"))
        .await
        .expect_err("no repository");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("no --model-repository"),
        "{}",
        e.message()
    );
    // By hub name from the cache, which is empty and cannot download here: the reason
    // stays in the server's log, with the cache's paths.
    let e = c
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "resnet50_ssl".into(),
            ..Default::default()
        })
        .await
        .expect_err("nothing to load");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("resnet50_ssl"), "{}", e.message());
    assert!(
        !e.message()
            .contains(&server.dir.path().display().to_string()),
        "{}",
        e.message()
    );
    assert_eq!(server.alive.count(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_drives_the_server() {
    let server = KServer::start(false).await;
    // Reference logits for what the script sends, from our own API.
    let values = synthetic::input(11, 2, 224);
    let images = tensor_images(&values);
    let want = classify_logits(&server, images).await;
    let jpeg_path = testkit::fixture("images/chelsea_q90.jpg");
    let jpeg_want = classify_logits(
        &server,
        vec![Image {
            kind: Some(image::Kind::Encoded(EncodedImage {
                data: std::fs::read(&jpeg_path).expect("fixture").into(),
            })),
        }],
    )
    .await;
    let dir = server.dir.path();
    std::fs::write(dir.join("input.f32"), raw_f32(&values)).expect("write");
    std::fs::write(dir.join("logits.f32"), raw_f32(&want.concat())).expect("write");
    std::fs::write(dir.join("jpeg_logits.f32"), raw_f32(&jpeg_want[0])).expect("write");
    let out = testkit::python::run(
        "tritonclient_check.py",
        &server.server.url,
        MODEL,
        [
            OsString::from("--data"),
            dir.into(),
            "--jpeg".into(),
            jpeg_path.into(),
        ],
    )
    .await;
    let text = out.text;
    assert!(out.success, "tritonclient checks failed:\n{text}");
    assert!(text.contains("all tritonclient checks passed"), "{text}");
    assert!(
        text.contains("ok: shared-memory logits match Classify"),
        "{text}"
    );
    server.stop().await;
}

/// The elements of a raw BYTES tensor (each a little-endian u32 length, then its bytes).
fn byte_elements(raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= raw.len() {
        let len = u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]) as usize;
        out.push(String::from_utf8_lossy(&raw[at + 4..at + 4 + len]).to_string());
        at += 4 + len;
    }
    out
}

/// `resnet_serve_kserve_nonfinite_inputs_total` for the test model (0 when absent).
async fn non_finite_count(server: &KServer) -> f64 {
    let series = format!("resnet_serve_kserve_nonfinite_inputs_total{{model=\"{MODEL}\"}}");
    testkit::metrics::series(&server.server.metrics().await, &series).unwrap_or(0.0)
}

/// A request for 2 seeded images, image 1 holding a NaN and infinities.
fn non_finite_request() -> (ModelInferRequest, Vec<f32>) {
    let (mut req, values) = tensor_request(MODEL, 4, 2);
    let mut raw = req.raw_input_contents[0].to_vec();
    for (element, v) in [
        (3, f32::NAN),
        (100, f32::NEG_INFINITY),
        (IMAGE_LEN - 1, f32::INFINITY),
    ] {
        let at = 4 * (IMAGE_LEN + element);
        raw[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    req.raw_input_contents[0] = raw.into();
    (req, values)
}

/// Triton computes FP32 inputs holding NaN or infinity as they are (perf_analyzer's
/// random data holds such bit patterns); so does KServe here, counting them, unless the
/// operator asks for refusal. Our own API refuses them either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_inputs_are_computed_as_triton_does_unless_refused() {
    let server = KServer::start(false).await;
    let mut c = server.kserve().await;
    assert_eq!(non_finite_count(&server).await, 0.0);
    let (mut req, values) = non_finite_request();
    req.outputs = vec![output("logits", None), output("probabilities", Some(3))];
    let r = c
        .model_infer(req)
        .await
        .expect("computed, as Triton does")
        .into_inner();
    let logits = f32s(&named_output(&r, "logits").1);
    assert_eq!(logits.len(), 2000);
    // Image 0's logits owe nothing to its neighbour in the batch.
    let want = classify_logits(&server, tensor_images(&values[..IMAGE_LEN])).await;
    assert!(close(&logits[..1000], &want[0]));
    // Image 1's own row is finite (and meaningless): the CPU kernels' ReLU, max(x, 0),
    // turns NaN into 0, as ONNX Runtime's MLAS and CUDA's fmaxf do (README, KServe).
    let bad = logits[1000..].iter().filter(|v| !v.is_finite()).count();
    assert_eq!(
        bad, 0,
        "image 1's row holds {bad} values that are not finite"
    );
    let (shape, raw) = named_output(&r, "probabilities");
    assert_eq!(shape, vec![2, 3]);
    let classes = byte_elements(&raw);
    assert_eq!(classes.len(), 6);
    for class in &classes {
        let parts: Vec<&str> = class.splitn(3, ':').collect();
        assert!(
            parts.len() == 3
                && parts[0].parse::<f32>().is_ok()
                && parts[1].parse::<usize>().is_ok_and(|i| i < 1000)
                && !parts[2].is_empty(),
            "{class}"
        );
    }
    assert_eq!(non_finite_count(&server).await, 1.0);

    // Random bit patterns in every image, as perf_analyzer sends with its defaults.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..2 * IMAGE_LEN * 4)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect();
    let (mut req, _) = tensor_request(MODEL, 1, 2);
    req.raw_input_contents[0] = random.into();
    let r = c.model_infer(req).await.expect("random bits").into_inner();
    assert_eq!(named_output(&r, "logits").0, vec![2, 1000]);
    assert_eq!(non_finite_count(&server).await, 3.0);

    // Our own API keeps refusing them.
    let err = server
        .ours()
        .await
        .classify(ClassifyRequest {
            model: MODEL.into(),
            images: tensor_images(&{
                let mut v = values[..IMAGE_LEN].to_vec();
                v[9] = f32::NAN;
                v
            }),
            ..Default::default()
        })
        .await
        .expect_err("Classify refuses NaN");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("element 9"), "{}", err.message());
    server.stop().await;

    // --kserve-refuse-non-finite: refused as Classify refuses them, and not counted.
    let server = KServer::start_options(Control::Off, true).await;
    let mut c = server.kserve().await;
    let e = c
        .model_infer(non_finite_request().0)
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("image 1: float tensor holds a NaN or infinite value at element 3"),
        "{}",
        e.message()
    );
    assert_eq!(non_finite_count(&server).await, 0.0);
    server.stop().await;
}

/// What a generic Triton image client (Triton's image_client.py) relies on, checked by
/// tests/kserve/triton_image_client_contract.py with tritonclient: one FP32 NCHW input,
/// one output, a batch of 2 and the classification extension's `score:index:label`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triton_image_client_takes_the_model_as_an_image_classifier() {
    let server = KServer::start(false).await;
    let values = synthetic::input(12, 2, 224);
    let want = classify_logits(&server, tensor_images(&values)).await;
    let dir = server.dir.path();
    std::fs::write(dir.join("input.f32"), raw_f32(&values)).expect("write");
    std::fs::write(dir.join("logits.f32"), raw_f32(&want.concat())).expect("write");
    let out = testkit::python::run(
        "triton_image_client_contract.py",
        &server.server.url,
        MODEL,
        [OsString::from("--data"), dir.into()],
    )
    .await;
    let text = out.text;
    assert!(out.success, "image client contract failed:\n{text}");
    assert!(text.contains("image client contract holds"), "{text}");
    server.stop().await;
}
