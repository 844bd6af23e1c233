//! Hostile input through the real server: every kind of request an unfriendly client
//! can send on loopback, each asserted to get its status, with the server still
//! answering afterwards and its memory bounded (the server runs in this process, so the
//! process's resident memory is the server's plus the client's requests).
//!
//! One server (the seeded resnet18, an in-flight budget of 96 MiB) takes every case in
//! turn; the table of cases, codes and times is printed at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use resnet_client::proto::classifier_client::ClassifierClient;
use resnet_client::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use resnet_client::proto::inference::{
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor, InferParameter,
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    RepositoryModelLoadRequest, ServerLiveRequest, SystemSharedMemoryRegisterRequest,
};
use resnet_client::proto::{
    image, stream_result, ClassifyRequest, EncodedImage, FloatTensor, GetModelRequest, Image,
    OutputKind, OutputSpec, RawFrame, StreamFrame,
};
use resnet_serve::process::server::{ModelLoader, ServeOptions};
use resnet_serve::scheduler::Backend;
use testkit::{TestServer, MODEL};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What the server (and this test's client) may hold at any point.
const RSS_LIMIT: u64 = 1 << 30;
/// The longest any refusal may take before the test calls it a hang.
const PATIENCE: Duration = Duration::from_secs(5);

fn options() -> ServeOptions {
    ServeOptions {
        max_in_flight_bytes: 96 << 20,
        drain_timeout: Duration::from_secs(10),
        ..testkit::server::options(&[1, 2, 4, 8], 2, 64)
    }
}

/// The server under attack, the clients, and the record of every case.
struct Attack {
    server: TestServer,
    addr: String,
    classifier: ClassifierClient<Channel>,
    kserve: GrpcInferenceServiceClient<Channel>,
    record: Vec<(String, Code, Duration)>,
    peak_rss: u64,
}

impl Attack {
    async fn start() -> Attack {
        let server = TestServer::start(options(), testkit::resnet18()).await;
        let addr = server.url.clone();
        let channel = server.channel().await;
        Attack {
            server,
            addr,
            classifier: ClassifierClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            kserve: GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            record: Vec::new(),
            peak_rss: 0,
        }
    }

    /// Runs one case: `call` must end with `want` within [`PATIENCE`]; then the server
    /// must still answer, and memory stay under [`RSS_LIMIT`].
    async fn case<F, T>(&mut self, name: &str, want: Code, call: F) -> Result<T, Status>
    where
        F: std::future::Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let got = tokio::time::timeout(PATIENCE, call)
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer within {PATIENCE:?}"));
        let took = started.elapsed();
        let code = got.as_ref().map_or_else(Status::code, |_| Code::Ok);
        assert_eq!(
            code,
            want,
            "{name}: {}",
            got.as_ref().err().map(|s| s.message()).unwrap_or("")
        );
        if let Err(status) = &got {
            assert!(
                status.message().len() <= 1100,
                "{name}: a {}-byte message",
                status.message().len()
            );
        }
        self.still_alive(name).await;
        self.record.push((name.to_string(), code, took));
        got
    }

    async fn still_alive(&mut self, after: &str) {
        let live = tokio::time::timeout(PATIENCE, self.kserve.server_live(ServerLiveRequest {}))
            .await
            .unwrap_or_else(|_| panic!("after {after}: ServerLive did not answer"))
            .unwrap_or_else(|e| panic!("after {after}: ServerLive failed: {e}"));
        assert!(live.into_inner().live, "after {after}");
        let rss = testkit::wait::rss_bytes();
        self.peak_rss = self.peak_rss.max(rss);
        assert!(rss < RSS_LIMIT, "after {after}: RSS {} MiB", rss >> 20);
    }
}

