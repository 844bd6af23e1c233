//! The `resnet_serve.v1.Classifier` gRPC service: its messages converted into the core's
//! [`Image`]s, validation, submission to the model's scheduler, and output formatting.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::api::admission::Held;
use crate::api::deadline::deadline_of;
use crate::api::error::ServeError;
use crate::api::state::{code_name, request_id_header, with_request_id, State};
use crate::api::stream::ordered_stream;
use crate::labels;
use crate::model::{INPUT_SIZE, NUM_CLASSES};
use crate::preprocess::{Image, INPUT_LEN};
use crate::proto::{self, classifier_server::Classifier, image, stream_result, OutputKind};
use crate::scheduler::ModelHandle;

/// One image of our API as the core takes it: a shared-memory window is read here (the
/// region's bytes, not a copy), a message with no image is refused.
fn image_of(state: &State, index: usize, image: proto::Image) -> Result<Image, ServeError> {
    Ok(match image.kind {
        Some(image::Kind::Tensor(t)) => Image::Tensor(t.data),
        Some(image::Kind::Shared(s)) => {
            let len = (INPUT_LEN * 4) as u64;
            Image::Tensor(state.shared_memory.bytes(&s.region, s.offset, len)?)
        }
        Some(image::Kind::Encoded(e)) => Image::Encoded(e.data),
        Some(image::Kind::Raw(r)) => Image::Raw {
            width: r.width,
            height: r.height,
            rgb: r.rgb,
        },
        None => {
            return Err(ServeError::InvalidArgument(format!(
                "image {index}: no data (set encoded, raw, tensor or shared)"
            )))
        }
    })
}

/// `Classify`: every image prepared (those to decode in parallel), one submission of
/// them all to the model's queue, the answers formatted as asked.
async fn classify(
    state: &Arc<State>,
    req: proto::ClassifyRequest,
    deadline: Option<Instant>,
) -> Result<proto::ClassifyResponse, ServeError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ServeError::Draining);
    }
    let model = state.model(&req.model)?;
    if req.images.is_empty() {
        return Err(ServeError::InvalidArgument(
            "a request needs at least one image".into(),
        ));
    }
    if req.images.len() > state.max_images_per_request {
        return Err(ServeError::InvalidArgument(format!(
            "{} images in one request; the limit is {}",
            req.images.len(),
            state.max_images_per_request
        )));
    }
    let output = OutputFormat::from_spec(req.output.as_ref())?;
    let images = req.images.len() as i64;
    let converted = req
        .images
        .into_iter()
        .enumerate()
        .map(|(i, image)| image_of(state, i, image))
        .collect::<Result<Vec<_>, _>>()?;
    let inputs = state
        .prepare_all(converted)
        .instrument(tracing::debug_span!("preprocess", images))
        .await?;
    let logits = model
        .classify_from(
            inputs,
            deadline,
            crate::scheduler::Priority::Normal,
            crate::scheduler::Origin::new(&req.request_id),
        )
        .await?;
    Ok(proto::ClassifyResponse {
        model: model.name().to_string(),
        request_id: req.request_id,
        results: logits.into_iter().map(|l| output.format(l)).collect(),
    })
}

/// One frame of `ClassifyStream`: its answer, or its error as the frame's outcome (a bad
/// frame does not end the stream).
async fn classify_frame(
    state: Arc<State>,
    model: String,
    frame: proto::StreamFrame,
) -> proto::StreamResult {
    let frame_id = frame.frame_id;
    let started = Instant::now();
    let outcome = async {
        let handle = state.model(&model)?;
        let output = OutputFormat::from_spec(frame.output.as_ref())?;
        let image = frame
            .image
            .ok_or_else(|| ServeError::InvalidArgument("frame has no image".into()))?;
        let input = state.prepare(0, image_of(&state, 0, image)?).await?;
        let mut logits = handle.classify(vec![input], None).await?;
        Ok::<_, ServeError>((handle.name().to_string(), output.format(logits.remove(0))))
    }
    .await;
    let (label, code) = match &outcome {
        Ok((name, _)) => (name.clone(), tonic::Code::Ok),
        Err(e) => {
            state.refused(e.code(), e);
            (state.metric_label(&model), e.code())
        }
    };
    state
        .metrics
        .observe_request(&label, "ClassifyStream", code_name(code), started.elapsed());
    proto::StreamResult {
        frame_id,
        outcome: Some(match outcome {
            Ok((_, c)) => stream_result::Outcome::Result(c),
            Err(e) => stream_result::Outcome::Error(proto::FrameError {
                code: e.code() as i32,
                message: e.message(),
            }),
        }),
    }
}

/// What a request asked to get back per image.
#[derive(Debug, Clone, Copy)]
enum OutputFormat {
    Logits,
    Probabilities,
    TopK(usize),
}

