//! Models served under names of the operator's choosing, with settings of their own, by
//! the `resnet-serve` binary run as an operator runs it: a TOML file with `[models.NAME]`
//! tables, `--model NAME=ARCH:PATH`, and a directory as KServe mounts it at /mnt/models.

use std::path::{Path, PathBuf};

use resnet_client::proto::inference::{
    model_repository_parameter::ParameterChoice, ModelMetadataRequest, ModelRepositoryParameter,
    RepositoryIndexRequest, RepositoryModelLoadRequest, RepositoryModelUnloadRequest,
};
use resnet_client::{tensor, Output};
use resnet_serve::model::{synthetic, Architecture};
use testkit::binary::Served;
use testkit::kserve::batching_policy as kserve_policy;

const BIN: &str = env!("CARGO_BIN_EXE_resnet-serve");

/// The server started on the CPU with `args`, its log in `log`.
fn server(args: &[&str], log: &Path) -> Served {
    Served::start(BIN, log, |c| {
        c.args(["--device", "cpu"])
            .args(args)
            // Nothing is downloaded in these tests: a closed port answers any attempt.
            .env("RESNET_SERVE_WEIGHTS_URL", "http://127.0.0.1:9");
    })
}

/// What KServe mounts at /mnt/models (a directory holding the seeded resnet18 as
/// `model.safetensors`) and a copy of that checkpoint as a plain file, under `dir`.
fn mounted_checkpoint(dir: &Path) -> (PathBuf, PathBuf) {
    let mounted = dir.join("mnt-models");
    std::fs::create_dir(&mounted).expect("mkdir");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &mounted.join("model.safetensors"));
    let file = dir.join("r18.safetensors");
    std::fs::copy(mounted.join("model.safetensors"), &file).expect("copy");
    (mounted, file)
}

/// The binary started with `toml` as its `--config` file; its log is the returned path.
fn served_with_config(dir: &Path, toml: &str) -> (Served, PathBuf) {
    let config = dir.join("serve.toml");
    std::fs::write(&config, toml).expect("write");
    let log = dir.join("server.log");
    (
        server(&["--config", &config.display().to_string()], &log),
        log,
    )
}

/// Runs the binary on the CPU to its end (it must fail at start-up) and returns what it
/// printed.
fn failed_start(args: &[&str]) -> String {
    let args: Vec<&str> = ["--device", "cpu"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    testkit::binary::failed_start(BIN, &args)
}

#[test]
fn a_model_is_served_under_its_own_name_with_its_own_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    // What KServe mounts at /mnt/models: the checkpoint and whatever came with it.
    let (mounted, file) = mounted_checkpoint(dir.path());
    std::fs::write(mounted.join("README.md"), "the synthetic resnet18").expect("write");
    let (served, log) = served_with_config(
        dir.path(),
        &format!(
            "batch_sizes = [1, 2, 4, 8]\n\
             model = [\"cats=resnet18:{file}\"]\n\
             [models.resnet18-custom]\n\
             path = \"{mounted}\"\n\
             batch_sizes = [1, 2]\n\
             max_queue_delay_ms = 1\n\
             queue_capacity = 6\n\
             workers_per_device = 1\n",
            file = file.display(),
            mounted = mounted.display()
        ),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = served.ready("resnet18-custom").await;
        // The same weights under two names: the same logits.
        let values = synthetic::input(5, 2, 224);
        let images = || values.chunks(3 * 224 * 224).map(tensor).collect::<Vec<_>>();
        let custom = client
            .classify("resnet18-custom", images(), Output::Logits)
            .await
            .expect("by its name");
        let cats = client
            .classify("cats", images(), Output::Logits)
            .await
            .expect("by the other name");
        assert_eq!(custom.results.len(), 2);
        for (a, b) in custom.results.iter().zip(&cats.results) {
            assert_eq!(a.values.len(), 1000);
            assert!(testkit::relative_error(&a.values, &b.values) <= 1e-6);
        }
        let names: Vec<String> = client
            .list_models()
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["cats", "resnet18-custom"]);

        // KServe knows it by that name, with its own policy; the other has the flags'.
        let mut k = client.kserve_stub();
        let meta = k
            .model_metadata(ModelMetadataRequest {
                name: "resnet18-custom".into(),
                version: String::new(),
            })
            .await
            .expect("metadata")
            .into_inner();
        assert_eq!(meta.name, "resnet18-custom");
        let policy = |name: &str| {
            let mut k = k.clone();
            let name = name.to_string();
            async move {
                let config = testkit::kserve::model_config(&mut k, &name).await;
                assert_eq!(config.parameters["architecture"].string_value, "resnet18");
                testkit::kserve::dynamic_batching(&config)
            }
        };
        assert_eq!(policy("resnet18-custom").await, (vec![1, 2], 1000, Some(6)));
        let (sizes, delay, _) = policy("cats").await;
        assert_eq!((sizes, delay), (vec![1, 2, 4, 8], 5000));
        // Its own queue of 6: a request of 7 images is refused whole.
        let seven: Vec<_> = (0..7).map(|_| tensor(&values[..3 * 224 * 224])).collect();
        let err = client
            .classify("resnet18-custom", seven, Output::TopK(1))
            .await
            .expect_err("past its queue");
        assert!(err.message().contains("6 images"), "{err}");
        client
            .classify(
                "cats",
                (0..7).map(|_| tensor(&values[..3 * 224 * 224])).collect(),
                Output::TopK(1),
            )
            .await
            .expect("the other model's queue holds 7");
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("resnet18-custom") && text.contains("model.safetensors"),
        "the log names the model and the file the directory held: {text}"
    );
}

