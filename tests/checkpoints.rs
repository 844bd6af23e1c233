//! The checkpoint readers against files written by `torch.save` itself (legacy and zip),
//! and against malformed and malicious ones.

use std::fs;
use std::time::Instant;

use resnet_serve::model::Architecture;
use resnet_serve::weights::{convert, inspect, Checkpoint, Format, Limits, WeightsError};

const FORMATS: [(&str, Format); 2] = [("legacy", Format::TorchLegacy), ("zip", Format::TorchZip)];

fn assert_matches_expected(ck: &Checkpoint) {
    let expected = testkit::fixtures::reference("checkpoints/mixed_expected.safetensors");
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(
        names,
        expected.names().collect::<Vec<_>>(),
        "{}",
        ck.path().display()
    );
    for name in names {
        let want = expected.read_raw(name).expect("expected tensor");
        let got = ck.read_raw(name).expect("tensor reads");
        assert_eq!(got.0, want.0, "{name}: dtype");
        assert_eq!(got.1, want.1, "{name}: bytes (contiguous, row-major)");
        assert_eq!(ck.info(name), expected.info(name), "{name}: info");
    }
}

#[test]
fn reads_torch_save_files_with_offsets_shared_storages_strides_and_dtypes() {
    for (suffix, format) in FORMATS {
        let ck = Checkpoint::open(testkit::fixture(&format!("checkpoints/mixed_{suffix}.pth")))
            .expect("opens");
        assert_eq!(ck.format(), format);
        assert_matches_expected(&ck);
        // f32 conversion of a non-contiguous view: base.t()[1] == base[:, 1].
        let full = ck.read_f32("shared.full").expect("f32");
        let t = ck.read_f32("shared.transposed").expect("f32");
        assert_eq!(t[4..8], [full[1], full[7], full[13], full[19]]);
    }
}

#[test]
fn nested_and_module_prefixed_state_dicts_load() {
    for (suffix, _) in FORMATS {
        for kind in ["nested", "module_prefix"] {
            let ck = Checkpoint::open(testkit::fixture(&format!(
                "checkpoints/{kind}_{suffix}.pth"
            )))
            .expect("opens");
            assert_matches_expected(&ck);
        }
    }
}

#[test]
fn a_pickle_naming_an_arbitrary_global_is_refused() {
    for (suffix, _) in FORMATS {
        let err = Checkpoint::open(testkit::fixture(&format!("checkpoints/evil_{suffix}.pth")))
            .expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, WeightsError::Pickle { .. }), "{text}");
        assert!(text.contains("posix.system"), "{text}");
    }
}

#[test]
fn truncated_and_corrupted_files_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (suffix, _) in FORMATS {
        let bytes = fs::read(testkit::fixture(&format!("checkpoints/mixed_{suffix}.pth")))
            .expect("fixture");
        // Cut at many points: inside the pickles, inside the data, one byte short.
        for cut in [
            1,
            2,
            10,
            40,
            200,
            bytes.len() / 2,
            bytes.len() - 100,
            bytes.len() - 1,
        ] {
            let path = dir.path().join(format!("cut_{suffix}_{cut}.pth"));
            fs::write(&path, &bytes[..cut]).expect("write");
            // Opening may succeed only if the cut left every tensor intact; reading all
            // of them then must fail or return the right number of bytes. Never panic.
            if let Ok(ck) = Checkpoint::open(&path) {
                let names: Vec<String> = ck.names().map(str::to_string).collect();
                let all_ok = names.iter().all(|n| ck.read_raw(n).is_ok());
                assert!(
                    !all_ok || cut == bytes.len(),
                    "{suffix} cut at {cut} read fully"
                );
            }
        }
    }
    // Wrong magic number in an otherwise valid legacy file.
    let mut bytes = fs::read(testkit::fixture("checkpoints/mixed_legacy.pth")).expect("fixture");
    bytes[5] ^= 0xff;
    let path = dir.path().join("magic.pth");
    fs::write(&path, &bytes).expect("write");
    let err = Checkpoint::open(&path)
        .expect_err("wrong magic")
        .to_string();
    assert!(err.contains("magic"), "{err}");
    // Not a checkpoint at all.
    let path = dir.path().join("text.pth");
    fs::write(&path, b"hello, world").expect("write");
    assert!(matches!(
        Checkpoint::open(&path),
        Err(WeightsError::UnknownFormat { .. })
    ));
}

