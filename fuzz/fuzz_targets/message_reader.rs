//! Fuzz target `message_reader`: see [`requests::message_reader`].
#![no_main]

#[path = "../harness/requests.rs"]
mod requests;

libfuzzer_sys::fuzz_target!(|data: &[u8]| requests::message_reader(data));