/// A RepositoryModelLoad of `model`, from `file` in the model repository if given.
fn load_request(model: &str, file: Option<&str>) -> RepositoryModelLoadRequest {
    RepositoryModelLoadRequest {
        model_name: model.into(),
        parameters: file
            .map(|f| {
                (
                    "file".to_string(),
                    ModelRepositoryParameter {
                        parameter_choice: Some(ParameterChoice::StringParam(f.into())),
                    },
                )
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

#[test]
fn model_control_reloads_a_configured_model_as_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mounted, file) = mounted_checkpoint(dir.path());
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).expect("mkdir");
    std::fs::copy(&file, repo.join("other.safetensors")).expect("copy");
    let (served, log) = served_with_config(
        dir.path(),
        &format!(
            "batch_sizes = [1, 2, 4, 8]\n\
             model_control = true\n\
             model_repository = \"{repo}\"\n\
             cache_dir = \"{cache}\"\n\
             [models.resnet18-custom]\n\
             path = \"{mounted}\"\n\
             batch_sizes = [1, 2]\n\
             max_queue_delay_ms = 1\n\
             queue_capacity = 6\n\
             workers_per_device = 2\n\
             [models.resnet18_swsl]\n\
             path = \"{file}\"\n",
            repo = repo.display(),
            cache = dir.path().join("cache").display(),
            mounted = mounted.display(),
            file = file.display(),
        ),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = served.ready("resnet18-custom").await;
        let values = synthetic::input(7, 2, 224);
        let images = || values.chunks(3 * 224 * 224).map(tensor).collect::<Vec<_>>();
        let logits = |name: &'static str| {
            let client = client.clone();
            let images = images();
            async move {
                client
                    .classify(name, images, Output::Logits)
                    .await
                    .expect(name)
                    .results
            }
        };
        let before = logits("resnet18-custom").await;
        let swsl_before = logits("resnet18_swsl").await;
        let mut k = client.kserve_stub();
        let own = (vec![1, 2], 1000, Some(6));
        assert_eq!(kserve_policy(&mut k, "resnet18-custom").await, own);
        for name in ["resnet18-custom", "resnet18_swsl"] {
            k.repository_model_unload(RepositoryModelUnloadRequest {
                model_name: name.into(),
                ..Default::default()
            })
            .await
            .expect("unload");
        }
        // Unloaded, the configured name is listed as one that can be loaded.
        let index = k
            .repository_index(RepositoryIndexRequest::default())
            .await
            .expect("index")
            .into_inner()
            .models;
        assert!(
            index
                .iter()
                .any(|m| m.name == "resnet18-custom" && m.state == "UNAVAILABLE"),
            "{index:?}"
        );
        // A name of the operator's own, reloaded from its configured directory with its
        // own policy and workers; a hub name with its own path from that path, not the
        // weights cache (which has nothing and cannot download here).
        for name in ["resnet18-custom", "resnet18_swsl"] {
            k.repository_model_load(load_request(name, None))
                .await
                .unwrap_or_else(|e| panic!("reloading {name}: {e}"));
        }
        assert_eq!(kserve_policy(&mut k, "resnet18-custom").await, own);
        for (name, was) in [
            ("resnet18-custom", &before),
            ("resnet18_swsl", &swsl_before),
        ] {
            let now = logits(name).await;
            assert_eq!(now.len(), 2);
            for (a, b) in now.iter().zip(was) {
                assert!(
                    testkit::relative_error(&a.values, &b.values) <= 1e-6,
                    "{name}"
                );
            }
        }
        // A file from the repository replaces its weights, not its settings.
        k.repository_model_load(load_request("resnet18-custom", Some("other.safetensors")))
            .await
            .expect("load from the repository");
        assert_eq!(kserve_policy(&mut k, "resnet18-custom").await, own);
        // A hub name with no table of its own keeps the server's settings.
        k.repository_model_load(load_request("resnet18_ssl", Some("other.safetensors")))
            .await
            .expect("load a hub name");
        assert_eq!(
            kserve_policy(&mut k, "resnet18_ssl").await,
            (vec![1, 2, 4, 8], 5000, Some(32))
        );
        // A name neither configured nor a hub name is unknown.
        let e = k
            .repository_model_load(load_request("cats", None))
            .await
            .expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        assert!(e.message().contains("resnet18-custom"), "{e}");
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let reloads: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(" loaded through the model repository API")
                && l.contains("model=resnet18-custom")
        })
        .collect();
    assert_eq!(reloads.len(), 2, "{text}");
    assert!(
        reloads.iter().all(|l| l.contains("replicas=2")),
        "its own workers_per_device: {reloads:?}"
    );
}

