//! The models a server serves, by name, and which one answers when a request names none.

use std::sync::Arc;

use dashmap::DashMap;

use crate::scheduler::ModelHandle;

#[derive(Clone, Default)]
pub struct Registry {
    models: Arc<DashMap<String, ModelHandle>>,
    default_model: Arc<std::sync::RwLock<Option<String>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a model; the first one added becomes the default.
    pub fn insert(&self, handle: ModelHandle) {
        let name = handle.name().to_string();
        self.models.insert(name.clone(), handle);
        // The lock is never held across an await.
        if let Ok(mut d) = self.default_model.write() {
            d.get_or_insert(name);
        }
    }

    /// Removes a model; its queue closes once in-flight requests let go of it, and its
    /// workers then exit and free it. The default passes to the first remaining model.
    pub fn remove(&self, name: &str) -> Option<ModelHandle> {
        let removed = self.models.remove(name).map(|(_, h)| h)?;
        if let Ok(mut d) = self.default_model.write() {
            if d.as_deref() == Some(name) {
                let mut rest: Vec<String> = self.models.iter().map(|e| e.key().clone()).collect();
                rest.sort();
                *d = rest.into_iter().next();
            }
        }
        Some(removed)
    }

    pub fn set_default(&self, name: &str) {
        if let Ok(mut d) = self.default_model.write() {
            *d = Some(name.to_string());
        }
    }

    pub fn default_name(&self) -> Option<String> {
        self.default_model.read().ok().and_then(|d| d.clone())
    }

    /// The named model, or the default for an empty name.
    pub fn get(&self, name: &str) -> Option<ModelHandle> {
        let name = if name.is_empty() {
            self.default_name()?
        } else {
            name.to_string()
        };
        self.models.get(&name).map(|h| h.clone())
    }

    /// All models, sorted by name.
    pub fn all(&self) -> Vec<ModelHandle> {
        let mut v: Vec<ModelHandle> = self.models.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(|h| h.name().to_string()).collect()
    }
}
