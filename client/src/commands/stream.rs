//! `resnet-client stream`: a video (ffmpeg-decoded file, frame directory or stdin) sent
//! frame by frame on one `ClassifyStream`, each result printed as it comes back.

use resnet_client::video::{self, Source};
use resnet_client::Client;

use super::progress;

#[derive(clap::Args)]
pub struct Args {
    /// VIDEO, DIR or - (stdin).
    source: String,
    #[arg(long, default_value = "")]
    model: String,
    /// Target frames per second; default: as fast as the server takes them.
    #[arg(long)]
    fps: Option<f64>,
    /// WIDTHxHEIGHT of frames decoded from stdin.
    #[arg(long, value_parser = parse_size)]
    size: Option<(u32, u32)>,
    /// JSON lines (one per frame, then the summary) instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WIDTHxHEIGHT")?;
    Ok((
        w.parse().map_err(|_| "bad width")?,
        h.parse().map_err(|_| "bad height")?,
    ))
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let Args {
        source,
        model,
        fps,
        size,
        json,
    } = args;
    let source = Source::parse(&source, size)?;
    let bar = progress(None, "frames");
    let summary = video::stream(client, &source, &model, fps, |f| {
        bar.inc(1);
        let line = if json {
            serde_json::to_string(f).unwrap_or_default()
        } else {
            match (&f.label, &f.error) {
                (_, Some(e)) => {
                    format!("frame {:>6}  t={:>8.3}s  error: {e}", f.index, f.timestamp)
                }
                (Some(l), None) => format!(
                    "frame {:>6}  t={:>8.3}s  {} ({}) {:.3}  {:.1} ms",
                    f.index,
                    f.timestamp,
                    l,
                    f.class.unwrap_or(0),
                    f.score.unwrap_or(0.0),
                    f.latency_ms
                ),
                (None, None) => {
                    format!("frame {:>6}  t={:>8.3}s  (no result)", f.index, f.timestamp)
                }
            }
        };
        bar.suspend(|| println!("{line}"));
    })
    .await?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{} frames in {:.2} s: {:.2} fps; {} errors; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
            summary.frames,
            summary.seconds,
            summary.fps,
            summary.errors,
            summary.latency_ms_p50,
            summary.latency_ms_p90,
            summary.latency_ms_p99,
            summary.latency_ms_max
        );
    }
    Ok(())
}
