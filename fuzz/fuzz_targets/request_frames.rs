//! Fuzz target `request_frames`: see [`requests::request_frames`].
#![no_main]

#[path = "../harness/requests.rs"]
mod requests;

libfuzzer_sys::fuzz_target!(|data: &[u8]| requests::request_frames(data));