#[test]
fn model_paths_and_names_that_cannot_be_served_fail_at_start_up_saying_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let two = dir.path().join("two");
    std::fs::create_dir(&two).expect("mkdir");
    let r18 = two.join("a.pth");
    testkit::write_synthetic_checkpoint(Architecture::Resnet18, &r18);
    std::fs::copy(&r18, two.join("b.safetensors")).expect("copy");
    let text = failed_start(&["--model", &format!("cats={}", two.display())]);
    assert!(
        text.contains("2 checkpoint files (a.pth, b.safetensors)"),
        "{text}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    std::fs::write(empty.join("notes.txt"), "x").expect("write");
    std::fs::write(empty.join("config.json"), "x").expect("write");
    let text = failed_start(&["--model", &format!("cats={}", empty.display())]);
    assert!(
        text.contains("no checkpoint file") && text.contains("config.json, notes.txt"),
        "{text}"
    );
    // The architecture given must be the checkpoint's.
    let text = failed_start(&["--model", &format!("cats=resnet50:{}", r18.display())]);
    assert!(
        text.contains("holds a resnet18 checkpoint, not resnet50"),
        "{text}"
    );
    let text = failed_start(&["--model", &format!("Cats_image={}", r18.display())]);
    assert!(text.contains("model name 'Cats_image'"), "{text}");
    // An unknown key in a model's table is named, with the model.
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[models.cats]\npath = \"{}\"\nbatch_size = [1]\n",
            r18.display()
        ),
    )
    .expect("write");
    let text = failed_start(&["--config", &config.display().to_string()]);
    assert!(
        text.contains("[models.cats]") && text.contains("batch_size"),
        "{text}"
    );
}

/// What `kernels` ("avx2-direct=19 gemm=1") counts, by implementation.
fn kernel_counts(kernels: &str) -> std::collections::BTreeMap<String, usize> {
    kernels
        .split_whitespace()
        .map(|part| {
            let (name, count) = part.split_once('=').expect("NAME=COUNT");
            (name.to_string(), count.parse().expect("a count"))
        })
        .collect()
}

