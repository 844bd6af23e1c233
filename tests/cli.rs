//! The `resnet-serve` binary's offline commands, run as a user would.

use std::process::Command;

use resnet_serve::model::Architecture;
use testkit::binary::run_ok;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_resnet-serve"))
}

#[test]
fn predict_prints_torchvision_logits_and_top5_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("resnet18.safetensors");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
    let images = ["rocket.jpg", "camera_gray.png", "chelsea_rgba.png"];
    let out = run_ok(
        bin()
            .args([
                "predict",
                "--model",
                "resnet18_swsl",
                "--output",
                "logits",
                "--json",
                "--weights",
            ])
            .arg(&weights)
            .args(images.map(|i| testkit::fixture(&format!("images/{i}")))),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let reference = testkit::fixtures::reference("preprocess.safetensors");
    for (i, name) in images.iter().enumerate() {
        let entry = &json[i];
        assert!(
            entry["file"].as_str().is_some_and(|f| f.ends_with(name)),
            "{entry}"
        );
        let got: Vec<f32> = entry["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let want = reference
            .read_f32(&format!("{name}.logits"))
            .expect("reference");
        assert!(testkit::relative_error(&got, &want) <= 1e-3, "{name}");
    }

    // Top-k text output names ImageNet labels.
    let out = bin()
        .args([
            "predict",
            "--model",
            "resnet18_swsl",
            "--top-k",
            "3",
            "--weights",
        ])
        .arg(&weights)
        .arg(testkit::fixture("images/rocket.jpg"))
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        3,
        "{text}"
    );
}

#[test]
fn predict_refuses_weights_of_another_architecture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("resnet18.safetensors");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
    let err = testkit::binary::run_failing(
        bin()
            .args(["predict", "--model", "resnet50_swsl", "--weights"])
            .arg(&weights)
            .arg(testkit::fixture("images/rocket.jpg")),
    );
    assert!(
        err.contains("does not match resnet50") && err.contains("missing key"),
        "{err}"
    );
}

#[test]
fn weights_inspect_and_convert_work_on_all_three_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = dir.path().join("r18.safetensors");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &st);
    let out = bin()
        .args(["weights", "inspect", "--json"])
        .arg(&st)
        .output()
        .expect("runs");
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["architecture"], "resnet18");
    assert_eq!(json["parameters"], 11_689_512);
    assert_eq!(json["format"], "safetensors");

    for (file, format) in [
        ("mixed_legacy.pth", "torch legacy"),
        ("mixed_zip.pth", "torch zip"),
    ] {
        let src = testkit::fixture(&format!("checkpoints/{file}"));
        let out = bin()
            .args(["weights", "inspect"])
            .arg(&src)
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(format) && text.contains("tensors:      11"),
            "{text}"
        );
        let dest = dir.path().join(format!("{file}.safetensors"));
        run_ok(bin().args(["weights", "convert"]).arg(&src).arg(&dest));
        let out = bin()
            .args(["weights", "inspect"])
            .arg(&dest)
            .output()
            .expect("runs");
        assert!(String::from_utf8_lossy(&out.stdout).contains("format:       safetensors"));
    }
}

#[test]
fn bad_image_files_are_reported_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("resnet18.safetensors");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &weights);
    let bad = dir.path().join("broken.jpg");
    let good = std::fs::read(testkit::fixture("images/rocket.jpg")).expect("fixture");
    std::fs::write(&bad, &good[..300]).expect("write");
    let out = bin()
        .args(["predict", "--model", "resnet18_ssl", "--weights"])
        .arg(&weights)
        .arg(&bad)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("broken.jpg"),
        "status {:?}: {err}",
        out.status
    );
}
