//! The weights cache and the download into it: resumable, hashed while it streams,
//! checked against the hash prefix in torch.hub's file name, and renamed into place
//! only once verified, so the cache never holds a partial or corrupt checkpoint.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::hub;
use crate::model::ModelName;

/// Overrides [`hub::DEFAULT_BASE_URL`] (a mirror, or a test server).
pub const BASE_URL_ENV: &str = "RESNET_SERVE_WEIGHTS_URL";

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot download {url}: {reason}. If this machine is offline, copy {file} into {cache} by other means, or pass a local file path instead of a model name")]
    Unreachable {
        url: String,
        reason: String,
        file: String,
        cache: PathBuf,
    },
    #[error("{url} answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: downloaded file has sha256 {actual}, which does not start with {expected}; refusing it")]
    HashMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("weights cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `$XDG_CACHE_HOME/resnet-serve`, else `~/.cache/resnet-serve`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("resnet-serve")
}

/// Downloads published checkpoints into a cache directory.
#[derive(Debug, Clone)]
pub struct Downloader {
    pub base_url: String,
    pub cache_dir: PathBuf,
    /// Draw a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl Downloader {
    /// Cache and base URL from the environment, or their defaults.
    pub fn from_env(cache_dir: Option<PathBuf>, base_url: Option<String>) -> Self {
        let base_url = base_url
            .or_else(|| std::env::var(BASE_URL_ENV).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| hub::DEFAULT_BASE_URL.to_string());
        Downloader {
            base_url,
            cache_dir: cache_dir.unwrap_or_else(default_cache_dir),
            progress: true,
        }
    }

    pub fn cached_path(&self, model: ModelName) -> PathBuf {
        self.cache_dir.join(model.hub_file_name())
    }

    /// The model's checkpoint in the cache, downloading it first if absent.
    pub fn fetch(&self, model: ModelName) -> Result<PathBuf, DownloadError> {
        self.fetch_file(model.hub_file_name())
    }

    /// `file` (a name under the base URL) in the cache, downloading it first if absent.
    /// A `-<hex>` hash prefix in the name is checked against the downloaded bytes.
    pub fn fetch_file(&self, file: &str) -> Result<PathBuf, DownloadError> {
        let dest = self.cache_dir.join(file);
        if dest.is_file() {
            return Ok(dest);
        }
        self.download(file, &dest)?;
        Ok(dest)
    }

    fn url(&self, file: &str) -> String {
        format!("{}/{file}", self.base_url.trim_end_matches('/'))
    }

    fn download(&self, file: &str, dest: &Path) -> Result<(), DownloadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DownloadError::Io { path, source }
        };
        fs::create_dir_all(&self.cache_dir).map_err(io(&self.cache_dir))?;
        let url = self.url(file);
        let part = dest.with_extension("part");
        let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = agent.get(&url);
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = request.call().map_err(|e| DownloadError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
            file: file.to_string(),
            cache: self.cache_dir.clone(),
        })?;
        let status = response.status().as_u16();
        let resumed = status == 206 && have > 0;
        if !(status == 200 || resumed) {
            return Err(DownloadError::Http { url, status });
        }
        let remaining: Option<u64> = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut hasher = Sha256::new();
        let mut out = if resumed {
            // Hash what we already have, then append the rest.
            let mut f = File::open(&part).map_err(io(&part))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match f.read(&mut buf).map_err(io(&part))? {
                    0 => break,
                    n => hasher.update(&buf[..n]),
                }
            }
            OpenOptions::new()
                .append(true)
                .open(&part)
                .map_err(io(&part))?
        } else {
            File::create(&part).map_err(io(&part))?
        };
        let start = if resumed { have } else { 0 };
        let bar = if self.progress {
            ProgressBar::new(start + remaining.unwrap_or(0))
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(file.to_string());
        bar.set_position(start);
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| DownloadError::Unreachable {
                    url: url.clone(),
                    reason: format!(
                        "connection lost after {} bytes ({e}); run again to resume",
                        bar.position()
                    ),
                    file: file.to_string(),
                    cache: self.cache_dir.clone(),
                })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io(&part))?;
            bar.inc(n as u64);
        }
        out.sync_all().map_err(io(&part))?;
        bar.finish_and_clear();
        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = hub::expected_hash_prefix(dest) {
            if !actual.starts_with(&expected) {
                // A corrupt partial file would poison every resume: start over next time.
                let _ = fs::remove_file(&part);
                return Err(DownloadError::HashMismatch {
                    url,
                    expected,
                    actual,
                });
            }
        }
        fs::rename(&part, dest).map_err(io(dest))?;
        Ok(())
    }
}
