//! KServe v2 (Triton) pieces several tests build or read: FP32 tensors as raw little-endian
//! bytes, input descriptions, and a model's configuration fetched and its dynamic
//! batching read.

use resnet_client::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use resnet_client::proto::inference::model_config::SchedulingChoice;
use resnet_client::proto::inference::model_infer_request::InferInputTensor;
use resnet_client::proto::inference::{ModelConfig, ModelConfigRequest};
use tonic::transport::Channel;

/// `values` as KServe's raw contents: little-endian f32.
pub fn raw_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Raw little-endian f32 contents read back.
pub fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// An input tensor's description (its data travels apart).
pub fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    }
}

/// The configuration ModelConfig answers for `name`.
pub async fn model_config(k: &mut GrpcInferenceServiceClient<Channel>, name: &str) -> ModelConfig {
    k.model_config(ModelConfigRequest {
        name: name.into(),
        version: String::new(),
    })
    .await
    .expect("config")
    .into_inner()
    .config
    .expect("config body")
}

/// A model's dynamic batching as KServe's ModelConfig reports it: preferred sizes,
/// delay in microseconds, queue size.
pub async fn batching_policy(
    k: &mut GrpcInferenceServiceClient<Channel>,
    name: &str,
) -> (Vec<i32>, u64, Option<u32>) {
    dynamic_batching(&model_config(k, name).await)
}

/// The dynamic batching of `config`: preferred sizes, delay in microseconds, queue size.
pub fn dynamic_batching(config: &ModelConfig) -> (Vec<i32>, u64, Option<u32>) {
    let Some(SchedulingChoice::DynamicBatching(db)) = &config.scheduling_choice else {
        panic!("dynamic batching expected");
    };
    (
        db.preferred_batch_size.clone(),
        db.max_queue_delay_microseconds,
        db.default_queue_policy.as_ref().map(|q| q.max_queue_size),
    )
}