#[test]
fn the_cpu_kernels_chosen_at_load_are_shown_and_can_be_forced() {
    use resnet_serve::model::cpu::{CpuKernels, CPU_KERNELS_ENV};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, file) = mounted_checkpoint(dir.path());
    let model = format!("r18=resnet18:{}", file.display());
    let supported = CpuKernels::supported();
    // resnet18's convolutions: the stem, 16 in its blocks, 3 shortcut projections, and
    // the classifier head, which the CPU path runs as a 1x1 convolution.
    const CONVOLUTIONS: usize = 21;
    let direct = |k: CpuKernels| match k {
        CpuKernels::Avx512 => "avx512-direct",
        CpuKernels::Avx2 => "avx2-direct",
        _ => "gemm",
    };
    let fastest = supported.first().copied().expect("gemm runs anywhere");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for choice in [
        CpuKernels::Auto,
        CpuKernels::Avx512,
        CpuKernels::Avx2,
        CpuKernels::Gemm,
    ] {
        let start = |c: &mut std::process::Command| {
            c.args(["--device", "cpu", "--model", &model])
                .env("RESNET_SERVE_WEIGHTS_URL", "http://127.0.0.1:9")
                .env(CPU_KERNELS_ENV, choice.name());
        };
        if choice != CpuKernels::Auto && !supported.contains(&choice) {
            // Never a silent fallback: the start fails, naming what the CPU lacks.
            let text = failed_start_with_kernels(&model, choice.name());
            assert!(text.contains("this CPU lacks"), "{}: {text}", choice.name());
            println!(
                "{}: refused at start-up on this CPU, as it must be",
                choice.name()
            );
            continue;
        }
        let log = dir.path().join(format!("{}.log", choice.name()));
        let served = Served::start(BIN, &log, start);
        let kernels = rt.block_on(async {
            let client = served.ready("r18").await;
            let models = client.list_models().await.expect("list");
            let info = models.first().expect("r18");
            let mut k = client.kserve_stub();
            let config = testkit::kserve::model_config(&mut k, "r18").await;
            assert_eq!(
                config.parameters["kernels"].string_value, info.kernels,
                "KServe's model config and GetModel say the same"
            );
            info.kernels.clone()
        });
        let counts = kernel_counts(&kernels);
        assert_eq!(counts.values().sum::<usize>(), CONVOLUTIONS, "{kernels}");
        let expected = direct(if choice == CpuKernels::Auto {
            fastest
        } else {
            choice
        });
        // Most run on the chosen implementation; the rest, shapes its direct kernels
        // do not cover, on the portable GEMMs, never on another instruction set.
        assert!(
            counts.get(expected).is_some_and(|&n| n * 2 > CONVOLUTIONS),
            "{}: {kernels}",
            choice.name()
        );
        assert!(
            counts.keys().all(|k| k == expected || k == "gemm"),
            "{}: {kernels}",
            choice.name()
        );
        assert!(
            served.log().contains(&format!(
                "cpu_kernels=\"{}\" convolutions={kernels}",
                choice.name()
            )),
            "the choice is logged: {}",
            served.log()
        );
        println!("{}: {kernels}", choice.name());
    }
    let text = failed_start_with_kernels(&model, "sse4");
    assert!(
        text.contains("expected auto, avx512, avx2 or gemm"),
        "{text}"
    );
}

/// The binary started on `model` with `RESNET_SERVE_CPU_KERNELS=kernels`, run to its end
/// (it must fail at start-up): what it printed.
fn failed_start_with_kernels(model: &str, kernels: &str) -> String {
    let port = || format!("127.0.0.1:{}", testkit::binary::free_port());
    testkit::binary::run_failing(
        std::process::Command::new(BIN)
            .args(["--listen", &port(), "--metrics-listen", &port()])
            .args(["--device", "cpu", "--model", model])
            .env("RESNET_SERVE_WEIGHTS_URL", "http://127.0.0.1:9")
            .env(resnet_serve::model::cpu::CPU_KERNELS_ENV, kernels),
    )
}
