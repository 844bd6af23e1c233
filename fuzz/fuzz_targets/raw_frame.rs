//! Fuzz target `raw_frame`: see [`files::raw_frame`].
#![no_main]

#[path = "../harness/files.rs"]
mod files;

libfuzzer_sys::fuzz_target!(|data: &[u8]| files::raw_frame(data));