#[test]
fn format_is_detected_by_content_not_extension() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (suffix, format) in FORMATS {
        let path = dir.path().join(format!("weights_{suffix}.safetensors"));
        fs::copy(
            testkit::fixture(&format!("checkpoints/mixed_{suffix}.pth")),
            &path,
        )
        .expect("copy");
        assert_eq!(
            Checkpoint::open(&path).map(|c| c.format()).ok(),
            Some(format)
        );
    }
    let path = dir.path().join("really_safetensors.pth");
    fs::copy(
        testkit::fixture("checkpoints/mixed_expected.safetensors"),
        &path,
    )
    .expect("copy");
    assert_eq!(
        Checkpoint::open(&path).map(|c| c.format()).ok(),
        Some(Format::Safetensors)
    );
}

#[test]
fn hub_hash_in_the_file_name_is_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = testkit::fixture("checkpoints/mixed_legacy.pth");
    let sha =
        resnet_serve::weights::hub::sha256_hex(fs::File::open(&src).expect("open")).expect("hash");
    let good = dir.path().join(format!("model-{}.pth", &sha[..8]));
    fs::copy(&src, &good).expect("copy");
    assert!(Checkpoint::open(&good).is_ok());
    let bad = dir.path().join("model-0123abcd.pth");
    fs::copy(&src, &bad).expect("copy");
    match Checkpoint::open(&bad) {
        Err(WeightsError::HashMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, "0123abcd");
            assert_eq!(actual, sha);
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
}

#[test]
fn converts_every_format_to_safetensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (suffix, _) in FORMATS {
        let ck = Checkpoint::open(testkit::fixture(&format!(
            "checkpoints/nested_{suffix}.pth"
        )))
        .expect("opens");
        let out = dir.path().join(format!("{suffix}.safetensors"));
        assert_eq!(convert::to_safetensors(&ck, &out).expect("converts"), 11);
        let back = Checkpoint::open(&out).expect("reads back");
        assert_eq!(back.format(), Format::Safetensors);
        assert_matches_expected(&back);
        let summary = inspect::summarize(&back);
        assert_eq!(summary.tensors, 11);
        assert_eq!(summary.architecture, None);
    }
}

#[test]
fn a_zip_member_that_inflates_to_a_gibibyte_costs_neither_time_nor_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bomb.pth");
    let replaced = testkit::fixtures::write_zip_bomb(&path);
    let on_disk = fs::metadata(&path).expect("meta").len();
    assert!(on_disk < 2 << 20, "{on_disk} bytes on disk");

    // Loading resnet18: refused from the member's size before it inflates.
    let before = testkit::wait::peak_rss();
    let started = Instant::now();
    let err = Checkpoint::open_within(&path, Limits::for_architecture(Architecture::Resnet18))
        .expect_err("refused");
    let refused_in = started.elapsed();
    assert!(matches!(err, WeightsError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("exceeds"), "{err}");
    // Without a model in mind (the largest model's limits, which 1 GiB is within):
    // only the bytes the pickle's storage holds are inflated.
    let started = Instant::now();
    let ck = Checkpoint::open(&path).expect("opens");
    let opened_in = started.elapsed();
    for name in ck.names() {
        let (dtype, raw) = ck.read_raw(name).expect("reads");
        let info = ck.info(name).expect("info");
        assert_eq!(raw.len(), info.numel() * dtype.size(), "{name}");
    }
    let grew = testkit::wait::peak_rss().saturating_sub(before);
    eprintln!(
        "1 GiB zip member ({on_disk} bytes on disk, {}): refused for resnet18 in {refused_in:?}, \
         opened within the default limits in {opened_in:?}; peak RSS grew {} KiB",
        replaced,
        grew >> 10
    );
    assert!(refused_in.as_millis() < 500, "{refused_in:?}");
    assert!(opened_in.as_millis() < 500, "{opened_in:?}");
    assert!(grew < 64 << 20, "peak RSS grew {grew} bytes");
}
