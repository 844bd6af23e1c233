//! TLS, mutual TLS and connection ages through the real server on 127.0.0.1, with
//! certificates from a CA made in the test (rcgen): the client crate over TLS, plaintext
//! refused, client certificates of the right CA only, tokens on top, certificates
//! rotated while a connection stays open, Python's tritonclient over mutual TLS with a
//! token, and GOAWAY after `max_connection_age` with the call in flight finishing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use resnet_client::proto::{stream_result, StreamFrame, StreamResult};
use resnet_client::{Client, ClientConfig, ClientError, Output, TlsFiles};
use resnet_serve::process::server::{ModelLoader, RunError, ServeOptions};
use resnet_serve::process::tls::TlsOptions;
use testkit::testca::{Issued, TestCa};
use testkit::{TestServer, MODEL};
use tokio_rustls::rustls;
use tonic::Code;

/// A CA, the server's certificate and key files, and a directory for more.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server: Issued,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("resnet-serve test CA");
        let ca_file = ca.write(dir.path(), "ca.crt");
        let server = ca.issue("server", 1);
        let (cert, key) = server.write(dir.path(), "server");
        Pki {
            dir,
            ca,
            ca_file,
            cert,
            key,
            server,
        }
    }

    fn options(&self) -> TlsOptions {
        TlsOptions::new(&self.cert, &self.key)
    }

    /// TLS files for a client that trusts this CA (and, given a certificate, holds it).
    fn client(&self, identity: Option<(&PathBuf, &PathBuf)>) -> TlsFiles {
        TlsFiles {
            ca: Some(self.ca_file.clone()),
            cert: identity.map(|(c, _)| c.clone()),
            key: identity.map(|(_, k)| k.clone()),
            domain: None,
        }
    }
}

async fn start(configure: impl FnOnce(&mut ServeOptions)) -> TestServer {
    let mut options = testkit::server::options(&[1, 2], 1, 16);
    configure(&mut options);
    TestServer::start(options, testkit::resnet18()).await
}

fn image() -> resnet_client::proto::Image {
    resnet_client::tensor(&vec![0.25f32; 3 * 224 * 224])
}

async fn connect(url: &str, tls: &TlsFiles, token: Option<&str>) -> Result<Client, ClientError> {
    let mut config = ClientConfig::new([url]);
    config.tls = tls.config()?;
    config.token = token.map(|t| resnet_client::Token(t.into()));
    config.retries = 0;
    Client::connect(config).await
}

/// One classification through a fresh client: Ok, or what failed (connecting or the
/// call; a TLS 1.3 server refuses a client certificate after the client's handshake
/// is done, so a refusal may surface only at the first call).
async fn classify_with(url: &str, tls: &TlsFiles, token: Option<&str>) -> Result<(), String> {
    let client = connect(url, tls, token)
        .await
        .map_err(|e| format!("{e:?}"))?;
    classify(&client).await
}

async fn classify(client: &Client) -> Result<(), String> {
    let r = client
        .classify(MODEL, vec![image()], Output::TopK(1))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].top.len(), 1);
    Ok(())
}

