//! OpenTelemetry traces, exported over OTLP/gRPC when an endpoint is configured
//! (`--otlp-endpoint`, else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_ENDPOINT`); off otherwise.
//!
//! The server's `tracing` spans are the trace: [`Telemetry::layer`] hands them to
//! `tracing-opentelemetry`, whose spans a batch processor exports. A call's span joins
//! the caller's trace through its W3C `traceparent` / `tracestate` metadata
//! ([`join_caller`]); its children are `preprocess` and `queue` (until the image's batch
//! starts), and the batch that computed it has a span of its own, in its own trace,
//! linked to each call it served ([`link_to`], carried with the queued job). A batch is
//! sampled when a call it served is, whatever the sampler decides for other root spans.
//!
//! Off, all of it costs a branch: the extra spans are at debug level, which only the
//! exporting layer enables (a disabled callsite otherwise), and everything else here
//! starts with [`enabled`]. The SDK reads the rest of the standard variables itself:
//! `OTEL_SERVICE_NAME` (here defaulting to `resnet-serve`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_EXPORTER_OTLP_TIMEOUT`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, Status, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample};
use opentelemetry_sdk::Resource;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// `service.name` unless `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`) names one.
pub const DEFAULT_SERVICE_NAME: &str = "resnet-serve";

/// Set once an exporting layer exists: every helper here is a no-op until then.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (the one branch tracing costs when they are not).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("starting the OTLP exporter's runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP endpoint {0}: only plaintext gRPC (http://) is supported; export to a collector agent beside the server")]
    Https(String),
}

/// Where traces go: `flag` (`--otlp-endpoint`), else the standard variables (`var` reads
/// the environment); `None` turns tracing off, as do `OTEL_SDK_DISABLED=true` and
/// `OTEL_TRACES_EXPORTER=none`.
pub fn endpoint(flag: Option<&str>, var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
    {
        return None;
    }
    flag.filter(|f| !f.trim().is_empty())
        .map(str::to_string)
        .or_else(|| set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The exporter, while the process runs. [`Telemetry::shutdown`] exports what is left.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Drives the exporter's gRPC connection, apart from the server's runtime, so that
    /// spans still go out after that runtime has stopped (the final flush).
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Telemetry")
    }
}

impl Telemetry {
    /// An exporter to `endpoint` (e.g. `http://collector:4317`) behind a batch span
    /// processor. Nothing connects yet: a collector that is down costs dropped spans,
    /// never a failed start.
    pub fn start(endpoint: &str) -> Result<Telemetry, TelemetryError> {
        if endpoint.trim().to_ascii_lowercase().starts_with("https://") {
            return Err(TelemetryError::Https(endpoint.to_string()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        let exporter = {
            // tonic's channel spawns its connection task on the runtime it is made in.
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()?
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            // The sampler the SDK makes of OTEL_TRACES_SAMPLER(_ARG), batches aside.
            .with_sampler(FollowLinks(
                opentelemetry_sdk::trace::Config::default().sampler,
            ))
            .build();
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Telemetry { provider, runtime })
    }

    /// The layer that turns the server's spans into exported ones. It sees this crate's
    /// spans and events down to debug level (the per-call children and the batch spans
    /// are debug spans), whatever the log filter says, and nothing from other crates.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        exporting_layer(self.provider.tracer(DEFAULT_SERVICE_NAME))
    }

    /// Exports the spans still buffered and stops the exporter: at most about 6 s (the
    /// SDK's 5 s shutdown bound, then the runtime's 1 s) when the collector does not
    /// answer. Run after the server has drained.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("exporting the last spans: {e}");
        }
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

fn exporting_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Nothing else here reads the active OpenTelemetry context: attaching it on
        // every poll of an instrumented future would be work for no one.
        .with_context_activation(false)
        .with_threads(false)
        .with_filter(Targets::new().with_target("resnet_serve", tracing::Level::DEBUG))
}

/// The configured sampler, except for a span with no parent and links (a batch's): it
/// is sampled when a span it links to is. A batch is a root span, so a ratio sampler
/// would otherwise keep a different fraction of batches than of the calls they served,
/// and a sampled call's batch would go missing.
#[derive(Debug, Clone)]
struct FollowLinks(Box<dyn ShouldSample>);

impl ShouldSample for FollowLinks {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        kind: &opentelemetry::trace::SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> SamplingResult {
        let root = parent.is_none_or(|cx| !cx.has_active_span());
        if root && !links.is_empty() {
            let sampled = links.iter().any(|l| l.span_context.is_sampled());
            return SamplingResult {
                decision: if sampled {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                },
                attributes: Vec::new(),
                trace_state: Default::default(),
            };
        }
        self.0
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// The SDK's resource (its detectors read `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES`), named `resnet-serve` where they name nothing.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    }
}

/// A call's metadata as the propagator reads it (ASCII entries only).
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's span, from its `traceparent` and `tracestate` (W3C trace context); an
/// empty context when it sent none, or one that does not parse.
pub fn caller_context(metadata: &MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// A gRPC method, as its server span is named and described.
#[derive(Debug, Clone, Copy)]
pub struct Rpc {
    pub service: &'static str,
    pub method: &'static str,
    /// `service/method`, the span's name.
    pub name: &'static str,
}

pub const CLASSIFY: Rpc = Rpc {
    service: "resnet_serve.v1.Classifier",
    method: "Classify",
    name: "resnet_serve.v1.Classifier/Classify",
};

pub const MODEL_INFER: Rpc = Rpc {
    service: "inference.GRPCInferenceService",
    method: "ModelInfer",
    name: "inference.GRPCInferenceService/ModelInfer",
};

/// Makes `span`, a call's span, the server span of `rpc` inside the caller's trace (a
/// trace of its own when the caller sent none). `span` declares the empty fields
/// `otel.name` and `otel.kind`, filled only here, so logs stay as they were while
/// nothing is exported. Must run before the span is first entered.
pub fn join_caller(span: &tracing::Span, metadata: &MetadataMap, rpc: Rpc) {
    if !enabled() || span.is_disabled() {
        return;
    }
    span.record("otel.name", rpc.name);
    span.record("otel.kind", "server");
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", rpc.service);
    span.set_attribute("rpc.method", rpc.method);
    let caller = caller_context(metadata);
    if caller.span().span_context().is_valid() {
        // Fails only when the span has started, which the caller rules out.
        let _ = span.set_parent(caller);
    }
}

/// What a batch's span links to for a call in it: the call's span context, when spans
/// are exported.
pub fn link_to(span: &tracing::Span) -> Option<SpanContext> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let context = span.context().span().span_context().clone();
    context.is_valid().then_some(context)
}

/// [`link_to`] the current span (a request's, where its images are queued).
pub fn current_link() -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    link_to(&tracing::Span::current())
}

/// Links a batch's span to the calls it served, each once (a call's images are queued
/// together, so repeats are usually adjacent).
pub fn link_batch<'a>(span: &tracing::Span, calls: impl Iterator<Item = &'a SpanContext>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let mut linked: Vec<opentelemetry::trace::SpanId> = Vec::new();
    for call in calls {
        if !linked.contains(&call.span_id()) {
            linked.push(call.span_id());
            span.add_link(call.clone());
        }
    }
    span.set_attribute("requests", linked.len() as i64);
}