/// A call's body sent as written (no client would send it), and its status.
async fn bare(addr: String, path: &str, body: bytes::Bytes) -> Result<bytes::Bytes, Status> {
    let (response, mut send) = testkit::wire::bare_call(&addr, path).await;
    // A call refused part-way may be answered (and its stream reset) before all of its
    // body is sent.
    let _ = send.send_data(body, true);
    let (status, data) = testkit::wire::bare_status(response).await;
    if status.code() == Code::Ok {
        Ok(data)
    } else {
        Err(status)
    }
}

/// A length-delimited protobuf field: `tag` (field number and wire type 2), length, bytes.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 10);
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A KServe request for `model` whose one input has `contents` (encoded by hand, so a
/// bomb of millions of elements costs this test only its bytes).
fn infer_with_contents(
    model: &str,
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: &[u8],
) -> bytes::Bytes {
    let mut input = field(1, name.as_bytes());
    input.extend(field(2, datatype.as_bytes()));
    let mut dims = Vec::new();
    for &d in shape {
        prost::encoding::encode_varint(d as u64, &mut dims);
    }
    input.extend(field(3, &dims));
    input.extend(field(5, contents));
    let mut message = field(1, model.as_bytes());
    message.extend(field(5, &input));
    testkit::wire::framed(0, &message)
}

fn request(images: Vec<Image>) -> ClassifyRequest {
    ClassifyRequest {
        model: MODEL.into(),
        images,
        ..Default::default()
    }
}

fn raw(width: u32, height: u32, rgb: Vec<u8>) -> Image {
    Image {
        kind: Some(image::Kind::Raw(RawFrame {
            width,
            height,
            rgb: rgb.into(),
        })),
    }
}

fn encoded(data: Vec<u8>) -> Image {
    Image {
        kind: Some(image::Kind::Encoded(EncodedImage { data: data.into() })),
    }
}

fn tensor(data: Vec<u8>) -> Image {
    Image {
        kind: Some(image::Kind::Tensor(FloatTensor { data: data.into() })),
    }
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = ::image::RgbImage::from_fn(width, height, |x, y| {
        ::image::Rgb([(x % 251) as u8, (y % 241) as u8, 77])
    });
    let mut out = Vec::new();
    ::image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut out),
            ::image::ImageFormat::Png,
        )
        .expect("png");
    out
}

fn jpeg() -> Vec<u8> {
    testkit::fixtures::image_bytes("chelsea_q90.jpg")
}

fn infer_request(model: &str, input: InferInputTensor, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![input],
        raw_input_contents: raw.into_iter().map(Into::into).collect(),
        ..Default::default()
    }
}

