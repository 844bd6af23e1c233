//! Everything that speaks gRPC: the two services on the port, how their calls are decoded
//! and admitted, who may make them, and how errors become statuses.
//!
//! A call enters through [`unary`] (the tensor-carrying methods, decoded from their HTTP/2
//! frames) or tonic's generated stubs, passes [`auth`] and [`admission`], and is served by
//! [`classifier`] (our `resnet_serve.v1.Classifier`) or [`kserve`] (KServe v2 / Triton), both
//! handing prepared inputs to the scheduler's queues.

pub mod admission;
pub mod auth;
pub mod classifier;
pub mod deadline;
pub mod error;
pub mod kserve;
mod prepare;
pub mod refusals;
pub mod shm;
pub mod state;
pub mod stream;
pub mod unary;
