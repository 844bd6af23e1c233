//! Everything that speaks gRPC: the two services on the port, how their calls are decoded
//! and admitted, who may make them, and how errors become statuses.
//!
//! A call enters through [`unary`] (the tensor-carrying methods, decoded from their HTTP/2
//! frames) or tonic's generated stubs, passes [`auth`] and [`admission`], and is served by
//! [`service`] (our `resnet_serve.v1.Classifier`) or [`kserve`] (KServe v2 / Triton), both
//! handing prepared inputs to the scheduler's queues.

pub mod admission;
pub mod auth;
pub mod error;
pub mod kserve;
pub mod refusals;
pub mod service;
pub mod shm;
pub mod unary;
