//! Float tensors handed to a server on the same host through system shared memory: they
//! are written once into a POSIX shared-memory object, registered with the server
//! (KServe's `SystemSharedMemoryRegister`), and requests then carry only a reference to
//! each (`SharedTensor`) instead of its 602 KB. This is Triton's system shared-memory
//! extension, which our `Classify` accepts as well as KServe's `ModelInfer`.
//!
//! ```no_run
//! # async fn demo(client: resnet_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use resnet_client::{shm::SharedTensors, Output};
//!
//! let tensors = vec![vec![0.0f32; 3 * 224 * 224]; 4];
//! let shared = SharedTensors::create(&client, "my-batch", &tensors).await?;
//! let reply = client.classify("resnet50_swsl", shared.images(), Output::TopK(5)).await?;
//! shared.release(&client).await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use tonic::Status;

use crate::proto::inference::{
    SystemSharedMemoryRegisterRequest, SystemSharedMemoryUnregisterRequest,
};
use crate::proto::{self, image};
use crate::Client;

/// Values in one `3 x 224 x 224` tensor.
const TENSOR_VALUES: usize = 3 * 224 * 224;
/// Bytes of one tensor in a region.
pub const TENSOR_BYTES: u64 = (TENSOR_VALUES * 4) as u64;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("a tensor has {0} values; expected 3 x 224 x 224 = {TENSOR_VALUES}")]
    TensorSize(usize),
    #[error("writing shared memory {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registering shared memory with the server: {0}")]
    Register(#[source] Status),
}

/// Tensors in a shared-memory object registered with one server as the region `name`.
/// The object is removed when this is dropped; [`SharedTensors::release`] also
/// unregisters it.
#[derive(Debug)]
pub struct SharedTensors {
    name: String,
    path: PathBuf,
    count: usize,
}

impl SharedTensors {
    /// Writes `tensors` (each `3 x 224 x 224`, normalised) one after another into a new
    /// shared-memory object and registers it with `client`'s server as region `name`.
    pub async fn create(
        client: &Client,
        name: &str,
        tensors: &[Vec<f32>],
    ) -> Result<SharedTensors, ShmError> {
        if let Some(t) = tensors.iter().find(|t| t.len() != TENSOR_VALUES) {
            return Err(ShmError::TensorSize(t.len()));
        }
        // One object per process and region, so two load clients never share one.
        let object = format!("resnet-client-{}-{name}", std::process::id());
        let path = PathBuf::from("/dev/shm").join(&object);
        let bytes: Vec<u8> = tensors
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(&path, &bytes).map_err(|source| ShmError::Write {
            path: path.clone(),
            source,
        })?;
        let shared = SharedTensors {
            name: name.to_string(),
            path,
            count: tensors.len(),
        };
        client
            .kserve_stub()
            .system_shared_memory_register(client.request(SystemSharedMemoryRegisterRequest {
                name: name.to_string(),
                key: format!("/{object}"),
                offset: 0,
                byte_size: bytes.len() as u64,
            }))
            .await
            .map_err(ShmError::Register)?;
        Ok(shared)
    }

    /// The shared-memory object the tensors are in (under `/dev/shm`).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The region's name on the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// A reference to tensor `index` (of those written, in order).
    pub fn image(&self, index: usize) -> proto::Image {
        shared_tensor(&self.name, index as u64 * TENSOR_BYTES)
    }

    /// References to every tensor, in order.
    pub fn images(&self) -> Vec<proto::Image> {
        (0..self.count).map(|i| self.image(i)).collect()
    }

    /// Unregisters the region from the server and removes the object.
    pub async fn release(self, client: &Client) -> Result<(), Status> {
        client
            .kserve_stub()
            .system_shared_memory_unregister(client.request(SystemSharedMemoryUnregisterRequest {
                name: self.name.clone(),
            }))
            .await
            .map(|_| ())
    }
}

impl Drop for SharedTensors {
    fn drop(&mut self) {
        // The server holds its own copy of whatever its requests read.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A `3 x 224 x 224` tensor at `offset` in a shared-memory region registered on the server.
pub fn shared_tensor(region: &str, offset: u64) -> proto::Image {
    proto::Image {
        kind: Some(image::Kind::Shared(proto::SharedTensor {
            region: region.to_string(),
            offset,
        })),
    }
}