/// Records a call's gRPC status on its span. As the RPC conventions have it for a
/// server, only the codes that mean the server failed mark the span as an error.
pub fn record_status(span: &tracing::Span, code: tonic::Code, message: &str) {
    if !enabled() || span.is_disabled() {
        return;
    }
    span.set_attribute("rpc.grpc.status_code", code as i64);
    use tonic::Code::*;
    if matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    ) {
        span.set_status(Status::error(message.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId};

    use super::*;

    fn metadata(entries: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (k, v) in entries {
            map.insert(*k, v.parse().expect("ascii"));
        }
        map
    }

    #[test]
    fn the_callers_traceparent_and_tracestate_are_read_from_metadata() {
        let map = metadata(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=opaque,other=x"),
            ("x-request-id", "r-1"),
        ]);
        let extractor = MetadataExtractor(&map);
        assert!(extractor.keys().contains(&"traceparent"));
        let cx = caller_context(&map);
        let span = cx.span();
        let caller = span.span_context();
        assert!(caller.is_valid() && caller.is_remote());
        assert_eq!(
            caller.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
        );
        assert_eq!(
            caller.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        assert_eq!(caller.trace_flags(), TraceFlags::SAMPLED);
        assert_eq!(caller.trace_state().get("vendor"), Some("opaque"));
        assert_eq!(caller.trace_state().get("other"), Some("x"));
    }

    #[test]
    fn a_missing_or_malformed_traceparent_gives_no_caller() {
        for entries in [
            &[][..],
            &[("traceparent", "garbage")][..],
            // An all-zero trace id is invalid by the W3C rules.
            &[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )][..],
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            )][..],
        ] {
            let cx = caller_context(&metadata(entries));
            assert!(!cx.span().span_context().is_valid(), "{entries:?}");
        }
    }

    /// Spans as the SDK hands them to an exporter.
    #[derive(Debug, Clone, Default)]
    struct Collected(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Collected {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(batch);
            Ok(())
        }
    }

    #[test]
    fn a_call_joins_its_callers_trace_and_its_batch_links_to_it() {
        use tracing_subscriber::layer::SubscriberExt;
        let collected = Collected::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .build();
        // Only this test's subscriber (thread-local) exports; the flag just lets the
        // helpers run.
        ENABLED.store(true, Ordering::Relaxed);
        let subscriber =
            tracing_subscriber::registry().with(exporting_layer(provider.tracer("test")));
        let caller = metadata(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        tracing::subscriber::with_default(subscriber, || {
            let call = tracing::info_span!(
                "Classify",
                request_id = "r-7",
                otel.name = tracing::field::Empty,
                otel.kind = tracing::field::Empty
            );
            join_caller(&call, &caller, CLASSIFY);
            let link = link_to(&call).expect("the call's span context");
            call.in_scope(|| drop(tracing::debug_span!("preprocess")));
            let batch = tracing::debug_span!(parent: None, "batch", batch_size = 2);
            link_batch(&batch, [&link, &link].into_iter());
            drop(batch);
            record_status(&call, tonic::Code::Internal, "broken");
            drop(call);
        });
        let spans = collected.0.lock().expect("spans").clone();
        let named = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
        };
        let attribute = |span: &opentelemetry_sdk::trace::SpanData, key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        let call = named(CLASSIFY.name);
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex");
        assert_eq!(call.span_context.trace_id(), trace);
        assert_eq!(
            call.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").expect("hex")
        );
        assert_eq!(call.span_kind, opentelemetry::trace::SpanKind::Server);
        assert_eq!(attribute(call, "request_id"), Some("r-7".into()));
        assert_eq!(attribute(call, "rpc.method"), Some("Classify".into()));
        assert_eq!(
            attribute(call, "rpc.grpc.status_code"),
            Some((tonic::Code::Internal as i64).into())
        );
        assert!(matches!(call.status, Status::Error { .. }));
        let preprocess = named("preprocess");
        assert_eq!(preprocess.span_context.trace_id(), trace);
        assert_eq!(preprocess.parent_span_id, call.span_context.span_id());
        let batch = named("batch");
        assert_ne!(batch.span_context.trace_id(), trace, "a trace of its own");
        let links: Vec<_> = batch.links.iter().map(|l| l.span_context.clone()).collect();
        assert_eq!(links, vec![call.span_context.clone()], "linked once");
        assert_eq!(attribute(batch, "requests"), Some(1i64.into()));
        assert_eq!(attribute(batch, "batch_size"), Some(2i64.into()));
    }

    #[test]
    fn a_batch_is_sampled_when_a_call_it_served_is() {
        use opentelemetry_sdk::trace::Sampler;
        use tracing_subscriber::layer::SubscriberExt;
        let collected = Collected::default();
        // Nothing is sampled at the root: only a caller's sampled flag keeps a call.
        let never = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0)));
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .with_sampler(FollowLinks(Box::new(never)))
            .build();
        ENABLED.store(true, Ordering::Relaxed);
        let subscriber =
            tracing_subscriber::registry().with(exporting_layer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let call = |id: &'static str, caller: &MetadataMap| {
                let span = tracing::info_span!(
                    "Classify",
                    request_id = id,
                    otel.name = tracing::field::Empty,
                    otel.kind = tracing::field::Empty
                );
                join_caller(&span, caller, CLASSIFY);
                let link = link_to(&span).expect("a span context");
                (span, link)
            };
            let (traced, traced_link) = call(
                "traced",
                &metadata(&[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )]),
            );
            let (untraced, untraced_link) = call("untraced", &metadata(&[]));
            let both = tracing::debug_span!(parent: None, "batch", batch_size = 2);
            link_batch(&both, [&untraced_link, &traced_link].into_iter());
            drop(both);
            let alone = tracing::debug_span!(parent: None, "batch", batch_size = 1);
            link_batch(&alone, [&untraced_link].into_iter());
            drop(alone);
            drop((traced, untraced));
        });
        let spans = collected.0.lock().expect("spans").clone();
        let ids: Vec<_> = spans
            .iter()
            .map(|s| {
                let size = s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "batch_size")
                    .map(|kv| kv.value.to_string());
                let id = s
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "request_id")
                    .map(|kv| kv.value.to_string());
                (s.name.to_string(), size.or(id).unwrap_or_default())
            })
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert!(ids.contains(&(CLASSIFY.name.to_string(), "traced".to_string())));
        assert!(ids.contains(&("batch".to_string(), "2".to_string())));
    }

    #[test]
    fn the_endpoint_comes_from_the_flag_else_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(endpoint(None, env(&[])), None, "off by default");
        assert_eq!(
            endpoint(
                None,
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])
            ),
            Some("http://c:4317".into())
        );
        assert_eq!(
            endpoint(
                None,
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
                ])
            ),
            Some("http://t:4317".into()),
            "the traces variable is the more specific"
        );
        assert_eq!(
            endpoint(
                Some("http://flag:4317"),
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])
            ),
            Some("http://flag:4317".into())
        );
        assert_eq!(
            endpoint(
                Some("http://flag:4317"),
                env(&[("OTEL_SDK_DISABLED", "true")])
            ),
            None
        );
        assert_eq!(
            endpoint(
                None,
                env(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_TRACES_EXPORTER", "none"),
                ])
            ),
            None
        );
        assert_eq!(
            endpoint(Some(" "), env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])),
            None
        );
        assert!(matches!(
            Telemetry::start("HTTPS://collector:4317"),
            Err(TelemetryError::Https(_))
        ));
    }
}
