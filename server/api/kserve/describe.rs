//! What KServe clients read about a model before they send anything: metadata, the
//! Triton model configuration (perf_analyzer refuses a server without one) and the
//! cumulative statistics.

use std::sync::atomic::Ordering;

use crate::process::stats::Tally;
use crate::proto::inference::{
    model_config::SchedulingChoice, model_input, model_instance_group,
    model_metadata_response::TensorMetadata, DataType, InferBatchStatistics, InferStatistics,
    ModelConfig, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelMetadataResponse,
    ModelOutput, ModelParameter, ModelQueuePolicy, ModelStatistics, StatisticDuration,
};
use crate::scheduler::ModelHandle;

use super::views::{Output, View};

/// The only version each model has.
pub const VERSION: &str = "1";
/// What `platform` says in metadata and configuration.
pub const PLATFORM: &str = "resnet-serve_candle";

fn with_batch(dims: Vec<i64>) -> Vec<i64> {
    std::iter::once(-1).chain(dims).collect()
}

pub fn metadata(handle: &ModelHandle, view: View) -> ModelMetadataResponse {
    ModelMetadataResponse {
        name: view.name(handle.name()),
        versions: vec![VERSION.into()],
        platform: PLATFORM.into(),
        inputs: vec![TensorMetadata {
            name: view.input_name().into(),
            datatype: view.datatype().into(),
            shape: with_batch(view.dims()),
        }],
        outputs: Output::LISTED
            .into_iter()
            .map(|o| TensorMetadata {
                name: o.name().into(),
                datatype: "FP32".into(),
                shape: with_batch(o.dims()),
            })
            .collect(),
    }
}

fn data_type(view: View) -> DataType {
    match view {
        View::Tensor => DataType::TypeFp32,
        View::Frame => DataType::TypeUint8,
        View::Image => DataType::TypeString,
    }
}

/// Instance groups from the devices the model's replicas run on (`cpu`, `cuda:0,cuda:1`).
fn instance_groups(devices: &str) -> Vec<ModelInstanceGroup> {
    let gpus: Vec<i32> = devices
        .split(',')
        .filter_map(|d| d.trim().strip_prefix("cuda:")?.parse().ok())
        .collect();
    if gpus.is_empty() {
        vec![ModelInstanceGroup {
            name: "cpu".into(),
            kind: model_instance_group::Kind::Cpu as i32,
            count: 1,
            gpus: vec![],
        }]
    } else {
        vec![ModelInstanceGroup {
            name: "gpu".into(),
            kind: model_instance_group::Kind::Gpu as i32,
            count: 1,
            gpus,
        }]
    }
}

/// Triton's view of the model. `max_batch_size` is the most images one request may
/// carry (the scheduler splits it over batches); dynamic batching lists the allowed
/// batch sizes and the queue policy; priority 1 is high, 2 (the default) normal.
pub fn config(handle: &ModelHandle, view: View, max_images_per_request: usize) -> ModelConfig {
    let policy = handle.policy();
    let info = handle.info();
    let mut parameters = std::collections::HashMap::new();
    for (k, v) in [
        ("architecture", info.architecture.as_str()),
        ("device", info.device.as_str()),
        ("dtype", info.dtype.as_str()),
        ("kernels", handle.implementation()),
    ] {
        parameters.insert(
            k.to_string(),
            ModelParameter {
                string_value: v.to_string(),
            },
        );
    }
    ModelConfig {
        name: view.name(handle.name()),
        platform: PLATFORM.into(),
        backend: "candle".into(),
        // A request larger than the model's queue could never be queued whole.
        max_batch_size: i32::try_from(max_images_per_request.min(handle.policy().queue_capacity))
            .unwrap_or(i32::MAX),
        input: vec![ModelInput {
            name: view.input_name().into(),
            data_type: data_type(view) as i32,
            format: match view {
                View::Tensor => model_input::Format::Nchw as i32,
                View::Frame => model_input::Format::Nhwc as i32,
                View::Image => model_input::Format::None as i32,
            },
            dims: view.dims(),
            ..Default::default()
        }],
        output: Output::LISTED
            .into_iter()
            .map(|o| ModelOutput {
                name: o.name().into(),
                data_type: DataType::TypeFp32 as i32,
                dims: o.dims(),
                label_filename: "imagenet_classes.txt".into(),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: Some(SchedulingChoice::DynamicBatching(ModelDynamicBatching {
            preferred_batch_size: policy
                .allowed_sizes()
                .iter()
                .map(|&s| i32::try_from(s).unwrap_or(i32::MAX))
                .collect(),
            max_queue_delay_microseconds: policy.max_queue_delay.as_micros() as u64,
            preserve_ordering: true,
            priority_levels: 2,
            default_priority_level: 2,
            default_queue_policy: Some(ModelQueuePolicy {
                allow_timeout_override: true,
                max_queue_size: u32::try_from(policy.queue_capacity).unwrap_or(u32::MAX),
                ..Default::default()
            }),
            ..Default::default()
        })),
        instance_group: instance_groups(&info.device),
        parameters,
    }
}

fn duration(t: &Tally) -> Option<StatisticDuration> {
    let (count, ns) = t.get();
    Some(StatisticDuration { count, ns })
}

/// The model's totals since it was loaded, under the name it was asked by.
pub fn statistics(handle: &ModelHandle, name: String) -> ModelStatistics {
    let s = &handle.metrics().stats;
    ModelStatistics {
        name,
        version: VERSION.into(),
        last_inference: s.last_inference_ms.load(Ordering::Relaxed),
        inference_count: s.inference_count.load(Ordering::Relaxed),
        execution_count: s.execution_count.load(Ordering::Relaxed),
        inference_stats: Some(InferStatistics {
            success: duration(&s.success),
            fail: duration(&s.fail),
            queue: duration(&s.queue),
            compute_input: duration(&s.compute_input),
            compute_infer: duration(&s.compute_infer),
            compute_output: duration(&s.compute_output),
            cache_hit: Some(StatisticDuration::default()),
            cache_miss: Some(StatisticDuration::default()),
        }),
        batch_stats: s
            .batch_totals()
            .into_iter()
            .map(
                |(size, (count, [input, infer, output]))| InferBatchStatistics {
                    batch_size: size as u64,
                    compute_input: Some(StatisticDuration { count, ns: input }),
                    compute_infer: Some(StatisticDuration { count, ns: infer }),
                    compute_output: Some(StatisticDuration { count, ns: output }),
                },
            )
            .collect(),
        memory_usage: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_groups_follow_the_devices() {
        assert_eq!(
            instance_groups("cpu")[0].kind,
            model_instance_group::Kind::Cpu as i32
        );
        let g = instance_groups("cuda:0,cuda:3");
        assert_eq!(g[0].gpus, vec![0, 3]);
        assert_eq!(g[0].kind, model_instance_group::Kind::Gpu as i32);
    }
}
