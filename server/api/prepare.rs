//! An image as the serving core takes it ([`Image`]) to the model's input: a tensor is
//! only length-checked at once; pixels are decoded and resized on the blocking pool, at
//! most `preprocess_slots` at a time, a request's images in parallel and in order.

use std::sync::Arc;

use crate::api::error::ServeError;
use crate::api::state::State;
use crate::model::ModelInput;
use crate::preprocess::Image;

impl State {
    /// One image's model input: a tensor at once, pixels decoded on the blocking pool.
    pub(crate) async fn prepare(
        self: &Arc<Self>,
        index: usize,
        image: Image,
    ) -> Result<ModelInput, ServeError> {
        if image.needs_decoding() {
            self.decode(index, image).await
        } else {
            self.check(index, &image)
        }
    }

    /// A ready tensor, sent or in a shared-memory region, is only length-checked (its
    /// values are checked where its batch is assembled), which is no work worth a thread.
    fn check(&self, index: usize, image: &Image) -> Result<ModelInput, ServeError> {
        self.preprocessor
            .prepare(image.input())
            .map_err(|source| ServeError::Image { index, source })
    }

    /// Decodes and resizes one image on the blocking pool, at most
    /// `preprocess_slots` at a time.
    async fn decode(
        self: &Arc<Self>,
        index: usize,
        image: Image,
    ) -> Result<ModelInput, ServeError> {
        let _slot = self
            .preprocess_slots
            .acquire()
            .await
            .map_err(|_| ServeError::Internal("preprocessing pool closed".into()))?;
        let state = self.clone();
        tokio::task::spawn_blocking(move || state.check(index, &image))
            .await
            .map_err(|e| ServeError::Internal(format!("preprocessing task failed: {e}")))?
    }

    /// Preprocesses all images, those that need decoding in parallel, keeping their
    /// order. Tensors are taken as they are, without a task each (a 64-tensor request
    /// spawned 128 tasks before).
    pub(crate) async fn prepare_all(
        self: &Arc<Self>,
        images: Vec<Image>,
    ) -> Result<Vec<ModelInput>, ServeError> {
        enum Pending {
            Ready(ModelInput),
            Decoding(tokio::task::JoinHandle<Result<ModelInput, ServeError>>),
        }
        let mut pending = Vec::with_capacity(images.len());
        for (i, img) in images.into_iter().enumerate() {
            pending.push(if img.needs_decoding() {
                let st = self.clone();
                Pending::Decoding(tokio::spawn(async move { st.decode(i, img).await }))
            } else {
                Pending::Ready(self.check(i, &img)?)
            });
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Pending::Ready(input) => input,
                Pending::Decoding(task) => task
                    .await
                    .map_err(|e| ServeError::Internal(e.to_string()))??,
            });
        }
        Ok(out)
    }
}
