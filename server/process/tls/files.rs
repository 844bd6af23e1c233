//! The certificate, key and client CA files: each read whole, a regular file of at most
//! 1 MiB (never waited on), told apart from the last reading by a digest, and made into
//! a rustls configuration (mutual TLS when a client CA is named, ALPN `h2`).

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use super::{TlsError, TlsOptions};

/// One reading of the files.
pub(super) struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The most a certificate, key or CA file may hold. A chain of a few certificates is a
/// few KiB; a CA bundle as big as the system's is ~200 KiB.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// One file, whole: a regular file of at most [`MAX_FILE_BYTES`]. A FIFO would block
/// the read (or, without O_NONBLOCK, the open) until someone writes to it, and a device
/// such as `/dev/zero` would never end; both are refused.
fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let unreadable = |source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    // Followed if a symbolic link: Kubernetes mounts Secrets as links into `..data/`.
    let file = options.open(path).map_err(unreadable)?;
    let metadata = file.metadata().map_err(unreadable)?;
    if !metadata.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(invalid(format!("larger than {} MiB", MAX_FILE_BYTES >> 20)));
    }
    Ok(bytes)
}

impl Files {
    pub(super) fn read(options: &TlsOptions) -> Result<Files, TlsError> {
        Ok(Files {
            cert: read_file("certificate", &options.cert)?,
            key: read_file("key", &options.key)?,
            client_ca: options
                .client_ca
                .as_deref()
                .map(|p| read_file("client CA", p))
                .transpose()?,
        })
    }

    /// What tells one reading from another, without keeping the key's bytes around.
    pub(super) fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            match part {
                Some(bytes) => {
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(bytes);
                }
                None => h.update(u64::MAX.to_le_bytes()),
            }
        }
        h.finalize().into()
    }
}

pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file, at least one.
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The rustls configuration of one reading of the files.
pub(super) fn build(options: &TlsOptions, files: &Files) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("certificate", &options.cert, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| TlsError::Invalid {
        what: "key",
        path: options.key.clone(),
        reason: format!("no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair {
            cert: options.cert.clone(),
            key: options.key.clone(),
            reason: e.to_string(),
        })?;
    let builder = match (&options.client_ca, &files.client_ca) {
        (Some(path), Some(pem)) => {
            let invalid = |reason: String| TlsError::Invalid {
                what: "client CA",
                path: path.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for ca in certificates("client CA", path, pem)? {
                roots
                    .add(ca)
                    .map_err(|e| invalid(format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        (None, None) => builder.with_no_client_auth(),
        // Never reached as the files are read; spelled out so that no change can turn
        // mutual TLS off without saying so.
        (Some(path), None) => {
            return Err(TlsError::Invalid {
                what: "client CA",
                path: path.clone(),
                reason: "was not read; refusing to serve without client certificates".into(),
            })
        }
        (None, Some(_)) => {
            return Err(TlsError::Inconsistent(
                "a client CA was read, but no --tls-client-ca names one",
            ))
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Pair {
            cert: options.cert.clone(),
            key: options.key.clone(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{Ca, Setup};
    use super::super::Tls;
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn bad_files_at_start_up_are_errors_that_name_them() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("server");
        let metrics = crate::process::metrics::Metrics::new();
        let setup = Setup::new(&leaf, None);

        let mut missing = setup.options.clone();
        missing.cert = setup.dir.path().join("absent.crt");
        let err = Tls::load(missing, &metrics).expect_err("missing");
        assert!(err.to_string().contains("absent.crt"), "{err}");

        std::fs::write(&setup.options.cert, "not a certificate\n").expect("write");
        let err = Tls::load(setup.options.clone(), &metrics).expect_err("garbage");
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");

        std::fs::write(&setup.options.cert, &leaf.cert).expect("write");
        std::fs::write(&setup.options.key, &leaf.cert).expect("write");
        let err = Tls::load(setup.options.clone(), &metrics).expect_err("no key");
        assert!(err.to_string().contains("no private key"), "{err}");

        std::fs::write(&setup.options.key, ca.leaf("other").key).expect("write");
        let err = Tls::load(setup.options.clone(), &metrics).expect_err("foreign key");
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");

        setup.write(&leaf);
        let mut no_ca = setup.options.clone();
        let ca_path = setup.dir.path().join("empty-ca.crt");
        std::fs::write(&ca_path, "").expect("write");
        no_ca.client_ca = Some(ca_path);
        let err = Tls::load(no_ca, &metrics).expect_err("empty CA");
        assert!(err.to_string().contains("client CA"), "{err}");
    }

    /// `Tls::load` on a thread, so that a regression that blocks fails the test
    /// instead of hanging it.
    fn load_within_seconds(options: TlsOptions) -> Result<Arc<Tls>, TlsError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(Tls::load(options, &crate::process::metrics::Metrics::new()));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("loading the files blocked")
    }

    #[cfg(unix)]
    #[test]
    fn fifos_devices_and_oversized_files_are_refused_not_waited_on() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("server");
        let setup = Setup::new(&leaf, None);

        // Nobody writes to it: std::fs::read waited in open() for good.
        let fifo = setup.dir.path().join("fifo.crt");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let mut options = setup.options.clone();
        options.cert = fifo.clone();
        let err = load_within_seconds(options).expect_err("a FIFO");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(err.to_string().contains("fifo.crt"), "{err}");

        // Endless: std::fs::read read it until memory ran out.
        let mut options = setup.options.clone();
        options.client_ca = Some(PathBuf::from("/dev/zero"));
        let err = load_within_seconds(options).expect_err("/dev/zero");
        assert!(err.to_string().contains("/dev/zero"), "{err}");

        // A valid chain padded past 1 MiB (PEM parsers skip the text between blocks):
        // it loaded before; now it is refused, at start-up and on reload.
        let padded = format!("{}{}", leaf.cert, "\n".repeat(1 << 20));
        let big = setup.dir.path().join("big.crt");
        std::fs::write(&big, &padded).expect("write");
        let mut options = setup.options.clone();
        options.cert = big.clone();
        let err = load_within_seconds(options).expect_err("oversized");
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");
        assert!(err.to_string().contains("big.crt"), "{err}");
        let tls = load_within_seconds(setup.options.clone()).expect("loads");
        std::fs::write(&setup.options.cert, &padded).expect("write");
        let err = tls.reload().expect_err("oversized on reload");
        assert!(err.to_string().contains("larger than 1 MiB"), "{err}");

        // At the limit exactly, it still loads.
        let fits = format!("{}{}", leaf.cert, "\n".repeat((1 << 20) - leaf.cert.len()));
        std::fs::write(&setup.options.cert, &fits).expect("write");
        assert!(tls.reload().is_ok());
    }

    #[test]
    fn a_client_ca_that_was_not_read_is_an_error_not_plain_tls() {
        let ca = Ca::new("test CA");
        let setup = Setup::new(&ca.leaf("server"), Some(&Ca::new("client CA")));
        let mut files = Files::read(&setup.options).expect("read");
        assert!(build(&setup.options, &files).is_ok());
        files.client_ca = None;
        let err = build(&setup.options, &files).expect_err("mutual TLS off");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        let mut plain = setup.options.clone();
        plain.client_ca = None;
        files.client_ca = Some(ca.pem.clone().into_bytes());
        let err = build(&plain, &files).expect_err("a CA no option names");
        assert!(matches!(err, TlsError::Inconsistent(_)), "{err}");
    }
}
