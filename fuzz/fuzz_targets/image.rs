//! Fuzz target `image`: see [`files::image`].
#![no_main]

#[path = "../harness/files.rs"]
mod files;

libfuzzer_sys::fuzz_target!(|data: &[u8]| files::image(data));
