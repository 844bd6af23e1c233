//! What the unit tests of TLS share: a CA that issues certificates, the files of a
//! server written to a temporary folder, a client that trusts the CA, and one handshake
//! over an in-memory pipe.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::files::provider;
use super::{Tls, TlsOptions};

/// The test CA of every TLS test (testkit's), issuing leaves as these tests use them.
pub(super) struct Ca {
    pub(super) pem: String,
    ca: testkit::testca::TestCa,
    serial: std::sync::atomic::AtomicU64,
}

/// A certificate and its key, PEM, and the certificate's DER.
pub(super) struct Leaf {
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) der: CertificateDer<'static>,
}

impl Ca {
    pub(super) fn new(name: &str) -> Ca {
        let ca = testkit::testca::TestCa::new(name);
        Ca {
            pem: ca.pem.clone(),
            ca,
            serial: 1.into(),
        }
    }

    /// A certificate for `localhost`, with common name `name`.
    pub(super) fn leaf(&self, name: &str) -> Leaf {
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let issued = self.ca.issue(name, serial);
        Leaf {
            cert: issued.cert_pem,
            key: issued.key_pem,
            der: CertificateDer::from(issued.der),
        }
    }
}

pub(super) struct Setup {
    pub(super) dir: tempfile::TempDir,
    pub(super) options: TlsOptions,
}

impl Setup {
    pub(super) fn new(leaf: &Leaf, client_ca: Option<&Ca>) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut options = TlsOptions::new(dir.path().join("tls.crt"), dir.path().join("tls.key"));
        if let Some(ca) = client_ca {
            let path = dir.path().join("ca.crt");
            std::fs::write(&path, &ca.pem).expect("write");
            options.client_ca = Some(path);
        }
        let setup = Setup { dir, options };
        setup.write(leaf);
        setup
    }

    pub(super) fn write(&self, leaf: &Leaf) {
        std::fs::write(&self.options.cert, &leaf.cert).expect("write");
        std::fs::write(&self.options.key, &leaf.key).expect("write");
    }
}

pub(super) fn client(ca: &Ca, identity: Option<&Leaf>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("pem"))
        .expect("root");
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// One handshake against the current configuration, over an in-memory pipe: the
/// server's certificate as the client saw it, or the handshake's error. A TLS 1.3
/// server refuses a client certificate after the client's side is done, so the
/// client reads once to learn the outcome.
pub(super) async fn handshake(
    tls: &Tls,
    connector: TlsConnector,
) -> Result<CertificateDer<'static>, String> {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let acceptor = TlsAcceptor::from(tls.config());
    let server = tokio::spawn(async move {
        let mut s = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"ok").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    });
    let name = ServerName::try_from("localhost").expect("name");
    let mut c = connector
        .connect(name, client_io)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let _ = server.await;
    let (_, session) = c.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    Ok(session.peer_certificates().expect("certificates")[0].clone())
}
