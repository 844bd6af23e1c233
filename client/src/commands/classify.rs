//! `resnet-client classify`: image files classified in one request, the results printed
//! per file as text or JSON.

use std::path::PathBuf;

use clap::ValueEnum;
use resnet_client::{Client, Output};

use super::read_images;

#[derive(clap::Args)]
pub struct Args {
    /// Model name; empty uses the server's default.
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long, default_value_t = 5)]
    top_k: u32,
    #[arg(long, value_enum, default_value = "topk")]
    output: OutputArg,
    #[arg(long)]
    json: bool,
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputArg {
    Logits,
    Probs,
    Topk,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let Args {
        model,
        top_k,
        output,
        json,
        files,
    } = args;
    let output = match output {
        OutputArg::Logits => Output::Logits,
        OutputArg::Probs => Output::Probabilities,
        OutputArg::Topk => Output::TopK(top_k),
    };
    let images = read_images(&files)?;
    let resp = client.classify(&model, images, output).await?;
    let mut out = Vec::new();
    for (file, r) in files.iter().zip(&resp.results) {
        if json {
            let mut entry = serde_json::Map::new();
            entry.insert("file".into(), file.display().to_string().into());
            match output {
                Output::Logits => entry.insert("logits".into(), r.values.clone().into()),
                Output::Probabilities => entry.insert("probs".into(), r.values.clone().into()),
                Output::TopK(_) => entry.insert(
                    "topk".into(),
                    r.top
                        .iter()
                        .map(|c| serde_json::json!({"index": c.index, "label": c.label, "score": c.score}))
                        .collect::<Vec<_>>()
                        .into(),
                ),
            };
            out.push(serde_json::Value::Object(entry));
        } else {
            println!("{}", file.display());
            for (rank, c) in r.top.iter().enumerate() {
                println!("  {}. {:.4}  {} ({})", rank + 1, c.score, c.label, c.index);
            }
            if !r.values.is_empty() {
                let v: Vec<String> = r.values.iter().map(|x| format!("{x:.6}")).collect();
                println!("  {}", v.join(" "));
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
