//! `resnet-client stream`: frames from a video (decoded by an `ffmpeg` subprocess to raw
//! RGB24), a directory of images, or a video on stdin, sent over `ClassifyStream` at a
//! target rate, with per-frame results and a summary.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::{proto, Client, Output};

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{tool} not found on PATH: install FFmpeg (e.g. `apt-get install ffmpeg`) to stream video files, or stream a directory of frames instead")]
    MissingTool { tool: &'static str },
    #[error("{tool} failed on {input}: {message}")]
    Tool {
        tool: &'static str,
        input: String,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no image files")]
    EmptyDir(PathBuf),
    #[error("a video on stdin needs --size WIDTHxHEIGHT")]
    NeedSize,
    #[error("stream failed: {0}")]
    Rpc(#[from] tonic::Status),
}

/// Where frames come from.
#[derive(Debug, Clone)]
pub enum Source {
    Video(PathBuf),
    /// A video on stdin, scaled by ffmpeg to this size.
    Stdin {
        width: u32,
        height: u32,
    },
    Dir(PathBuf),
}

impl Source {
    /// `-` is stdin (with `size`), a directory is a folder of frames, anything else a
    /// video file.
    pub fn parse(arg: &str, size: Option<(u32, u32)>) -> Result<Source, VideoError> {
        if arg == "-" {
            let (width, height) = size.ok_or(VideoError::NeedSize)?;
            return Ok(Source::Stdin { width, height });
        }
        let p = PathBuf::from(arg);
        Ok(if p.is_dir() {
            Source::Dir(p)
        } else {
            Source::Video(p)
        })
    }
}

fn tool_error(tool: &'static str, input: &str, e: std::io::Error) -> VideoError {
    if e.kind() == std::io::ErrorKind::NotFound {
        VideoError::MissingTool { tool }
    } else {
        VideoError::Tool {
            tool,
            input: input.to_string(),
            message: e.to_string(),
        }
    }
}

/// Width, height and frame rate of a video's first stream, by ffprobe.
pub fn probe(path: &Path) -> Result<(u32, u32, f64), VideoError> {
    let input = path.display().to_string();
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height,avg_frame_rate",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .map_err(|e| tool_error("ffprobe", &input, e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fail = |message: String| VideoError::Tool {
        tool: "ffprobe",
        input: input.clone(),
        message,
    };
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let fields: Vec<&str> = text.trim().split(',').collect();
    let [w, h, rate, ..] = fields[..] else {
        return Err(fail(format!("unexpected output '{}'", text.trim())));
    };
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| fail(format!("bad size '{s}'")))
    };
    let fps = match rate.split_once('/') {
        Some((n, d)) => n.parse::<f64>().unwrap_or(0.0) / d.parse::<f64>().unwrap_or(1.0).max(1e-9),
        None => rate.parse().unwrap_or(0.0),
    };
    Ok((parse(w)?, parse(h)?, if fps > 0.0 { fps } else { 25.0 }))
}

/// One frame to send, with its place in the source.
pub struct Frame {
    pub index: u64,
    /// Seconds into the source.
    pub timestamp: f64,
    pub image: proto::Image,
}

/// Starts reading frames on a blocking thread; returns them through a small bounded
/// channel (so a slow server slows the decoder) and the source's frame rate.
pub fn frames(
    source: &Source,
) -> Result<(mpsc::Receiver<Result<Frame, VideoError>>, f64), VideoError> {
    let (tx, rx) = mpsc::channel(4);
    match source {
        Source::Dir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| VideoError::Io {
                    path: dir.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(
                            e.to_ascii_lowercase().as_str(),
                            "jpg" | "jpeg" | "png" | "webp" | "bmp" | "gif"
                        )
                    })
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(VideoError::EmptyDir(dir.clone()));
            }
            let fps = 25.0;
            std::thread::spawn(move || {
                for (i, path) in files.into_iter().enumerate() {
                    let item = std::fs::read(&path)
                        .map(|data| Frame {
                            index: i as u64,
                            timestamp: i as f64 / fps,
                            image: crate::encoded(data),
                        })
                        .map_err(|source| VideoError::Io { path, source });
                    if tx.blocking_send(item).is_err() {
                        break;
                    }
                }
            });
            Ok((rx, fps))
        }
        Source::Video(path) => {
            let (w, h, fps) = probe(path)?;
            let mut cmd = Command::new("ffmpeg");
            cmd.args(["-v", "error", "-nostdin", "-i"])
                .arg(path)
                .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
            spawn_decoder(cmd, path.display().to_string(), w, h, fps, tx)?;
            Ok((rx, fps))
        }
        Source::Stdin { width, height } => {
            let mut cmd = Command::new("ffmpeg");
            cmd.args(["-v", "error", "-i", "pipe:0", "-vf"])
                .arg(format!("scale={width}:{height}"))
                .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
                .stdin(Stdio::inherit());
            spawn_decoder(cmd, "stdin".into(), *width, *height, 25.0, tx)?;
            Ok((rx, 25.0))
        }
    }
}

