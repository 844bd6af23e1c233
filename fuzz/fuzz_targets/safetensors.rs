//! Fuzz target `safetensors`: see [`files::checkpoint`].
#![no_main]

#[path = "../harness/files.rs"]
mod files;

libfuzzer_sys::fuzz_target!(|data: &[u8]| files::checkpoint(data));
