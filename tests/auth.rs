//! Bearer tokens through the real server: a token file made in the test, calls from the
//! generated clients with and without `authorization`, scopes, a `sha256:` line, the
//! file rewritten while serving, and the open health and reflection services.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use resnet_client::proto::classifier_client::ClassifierClient;
use resnet_client::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use resnet_client::proto::inference::{
    RepositoryModelLoadRequest, ServerLiveRequest, SystemSharedMemoryStatusRequest,
};
use resnet_client::proto::{image, ClassifyRequest, FloatTensor, Image, ListModelsRequest};
use resnet_serve::api::auth::{Open, Tokens};
use resnet_serve::process::server::ServeOptions;
use sha2::Digest;
use testkit::{TestServer, MODEL};
use tonic::transport::Channel;
use tonic::{Code, Request};

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

fn classify_request() -> ClassifyRequest {
    ClassifyRequest {
        model: MODEL.into(),
        images: vec![Image {
            kind: Some(image::Kind::Tensor(FloatTensor {
                data: vec![0u8; 3 * 224 * 224 * 4].into(),
            })),
        }],
        ..Default::default()
    }
}

async fn start(tokens: &std::path::Path, open: Open) -> (TestServer, Channel) {
    let options = ServeOptions {
        auth_tokens: Some(Arc::new(Tokens::load(tokens).expect("token file"))),
        auth_open: open,
        ..testkit::server::options(&[1, 2], 1, 16)
    };
    let server = TestServer::start(options, testkit::resnet18()).await;
    let channel = server.channel().await;
    (server, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_token_and_changes_need_an_admin_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    let hashed = hex::encode(sha2::Sha256::digest(b"kept-out-of-the-file"));
    std::fs::write(
        &file,
        format!("# infer-only reader, then the operator\nreader-1 infer\noperator-1 admin\nsha256:{hashed} infer\n"),
    )
    .expect("write");
    let (server, channel) = start(&file, Open::default()).await;
    let mut c = ClassifierClient::new(channel.clone());
    let mut k = GrpcInferenceServiceClient::new(channel.clone());

    // No token, a wrong one, a malformed header: UNAUTHENTICATED, saying nothing of tokens.
    let err = c.classify(classify_request()).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = c
        .classify(with_token(classify_request(), "reader-2"))
        .await
        .expect_err("wrong");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(!err.message().contains("reader-1"), "{err}");
    let mut basic = Request::new(classify_request());
    basic.metadata_mut().insert(
        "authorization",
        "Basic cmVhZGVyLTE6".parse().expect("ascii"),
    );
    assert_eq!(
        c.classify(basic).await.expect_err("not bearer").code(),
        Code::Unauthenticated
    );
    let err = k
        .server_live(ServerLiveRequest {})
        .await
        .expect_err("KServe too");
    assert_eq!(err.code(), Code::Unauthenticated);
    // A stream, refused before its first message.
    let (response, mut send) =
        testkit::wire::bare_call(&server.url, "/resnet_serve.v1.Classifier/ClassifyStream").await;
    let _ = send.send_data(bytes::Bytes::new(), true);
    let (status, _) = testkit::wire::bare_status(response).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    // The infer token classifies, and may not change the server.
    c.classify(with_token(classify_request(), "reader-1"))
        .await
        .expect("an infer token classifies");
    c.list_models(with_token(ListModelsRequest {}, "reader-1"))
        .await
        .expect("metadata");
    c.classify(with_token(classify_request(), "kept-out-of-the-file"))
        .await
        .expect("a token given by its sha256 in the file");
    let load = || RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: MODEL.into(),
        parameters: HashMap::new(),
    };
    let err = k
        .repository_model_load(with_token(load(), "reader-1"))
        .await
        .expect_err("admin only");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = k
        .system_shared_memory_status(with_token(
            SystemSharedMemoryStatusRequest {
                name: String::new(),
            },
            "reader-1",
        ))
        .await
        .expect_err("admin only");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // The admin token gets through to the call itself (model control is off here).
    let err = k
        .repository_model_load(with_token(load(), "operator-1"))
        .await
        .expect_err("model control is off");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token")
        .into_inner();
    assert_eq!(status.status, 1);
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut r = ServerReflectionClient::new(channel.clone());
        r.server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("reflection without a token");
    }

    // A rewritten file is read again within a couple of seconds: the old token goes,
    // the new one works.
    std::fs::write(&file, "reader-2 infer\n").expect("rewrite");
    let mut switched = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.classify(with_token(classify_request(), "reader-2"))
            .await
            .is_ok()
        {
            switched = true;
            break;
        }
    }
    assert!(switched, "the new token was never accepted");
    let err = c
        .classify(with_token(classify_request(), "reader-1"))
        .await
        .expect_err("the old token is gone");
    assert_eq!(err.code(), Code::Unauthenticated);

    let metrics = server.metrics().await;
    for reason in ["missing", "invalid", "scope"] {
        let line = format!("resnet_serve_auth_refusals_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{reason}: {metrics}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_closed_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "t\n").expect("write");
    let open = Open {
        health: true,
        reflection: false,
    };
    let (server, channel) = start(&file, open).await;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(channel);
    let err = r
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect_err("closed");
    assert_eq!(err.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crate_sends_its_token_on_every_kind_of_call() {
    use resnet_client::{Client, ClientConfig, Output, Token};
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    std::fs::write(&file, "client-token infer\n").expect("write");
    let (server, _) = start(&file, Open::default()).await;
    let connect = |token: Option<&str>| {
        let mut config = ClientConfig::new([server.url.clone()]);
        config.token = token.map(|t| Token(t.into()));
        config.retries = 0;
        Client::connect(config)
    };
    let tensor = || Image {
        kind: Some(image::Kind::Tensor(FloatTensor {
            data: vec![0u8; 3 * 224 * 224 * 4].into(),
        })),
    };
    let without = connect(None).await.expect("connect");
    let err = without
        .classify(MODEL, vec![tensor()], Output::TopK(1))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let with = connect(Some("client-token")).await.expect("connect");
    assert_eq!(format!("{:?}", with.config().token), "Some(Token(…))");
    with.classify(MODEL, vec![tensor()], Output::TopK(1))
        .await
        .expect("unary with the token");
    assert_eq!(with.list_models().await.expect("list").len(), 1);
    let frames = tokio_stream::iter((0..2u64).map(move |i| resnet_client::proto::StreamFrame {
        frame_id: i,
        model: MODEL.into(),
        image: Some(tensor()),
        output: None,
    }));
    let mut results = with.classify_stream(frames).await.expect("stream opens");
    let mut answered = 0;
    while let Some(r) = results.next().await {
        r.expect("a frame's result");
        answered += 1;
    }
    assert_eq!(answered, 2);
    server.stop().await;
}
