//! What the operator sets about serving, models aside: batching, limits, message sizes,
//! the drain's deadline, KServe's options, shared memory, auth, TLS and connection age;
//! the defaults the flags and the config file start from.

use std::sync::Arc;
use std::time::Duration;

use crate::preprocess::Limits;
use crate::scheduler::{BatchPolicy, ModelFactory};

/// Everything about serving that is not a model.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub policy: BatchPolicy,
    pub limits: Limits,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    pub max_images_per_request: usize,
    pub preprocess_threads: usize,
    /// How long queued and in-flight requests get to finish after a shutdown signal.
    pub drain_timeout: Duration,
    /// The default model's name; the first loaded otherwise.
    pub default_model: Option<String>,
    /// Lets KServe clients load and unload models at run time; `None` (the default)
    /// refuses them.
    pub model_factory: Option<ModelFactory>,
    /// Serves KServe's system shared-memory extension (regions of this host's
    /// `/dev/shm` that clients register). Off by default: the operator enables it.
    pub shared_memory: bool,
    /// How many regions and bytes clients may register when it is on.
    pub shared_memory_limits: crate::api::shm::Limits,
    /// Bytes of request messages the server holds at once (received and not yet
    /// answered); past it a new call is refused with RESOURCE_EXHAUSTED at once.
    pub max_in_flight_bytes: usize,
    /// Concurrent streams (calls) one HTTP/2 connection may open.
    pub max_concurrent_streams: u32,
    /// The models the loader will load, by the names they will be served under: while
    /// they load, a request for one answers UNAVAILABLE rather than NOT_FOUND.
    pub configured_models: Vec<String>,
    /// Batching policies of models that have their own (the config file's
    /// `[models.NAME]` tables), by served name; the rest follow `policy`.
    pub model_policies: std::collections::HashMap<String, BatchPolicy>,
    /// KServe refuses FP32 inputs holding NaN or infinity (INVALID_ARGUMENT) rather
    /// than computing them as given, as Triton does.
    pub kserve_refuse_non_finite: bool,
    /// Bearer tokens every call must carry (`None`: the server is open).
    pub auth_tokens: Option<Arc<crate::api::auth::Tokens>>,
    /// The calls that stay open when tokens are required.
    pub auth_open: crate::api::auth::Open,
    /// TLS (and mutual TLS) on the gRPC port; `None`: plaintext.
    pub tls: Option<crate::process::tls::TlsOptions>,
    /// After about this long (+-10%), a connection is asked to go away (HTTP/2 GOAWAY;
    /// its calls in flight finish), so that clients reconnect and L4 load balancing
    /// spreads them over replicas added since. `None`: connections live on.
    pub max_connection_age: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            policy: BatchPolicy::default(),
            limits: Limits::default(),
            max_message_bytes: 64 << 20,
            // One default queue's worth (scheduler::policy::default_queue_capacity).
            max_images_per_request: 128,
            preprocess_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            drain_timeout: Duration::from_secs(30),
            default_model: None,
            model_factory: None,
            shared_memory: false,
            shared_memory_limits: crate::api::shm::Limits::default(),
            max_in_flight_bytes: crate::api::admission::default_in_flight_bytes(),
            max_concurrent_streams: 128,
            configured_models: Vec::new(),
            model_policies: std::collections::HashMap::new(),
            kserve_refuse_non_finite: false,
            auth_tokens: None,
            auth_open: crate::api::auth::Open::default(),
            tls: None,
            max_connection_age: None,
        }
    }
}