const CLASSIFY: &str = "/resnet_serve.v1.Classifier/Classify";
const CLASSIFY_STREAM: &str = "/resnet_serve.v1.Classifier/ClassifyStream";
const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const MODEL_STREAM_INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_survives_every_hostile_request() {
    let mut a = Attack::start().await;
    let one_tensor = vec![0u8; 3 * 224 * 224 * 4];

    // --- Images whose size or shape is the weapon ---------------------------------
    let r = request(vec![raw(1, 100_000, vec![9; 300_000])]);
    a.case(
        "raw 1x100000 frame (resized whole: 25.6 M rows)",
        Code::Ok,
        a.classifier.clone().classify(r),
    )
    .await
    .ok();
    for (w, h) in [(100_000, 1), (1, 100_000)] {
        let r = request(vec![
            raw(w, h, vec![200; 300_000]),
            raw(w, h, vec![1; 300_000]),
        ]);
        a.case(
            &format!("raw {w}x{h} frames, twice in one request"),
            Code::Ok,
            a.classifier.clone().classify(r),
        )
        .await
        .ok();
    }
    let tall = png(1, 65_000);
    a.case(
        "encoded 1x65000 PNG",
        Code::Ok,
        a.classifier.clone().classify(request(vec![encoded(tall)])),
    )
    .await
    .ok();
    let cases: Vec<(&str, Image)> = vec![
        ("raw frame with too few bytes", raw(640, 480, vec![0; 100])),
        ("raw frame 0x0", raw(0, 0, vec![])),
        (
            "raw frame over the pixel limit",
            raw(100_000, 100_000, vec![0; 30]),
        ),
        (
            "raw frame whose byte count overflows 32 bits",
            raw(u32::MAX, u32::MAX, vec![0; 3]),
        ),
        (
            "PNG header claiming 100000x100000",
            encoded(png_header(100_000, 100_000)),
        ),
        (
            "JPEG cut in half",
            encoded({
                let j = jpeg();
                j[..j.len() / 2].to_vec()
            }),
        ),
        ("JPEG cut after its header", encoded(jpeg()[..600].to_vec())),
        (
            "garbage bytes as an image",
            encoded(b"GIF89a but not really".to_vec()),
        ),
        ("empty encoded image", encoded(vec![])),
        (
            "tensor one byte short",
            tensor(vec![0; 3 * 224 * 224 * 4 - 1]),
        ),
        (
            "tensor of NaN",
            tensor(f32::NAN.to_le_bytes().repeat(3 * 224 * 224)),
        ),
        (
            "tensor of infinity",
            tensor(f32::INFINITY.to_le_bytes().repeat(3 * 224 * 224)),
        ),
        ("image with no data", Image { kind: None }),
    ];
    for (name, img) in cases {
        let mut c = a.classifier.clone();
        a.case(name, Code::InvalidArgument, c.classify(request(vec![img])))
            .await
            .ok();
    }

    // --- Counts and sizes of the request itself --------------------------------
    // Each empty image is two bytes on the wire and ~100 in memory once decoded.
    let mut empties = field(1, MODEL.as_bytes());
    while empties.len() < (64 << 20) - 8 {
        empties.extend_from_slice(&[0x12, 0x00]);
    }
    let body = testkit::wire::framed(0, &empties);
    drop(empties);
    let (body_len, rss_with_body) = (body.len() as u64, testkit::wait::rss_bytes());
    a.case(
        "64 MiB Classify of 33 M empty images",
        Code::InvalidArgument,
        bare(a.addr.clone(), CLASSIFY, body),
    )
    .await
    .ok();
    let grown = testkit::wait::rss_bytes().saturating_sub(rss_with_body);
    assert!(
        grown <= body_len,
        "the refusal grew RSS by {} MiB",
        grown >> 20
    );
    a.case(
        "257 images in one request",
        Code::InvalidArgument,
        a.classifier
            .clone()
            .classify(request(vec![raw(1, 1, vec![0; 3]); 257])),
    )
    .await
    .ok();
    a.case(
        "no images",
        Code::InvalidArgument,
        a.classifier.clone().classify(request(vec![])),
    )
    .await
    .ok();
    let over = {
        let mut b = vec![0u8];
        b.extend_from_slice(&((64u32 << 20) + 1).to_be_bytes());
        b.extend_from_slice(&[0; 1024]);
        bytes::Bytes::from(b)
    };
    a.case(
        "message over the 64 MiB limit (announced)",
        Code::OutOfRange,
        bare(a.addr.clone(), CLASSIFY, over),
    )
    .await
    .ok();
    a.case(
        "malformed protobuf",
        Code::Internal,
        bare(
            a.addr.clone(),
            CLASSIFY,
            testkit::wire::framed(0, &[0xff, 0xff, 0xff]),
        ),
    )
    .await
    .ok();
    a.case(
        "compressed flag without an encoding",
        Code::Internal,
        bare(a.addr.clone(), CLASSIFY, testkit::wire::framed(1, &[])),
    )
    .await
    .ok();
    let two = {
        let one = testkit::wire::grpc_body(&request(vec![tensor(one_tensor.clone())]));
        let mut b = one.to_vec();
        b.extend_from_slice(&one);
        bytes::Bytes::from(b)
    };
    a.case(
        "two messages in a unary call",
        Code::Internal,
        bare(a.addr.clone(), CLASSIFY, two),
    )
    .await
    .ok();
    let cut = testkit::wire::grpc_body(&request(vec![tensor(one_tensor.clone())]));
    a.case(
        "body ends inside its message",
        Code::Internal,
        bare(a.addr.clone(), CLASSIFY, cut.slice(..cut.len() / 2)),
    )
    .await
    .ok();
    a.case(
        "empty body",
        Code::Internal,
        bare(a.addr.clone(), CLASSIFY, bytes::Bytes::new()),
    )
    .await
    .ok();

    // --- Names, options and deadlines --------------------------------------------
    let long_name = "m".repeat(1 << 20);
    let mut named = request(vec![tensor(one_tensor.clone())]);
    named.model = long_name.clone();
    a.case(
        "unknown model with a 1 MiB name",
        Code::NotFound,
        a.classifier.clone().classify(named),
    )
    .await
    .ok();
    a.case(
        "GetModel with a 900 KiB name",
        Code::NotFound,
        a.classifier.clone().get_model(GetModelRequest {
            name: "g".repeat(900 << 10),
        }),
    )
    .await
    .ok();
    a.case(
        "GetModel with a 2 MiB name (past the control-message limit)",
        Code::OutOfRange,
        a.classifier.clone().get_model(GetModelRequest {
            name: "g".repeat(2 << 20),
        }),
    )
    .await
    .ok();
    let mut topk = request(vec![tensor(one_tensor.clone())]);
    topk.output = Some(OutputSpec {
        kind: OutputKind::TopK as i32,
        top_k: u32::MAX,
    });
    a.case(
        "top_k of 4 billion",
        Code::InvalidArgument,
        a.classifier.clone().classify(topk),
    )
    .await
    .ok();
    let mut kind = request(vec![tensor(one_tensor.clone())]);
    kind.output = Some(OutputSpec { kind: 99, top_k: 0 });
    a.case(
        "unknown output kind",
        Code::InvalidArgument,
        a.classifier.clone().classify(kind),
    )
    .await
    .ok();
    for timeout in [
        "999999999S",
        "99999999H",
        "18446744073709551615n",
        "-5S",
        "5x",
        "S",
    ] {
        let mut r = tonic::Request::new(request(vec![tensor(one_tensor.clone())]));
        r.metadata_mut()
            .insert("grpc-timeout", timeout.parse().expect("ascii"));
        let mut c = a.classifier.clone();
        a.case(
            &format!("grpc-timeout {timeout} (out of spec: ignored)"),
            Code::Ok,
            c.classify(r),
        )
        .await
        .ok();
    }
    let mut id = request(vec![tensor(one_tensor.clone())]);
    id.request_id = "r".repeat(4 << 20);
    let echoed = a
        .case(
            "a 4 MiB request id",
            Code::Ok,
            a.classifier.clone().classify(id),
        )
        .await;
    if let Ok(reply) = echoed {
        assert!(reply.into_inner().request_id.len() < 100, "echoed in full");
    }

    // --- KServe ------------------------------------------------------------------
    let tensor_input = |shape| testkit::kserve::input("input", "FP32", shape);
    let huge = (1i64 << 52) + 1;
    a.case(
        "KServe shape [2^52+1,3,224,224]",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(infer_request(
            MODEL,
            tensor_input(vec![huge, 3, 224, 224]),
            vec![vec![0; 16]],
        )),
    )
    .await
    .ok();
    a.case(
        "KServe negative dimension",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(infer_request(
            MODEL,
            tensor_input(vec![-1, 3, 224, 224]),
            vec![vec![]],
        )),
    )
    .await
    .ok();
    let bytes_bomb = [0x42u8, 0x00].repeat(16 << 20);
    let body = infer_with_contents(
        &format!("{MODEL}_image"),
        "image",
        "BYTES",
        &[1],
        &bytes_bomb,
    );
    drop(bytes_bomb);
    a.case(
        "KServe BYTES input of 16 M empty elements",
        Code::InvalidArgument,
        bare(a.addr.clone(), MODEL_INFER, body),
    )
    .await
    .ok();
    let uint_bomb = field(4, &vec![7u8; 48 << 20]);
    let body = infer_with_contents(
        &format!("{MODEL}_frame"),
        "frame",
        "UINT8",
        &[1, 4000, 4000, 3],
        &uint_bomb,
    );
    drop(uint_bomb);
    a.case(
        "KServe UINT8 contents of 48 M elements",
        Code::InvalidArgument,
        bare(a.addr.clone(), MODEL_INFER, body),
    )
    .await
    .ok();
    let small = InferTensorContents {
        uint_contents: vec![7; 224 * 224 * 3],
        ..Default::default()
    };
    let mut frame_input = testkit::kserve::input("frame", "UINT8", vec![1, 224, 224, 3]);
    frame_input.contents = Some(small);
    a.case(
        "KServe UINT8 frame as typed contents (within bounds)",
        Code::Ok,
        a.kserve.clone().model_infer(infer_request(
            &format!("{MODEL}_frame"),
            frame_input,
            vec![],
        )),
    )
    .await
    .ok();
    let mut many_inputs = infer_request(MODEL, tensor_input(vec![1, 3, 224, 224]), vec![]);
    many_inputs.inputs = vec![tensor_input(vec![1, 3, 224, 224]); 100_000];
    a.case(
        "KServe request of 100000 inputs",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(many_inputs),
    )
    .await
    .ok();
    let mut params = infer_request(
        MODEL,
        tensor_input(vec![1, 3, 224, 224]),
        vec![one_tensor.clone()],
    );
    params.parameters = (0..100_000)
        .map(|i| (format!("p{i}"), InferParameter::default()))
        .collect::<HashMap<_, _>>();
    a.case(
        "KServe request of 100000 parameters",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(params),
    )
    .await
    .ok();
    let mut raw_many = infer_request(MODEL, tensor_input(vec![1, 3, 224, 224]), vec![]);
    raw_many.raw_input_contents = vec![bytes::Bytes::new(); 1 << 20];
    a.case(
        "KServe 1 M raw_input_contents",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(raw_many),
    )
    .await
    .ok();
    let mut elements = Vec::new();
    for _ in 0..100_000 {
        elements.extend_from_slice(&0u32.to_le_bytes());
    }
    a.case(
        "KServe raw BYTES of 100000 elements for a batch of 1",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(infer_request(
            &format!("{MODEL}_image"),
            testkit::kserve::input("image", "BYTES", vec![1]),
            vec![elements],
        )),
    )
    .await
    .ok();
    let mut timeout = infer_request(
        MODEL,
        tensor_input(vec![1, 3, 224, 224]),
        vec![one_tensor.clone()],
    );
    timeout.parameters.insert(
        "timeout".into(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(i64::MAX)),
        },
    );
    a.case(
        "KServe timeout parameter of i64::MAX us",
        Code::Ok,
        a.kserve.clone().model_infer(timeout),
    )
    .await
    .ok();
    a.case(
        "KServe unknown model with a 1 MiB name",
        Code::NotFound,
        a.kserve.clone().model_infer(infer_request(
            &long_name,
            tensor_input(vec![1, 3, 224, 224]),
            vec![one_tensor.clone()],
        )),
    )
    .await
    .ok();
    a.case(
        "KServe ModelMetadata with a 900 KiB name",
        Code::NotFound,
        a.kserve.clone().model_metadata(ModelMetadataRequest {
            name: "n".repeat(900 << 10),
            version: String::new(),
        }),
    )
    .await
    .ok();
    let ready = a
        .case(
            "KServe ModelReady of an unknown model",
            Code::Ok,
            a.kserve.clone().model_ready(ModelReadyRequest {
                name: "x".repeat(1000),
                version: String::new(),
            }),
        )
        .await;
    assert!(!ready.expect("answered").into_inner().ready);
    a.case(
        "shared-memory registration on a server that did not enable it",
        Code::Unimplemented,
        a.kserve
            .clone()
            .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
                name: "r".into(),
                key: "/etc/passwd".into(),
                offset: 0,
                byte_size: 4096,
            }),
    )
    .await
    .ok();
    a.case(
        "model load on a server without model control",
        Code::FailedPrecondition,
        a.kserve
            .clone()
            .repository_model_load(RepositoryModelLoadRequest {
                repository_name: String::new(),
                model_name: "../../etc/passwd".into(),
                parameters: HashMap::new(),
            }),
    )
    .await
    .ok();

    // --- Streams -----------------------------------------------------------------
    let frame = |id| StreamFrame {
        frame_id: id,
        model: MODEL.into(),
        image: Some(tensor(one_tensor.clone())),
        output: None,
    };
    let stream_cases: Vec<(&str, bytes::Bytes, Code)> = vec![
        (
            "ClassifyStream: a malformed second message",
            testkit::wire::framed(0, &[0xff, 0xff]),
            Code::Internal,
        ),
        (
            "ClassifyStream: an oversize second message",
            {
                let mut b = vec![0u8];
                b.extend_from_slice(&(100u32 << 20).to_be_bytes());
                bytes::Bytes::from(b)
            },
            Code::OutOfRange,
        ),
        (
            "ClassifyStream: a compressed second message",
            testkit::wire::framed(1, &[1]),
            Code::Internal,
        ),
        (
            "ClassifyStream: a body ending inside its second message",
            testkit::wire::framed(0, &[10, 20, 30]).slice(..6),
            Code::Internal,
        ),
    ];
    for (name, tail, want) in stream_cases {
        let mut body = testkit::wire::grpc_body(&frame(1)).to_vec();
        body.extend_from_slice(&tail);
        let got = a
            .case(
                name,
                want,
                bare(a.addr.clone(), CLASSIFY_STREAM, body.into()),
            )
            .await;
        let _ = got;
    }
    // The first frame's answer came before the status that ended the stream.
    {
        let mut body = testkit::wire::grpc_body(&frame(7)).to_vec();
        body.extend_from_slice(&testkit::wire::framed(0, &[0xff, 0xff]));
        let (response, mut send) = testkit::wire::bare_call(&a.addr, CLASSIFY_STREAM).await;
        let _ = send.send_data(body.into(), true);
        let (status, data) = testkit::wire::bare_status(response).await;
        assert_eq!(status.code(), Code::Internal, "{status}");
        let answer = resnet_client::proto::StreamResult::decode(data.slice(5..)).expect("answer");
        assert_eq!(answer.frame_id, 7);
        assert!(matches!(
            answer.outcome,
            Some(stream_result::Outcome::Result(_))
        ));
    }
    let mut stream_infer = testkit::wire::grpc_body(&infer_request(
        MODEL,
        tensor_input(vec![1, 3, 224, 224]),
        vec![one_tensor.clone()],
    ))
    .to_vec();
    stream_infer.extend_from_slice(&testkit::wire::framed(0, &[0xff, 0xff]));
    a.case(
        "ModelStreamInfer: a malformed second message",
        Code::Internal,
        bare(a.addr.clone(), MODEL_STREAM_INFER, stream_infer.into()),
    )
    .await
    .ok();
    let no_inputs = ModelInferRequest {
        model_name: MODEL.into(),
        ..Default::default()
    };
    a.case(
        "ModelInfer with no inputs",
        Code::InvalidArgument,
        a.kserve.clone().model_infer(no_inputs),
    )
    .await
    .ok();

    // --- The in-flight budget ----------------------------------------------------
    // A call that announces 60 MiB and sends a little of it holds 60 of the 96 MiB;
    // a second such call is refused at once, without waiting for either body.
    let (held, mut held_send) = testkit::wire::bare_call(&a.addr, CLASSIFY).await;
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(60u32 << 20).to_be_bytes());
    prefix.extend_from_slice(&[0x12; 1000]);
    held_send
        .send_data(prefix.clone().into(), false)
        .expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (refused, mut refused_send) = testkit::wire::bare_call(&a.addr, CLASSIFY).await;
    refused_send.send_data(prefix.into(), false).expect("send");
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(PATIENCE, testkit::wire::bare_status(refused))
        .await
        .expect("refused at once");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    a.record.push((
        "a call past the in-flight budget".into(),
        status.code(),
        started.elapsed(),
    ));
    a.classifier
        .clone()
        .classify(request(vec![tensor(one_tensor.clone())]))
        .await
        .expect("a small call still fits");
    held_send.send_reset(h2::Reason::CANCEL);
    drop(held);
    let metrics = a.server.metrics().await;
    assert!(
        metrics.contains("resnet_serve_refusals_total{reason=\"in_flight_bytes\"} 1"),
        "{metrics}"
    );

    // --- What the hostile names left behind --------------------------------------
    assert!(
        metrics.len() < 512 << 10,
        "/metrics is {} bytes",
        metrics.len()
    );
    assert!(
        !metrics.contains("mmmmmmmm"),
        "a client's name became a label"
    );
    assert!(metrics.contains("model=\"(unknown)\""), "{metrics}");

    let width = a.record.iter().map(|(n, _, _)| n.len()).max().unwrap_or(0);
    println!("{:width$}  {:18}  ms", "case", "status");
    for (name, code, took) in &a.record {
        println!(
            "{name:width$}  {:18}  {:.1}",
            format!("{code:?}"),
            took.as_secs_f64() * 1e3
        );
    }
    println!(
        "{} cases; peak RSS {} MiB",
        a.record.len(),
        a.peak_rss >> 20
    );
    assert!(a.record.len() >= 40, "{} cases", a.record.len());
    a.server.stop().await;
}

