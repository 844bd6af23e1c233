//! The gRPC server end to end: a real server on 127.0.0.1:0 serving the synthetic
//! resnet18, called through the generated client of the `resnet-client` crate.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use resnet_client::proto::{
    image, stream_result, ClassifyRequest, EncodedImage, FloatTensor, GetModelRequest, Image,
    ListModelsRequest, OutputKind, OutputSpec, RawFrame, StreamFrame,
};
use resnet_serve::model::synthetic;
use resnet_serve::model::Classifier;
use resnet_serve::preprocess::{Input, Preprocessor, INPUT_LEN};
use resnet_serve::process::server::ServeOptions;
use resnet_serve::scheduler::Backend;
use testkit::backends::{Gated, PanicOnce};
use testkit::server::health;
use testkit::wait::eventually;
use testkit::{TestServer, MODEL};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

fn model() -> Arc<Classifier> {
    testkit::resnet18()
}

fn options(sizes: &[usize], delay_ms: u64, capacity: usize) -> ServeOptions {
    ServeOptions {
        drain_timeout: Duration::from_secs(20),
        ..testkit::server::options(sizes, delay_ms, capacity)
    }
}

fn encoded(name: &str) -> Image {
    let data = testkit::fixtures::image_bytes(name);
    Image {
        kind: Some(image::Kind::Encoded(EncodedImage { data: data.into() })),
    }
}

fn tensor_image(seed: u64) -> (Image, Vec<f32>) {
    let values = synthetic::input(seed, 1, 224);
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    (
        Image {
            kind: Some(image::Kind::Tensor(FloatTensor { data })),
        },
        values,
    )
}

fn logits_request(images: Vec<Image>) -> ClassifyRequest {
    ClassifyRequest {
        model: String::new(),
        images,
        output: Some(OutputSpec {
            kind: OutputKind::Logits as i32,
            top_k: 0,
        }),
        request_id: String::new(),
    }
}

