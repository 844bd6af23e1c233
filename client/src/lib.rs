//! Client for resnet-serve's `resnet_serve.v1` gRPC API, generated from `proto/`.

/// The generated protocol types and the `Classifier` client stub.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("resnet_serve.v1");
}
