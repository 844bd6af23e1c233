//! The process around the serving core: which models are served and where they load, the
//! listeners (plaintext, TLS) and their connections, start-up and graceful drain, metrics,
//! statistics and traces.

pub mod accept;
pub mod allocator;
pub mod device;
pub mod linger;
pub mod local;
pub mod metrics;
pub mod models;
pub mod placement;
pub mod registry;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod tls;