/// `resnet_serve_tls_handshake_failures_total{reason}` now.
async fn handshake_failures(server: &TestServer, reason: &str) -> u64 {
    let series = format!("resnet_serve_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    testkit::metrics::series(&server.metrics().await, &series).unwrap_or(0.0) as u64
}

/// Waits (a little) for the server to count `want` failed handshakes: it counts them
/// in its own task, after the client has given up.
async fn expect_handshake_failures(server: &TestServer, want: u64) {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let got = handshake_failures(server, "error").await;
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{got} handshake failures, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The certificate the server presents to a new connection (by DER), through a bare
/// rustls client that trusts `roots`.
async fn presented_certificate(url: &str, roots: &[&TestCa]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut store = rustls::RootCertStore::empty();
    for ca in roots {
        store
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("pem"))
            .expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("https://"))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (_, session) = tls.get_ref();
    session.peer_certificates().expect("certificates")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crate_speaks_tls_and_plaintext_is_refused() {
    let pki = Pki::new();
    let server = start(|o| o.tls = Some(pki.options())).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // The endpoint's address is in the certificate; so is the name given instead.
    classify_with(&server.url, &pki.client(None), None)
        .await
        .expect("TLS with the test CA");
    let mut by_name = pki.client(None);
    by_name.domain = Some("localhost".into());
    classify_with(&server.url, &by_name, None)
        .await
        .expect("TLS verifying the name localhost");
    assert_eq!(
        presented_certificate(&server.url, &[&pki.ca]).await,
        pki.server.der
    );

    // No TLS files: an https endpoint gets the public (webpki) roots, which do not
    // hold the test CA.
    let public = classify_with(&server.url, &TlsFiles::default(), None).await;
    assert!(
        public.is_err(),
        "a certificate of an unknown CA was accepted"
    );
    // A name the certificate does not carry.
    let mut wrong_name = pki.client(None);
    wrong_name.domain = Some("elsewhere.example".into());
    assert!(classify_with(&server.url, &wrong_name, None).await.is_err());
    expect_handshake_failures(&server, 2).await;

    // Plaintext HTTP/2 to the TLS port fails; TLS settings with an http:// endpoint are
    // refused by the client rather than sent in the clear.
    let plain = server.url.replacen("https://", "http://", 1);
    let refused = classify_with(&plain, &TlsFiles::default(), None).await;
    assert!(refused.is_err(), "plaintext call to a TLS port answered");
    expect_handshake_failures(&server, 3).await;
    let err = connect(&plain, &pki.client(None), None)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, ClientError::PlaintextEndpoint(_)), "{err:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_certificates_of_its_client_ca_only() {
    let pki = Pki::new();
    let clients = TestCa::new("client CA");
    let client_ca = clients.write(pki.dir.path(), "clients.crt");
    let good = clients.issue("good client", 10);
    let (good_cert, good_key) = good.write(pki.dir.path(), "good");
    let foreign = TestCa::new("foreign CA").issue("stranger", 11);
    let (foreign_cert, foreign_key) = foreign.write(pki.dir.path(), "foreign");
    let server = start(|o| {
        let mut tls = pki.options();
        tls.client_ca = Some(client_ca.clone());
        o.tls = Some(tls);
    })
    .await;

    classify_with(
        &server.url,
        &pki.client(Some((&good_cert, &good_key))),
        None,
    )
    .await
    .expect("a client certificate of the client CA");
    let stranger = classify_with(
        &server.url,
        &pki.client(Some((&foreign_cert, &foreign_key))),
        None,
    )
    .await;
    assert!(
        stranger.is_err(),
        "a foreign client certificate was admitted"
    );
    let anonymous = classify_with(&server.url, &pki.client(None), None).await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was admitted"
    );
    expect_handshake_failures(&server, 2).await;

    // A client certificate without its key is the client's error, before connecting.
    let half = TlsFiles {
        key: None,
        ..pki.client(Some((&good_cert, &good_key)))
    };
    assert!(matches!(half.config(), Err(ClientError::TlsIdentity)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_over_tls_too() {
    let pki = Pki::new();
    let tokens = pki.dir.path().join("tokens");
    std::fs::write(&tokens, "tls-secret\n").expect("write");
    let server = start(|o| {
        o.tls = Some(pki.options());
        o.auth_tokens = Some(Arc::new(
            resnet_serve::api::auth::Tokens::load(&tokens).expect("tokens"),
        ));
    })
    .await;
    let anonymous = connect(&server.url, &pki.client(None), None)
        .await
        .expect("connects");
    let status = anonymous
        .classify(MODEL, vec![image()], Output::TopK(1))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    classify_with(&server.url, &pki.client(None), Some("tls-secret"))
        .await
        .expect("TLS and the token");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_dropping_open_connections() {
    let pki = Pki::new();
    let server = start(|o| {
        let mut tls = pki.options();
        tls.reload_every = Duration::from_millis(100);
        o.tls = Some(tls);
    })
    .await;
    // This client trusts the first CA only: were its connection dropped, reconnecting
    // to the rotated certificate (another CA's) would fail.
    let open = connect(&server.url, &pki.client(None), None)
        .await
        .expect("connects");
    classify(&open).await.expect("before the rotation");

    let next_ca = TestCa::new("next CA");
    let next_ca_file = next_ca.write(pki.dir.path(), "next-ca.crt");
    let rotated = next_ca.issue("server, rotated", 2);
    // A broken write first (a key alone): the server keeps its certificate.
    std::fs::write(&pki.key, &rotated.key_pem).expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        presented_certificate(&server.url, &[&pki.ca, &next_ca]).await,
        pki.server.der,
        "a key that does not match is not taken"
    );
    rotated.write_to(&pki.cert, &pki.key);
    let give_up = Instant::now() + Duration::from_secs(10);
    while presented_certificate(&server.url, &[&pki.ca, &next_ca]).await != rotated.der {
        assert!(
            Instant::now() < give_up,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = server.metrics().await;
    assert!(
        text.contains("resnet_serve_tls_reloads_total{result=\"applied\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("resnet_serve_tls_reloads_total{result=\"failed\"} 1"),
        "{text}"
    );

    classify(&open)
        .await
        .expect("the connection opened before the rotation still serves");
    let old_trust = classify_with(&server.url, &pki.client(None), None).await;
    assert!(
        old_trust.is_err(),
        "a new connection got the old certificate"
    );
    let new_trust = TlsFiles {
        ca: Some(next_ca_file),
        ..TlsFiles::default()
    };
    classify_with(&server.url, &new_trust, None)
        .await
        .expect("a new connection with the new CA");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_certificate_at_once() {
    // Registered first, so the signal sent below can never take the default action
    // (ending this test process), whatever the server's watcher has done by then.
    let mut hangups =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("signal");
    let pki = Pki::new();
    let server = start(|o| {
        let mut tls = pki.options();
        // Only the signal can make it look before the test ends.
        tls.reload_every = Duration::from_secs(3600);
        o.tls = Some(tls);
    })
    .await;
    assert_eq!(
        presented_certificate(&server.url, &[&pki.ca]).await,
        pki.server.der
    );
    let renewed = pki.ca.issue("server, renewed", 3);
    renewed.write_to(&pki.cert, &pki.key);
    // SAFETY: kill(2) on this process with a signal it handles.
    let sent = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    assert_eq!(sent, 0, "kill");
    hangups.recv().await;
    let give_up = Instant::now() + Duration::from_secs(5);
    while presented_certificate(&server.url, &[&pki.ca]).await != renewed.der {
        assert!(
            Instant::now() < give_up,
            "SIGHUP did not re-read the certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_certificate_files_stop_the_start() {
    let pki = Pki::new();
    let mut missing = pki.options();
    missing.cert = pki.dir.path().join("absent.crt");
    let loader: ModelLoader = Box::new(|| Ok(Vec::new()));
    let options = ServeOptions {
        tls: Some(missing),
        ..ServeOptions::default()
    };
    let server = TestServer::spawn(options, loader).await;
    assert!(server.ready_within(Duration::from_secs(10)).await.is_err());
    let err = server.shutdown().await.expect_err("no start");
    assert!(matches!(err, RunError::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("absent.crt"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_over_mutual_tls_with_a_token() {
    let pki = Pki::new();
    let clients = TestCa::new("client CA");
    let client_ca = clients.write(pki.dir.path(), "clients.crt");
    let (cert, key) = clients.issue("python", 20).write(pki.dir.path(), "python");
    let tokens = pki.dir.path().join("tokens");
    std::fs::write(&tokens, "py-secret infer\n").expect("write");
    let server = start(|o| {
        let mut tls = pki.options();
        tls.client_ca = Some(client_ca.clone());
        o.tls = Some(tls);
        o.auth_tokens = Some(Arc::new(
            resnet_serve::api::auth::Tokens::load(&tokens).expect("tokens"),
        ));
    })
    .await;
    let out = testkit::python::run(
        "tritonclient_tls.py",
        &server.url,
        MODEL,
        [
            OsString::from("--token"),
            "py-secret".into(),
            "--ca".into(),
            pki.ca_file.clone().into(),
            "--cert".into(),
            cert.into(),
            "--key".into(),
            key.into(),
        ],
    )
    .await;
    let text = out.text;
    assert!(out.success, "tritonclient over TLS failed:\n{text}");
    assert!(
        text.contains("all tritonclient TLS checks passed"),
        "{text}"
    );
    server.stop().await;
}

/// The next whole gRPC message of a response body.
async fn next_message<M: Message + Default>(
    body: &mut h2::RecvStream,
    buffered: &mut Vec<u8>,
) -> M {
    loop {
        if buffered.len() >= 5 {
            let len =
                u32::from_be_bytes([buffered[1], buffered[2], buffered[3], buffered[4]]) as usize;
            if buffered.len() >= 5 + len {
                let message = M::decode(&buffered[5..5 + len]).expect("message");
                buffered.drain(..5 + len);
                return message;
            }
        }
        let chunk = body
            .data()
            .await
            .expect("more of the response")
            .expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        buffered.extend_from_slice(&chunk);
    }
}

fn frame(id: u64) -> StreamFrame {
    StreamFrame {
        frame_id: id,
        model: MODEL.into(),
        image: Some(image()),
        output: Some(Output::TopK(1).spec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_are_sent_goaway_and_their_calls_finish() {
    let server = start(|o| o.max_connection_age = Some(Duration::from_secs(1))).await;
    let authority = server.url.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .expect("connect");
    let (h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let opened = Instant::now();
    let connection = tokio::spawn(connection);
    let head = |path: &str| {
        http::Request::post(format!("http://{authority}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request")
    };

    // A stream that stays open across the connection's age.
    let mut sender = h2.clone().ready().await.expect("ready");
    let (response, mut stream) = sender
        .send_request(head("/resnet_serve.v1.Classifier/ClassifyStream"), false)
        .expect("send");
    stream
        .send_data(testkit::wire::grpc_body(&frame(1)), false)
        .expect("frame 1");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut buffered = Vec::new();
    let first: StreamResult = next_message(&mut body, &mut buffered).await;
    assert_eq!(first.frame_id, 1);
    assert!(
        matches!(first.outcome, Some(stream_result::Outcome::Result(_))),
        "{first:?}"
    );

    // New calls on the connection are refused once it is told to go away.
    let refused_after = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            opened.elapsed() < Duration::from_secs(5),
            "no GOAWAY within 5 s of a 1 s age"
        );
        let health = head("/grpc.health.v1.Health/Check");
        let refused = match h2.clone().ready().await {
            Err(e) => e.is_go_away(),
            Ok(mut s) => match s.send_request(health, true) {
                Err(e) => e.is_go_away(),
                Ok(_) => false,
            },
        };
        if refused {
            break opened.elapsed();
        }
    };
    assert!(
        refused_after >= Duration::from_millis(850),
        "GOAWAY after {refused_after:?}, before the age less its 10% jitter"
    );

    // The call in flight goes on: another frame, its result, and an OK status.
    stream
        .send_data(testkit::wire::grpc_body(&frame(2)), true)
        .expect("frame 2 after GOAWAY");
    let second: StreamResult = next_message(&mut body, &mut buffered).await;
    assert_eq!(second.frame_id, 2);
    assert!(
        matches!(second.outcome, Some(stream_result::Outcome::Result(_))),
        "{second:?}"
    );
    let trailers = body.trailers().await.expect("trailers").expect("some");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    // With its last call done, the server closes the connection.
    drop((h2, sender));
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the connection closes after its last call")
        .expect("join")
        .expect("closed gracefully");

    // A new connection serves.
    let client = Client::connect(ClientConfig::new([server.url.clone()]))
        .await
        .expect("connects");
    classify(&client).await.expect("on a fresh connection");
    server.stop().await;
}
