//! Fuzz target `kserve_tensors`: see [`requests::kserve_tensors`].
#![no_main]

#[path = "../harness/requests.rs"]
mod requests;

libfuzzer_sys::fuzz_target!(|data: &[u8]| requests::kserve_tensors(data));