impl OutputFormat {
    fn from_spec(spec: Option<&proto::OutputSpec>) -> Result<Self, ServeError> {
        let Some(spec) = spec else {
            return Ok(OutputFormat::TopK(5));
        };
        let kind = OutputKind::try_from(spec.kind).map_err(|_| {
            ServeError::InvalidArgument(format!("unknown output kind {}", spec.kind))
        })?;
        Ok(match kind {
            OutputKind::Logits => OutputFormat::Logits,
            OutputKind::Probabilities => OutputFormat::Probabilities,
            OutputKind::Unspecified | OutputKind::TopK => {
                let k = if spec.top_k == 0 {
                    5
                } else {
                    spec.top_k as usize
                };
                if k > NUM_CLASSES {
                    return Err(ServeError::InvalidArgument(format!(
                        "top_k {k} is more than the {NUM_CLASSES} classes"
                    )));
                }
                OutputFormat::TopK(k)
            }
        })
    }

    fn format(self, logits: Vec<f32>) -> proto::Classification {
        match self {
            OutputFormat::Logits => proto::Classification {
                values: logits,
                top: vec![],
            },
            OutputFormat::Probabilities => proto::Classification {
                values: labels::softmax(&logits),
                top: vec![],
            },
            OutputFormat::TopK(k) => proto::Classification {
                values: vec![],
                top: labels::top_k(&labels::softmax(&logits), k)
                    .into_iter()
                    .map(|s| proto::Class {
                        index: s.index as u32,
                        label: s.label.to_string(),
                        score: s.score,
                    })
                    .collect(),
            },
        }
    }
}