/// In-process logits of one preprocessed input, alone in a batch of one.
fn alone(input: &[f32]) -> Vec<f32> {
    model().classify(input, 1).expect("forward").remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_returns_what_the_model_computes_for_every_input_kind() {
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), model()).await;
    let mut client = server.client().await;
    let pre = Preprocessor::default();
    let png = testkit::fixtures::image_bytes("coffee.png");
    let rgb =
        resnet_serve::preprocess::decode::decode_rgb8(&png, &Default::default()).expect("decode");
    let (tensor, values) = tensor_image(11);
    let images = vec![
        encoded("coffee.png"),
        Image {
            kind: Some(image::Kind::Raw(RawFrame {
                width: rgb.width(),
                height: rgb.height(),
                rgb: rgb.as_raw().clone().into(),
            })),
        },
        tensor,
    ];
    let mut req = logits_request(images);
    req.request_id = "my-id".into();
    let resp = client.classify(req).await.expect("classify").into_inner();
    assert_eq!(resp.model, MODEL);
    assert_eq!(resp.request_id, "my-id");
    let png_input = pre
        .prepare(Input::Encoded(&png))
        .expect("pre")
        .into_values();
    let want = [alone(&png_input), alone(&png_input), alone(&values)];
    for (i, (got, want)) in resp.results.iter().zip(&want).enumerate() {
        let err = testkit::relative_error(&got.values, want);
        assert!(err <= 1e-5, "image {i}: {err:e}");
    }

    // Top-k and probabilities.
    let mut req = logits_request(vec![encoded("rocket.jpg")]);
    req.output = Some(OutputSpec {
        kind: OutputKind::TopK as i32,
        top_k: 3,
    });
    let top = client
        .classify(req)
        .await
        .expect("topk")
        .into_inner()
        .results
        .remove(0)
        .top;
    assert_eq!(top.len(), 3);
    assert!(top[0].score >= top[1].score && !top[0].label.is_empty());
    let mut req = logits_request(vec![encoded("rocket.jpg")]);
    req.output = Some(OutputSpec {
        kind: OutputKind::Probabilities as i32,
        top_k: 0,
    });
    let probs = client
        .classify(req)
        .await
        .expect("probs")
        .into_inner()
        .results
        .remove(0)
        .values;
    assert_eq!(probs.len(), 1000);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_coalesce_into_batches_with_unchanged_results() {
    // A generous delay: eight requests sent together must share batches.
    let server = TestServer::start(options(&[1, 2, 4, 8], 200, 64), model()).await;
    let mut tasks = Vec::new();
    for seed in 0..8u64 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let (img, values) = tensor_image(100 + seed);
            let got = client
                .classify(logits_request(vec![img]))
                .await
                .expect("classify")
                .into_inner();
            (got.results[0].values.clone(), values)
        }));
    }
    for t in tasks {
        let (got, input) = t.await.expect("task");
        let err = testkit::relative_error(&got, &alone(&input));
        assert!(err <= 1e-5, "batched result differs from alone: {err:e}");
    }
    let batches = server.metric("resnet_serve_batches_total{").await;
    let slots = server.metric("resnet_serve_batch_slots_total{").await;
    let padded = server.metric("resnet_serve_padded_slots_total{").await;
    assert!(
        batches < 8.0,
        "8 concurrent requests ran in {batches} batches"
    );
    assert_eq!(slots - padded, 8.0, "every image computed exactly once");
    let text = server.metrics().await;
    assert!(
        text.contains("resnet_serve_batch_size_bucket"),
        "batch size histogram exported"
    );
    assert!(text.contains("resnet_serve_queue_duration_seconds_bucket"));
    assert!(text.contains("resnet_serve_compute_duration_seconds_bucket"));
    assert!(
        text.contains(
            "resnet_serve_requests_total{code=\"OK\",model=\"resnet18_swsl\",rpc=\"Classify\"} 8"
        ),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_largest_batch_is_split_and_reassembled_in_order() {
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), model()).await;
    let mut client = server.client().await;
    let (images, inputs): (Vec<_>, Vec<_>) = (0..11u64).map(|s| tensor_image(200 + s)).unzip();
    let resp = client
        .classify(logits_request(images))
        .await
        .expect("classify")
        .into_inner();
    assert_eq!(resp.results.len(), 11);
    for (i, (r, input)) in resp.results.iter().zip(&inputs).enumerate() {
        assert!(
            testkit::relative_error(&r.values, &alone(input)) <= 1e-5,
            "image {i} out of order or wrong"
        );
    }
    assert!(server.metric("resnet_serve_batches_total{").await >= 3.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_answers_in_order_with_per_frame_errors() {
    let server = TestServer::start(options(&[1, 2, 4], 2, 64), model()).await;
    let mut client = server.client().await;
    let mut frames = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..12u64 {
        let image = if i % 5 == 3 {
            inputs.push(None);
            Image {
                kind: Some(image::Kind::Encoded(EncodedImage {
                    data: b"definitely not an image".to_vec().into(),
                })),
            }
        } else {
            let (img, values) = tensor_image(300 + i);
            inputs.push(Some(values));
            img
        };
        frames.push(StreamFrame {
            frame_id: 1000 + i,
            model: if i == 0 { MODEL.into() } else { String::new() },
            image: Some(image),
            output: Some(OutputSpec {
                kind: OutputKind::Logits as i32,
                top_k: 0,
            }),
        });
    }
    let mut responses = client
        .classify_stream(tokio_stream::iter(frames))
        .await
        .expect("stream")
        .into_inner();
    let mut n = 0;
    while let Some(r) = responses.message().await.expect("message") {
        let i = n;
        assert_eq!(
            r.frame_id,
            1000 + i as u64,
            "responses come back in send order"
        );
        match (&r.outcome, &inputs[i]) {
            (Some(stream_result::Outcome::Result(c)), Some(input)) => {
                assert!(
                    testkit::relative_error(&c.values, &alone(input)) <= 1e-5,
                    "frame {i}"
                );
            }
            (Some(stream_result::Outcome::Error(e)), None) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert!(
                    e.message.contains("unrecognised image format"),
                    "{}",
                    e.message
                );
            }
            other => panic!("frame {i}: unexpected {other:?}"),
        }
        n += 1;
    }
    assert_eq!(n, 12);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_stream_producer_is_slowed_not_buffered() {
    let gate = gated();
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), gate.clone()).await;
    let mut client = server.client().await;
    let pulled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = pulled.clone();
    let frames = tokio_stream::iter(0..80u64).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        StreamFrame {
            frame_id: i,
            model: String::new(),
            image: Some(tensor_image(i).0),
            output: None,
        }
    });
    let mut responses = client
        .classify_stream(frames)
        .await
        .expect("stream")
        .into_inner();
    gate.entered().await;
    // The worker is held: the server must stop reading after a bounded window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read_while_blocked = pulled.load(Ordering::SeqCst);
    assert!(
        read_while_blocked < 30,
        "{read_while_blocked} of 80 frames pulled while the model was blocked"
    );
    gate.open();
    let mut n = 0u64;
    while let Some(r) = responses.message().await.expect("message") {
        assert_eq!(r.frame_id, n);
        assert!(
            matches!(r.outcome, Some(stream_result::Outcome::Result(_))),
            "frame {n}: {r:?}"
        );
        n += 1;
    }
    assert_eq!(n, 80);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_is_no_longer_in_flight() {
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), model()).await;
    // A bare HTTP/2 client, so the call can be reset as a client that goes away resets it.
    let (response, mut send) =
        testkit::wire::bare_call(&server.url, "/resnet_serve.v1.Classifier/ClassifyStream").await;
    let frame = StreamFrame {
        frame_id: 0,
        model: String::new(),
        image: Some(tensor_image(0).0),
        output: None,
    };
    send.send_data(testkit::wire::grpc_body(&frame), false)
        .expect("frame");
    let mut body = response.await.expect("response").into_body();
    let first = body.data().await.expect("a result").expect("data");
    assert!(first.len() > 5, "the first frame is answered");
    // Half of the next message, then the stream is reset.
    send.send_data(vec![0u8, 0, 0, 1, 0, 8].into(), false)
        .expect("part of a frame");
    send.send_reset(h2::Reason::CANCEL);
    // Draining waits for calls in flight (up to 20 s here): the reset one is not.
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.stop()).await;
    assert!(stopped.is_ok(), "the drain waited for the reset stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let server = TestServer::start(options(&[1], 1, 8), model()).await;
    let channel = Channel::from_shared(server.url.clone())
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let msg = resp
        .message()
        .await
        .expect("message")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"resnet_serve.v1.Classifier".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // The older generation that grpcurl 1.8, Postman and older evans ask for.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let channel = Channel::from_shared(server.url.clone())
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut client = ServerReflectionClient::new(channel);
        let ask = |request| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut resp = client
            .server_reflection_info(tokio_stream::iter(vec![
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(
                    "resnet_serve.v1.Classifier".into(),
                )),
            ]))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        let msg = resp.message().await.expect("message").expect("a list");
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected v1alpha answer {msg:?}");
        };
        let alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            alpha.contains(&"resnet_serve.v1.Classifier".to_string()),
            "{alpha:?}"
        );
        assert!(
            alpha.contains(&"inference.GRPCInferenceService".to_string()),
            "{alpha:?}"
        );
        let msg = resp.message().await.expect("message").expect("a file");
        let Some(MessageResponse::FileDescriptorResponse(files)) = msg.message_response else {
            panic!("unexpected v1alpha answer {msg:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_at_once() {
    let server = TestServer::start(options(&[1, 2, 4], 1, 4), model()).await;
    let mut client = server.client().await;
    // More images than the whole queue holds: no retry could succeed, so it is the
    // request that is wrong, refused whole, immediately.
    let images = (0..5u64).map(|s| tensor_image(s).0).collect();
    let err = client
        .classify(logits_request(images))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains("queues at most 4 images; this request has 5"),
        "{}",
        err.message()
    );
    // A flood: some are refused, none hang or fail otherwise, and the server recovers.
    let mut tasks = Vec::new();
    for s in 0..12u64 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            let images = vec![tensor_image(s).0, tensor_image(s + 50).0];
            c.classify(logits_request(images))
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(Code::ResourceExhausted) => exhausted += 1,
            Err(other) => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(ok + exhausted, 12);
    assert!(ok >= 1 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    assert!(client
        .classify(logits_request(vec![tensor_image(1).0]))
        .await
        .is_ok());
    server.stop().await;
}

fn gated() -> Arc<Gated> {
    Gated::new(model())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_answered_on_time_and_the_request_never_computed() {
    let gate = gated();
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), gate.clone()).await;
    let mut busy = server.client().await;
    let first =
        tokio::spawn(async move { busy.classify(logits_request(vec![tensor_image(1).0])).await });
    gate.entered().await; // the worker is now inside the first batch
    let mut client = server.client().await;
    let mut req = tonic::Request::new(logits_request(vec![tensor_image(2).0, tensor_image(3).0]));
    req.set_timeout(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let err = client.classify(req).await.expect_err("deadline");
    let waited = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        waited < Duration::from_millis(1500),
        "answered by a timer, after {waited:?}"
    );
    gate.open();
    first.await.expect("task").expect("first request completes");
    // Only the first request's image was ever computed.
    let slots = server.metric("resnet_serve_batch_slots_total{").await;
    let padded = server.metric("resnet_serve_padded_slots_total{").await;
    assert_eq!(slots - padded, 1.0);
    assert_eq!(
        server
            .metric("resnet_serve_requests_total{code=\"DEADLINE_EXCEEDED\"")
            .await,
        1.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_is_not_computed() {
    let gate = gated();
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), gate.clone()).await;
    let mut busy = server.client().await;
    let first =
        tokio::spawn(async move { busy.classify(logits_request(vec![tensor_image(1).0])).await });
    gate.entered().await;
    let mut client = server.client().await;
    let doomed = tokio::spawn(async move {
        client
            .classify(logits_request(
                (0..3u64).map(|s| tensor_image(s + 10).0).collect(),
            ))
            .await
    });
    // Let it reach the queue, then the client goes away.
    eventually("the doomed request is queued", || async {
        server.metric("resnet_serve_images_queued_total{").await >= 4.0
    })
    .await;
    doomed.abort();
    let _ = doomed.await;
    // The reset reaches the server and drops its handler: only the first is in flight.
    eventually("the cancelled call leaves the server", || async {
        server.metric("resnet_serve_requests_in_flight").await <= 1.0
    })
    .await;
    gate.open();
    first.await.expect("task").expect("first completes");
    // The server still answers, and the cancelled images were skipped.
    let mut c = server.client().await;
    c.classify(logits_request(vec![tensor_image(5).0]))
        .await
        .expect("after cancel");
    let slots = server.metric("resnet_serve_batch_slots_total{").await;
    let padded = server.metric("resnet_serve_padded_slots_total{").await;
    assert_eq!(
        slots - padded,
        2.0,
        "only the two live requests were computed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_every_in_flight_request_then_refuses_new_ones() {
    let gate = gated();
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), gate.clone()).await;
    let mut tasks = Vec::new();
    for s in 0..6u64 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            c.classify(logits_request(vec![tensor_image(s).0])).await
        }));
    }
    gate.entered().await;
    // All six are inside the server before the shutdown signal.
    eventually("all six requests are in flight", || async {
        server.metric("resnet_serve_requests_in_flight").await >= 6.0
    })
    .await;
    let mut late = server.client().await;
    let addr = server.url.clone();
    let stopping = tokio::spawn(server.shutdown());
    // Draining: health goes NOT_SERVING and new requests are refused.
    eventually("health leaves SERVING", || async {
        health(&addr).await != 1
    })
    .await;
    assert_eq!(health(&addr).await, 2, "NOT_SERVING while draining");
    let err = late
        .classify(logits_request(vec![tensor_image(9).0]))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
    // The model says it takes no requests while the server drains.
    let info = late
        .get_model(GetModelRequest { name: MODEL.into() })
        .await
        .expect("info")
        .into_inner();
    assert!(!info.ready, "ModelInfo.ready while draining");
    gate.open();
    for t in tasks {
        t.await
            .expect("task")
            .expect("every in-flight request is answered");
    }
    stopping.await.expect("join").expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_queue_and_compute_at_the_same_time() {
    let (a, b) = (gated(), gated());
    let server = TestServer::start_replicas(
        options(&[1, 2, 4], 1, 64),
        vec![a.clone() as Arc<dyn Backend>, b.clone()],
    )
    .await;
    let mut tasks = Vec::new();
    for seed in [1u64, 2] {
        let mut c = server.client().await;
        let (img, input) = tensor_image(seed);
        tasks.push(tokio::spawn(async move {
            let out = c.classify(logits_request(vec![img])).await;
            (out, input)
        }));
        // The first batch holds one replica; the second request can only start on the
        // other one.
        eventually("a replica took the batch", || async {
            server.metric("resnet_serve_batches_total{").await >= seed as f64
        })
        .await;
    }
    // Both replicas are inside a forward pass at once (neither gate is open yet).
    tokio::time::timeout(Duration::from_secs(30), async {
        a.entered().await;
        b.entered().await;
    })
    .await
    .expect("both replicas entered a forward pass");
    a.open();
    b.open();
    for t in tasks {
        let (out, input) = t.await.expect("task");
        let out = out.expect("answered").into_inner();
        assert!(testkit::relative_error(&out.results[0].values, &alone(&input)) <= 1e-5);
    }
    let info = server
        .client()
        .await
        .get_model(GetModelRequest { name: MODEL.into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        info.device, "cpu",
        "two replicas on one device list it once"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_panic_fails_its_batch_and_the_worker_is_restarted() {
    let backend = PanicOnce::new(model());
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), backend).await;
    let mut client = server.client().await;
    let err = client
        .classify(logits_request(vec![tensor_image(1).0]))
        .await
        .expect_err("panics");
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message().contains("injected fault"),
        "{}",
        err.message()
    );
    let (img, input) = tensor_image(2);
    let ok = client
        .classify(logits_request(vec![img]))
        .await
        .expect("served after restart")
        .into_inner();
    assert!(testkit::relative_error(&ok.results[0].values, &alone(&input)) <= 1e-5);
    assert_eq!(
        server.metric("resnet_serve_worker_restarts_total{").await,
        1.0
    );
    server.stop().await;
}

