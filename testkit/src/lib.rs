//! Test support for the workspace's integration tests (`tests/*.rs` of the server and
//! `client/tests/cli.rs`): one place that knows how to start a real server on loopback
//! ports and talk to it, so that no test file carries a harness of its own.
//!
//! - [`fixtures`]: the committed fixture files, the seeded synthetic resnet18 (as a
//!   model and as a checkpoint file), the parity measure, a zip-bomb checkpoint.
//! - [`backends`]: wrappers around a real model that tests steer: [`backends::Gated`]
//!   holds forward passes until opened, [`backends::PanicOnce`] panics once,
//!   [`backends::Tracked`] counts the replicas alive.
//! - [`server`]: the library's server in this process ([`server::TestServer`]) or on a
//!   runtime thread of its own for blocking callers ([`server::BlockingServer`]).
//! - [`binary`]: the `resnet-serve` binary as a child process, as an operator runs it.
//! - [`hub`]: a weights host on loopback, for the download tests.
//! - [`metrics`]: the Prometheus endpoint scraped, and samples read from its text.
//! - [`wire`]: gRPC calls written by hand on a bare HTTP/2 connection, and plain HTTP.
//! - [`kserve`]: KServe v2 tensors and model configurations.
//! - [`python`]: the Python scripts under `tests/kserve/` run with tritonclient.
//! - [`testca`]: a certificate authority made in the test (rcgen).
//! - [`wait`]: waiting for a condition with a bound, and this process's memory.

pub mod backends;
pub mod binary;
pub mod fixtures;
pub mod hub;
pub mod kserve;
pub mod metrics;
pub mod python;
pub mod server;
pub mod testca;
pub mod wait;
pub mod wire;

pub use fixtures::{fixture, relative_error, resnet18, write_synthetic_checkpoint};
pub use server::{BlockingServer, TestServer, MODEL};