fn model_info(h: &ModelHandle, ready: bool) -> proto::ModelInfo {
    let info = h.info();
    proto::ModelInfo {
        name: h.name().to_string(),
        architecture: info.architecture.clone(),
        input_shape: vec![3, INPUT_SIZE as u32, INPUT_SIZE as u32],
        num_classes: NUM_CLASSES as u32,
        allowed_batch_sizes: h
            .policy()
            .allowed_sizes()
            .iter()
            .map(|&s| s as u32)
            .collect(),
        device: info.device.clone(),
        dtype: info.dtype.clone(),
        ready,
        kernels: h.implementation().to_string(),
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct ClassifierService {
    pub state: Arc<State>,
}

impl ClassifierService {
    /// `ClassifyStream` over `frames`, as tonic decodes them or as decoded from the
    /// call's HTTP/2 frames ([`crate::api::unary`]): results in the frames' order.
    pub fn classify_frames(
        &self,
        frames: impl tokio_stream::Stream<Item = Result<Held<proto::StreamFrame>, Status>>
            + Send
            + Unpin
            + 'static,
    ) -> Result<Response<ReceiverStream<Result<proto::StreamResult, Status>>>, Status> {
        if self.state.draining.load(Ordering::SeqCst) {
            return Err(ServeError::Draining.into());
        }
        let guard = self.state.in_flight.enter();
        let state = self.state.clone();
        let mut model = String::new();
        let answers = ordered_stream(
            frames,
            self.state.stream_window,
            guard,
            move |Held {
                      message: frame,
                      reservation,
                  }: Held<proto::StreamFrame>| {
                // A frame that names no model uses the stream's last named one.
                if !frame.model.is_empty() {
                    model.clone_from(&frame.model);
                }
                let (state, model) = (state.clone(), model.clone());
                async move {
                    let _reservation = reservation;
                    Ok(classify_frame(state, model, frame).await)
                }
            },
            |e| Err(Status::internal(format!("frame task failed: {e}"))),
        );
        Ok(Response::new(answers))
    }
}

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<proto::ClassifyRequest>,
    ) -> Result<Response<proto::ClassifyResponse>, Status> {
        let _guard = self.state.in_flight.enter();
        let deadline = deadline_of(&request);
        let header_id = request_id_header(request.metadata());
        let request_id = self.state.request_id(
            header_id
                .as_deref()
                .unwrap_or(&request.get_ref().request_id),
        );
        let model_label = self.state.metric_label(&request.get_ref().model);
        let span = tracing::info_span!(
            "classify",
            request_id = %request_id,
            model = %model_label,
            images = request.get_ref().images.len() as i64,
            otel.name = tracing::field::Empty,
            otel.kind = tracing::field::Empty
        );
        crate::process::telemetry::join_caller(
            &span,
            request.metadata(),
            crate::process::telemetry::CLASSIFY,
        );
        let mut req = request.into_inner();
        req.request_id = request_id;
        let id = tonic::metadata::MetadataValue::try_from(req.request_id.as_str()).ok();
        let started = Instant::now();
        let result = classify(&self.state, req, deadline)
            .instrument(span.clone())
            .await;
        let code = result
            .as_ref()
            .map_or_else(ServeError::code, |_| tonic::Code::Ok);
        self.state.metrics.observe_request(
            &model_label,
            "Classify",
            code_name(code),
            started.elapsed(),
        );
        if let Some(h) = self.state.registry.get(&model_label) {
            h.metrics()
                .stats
                .record_request(result.is_ok(), started.elapsed());
        }
        span.in_scope(|| match &result {
            Ok(_) => tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "ok"),
            Err(e) => self.state.refused(code, e),
        });
        if crate::process::telemetry::enabled() {
            let message = result.as_ref().err().map(ServeError::message);
            crate::process::telemetry::record_status(&span, code, message.as_deref().unwrap_or(""));
        }
        with_request_id(result.map(Response::new).map_err(Status::from), id)
    }

    type ClassifyStreamStream = ReceiverStream<Result<proto::StreamResult, Status>>;

    async fn classify_stream(
        &self,
        request: Request<Streaming<proto::StreamFrame>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        use tokio_stream::StreamExt;
        self.classify_frames(request.into_inner().map(|r| r.map(Held::unreserved)))
    }

    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Ok(Response::new(proto::ListModelsResponse {
            models: self
                .state
                .registry
                .all()
                .iter()
                .map(|h| model_info(h, self.state.model_ready()))
                .collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let h = self.state.model(&request.into_inner().name)?;
        Ok(Response::new(model_info(&h, self.state.model_ready())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::shm::SharedMemory;
    use crate::preprocess::Preprocessor;
    use crate::process::metrics::Metrics;
    use crate::process::registry::Registry;

    fn state(shared_memory: bool) -> State {
        State::new(
            Registry::new(),
            Preprocessor::default(),
            Metrics::new(),
            1,
            8,
            SharedMemory::new(shared_memory),
        )
    }

    fn message(kind: image::Kind) -> proto::Image {
        proto::Image { kind: Some(kind) }
    }

    #[test]
    fn each_kind_of_image_becomes_the_cores_image_without_a_copy() {
        let s = state(false);
        let data = bytes::Bytes::from(vec![1u8; 12]);
        let tensor = image_of(
            &s,
            0,
            message(image::Kind::Tensor(proto::FloatTensor {
                data: data.clone(),
            })),
        )
        .expect("tensor");
        let Image::Tensor(kept) = &tensor else {
            panic!("{tensor:?}")
        };
        assert_eq!(
            kept.as_ptr(),
            data.as_ptr(),
            "the received bytes, not a copy"
        );
        assert_eq!(
            image_of(
                &s,
                1,
                message(image::Kind::Encoded(proto::EncodedImage {
                    data: data.clone()
                }))
            )
            .expect("encoded"),
            Image::Encoded(data.clone())
        );
        assert_eq!(
            image_of(
                &s,
                2,
                message(image::Kind::Raw(proto::RawFrame {
                    width: 2,
                    height: 2,
                    rgb: data.clone(),
                }))
            )
            .expect("raw"),
            Image::Raw {
                width: 2,
                height: 2,
                rgb: data
            }
        );
    }

    #[test]
    fn an_empty_image_or_an_unknown_region_is_refused_with_its_index() {
        let s = state(true);
        let err = image_of(&s, 3, proto::Image { kind: None }).expect_err("empty");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("image 3"), "{}", err.message());
        let shared = message(image::Kind::Shared(proto::SharedTensor {
            region: "nowhere".into(),
            offset: 0,
        }));
        let err = image_of(&s, 0, shared.clone()).expect_err("unregistered");
        assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
        // With the extension off, a region is no way in at all.
        assert!(image_of(&state(false), 0, shared).is_err());
    }

    #[test]
    fn output_specs_default_to_top_5_and_refuse_what_cannot_be() {
        let spec = |kind: i32, top_k: u32| proto::OutputSpec { kind, top_k };
        let top = |f: OutputFormat| match f {
            OutputFormat::TopK(k) => Some(k),
            _ => None,
        };
        assert_eq!(
            top(OutputFormat::from_spec(None).expect("default")),
            Some(5)
        );
        let unspecified = spec(OutputKind::Unspecified as i32, 0);
        assert_eq!(
            top(OutputFormat::from_spec(Some(&unspecified)).expect("ok")),
            Some(5)
        );
        let all = spec(OutputKind::TopK as i32, NUM_CLASSES as u32);
        assert_eq!(
            top(OutputFormat::from_spec(Some(&all)).expect("ok")),
            Some(NUM_CLASSES)
        );
        for bad in [spec(OutputKind::TopK as i32, 1001), spec(99, 0)] {
            let err = OutputFormat::from_spec(Some(&bad)).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
        let probs = OutputFormat::Probabilities.format(vec![0.0, 0.0]);
        assert_eq!(probs.values, vec![0.5, 0.5]);
        let top1 = OutputFormat::TopK(1).format(vec![0.0, 3.0]);
        assert_eq!((top1.top.len(), top1.top[0].index), (1, 1));
        assert_eq!(OutputFormat::Logits.format(vec![1.0]).values, vec![1.0]);
    }
}