/// Tensors are checked for NaN and infinity where their batch is assembled (each value
/// is read there anyway): a bad one fails its own request and no other in its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_finite_tensor_fails_its_request_not_its_batch() {
    // A long delay and room for all three images: both requests share one batch.
    let server = TestServer::start(options(&[4], 300, 64), model()).await;
    let (mut a, mut b) = (server.client().await, server.client().await);
    let (good, good_values) = tensor_image(5);
    let mut bad = synthetic::input(6, 1, 224);
    bad[INPUT_LEN - 1] = f32::INFINITY;
    let bad = Image {
        kind: Some(image::Kind::Tensor(FloatTensor {
            data: bad.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })),
    };
    let batches_before = server.metric("resnet_serve_batches_total{").await;
    let (ok, refused) = tokio::join!(
        a.classify(logits_request(vec![good])),
        b.classify(logits_request(vec![tensor_image(7).0, bad])),
    );
    let ok = ok.expect("the good request").into_inner();
    assert!(testkit::relative_error(&ok.results[0].values, &alone(&good_values)) <= 1e-5);
    let refused = refused.expect_err("the bad request");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    assert!(
        refused.message().contains(&format!(
            "image 1: float tensor holds a NaN or infinite value at element {}",
            INPUT_LEN - 1
        )),
        "{}",
        refused.message()
    );
    assert_eq!(
        server.metric("resnet_serve_batches_total{").await - batches_before,
        1.0,
        "the three images were one batch"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_the_right_status_and_the_server_keeps_serving() {
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), model()).await;
    let mut client = server.client().await;
    let tensor_bytes = |v: Vec<f32>| Image {
        kind: Some(image::Kind::Tensor(FloatTensor {
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })),
    };
    let mut nan = vec![0.5f32; INPUT_LEN];
    nan[7] = f32::NAN;
    let cases: Vec<(&str, ClassifyRequest, Code, &str)> = vec![
        (
            "unknown model",
            ClassifyRequest {
                model: "resnet34_ssl".into(),
                ..logits_request(vec![tensor_image(1).0])
            },
            Code::NotFound,
            "resnet34_ssl",
        ),
        (
            "no images",
            logits_request(vec![]),
            Code::InvalidArgument,
            "at least one image",
        ),
        (
            "garbage bytes",
            logits_request(vec![tensor_image(1).0, encoded_bytes(b"GIF89a-not-really")]),
            Code::InvalidArgument,
            "image 1:",
        ),
        (
            "short tensor",
            logits_request(vec![tensor_bytes(vec![0.0; 10])]),
            Code::InvalidArgument,
            "3x224x224",
        ),
        (
            "NaN tensor",
            logits_request(vec![tensor_image(2).0, tensor_bytes(nan)]),
            Code::InvalidArgument,
            "image 1: float tensor holds a NaN or infinite value at element 7",
        ),
        (
            "bad raw frame",
            logits_request(vec![Image {
                kind: Some(image::Kind::Raw(RawFrame {
                    width: 10,
                    height: 10,
                    rgb: vec![0; 299].into(),
                })),
            }]),
            Code::InvalidArgument,
            "needs 300 RGB8 bytes",
        ),
        (
            "empty image",
            logits_request(vec![Image { kind: None }]),
            Code::InvalidArgument,
            "no data",
        ),
        (
            "k too large",
            ClassifyRequest {
                output: Some(OutputSpec {
                    kind: OutputKind::TopK as i32,
                    top_k: 1001,
                }),
                ..logits_request(vec![tensor_image(1).0])
            },
            Code::InvalidArgument,
            "top_k",
        ),
        (
            "unknown output kind",
            ClassifyRequest {
                output: Some(OutputSpec { kind: 42, top_k: 0 }),
                ..logits_request(vec![tensor_image(1).0])
            },
            Code::InvalidArgument,
            "output kind",
        ),
    ];
    for (what, req, code, needle) in cases {
        let err = client.classify(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
        // Still serving.
        client
            .classify(logits_request(vec![tensor_image(3).0]))
            .await
            .expect("still serving");
    }
    let err = client
        .get_model(GetModelRequest {
            name: "nope".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

/// A gRPC body: the message prefix (uncompressed, length) and the encoded message.
/// One `Classify` call over a bare HTTP/2 connection, `body` sent as DATA frames of
/// `frame` bytes each: its status (OK included) and the decoded reply.
async fn classify_in_frames(
    addr: &str,
    body: bytes::Bytes,
    frame: usize,
) -> (
    tonic::Status,
    Option<resnet_client::proto::ClassifyResponse>,
) {
    use prost::Message;
    let (response, mut send) =
        testkit::wire::bare_call(addr, "/resnet_serve.v1.Classifier/Classify").await;
    let mut start = 0;
    while start < body.len() {
        let end = (start + frame).min(body.len());
        // Each buffer goes out as a frame of its own (h2 splits buffers, never merges them).
        // A call the server refuses part-way is answered, and its stream closed, before
        // the rest is sent.
        if send
            .send_data(body.slice(start..end), end == body.len())
            .is_err()
        {
            break;
        }
        start = end;
    }
    let response = response.await.expect("response");
    // A refusal comes as headers alone (trailers-only); an answer as data and trailers.
    let mut fields = response.headers().clone();
    let mut body = response.into_body();
    let mut reply = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.expect("data");
        let _ = body.flow_control().release_capacity(data.len());
        reply.extend_from_slice(&data);
    }
    if let Some(trailers) = body.trailers().await.expect("trailers") {
        fields.extend(trailers);
    }
    let status = tonic::Status::from_header_map(&fields).expect("a grpc-status");
    let decoded = (reply.len() >= 5).then(|| {
        resnet_client::proto::ClassifyResponse::decode(&reply[5..]).expect("decode reply")
    });
    (status, decoded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_into_small_frames_is_answered_as_one_sent_whole() {
    let server = TestServer::start(options(&[1, 2, 4], 1, 64), model()).await;
    let (a, a_values) = tensor_image(21);
    let (b, b_values) = tensor_image(22);
    let body = testkit::wire::grpc_body(&logits_request(vec![a, encoded("coffee.png"), b]));
    let png = testkit::fixtures::image_bytes("coffee.png");
    let png_values = Preprocessor::default()
        .prepare(Input::Encoded(&png))
        .expect("pre")
        .into_values();
    let want = [alone(&a_values), alone(&png_values), alone(&b_values)];
    // 1,000-byte frames cut every tensor (602 KB) and the PNG across hundreds of frames;
    // 16 KiB is HTTP/2's smallest maximum frame; then the whole call in one buffer.
    for frame in [1000, 16 << 10, usize::MAX] {
        let (status, reply) = classify_in_frames(&server.url, body.clone(), frame).await;
        assert_eq!(status.code(), Code::Ok, "frames of {frame}: {status}");
        let reply = reply.expect("a reply");
        assert_eq!(reply.results.len(), 3);
        for (i, (got, want)) in reply.results.iter().zip(&want).enumerate() {
            let err = testkit::relative_error(&got.values, want);
            assert!(err <= 1e-5, "frames of {frame}, image {i}: {err:e}");
        }
    }
    // A call whose body ends inside its message, or runs past it, is refused (INTERNAL,
    // as tonic refuses it), and the server goes on serving.
    let cut = body.slice(..body.len() - 100);
    let (status, _) = classify_in_frames(&server.url, cut, 1 << 20).await;
    assert_eq!(status.code(), Code::Internal, "{status}");
    assert!(status.message().contains("Unexpected EOF"), "{status}");
    let mut two = body.to_vec();
    two.extend_from_slice(&body);
    let (status, _) = classify_in_frames(&server.url, two.into(), 1 << 20).await;
    assert_eq!(status.code(), Code::Internal, "{status}");
    assert!(status.message().contains("one message"), "{status}");
    let (status, reply) = classify_in_frames(&server.url, body, 4096).await;
    assert_eq!(status.code(), Code::Ok, "{status}");
    assert_eq!(reply.map(|r| r.results.len()), Some(3));
    server.stop().await;
}

fn encoded_bytes(data: &[u8]) -> Image {
    Image {
        kind: Some(image::Kind::Encoded(EncodedImage {
            data: data.to_vec().into(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_and_health_and_reflection_answer() {
    let server = TestServer::start(options(&[1, 4, 16], 1, 64), model()).await;
    let mut client = server.client().await;
    let models = client
        .list_models(ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(
        (m.name.as_str(), m.architecture.as_str()),
        (MODEL, "resnet18")
    );
    assert_eq!(m.input_shape, vec![3, 224, 224]);
    assert_eq!(m.num_classes, 1000);
    assert_eq!(m.allowed_batch_sizes, vec![1, 4, 16]);
    assert_eq!(
        (m.device.as_str(), m.dtype.as_str(), m.ready),
        ("cpu", "f32", true)
    );
    let one = client
        .get_model(GetModelRequest {
            name: String::new(),
        })
        .await
        .expect("default")
        .into_inner();
    assert_eq!(one.name, MODEL);
    assert_eq!(server.health().await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_with_a_clear_message() {
    let options = ServeOptions {
        max_message_bytes: 1 << 20,
        ..options(&[1, 2, 4], 1, 64)
    };
    let server = TestServer::start(options, model()).await;
    let mut client = server.client().await;
    let err = client
        .classify(logits_request(vec![encoded_bytes(&vec![0u8; 2 << 20])]))
        .await
        .expect_err("too large");
    // tonic's codec answers OUT_OF_RANGE for a message over the limit.
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(
        err.message().contains("the limit is: 1048576 bytes"),
        "{}",
        err.message()
    );
    client
        .classify(logits_request(vec![tensor_image(1).0]))
        .await
        .expect("still serving");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_tensors_are_read_and_bad_references_refused() {
    use resnet_client::proto::inference::{
        SystemSharedMemoryRegisterRequest, SystemSharedMemoryStatusRequest,
    };
    use resnet_client::shm::{shared_tensor, SharedTensors, TENSOR_BYTES};
    use resnet_client::{Client, ClientConfig, Output};
    use std::os::unix::fs::FileExt;

    let server = TestServer::start(
        ServeOptions {
            shared_memory: true,
            ..options(&[1, 2, 4], 1, 64)
        },
        model(),
    )
    .await;
    let client = Client::connect(ClientConfig::new([server.url.clone()]))
        .await
        .expect("connect");
    let values: Vec<Vec<f32>> = (21..24).map(|s| synthetic::input(s, 1, 224)).collect();
    let shared = SharedTensors::create(&client, "tensors", &values)
        .await
        .expect("register");
    let status = client
        .kserve_stub()
        .system_shared_memory_status(SystemSharedMemoryStatusRequest {
            name: "tensors".into(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.regions["tensors"].byte_size, 3 * TENSOR_BYTES);

    // Shared and sent tensors in one request, in any order.
    let (sent, sent_values) = tensor_image(5);
    let logits = |r: resnet_client::proto::ClassifyResponse| -> Vec<Vec<f32>> {
        r.results.into_iter().map(|c| c.values).collect()
    };
    let got = logits(
        client
            .classify(
                "",
                vec![shared.image(2), sent, shared.image(0)],
                Output::Logits,
            )
            .await
            .expect("classify"),
    );
    for (i, want) in [&values[2], &sent_values, &values[0]]
        .into_iter()
        .enumerate()
    {
        let err = testkit::relative_error(&got[i], &alone(want));
        assert!(err <= 1e-5, "image {i}: {err:e}");
    }

    // A stream frame may point into the region too.
    let frames = tokio_stream::iter(vec![StreamFrame {
        frame_id: 1,
        model: String::new(),
        image: Some(shared.image(1)),
        output: Some(Output::Logits.spec()),
    }]);
    let mut results = client.classify_stream(frames).await.expect("stream");
    let first = results.next().await.expect("a result").expect("ok");
    let Some(stream_result::Outcome::Result(c)) = first.outcome else {
        panic!("frame failed: {first:?}");
    };
    assert!(testkit::relative_error(&c.values, &alone(&values[1])) <= 1e-5);

    // The server reads the region as it is when the request comes: a NaN written into
    // the object after registration fails that image, with its element named.
    let object = std::fs::OpenOptions::new()
        .write(true)
        .open(shared.path())
        .expect("open object");
    object
        .write_all_at(&f32::NAN.to_le_bytes(), TENSOR_BYTES + 4 * 17)
        .expect("write NaN");
    let err = client
        .classify("", vec![shared.image(1)], Output::Logits)
        .await
        .expect_err("NaN");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("17"), "{}", err.message());

    // Bad references and registrations.
    let refused = |image, code: Code| {
        let client = client.clone();
        async move {
            let err = client
                .classify("", vec![image], Output::Logits)
                .await
                .expect_err("refused");
            assert_eq!(err.code(), code, "{err:?}");
            err.message().to_string()
        }
    };
    let message = refused(
        shared_tensor("tensors", 2 * TENSOR_BYTES + 4),
        Code::InvalidArgument,
    )
    .await;
    assert!(message.contains("run past"), "{message}");
    refused(shared_tensor("nowhere", 0), Code::NotFound).await;
    let register = |name: &str, key: &str, byte_size| {
        let mut kserve = client.kserve_stub();
        let req = SystemSharedMemoryRegisterRequest {
            name: name.into(),
            key: key.into(),
            offset: 0,
            byte_size,
        };
        async move { kserve.system_shared_memory_register(req).await }
    };
    let key = format!(
        "/{}",
        shared.path().file_name().expect("name").to_string_lossy()
    );
    let code = |r: Result<_, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code(register("tensors", &key, 16).await),
        Some(Code::AlreadyExists)
    );
    assert_eq!(
        code(register("big", &key, 4 * TENSOR_BYTES).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(register("etc", "/../etc/passwd", 16).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(register("gone", "/resnet-serve-no-such-object", 16).await),
        Some(Code::InvalidArgument)
    );

    // Unregistered: references to it are refused, and the server goes on serving.
    shared.release(&client).await.expect("unregister");
    refused(shared_tensor("tensors", 0), Code::NotFound).await;
    let (ok, _) = tensor_image(6);
    client
        .classify("", vec![ok], Output::Logits)
        .await
        .expect("still serving");
    server.stop().await;

    // A server started with the defaults refuses registration outright.
    let server = TestServer::start(options(&[1], 1, 8), model()).await;
    let client = Client::connect(ClientConfig::new([server.url.clone()]))
        .await
        .expect("connect");
    let err = SharedTensors::create(&client, "off", &values[..1])
        .await
        .expect_err("disabled");
    let resnet_client::shm::ShmError::Register(status) = err else {
        panic!("{err:?}");
    };
    assert_eq!(status.code(), Code::Unimplemented);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_truncating_its_shared_memory_cannot_stop_the_server() {
    use resnet_client::proto::inference::model_infer_request::InferInputTensor;
    use resnet_client::proto::inference::{
        infer_parameter::ParameterChoice, InferParameter, ModelInferRequest,
        SystemSharedMemoryRegisterRequest,
    };
    use resnet_client::shm::{SharedTensors, TENSOR_BYTES};
    use resnet_client::{Client, ClientConfig, Output};

    // A long batching delay: a lone image waits in the queue, where a truncation used to
    // find it still pointing into the object.
    let server = TestServer::start(
        ServeOptions {
            shared_memory: true,
            ..options(&[1, 2, 4], 1500, 64)
        },
        model(),
    )
    .await;
    let client = Client::connect(ClientConfig::new([server.url.clone()]))
        .await
        .expect("connect");
    let values: Vec<Vec<f32>> = (31..33).map(|s| synthetic::input(s, 1, 224)).collect();
    let shared = SharedTensors::create(&client, "doomed", &values)
        .await
        .expect("register");
    let truncate = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(shared.path())
            .and_then(|f| f.set_len(0))
            .expect("truncate")
    };

    // Truncated while its image waits for a batch: the server read it on arrival.
    let queued = tokio::spawn({
        let client = client.clone();
        let image = shared.image(0);
        async move { client.classify("", vec![image], Output::Logits).await }
    });
    eventually("the image is queued", || async {
        server.metric("resnet_serve_images_queued_total{").await >= 1.0
    })
    .await;
    truncate();
    let got = queued
        .await
        .expect("task")
        .expect("read before the truncation");
    let err = testkit::relative_error(&got.results[0].values, &alone(&values[0]));
    assert!(err <= 1e-5, "{err:e}");

    // Truncated before the request: FAILED_PRECONDITION, through both APIs.
    let err = client
        .classify("", vec![shared.image(1)], Output::Logits)
        .await
        .expect_err("shrunk");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("shrank"), "{}", err.message());
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let input = InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape: vec![1, 3, 224, 224],
        parameters: [
            (
                "shared_memory_region".to_string(),
                param(ParameterChoice::StringParam("doomed".into())),
            ),
            (
                "shared_memory_byte_size".to_string(),
                param(ParameterChoice::Int64Param(TENSOR_BYTES as i64)),
            ),
        ]
        .into(),
        ..Default::default()
    };
    let err = client
        .kserve_stub()
        .model_infer(ModelInferRequest {
            model_name: MODEL.into(),
            inputs: vec![input],
            ..Default::default()
        })
        .await
        .expect_err("shrunk");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // A key that is a symbolic link to another object is refused, never followed.
    let link = shared.path().with_extension("link");
    std::os::unix::fs::symlink(shared.path(), &link).expect("symlink");
    let err = client
        .kserve_stub()
        .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
            name: "link".into(),
            key: format!("/{}", link.file_name().expect("name").to_string_lossy()),
            offset: 0,
            byte_size: 16,
        })
        .await
        .expect_err("a link");
    std::fs::remove_file(&link).expect("remove link");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("symbolic link"), "{}", err.message());

    // The server goes on serving.
    let (ok, _) = tensor_image(7);
    client
        .classify("", vec![ok], Output::Logits)
        .await
        .expect("still serving");
    shared.release(&client).await.expect("unregister");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_travels_both_ways() {
    use resnet_client::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use resnet_client::proto::inference::{
        model_infer_request::InferInputTensor, ModelInferRequest,
    };
    let server = TestServer::start(options(&[1, 2], 1, 16), model()).await;
    let mut client = server.client().await;
    let id_of = |m: &tonic::metadata::MetadataMap| {
        m.get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let with_header = |mut r: tonic::Request<ClassifyRequest>, id: &str| {
        r.metadata_mut()
            .insert("x-request-id", id.parse().expect("ascii"));
        r
    };
    // The header's id wins, and comes back in the header and the body.
    let mut request = logits_request(vec![tensor_image(1).0]);
    request.request_id = "from-the-body".into();
    let reply = client
        .classify(with_header(
            tonic::Request::new(request.clone()),
            "trace-7f3a",
        ))
        .await
        .expect("classified");
    assert_eq!(id_of(reply.metadata()).as_deref(), Some("trace-7f3a"));
    assert_eq!(reply.into_inner().request_id, "trace-7f3a");
    // Else the body's; else one made here.
    let reply = client.classify(request).await.expect("classified");
    assert_eq!(id_of(reply.metadata()).as_deref(), Some("from-the-body"));
    let reply = client
        .classify(logits_request(vec![tensor_image(2).0]))
        .await
        .expect("classified");
    let made = id_of(reply.metadata()).expect("an id is made");
    assert!(made.starts_with("req-"), "{made}");
    assert_eq!(reply.into_inner().request_id, made);
    // A refusal carries it too.
    let mut unknown = logits_request(vec![tensor_image(3).0]);
    unknown.model = "nope".into();
    let err = client
        .classify(with_header(tonic::Request::new(unknown), "trace-err"))
        .await
        .expect_err("unknown model");
    assert_eq!(id_of(err.metadata()).as_deref(), Some("trace-err"));
    // KServe's ModelInfer returns the header it was sent.
    let mut kserve = GrpcInferenceServiceClient::connect(server.url.clone())
        .await
        .expect("connect");
    let values = synthetic::input(4, 1, 224);
    let mut infer = tonic::Request::new(ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 3, 224, 224],
            ..Default::default()
        }],
        raw_input_contents: vec![values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()],
        ..Default::default()
    });
    infer
        .metadata_mut()
        .insert("x-request-id", "kserve-1".parse().expect("ascii"));
    let reply = kserve.model_infer(infer).await.expect("inferred");
    assert_eq!(id_of(reply.metadata()).as_deref(), Some("kserve-1"));
    server.stop().await;
}
