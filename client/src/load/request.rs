//! What request `i` of a load sends — a `Classify` call, the same images as a KServe
//! `ModelInfer` call (a batch in shared memory as one window), or a frame on a
//! `ClassifyStream` — and how its outcome reads.

use std::collections::HashMap;

use bytes::Bytes;

use super::{LoadConfig, Transport};
use crate::proto::inference::{infer_parameter::ParameterChoice, InferParameter};
use crate::proto::{self, ClassifyRequest};
use crate::shm::TENSOR_BYTES;
use crate::{wire, Client};

fn request_images(cfg: &LoadConfig, i: u64) -> Vec<proto::Image> {
    (0..cfg.images_per_request as u64)
        .map(|k| {
            cfg.inputs[((i * cfg.images_per_request as u64 + k) % cfg.inputs.len() as u64) as usize]
                .clone()
        })
        .collect()
}

/// The KServe input parameters that place a request's images in shared memory, when
/// they are shared tensors lying one after another in one region (KServe takes a batch
/// as one window); `None` for images sent as bytes.
fn shared_window(
    images: &[proto::Image],
) -> Result<Option<HashMap<String, InferParameter>>, tonic::Code> {
    let Some(proto::image::Kind::Shared(first)) = images.first().and_then(|i| i.kind.as_ref())
    else {
        return Ok(None);
    };
    let contiguous = images.iter().enumerate().all(|(k, img)| {
        matches!(&img.kind, Some(proto::image::Kind::Shared(s))
            if s.region == first.region && s.offset == first.offset + k as u64 * TENSOR_BYTES)
    });
    if !contiguous {
        return Err(tonic::Code::InvalidArgument);
    }
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let bytes = images.len() as u64 * TENSOR_BYTES;
    Ok(Some(HashMap::from([
        (
            "shared_memory_region".to_string(),
            param(ParameterChoice::StringParam(first.region.clone())),
        ),
        (
            "shared_memory_byte_size".to_string(),
            param(ParameterChoice::Int64Param(bytes as i64)),
        ),
        (
            "shared_memory_offset".to_string(),
            param(ParameterChoice::Int64Param(first.offset as i64)),
        ),
    ])))
}

/// One KServe `ModelInfer` carrying the same images a `Classify` would.
async fn kserve(client: &Client, cfg: &LoadConfig, i: u64) -> Result<(), tonic::Status> {
    use proto::inference::{
        model_infer_request::InferInputTensor, ModelInferRequest, ModelInferResponse,
    };
    let images = request_images(cfg, i);
    let n = images.len() as i64;
    // Sent as the images' own buffers, one after another in the raw field.
    let tensors: Option<Vec<Bytes>> = images
        .iter()
        .map(|img| match &img.kind {
            Some(proto::image::Kind::Tensor(t)) => Some(t.data.clone()),
            _ => None,
        })
        .collect();
    let fp32 = |parameters| InferInputTensor {
        name: "input".into(),
        datatype: "FP32".into(),
        shape: vec![n, 3, 224, 224],
        parameters,
        ..Default::default()
    };
    let window = shared_window(&images)
        .map_err(|code| tonic::Status::new(code, "a batch in shared memory is one window"))?;
    let (model, input, raw) = match (window, tensors) {
        // One window of a shared-memory region holds the whole batch.
        (Some(parameters), _) => (cfg.model.clone(), fp32(parameters), Vec::new()),
        (None, Some(raw)) => (cfg.model.clone(), fp32(HashMap::new()), raw),
        (None, None) => {
            let mut raw = Vec::with_capacity(2 * images.len());
            for img in &images {
                let Some(proto::image::Kind::Encoded(e)) = &img.kind else {
                    return Err(tonic::Status::invalid_argument(
                        "KServe requests take tensors or encoded files, not raw frames",
                    ));
                };
                raw.push(Bytes::copy_from_slice(&(e.data.len() as u32).to_le_bytes()));
                raw.push(e.data.clone());
            }
            (
                format!("{}_image", cfg.model),
                InferInputTensor {
                    name: "image".into(),
                    datatype: "BYTES".into(),
                    shape: vec![n, 1],
                    ..Default::default()
                },
                raw,
            )
        }
    };
    let req = ModelInferRequest {
        model_name: model,
        inputs: vec![input],
        // Only the logits, as the Classify side asks for its configured output.
        outputs: vec![
            proto::inference::model_infer_request::InferRequestedOutputTensor {
                name: "logits".into(),
                parameters: Default::default(),
            },
        ],
        ..Default::default()
    };
    let mut encoded = wire::Encoded::new(&req);
    if !raw.is_empty() {
        encoded = encoded.with_bytes_field(RAW_INPUT_CONTENTS, &raw);
    }
    client
        .unary::<ModelInferResponse>(wire::MODEL_INFER, encoded, client.config().timeout)
        .await
        .map(|_| ())
}

