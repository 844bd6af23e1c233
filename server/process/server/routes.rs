//! The services on the gRPC port, built from the options: what every call shares
//! ([`State`]), the message and byte limits, our classifier and KServe v2 (their
//! tensor-carrying methods decoded from their frames, the rest tonic's generated
//! servers) and both generations of server reflection.

use std::sync::Arc;

use tonic::codegen::InterceptedService;

use super::{RunError, ServeOptions};
use crate::api::classifier::ClassifierService;
use crate::api::kserve::{KServeService, Repository};
use crate::api::shm::SharedMemory;
use crate::api::state::State;
use crate::api::unary::{self, FrameRoutes};
use crate::preprocess::Preprocessor;
use crate::process::metrics::Metrics;
use crate::process::registry::Registry;
use crate::proto::classifier_server::{Classifier, ClassifierServer};
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;

/// The largest message of a method that tonic decodes (every one but the four that
/// carry images and tensors).
const CONTROL_MESSAGE_BYTES: usize = 1 << 20;

/// A generated server whose tensor-carrying methods are read from their frames.
pub(super) type Routed<S> = FrameRoutes<InterceptedService<S, unary::Interceptor>>;

/// What every call shares, for the models `registry` will hold.
pub(super) fn state(options: &ServeOptions, registry: Registry, metrics: &Metrics) -> Arc<State> {
    let mut state = State::new(
        registry,
        Preprocessor::new(options.limits),
        metrics.clone(),
        options.preprocess_threads,
        options.max_images_per_request,
        SharedMemory::with_limits(options.shared_memory, options.shared_memory_limits),
    );
    // Two batches' worth of frames per stream keeps the device fed without letting one
    // stream fill its model's queue by itself (the smallest queue, where models have
    // policies of their own).
    state.stream_window = (2 * options.policy.max_batch())
        .min(options.policy.queue_capacity)
        .min(
            options
                .model_policies
                .values()
                .map(|p| p.queue_capacity)
                .min()
                .unwrap_or(usize::MAX),
        )
        .max(1);
    state.configured_models = options.configured_models.clone();
    Arc::new(state)
}

/// The limits of the methods read from their frames: message size, counts and the
/// in-flight byte budget.
fn limits(options: &ServeOptions, metrics: &Metrics) -> unary::Limits {
    unary::Limits {
        max_decoding: options.max_message_bytes,
        max_encoding: options.max_message_bytes,
        counts: crate::api::admission::Counts::new(
            options.max_images_per_request,
            options.max_message_bytes,
        ),
        budget: crate::api::admission::ByteBudget::new(
            options.max_in_flight_bytes,
            Some(metrics.refusals("in_flight_bytes")),
        ),
    }
}

/// The methods tonic decodes itself carry names and small parameters, never tensors
/// (those are all routed through `unary`): a message of theirs is held to 1 MiB.
fn control_message_bytes(options: &ServeOptions) -> usize {
    options.max_message_bytes.min(CONTROL_MESSAGE_BYTES)
}

/// Our classifier service; `Classify` and `ClassifyStream` read from their frames.
pub(super) fn classifier(
    options: &ServeOptions,
    state: &Arc<State>,
    metrics: &Metrics,
) -> Routed<ClassifierServer<ClassifierService>> {
    let service = Arc::new(ClassifierService {
        state: state.clone(),
    });
    let streaming = service.clone();
    let unary_service = service.clone();
    FrameRoutes::new(
        ClassifierServer::from_arc(service)
            .max_decoding_message_size(control_message_bytes(options))
            .max_encoding_message_size(options.max_message_bytes),
        limits(options, metrics),
        crate::api::deadline::stamp_deadline,
    )
    .unary("/resnet_serve.v1.Classifier/Classify", move |request| {
        let service = unary_service.clone();
        async move { service.classify(request).await }
    })
    .streaming(
        "/resnet_serve.v1.Classifier/ClassifyStream",
        move |request: tonic::Request<unary::Messages<crate::proto::StreamFrame>>| {
            let answers = streaming.classify_frames(request.into_inner());
            async move { answers }
        },
    )
}

/// KServe v2; `ModelInfer` and `ModelStreamInfer` read from their frames. The model
/// repository's load and unload work where the options give a model factory.
pub(super) fn kserve(
    options: &ServeOptions,
    state: &Arc<State>,
    metrics: &Metrics,
) -> Routed<GrpcInferenceServiceServer<KServeService>> {
    let service = Arc::new(KServeService {
        state: state.clone(),
        repository: options.model_factory.clone().map(|f| {
            Arc::new(
                Repository::new(f, options.policy.clone())
                    .with_policies(options.model_policies.clone()),
            )
        }),
        refuse_non_finite: options.kserve_refuse_non_finite,
    });
    let streaming = service.clone();
    let unary_service = service.clone();
    FrameRoutes::new(
        GrpcInferenceServiceServer::from_arc(service)
            .max_decoding_message_size(control_message_bytes(options))
            .max_encoding_message_size(options.max_message_bytes),
        limits(options, metrics),
        crate::api::deadline::stamp_deadline,
    )
    .unary(
        "/inference.GRPCInferenceService/ModelInfer",
        move |request: tonic::Request<crate::api::kserve::InferRequest>| {
            let service = unary_service.clone();
            async move { service.model_infer_call(request).await }
        },
    )
    .streaming(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        move |request: tonic::Request<unary::Messages<crate::api::kserve::InferRequest>>| {
            let answers = streaming.stream_infer(request.into_inner());
            async move { answers }
        },
    )
}

/// Server reflection, v1 and v1alpha: grpcurl 1.8, Postman and older evans ask for
/// v1alpha only, newer clients for v1.
pub(super) fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    RunError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| RunError::Load(format!("reflection: {e}")))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| RunError::Load(format!("reflection: {e}")))?;
    Ok((v1, v1alpha))
}
