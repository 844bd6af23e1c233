//! Bearer tokens on both APIs: who may call, and which calls.
//!
//! The operator names a token file (`--auth-token-file`): one token per line, either the
//! token itself or `sha256:<hex>`, its digest, so the file need not hold secrets; after
//! it, optionally, its scope: `infer` (inference and metadata) or `admin` (everything,
//! the default). Blank lines and `#` comments are skipped. The file is re-read when it
//! changes (checked at most once a second), so tokens rotate without a restart.
//!
//! Every gRPC call but health (and, by default, reflection) needs
//! `authorization: Bearer <token>`. The token is hashed and compared with every entry's
//! digest in constant time, so neither the answer nor its timing says which tokens exist.
//! Missing or wrong: UNAUTHENTICATED. An `infer` token on a call that changes the server
//! (model load and unload, shared-memory registration): PERMISSION_DENIED. Each refusal
//! is counted in `resnet_serve_auth_refusals_total{reason}`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::Status;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Inference and metadata.
    Infer,
    /// Everything, the calls that change the server included.
    Admin,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("token file {0} holds no token")]
    Empty(PathBuf),
}

/// One accepted token, as its digest.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    scope: Scope,
}

/// The tokens of one reading of the file.
fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, AuthError> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fail = |reason: &str| AuthError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason: reason.to_string(),
        };
        let mut words = line.split_whitespace();
        let token = words.next().ok_or_else(|| fail("no token"))?;
        let scope = match words.next() {
            None | Some("admin") => Scope::Admin,
            Some("infer") => Scope::Infer,
            Some(_) => return Err(fail("the scope after a token is 'infer' or 'admin'")),
        };
        if words.next().is_some() {
            return Err(fail("a line holds a token and at most a scope"));
        }
        let digest = match token.strip_prefix("sha256:") {
            Some(hex_digest) => {
                let bytes = hex::decode(hex_digest)
                    .map_err(|_| fail("sha256: needs 64 hexadecimal digits"))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| fail("sha256: needs 64 hexadecimal digits"))?
            }
            None => Sha256::digest(token.as_bytes()).into(),
        };
        entries.push(Entry { digest, scope });
    }
    if entries.is_empty() {
        return Err(AuthError::Empty(path.to_path_buf()));
    }
    Ok(entries)
}

/// The accepted tokens, re-read from their file when it changes.
pub struct Tokens {
    path: PathBuf,
    state: RwLock<Loaded>,
}

struct Loaded {
    entries: Arc<Vec<Entry>>,
    /// The file's modification time and length when read.
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// How often the file's metadata is looked at for a change.
const RECHECK: Duration = Duration::from_secs(1);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Tokens {
    /// Reads the file once; a file that cannot be read or holds no token is an error
    /// (the server then does not start).
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, AuthError> {
        let path = path.into();
        let stamp = stamp(&path);
        let text = std::fs::read_to_string(&path).map_err(|source| AuthError::Read {
            path: path.clone(),
            source,
        })?;
        let entries = Arc::new(parse(&path, &text)?);
        Ok(Tokens {
            path,
            state: RwLock::new(Loaded {
                entries,
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The entries now, re-read first if the file changed. A rewrite that does not parse
    /// keeps the last good tokens (and is logged), so a half-written file locks nobody out.
    fn entries(&self) -> Arc<Vec<Entry>> {
        let due = self
            .state
            .read()
            .map(|s| s.checked.elapsed() >= RECHECK)
            .unwrap_or(false);
        if due {
            if let Ok(mut s) = self.state.write() {
                s.checked = Instant::now();
                let now = stamp(&self.path);
                if now != s.stamp {
                    match std::fs::read_to_string(&self.path)
                        .map_err(|source| AuthError::Read {
                            path: self.path.clone(),
                            source,
                        })
                        .and_then(|text| parse(&self.path, &text))
                    {
                        Ok(entries) => {
                            tracing::info!(path = %self.path.display(), tokens = entries.len(), "token file re-read");
                            s.entries = Arc::new(entries);
                            s.stamp = now;
                        }
                        Err(e) => tracing::warn!("{e}; keeping the previous tokens"),
                    }
                }
            }
        }
        self.state
            .read()
            .map(|s| s.entries.clone())
            .unwrap_or_default()
    }

    /// The scope of `token`, if it is one of the file's: every entry is compared, in
    /// constant time, whatever matches.
    pub fn scope_of(&self, token: &str) -> Option<Scope> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut best: Option<Scope> = None;
        for entry in self.entries().iter() {
            let same = entry
                .digest
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same {
                best = best.max(Some(entry.scope));
            }
        }
        best
    }
}

/// Which calls stay open without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub health: bool,
    pub reflection: bool,
}

impl Default for Open {
    fn default() -> Self {
        Open {
            health: true,
            reflection: true,
        }
    }
}

/// What a call needs, from its path.
fn needs(path: &str, open: Open) -> Option<Scope> {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let method = path.rsplit('/').next().unwrap_or("");
    if service == "grpc.health.v1.Health" && open.health {
        return None;
    }
    if service.starts_with("grpc.reflection.") && open.reflection {
        return None;
    }
    let changes_the_server = service == "inference.GRPCInferenceService"
        && (method.starts_with("RepositoryModel")
            || method.starts_with("SystemSharedMemory")
            || method.starts_with("CudaSharedMemory"));
    Some(if changes_the_server {
        Scope::Admin
    } else {
        Scope::Infer
    })
}

/// The checks every call passes, shared by the connections' services.
pub struct Guard {
    pub tokens: Arc<Tokens>,
    pub open: Open,
    refusals: prometheus::IntCounterVec,
}

impl Guard {
    pub fn new(
        tokens: Arc<Tokens>,
        open: Open,
        metrics: &crate::process::metrics::Metrics,
    ) -> Arc<Self> {
        Arc::new(Guard {
            tokens,
            open,
            refusals: metrics.auth_refusals(),
        })
    }

    /// Admits the call or says why not.
    #[allow(clippy::result_large_err)]
    pub fn check<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let Some(needed) = needs(request.uri().path(), self.open) else {
            return Ok(());
        };
        let refuse = |reason: &'static str, status: Status| {
            self.refusals.with_label_values(&[reason]).inc();
            Err(status)
        };
        let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
            return refuse(
                "missing",
                Status::unauthenticated("this server needs a token: authorization: Bearer <token>"),
            );
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(scope) = token.and_then(|t| self.tokens.scope_of(t)) else {
            return refuse("invalid", Status::unauthenticated("invalid token"));
        };
        if scope < needed {
            return refuse(
                "scope",
                Status::permission_denied("this call needs an admin token"),
            );
        }
        Ok(())
    }
}

/// The layer that puts [`Guard`] in front of every service of the server.
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<Guard>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            guard: self.0.clone(),
        }
    }
}

