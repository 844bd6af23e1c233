//! Preprocessing against PIL + torchvision on real photos in several encodings and
//! modes: the uint8 224x224 crop within one level per pixel, and the same top-5 (and
//! close logits) end to end through the synthetic resnet18 PyTorch also ran.

use resnet_serve::preprocess::{decode, resize, Input, Preprocessor};
use testkit::fixtures::image_bytes;

const IMAGES: [&str; 15] = [
    "camera_gray16.png",
    "rocket.jpg",
    "chelsea_q90.jpg",
    "coffee_444.jpg",
    "coffee.png",
    "astronaut_odd.png",
    "camera_gray.png",
    "camera_gray.jpg",
    "chelsea_rgba.png",
    "astronaut_palette.png",
    "astronaut.gif",
    "coffee_lossless.webp",
    "chelsea.bmp",
    "wide_small.png",
    "tiny_up.png",
];

#[test]
fn crops_match_pil_within_one_level() {
    let reference = testkit::fixtures::reference("preprocess.safetensors");
    let mut worst = 0u8;
    for name in IMAGES {
        let want = reference
            .read_raw(&format!("{name}.crop"))
            .expect("reference crop")
            .1;
        let rgb = decode::decode_rgb8(&image_bytes(name), &Default::default()).expect("decodes");
        let got = resize::resize_and_crop(&rgb).expect("resizes").into_raw();
        assert_eq!(got.len(), want.len(), "{name}");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!(
            "{name}: max |d| = {max}, {off} of {} values differ",
            want.len()
        );
        assert!(max <= 1, "{name}: max per-pixel difference {max} > 1");
        worst = worst.max(max);
    }
    println!("worst per-pixel difference over all images: {worst}");
}

#[test]
fn same_top5_as_torchvision_end_to_end() {
    let reference = testkit::fixtures::reference("preprocess.safetensors");
    let model = testkit::resnet18();
    let pre = Preprocessor::default();
    for name in IMAGES {
        let want = reference
            .read_f32(&format!("{name}.logits"))
            .expect("reference logits");
        let input = pre
            .prepare(Input::Encoded(&image_bytes(name)))
            .expect("preprocesses")
            .into_values();
        let got = model.classify(&input, 1).expect("forward").remove(0);
        let top = |v: &[f32]| -> Vec<usize> {
            resnet_serve::labels::top_k(v, 5)
                .iter()
                .map(|s| s.index)
                .collect()
        };
        assert_eq!(top(&got), top(&want), "{name}: top-5");
        let err = testkit::relative_error(&got, &want);
        println!("{name}: logits max|d|/max|ref| = {err:.2e}");
        // One-level differences from the resampler move logits by ~4e-4 of their range.
        assert!(err <= 1e-3, "{name}: logits differ by {err:.3e}");
    }
}

#[test]
fn raw_frames_take_the_same_path_as_decoded_images() {
    let pre = Preprocessor::default();
    let bytes = image_bytes("coffee.png");
    let rgb = decode::decode_rgb8(&bytes, &Default::default()).expect("decodes");
    let from_frame = pre
        .prepare(Input::Raw {
            width: rgb.width(),
            height: rgb.height(),
            rgb: rgb.as_raw(),
        })
        .expect("frame");
    assert_eq!(
        from_frame,
        pre.prepare(Input::Encoded(&bytes)).expect("encoded")
    );
}
