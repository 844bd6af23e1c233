//! Fuzz target `pickle`: see [`files::pickle`].
#![no_main]

#[path = "../harness/files.rs"]
mod files;

libfuzzer_sys::fuzz_target!(|data: &[u8]| files::pickle(data));