/// A service behind [`Guard`] (or open, when the server has no token file).
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(guard) = &self.guard {
            if let Err(status) = guard.check(&request) {
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let answer = self.inner.call(request);
        Box::pin(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn tokens_digests_and_scopes() {
        let digest = hex::encode(Sha256::digest(b"hashed-secret"));
        let (_dir, path) = file(&format!(
            "# operators\nplain-admin\nreader infer\n\nsha256:{digest} infer\nboth admin\n"
        ));
        let tokens = Tokens::load(&path).expect("loads");
        assert_eq!(tokens.scope_of("plain-admin"), Some(Scope::Admin));
        assert_eq!(tokens.scope_of("reader"), Some(Scope::Infer));
        assert_eq!(tokens.scope_of("hashed-secret"), Some(Scope::Infer));
        assert_eq!(
            tokens.scope_of(&format!("sha256:{digest}")),
            None,
            "the digest is no token"
        );
        assert_eq!(tokens.scope_of("nobody"), None);
        assert_eq!(tokens.scope_of(""), None);
    }

    #[test]
    fn bad_files_are_refused_with_their_line() {
        for (text, want) in [
            ("tok superuser\n", "line 1"),
            ("# only\n\n", "holds no token"),
            ("ok\nsha256:abc\n", "line 2"),
            ("a infer extra\n", "at most a scope"),
        ] {
            let (_dir, path) = file(text);
            let err = Tokens::load(&path)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_rewritten_file_is_read_again_and_a_broken_one_ignored() {
        let (_dir, path) = file("first\n");
        let tokens = Tokens::load(&path).expect("loads");
        assert_eq!(tokens.scope_of("first"), Some(Scope::Admin));
        std::fs::write(&path, "second infer\nlonger-than-before\n").expect("rewrite");
        if let Ok(mut s) = tokens.state.write() {
            s.checked -= RECHECK;
        }
        assert_eq!(tokens.scope_of("first"), None);
        assert_eq!(tokens.scope_of("second"), Some(Scope::Infer));
        std::fs::write(&path, "bad scope here\n").expect("rewrite");
        if let Ok(mut s) = tokens.state.write() {
            s.checked -= RECHECK;
        }
        assert_eq!(tokens.scope_of("second"), Some(Scope::Infer), "kept");
    }

    #[test]
    fn what_each_call_needs() {
        let open = Open::default();
        assert_eq!(needs("/grpc.health.v1.Health/Check", open), None);
        assert_eq!(
            needs(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                open
            ),
            None
        );
        let closed = Open {
            health: true,
            reflection: false,
        };
        assert_eq!(
            needs(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                closed
            ),
            Some(Scope::Infer)
        );
        assert_eq!(
            needs("/resnet_serve.v1.Classifier/Classify", open),
            Some(Scope::Infer)
        );
        assert_eq!(
            needs("/inference.GRPCInferenceService/ModelInfer", open),
            Some(Scope::Infer)
        );
        for admin in [
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister",
            "SystemSharedMemoryStatus",
        ] {
            assert_eq!(
                needs(&format!("/inference.GRPCInferenceService/{admin}"), open),
                Some(Scope::Admin),
                "{admin}"
            );
        }
    }
}
