//! Fuzz target `grpc_timeout`: see [`requests::grpc_timeout`].
#![no_main]

#[path = "../harness/requests.rs"]
mod requests;

libfuzzer_sys::fuzz_target!(|data: &[u8]| requests::grpc_timeout(data));
