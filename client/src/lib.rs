//! Client for resnet-serve's `resnet_serve.v1` gRPC API.
//!
//! [`proto`] holds the stubs generated from the workspace's `proto/` (client side only;
//! nothing here depends on Candle). [`Client`] adds what a service calling us needs:
//! several endpoints balanced, connect and per-call timeouts, optional TLS, and retries
//! with backoff for UNAVAILABLE only (a draining or restarting replica), never for
//! errors a retry cannot fix.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use resnet_client::{Client, ClientConfig, Output};
//!
//! let client = Client::connect(ClientConfig::new(["http://127.0.0.1:50051"])).await?;
//! let jpeg = std::fs::read("cat.jpg")?;
//! let response = client
//!     .classify("resnet50_swsl", vec![resnet_client::encoded(jpeg)], Output::TopK(5))
//!     .await?;
//! for class in &response.results[0].top {
//!     println!("{:.3} {}", class.score, class.label);
//! }
//! # Ok(()) }
//! ```

mod client;
pub mod codec;
mod config;
mod images;
pub mod load;
pub mod metrics;
pub mod shm;
pub mod soak;
pub mod video;
pub mod wire;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("resnet_serve.v1");

    /// The KServe v2 / Triton `inference` protocol (client stubs), which the server also
    /// speaks on the same port.
    pub mod inference {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("inference");
    }
}

pub use client::Client;
pub use config::{ClientConfig, ClientError, TlsFiles, Token};
pub use images::{encoded, raw, tensor, Output};