/// `ModelInferRequest.raw_input_contents`' field number.
const RAW_INPUT_CONTENTS: u32 = 7;

pub(super) async fn unary(client: &Client, cfg: &LoadConfig, i: u64) -> Result<(), tonic::Code> {
    call(client, cfg, i).await.map_err(|s| s.code())
}

/// Request `i` of a unary load (`Classify`, or `ModelInfer` for [`Transport::KServe`]),
/// sent once, with the whole status: the soak tool tells the server's answers from
/// transport failures by it.
pub(crate) async fn call(client: &Client, cfg: &LoadConfig, i: u64) -> Result<(), tonic::Status> {
    if cfg.transport == Transport::KServe {
        return kserve(client, cfg, i).await;
    }
    let req = ClassifyRequest {
        model: cfg.model.clone(),
        images: request_images(cfg, i),
        output: Some(cfg.output.spec()),
        request_id: String::new(),
    };
    // One attempt: a load tester reports what the server answered.
    client
        .unary::<proto::ClassifyResponse>(
            wire::CLASSIFY,
            wire::Encoded::new(&req),
            client.config().timeout,
        )
        .await
        .map(|_| ())
}

pub(super) fn frame(cfg: &LoadConfig, i: u64) -> proto::StreamFrame {
    proto::StreamFrame {
        frame_id: i,
        model: cfg.model.clone(),
        image: Some(cfg.inputs[(i % cfg.inputs.len() as u64) as usize].clone()),
        output: Some(cfg.output.spec()),
    }
}

pub(super) fn outcome(r: &proto::StreamResult) -> Result<(), tonic::Code> {
    match &r.outcome {
        Some(proto::stream_result::Outcome::Error(e)) => Err(tonic::Code::from_i32(e.code)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::shared_tensor;

    #[test]
    fn a_kserve_batch_in_shared_memory_is_one_window() {
        let images: Vec<_> = (2..5)
            .map(|k| shared_tensor("r", k * TENSOR_BYTES))
            .collect();
        let params = shared_window(&images).expect("contiguous").expect("shared");
        let int = |key: &str| match params[key].parameter_choice {
            Some(ParameterChoice::Int64Param(v)) => v,
            ref other => panic!("{key}: {other:?}"),
        };
        assert_eq!(int("shared_memory_offset"), 2 * TENSOR_BYTES as i64);
        assert_eq!(int("shared_memory_byte_size"), 3 * TENSOR_BYTES as i64);
        let gap = vec![shared_tensor("r", 0), shared_tensor("r", 2 * TENSOR_BYTES)];
        assert_eq!(shared_window(&gap), Err(tonic::Code::InvalidArgument));
        let two_regions = vec![shared_tensor("r", 0), shared_tensor("s", TENSOR_BYTES)];
        assert_eq!(
            shared_window(&two_regions),
            Err(tonic::Code::InvalidArgument)
        );
        let sent = vec![crate::tensor(&[0.0; 3 * 224 * 224])];
        assert_eq!(shared_window(&sent), Ok(None));
    }
}