fn spawn_decoder(
    mut cmd: Command,
    input: String,
    w: u32,
    h: u32,
    fps: f64,
    tx: mpsc::Sender<Result<Frame, VideoError>>,
) -> Result<(), VideoError> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error("ffmpeg", &input, e))?;
    let mut stdout = child.stdout.take().ok_or_else(|| VideoError::Tool {
        tool: "ffmpeg",
        input: input.clone(),
        message: "no stdout".into(),
    })?;
    std::thread::spawn(move || {
        let size = w as usize * h as usize * 3;
        let mut index = 0u64;
        loop {
            let mut rgb = vec![0u8; size];
            match stdout.read_exact(&mut rgb) {
                Ok(()) => {
                    let frame = Frame {
                        index,
                        timestamp: index as f64 / fps,
                        image: crate::raw(w, h, rgb),
                    };
                    if tx.blocking_send(Ok(frame)).is_err() {
                        let _ = child.kill();
                        break;
                    }
                    index += 1;
                }
                Err(_) => break, // end of the video (or ffmpeg died: see its status)
            }
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if let Ok(status) = child.wait() {
            if !status.success() && index == 0 {
                let _ = tx.blocking_send(Err(VideoError::Tool {
                    tool: "ffmpeg",
                    input,
                    message: err.trim().to_string(),
                }));
            }
        }
    });
    Ok(())
}

/// One frame's result.
#[derive(Debug, Clone, Serialize)]
pub struct FrameReport {
    pub index: u64,
    pub timestamp: f64,
    pub latency_ms: f64,
    /// Top-1 class, when the frame succeeded.
    pub label: Option<String>,
    pub class: Option<u32>,
    pub score: Option<f32>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    pub frames: u64,
    pub errors: u64,
    pub seconds: f64,
    pub fps: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
}

/// Streams every frame of `source` to `model` (at `fps` if given, else as fast as the
/// server takes them), calling `on_frame` per result in order.
pub async fn stream(
    client: &Client,
    source: &Source,
    model: &str,
    fps: Option<f64>,
    mut on_frame: impl FnMut(&FrameReport),
) -> Result<StreamSummary, VideoError> {
    let (mut frames, _source_fps) = frames(source)?;
    let (tx, rx) = mpsc::channel::<proto::StreamFrame>(8);
    let sent_at: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(u64, f64, Instant)>>> =
        Default::default();
    let mut responses = client.classify_stream(ReceiverStream::new(rx)).await?;
    let model = model.to_string();
    let sent = sent_at.clone();
    let producer = tokio::spawn(async move {
        let mut tick =
            fps.map(|f| tokio::time::interval(Duration::from_secs_f64(1.0 / f.max(1e-3))));
        while let Some(item) = frames.recv().await {
            let frame = item?;
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            if let Ok(mut q) = sent.lock() {
                q.push_back((frame.index, frame.timestamp, Instant::now()));
            }
            let msg = proto::StreamFrame {
                frame_id: frame.index,
                model: model.clone(),
                image: Some(frame.image),
                output: Some(Output::TopK(1).spec()),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
        Ok::<(), VideoError>(())
    });
    let started = Instant::now();
    // 1 µs to 1 h: `saturating_record` clamps to these bounds.
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| VideoError::Tool {
            tool: "histogram",
            input: String::new(),
            message: e.to_string(),
        })?;
    let (mut n, mut errors) = (0u64, 0u64);
    while let Some(r) = responses.message().await? {
        let (index, timestamp, at) = sent_at
            .lock()
            .ok()
            .and_then(|mut q| q.pop_front())
            .unwrap_or((r.frame_id, 0.0, Instant::now()));
        let latency = at.elapsed();
        histogram.saturating_record(latency.as_micros().max(1) as u64);
        let mut report = FrameReport {
            index,
            timestamp,
            latency_ms: latency.as_secs_f64() * 1000.0,
            label: None,
            class: None,
            score: None,
            error: None,
        };
        match r.outcome {
            Some(proto::stream_result::Outcome::Result(c)) => {
                if let Some(top) = c.top.first() {
                    report.label = Some(top.label.clone());
                    report.class = Some(top.index);
                    report.score = Some(top.score);
                }
            }
            Some(proto::stream_result::Outcome::Error(e)) => {
                errors += 1;
                report.error = Some(format!(
                    "{:?}: {}",
                    tonic::Code::from_i32(e.code),
                    e.message
                ));
            }
            None => {}
        }
        on_frame(&report);
        n += 1;
    }
    producer.await.map_err(|e| VideoError::Tool {
        tool: "ffmpeg",
        input: String::new(),
        message: e.to_string(),
    })??;
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(StreamSummary {
        frames: n,
        errors,
        seconds,
        fps: n as f64 / seconds.max(1e-9),
        latency_ms_p50: ms(0.5),
        latency_ms_p90: ms(0.9),
        latency_ms_p99: ms(0.99),
        latency_ms_max: histogram.max() as f64 / 1000.0,
    })
}
