//! Models that tests steer: each wraps a real model (usually
//! [`crate::fixtures::resnet18`]) and computes what it computes, but can be held inside
//! a forward pass, made to panic, or counted while alive.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use resnet_serve::model::ModelError;
use resnet_serve::scheduler::{Backend, BackendInfo};

/// Holds each forward pass until [`Gated::open`], so tests can keep the worker busy for
/// as long as they need.
pub struct Gated {
    inner: Arc<dyn Backend>,
    open: AtomicBool,
    entered: tokio::sync::Notify,
    has_entered: AtomicBool,
}

impl Gated {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Gated> {
        Arc::new(Gated {
            inner,
            open: AtomicBool::new(false),
            entered: tokio::sync::Notify::new(),
            has_entered: AtomicBool::new(false),
        })
    }

    /// Lets every forward pass, held or to come, run.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Resolves once a forward pass has entered (one wake-up per entry, kept for a
    /// waiter that comes later, as [`tokio::sync::Notify::notify_one`] keeps it).
    pub async fn entered(&self) {
        self.entered.notified().await;
    }

    /// Whether any forward pass has entered, for callers that poll.
    pub fn has_entered(&self) -> bool {
        self.has_entered.load(Ordering::SeqCst)
    }
}

impl Backend for Gated {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        self.has_entered.store(true, Ordering::SeqCst);
        self.entered.notify_one();
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.forward(pixels, n)
    }

    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
}

/// The wrapped model, except that its first forward pass panics ("injected fault").
pub struct PanicOnce {
    inner: Arc<dyn Backend>,
    panicked: AtomicBool,
}

impl PanicOnce {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<PanicOnce> {
        Arc::new(PanicOnce {
            inner,
            panicked: AtomicBool::new(false),
        })
    }
}

impl Backend for PanicOnce {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        if !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("injected fault");
        }
        self.inner.forward(pixels, n)
    }

    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
}

/// Counts model replicas alive, so a test can see an unloaded model's memory go.
#[derive(Default)]
pub struct Alive(AtomicUsize);

impl Alive {
    /// Replicas made and not yet dropped.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A replica counted in an [`Alive`] from its making to its drop.
pub struct Tracked {
    inner: Arc<dyn Backend>,
    alive: Arc<Alive>,
}

impl Tracked {
    pub fn new(inner: Arc<dyn Backend>, alive: &Arc<Alive>) -> Tracked {
        alive.0.fetch_add(1, Ordering::SeqCst);
        Tracked {
            inner,
            alive: alive.clone(),
        }
    }
}

impl Backend for Tracked {
    fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        self.inner.forward(pixels, n)
    }

    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.alive.0.fetch_sub(1, Ordering::SeqCst);
    }
}