/// A PNG header (IHDR) claiming `w x h`, then an empty IDAT: no pixel data at all.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(b"IDAT");
    out.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// While the start-up load runs, a configured model is UNAVAILABLE ("loading"), not
/// NOT_FOUND; KServe's ModelReady and ServerReady say false; once loaded, it serves.
#[tokio::test]
async fn a_model_that_is_still_loading_is_unavailable_not_missing() {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let loader: ModelLoader = Box::new(move || {
        let _ = wait.recv_timeout(Duration::from_secs(60));
        Ok(vec![(
            MODEL.to_string(),
            testkit::resnet18() as Arc<dyn Backend>,
        )])
    });
    let server = TestServer::spawn(
        ServeOptions {
            configured_models: vec![MODEL.to_string()],
            ..options()
        },
        loader,
    )
    .await;
    let channel = server.channel().await;
    let mut c = ClassifierClient::new(channel.clone());
    let mut k = GrpcInferenceServiceClient::new(channel);
    let one = request(vec![tensor(vec![0; 3 * 224 * 224 * 4])]);
    let err = c.classify(one.clone()).await.expect_err("loading");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("resnet18_swsl is loading"), "{err}");
    let mut default = one.clone();
    default.model.clear();
    let err = c.classify(default).await.expect_err("loading");
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    let mut other = one.clone();
    other.model = "resnet50_ssl".into();
    let err = c.classify(other).await.expect_err("not configured");
    assert_eq!(err.code(), Code::NotFound, "{err}");
    let ready = k
        .model_ready(ModelReadyRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("answers");
    assert!(!ready.into_inner().ready);
    release.send(()).expect("release");
    server.ready().await;
    c.classify(one).await.expect("serves once loaded");
    let info = c
        .get_model(GetModelRequest { name: MODEL.into() })
        .await
        .expect("info")
        .into_inner();
    assert!(info.ready);
    server.stop().await;
}
