//! The static registry of job kinds a worker runs. Handlers are `tower::Service`s, so tower's
//! layers (timeout, concurrency limit, rate limit, ...) wrap them unchanged.

use super::resources::Resources;
use crate::job::{JobError, JobMeta};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;

/// A job as a handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Id, kind, attempt and the rest of the metadata.
    pub meta: Arc<JobMeta>,
    /// The decoded input.
    pub input: Value,
    /// Cancelled when the job should stop (deadline, cancel request, forced shutdown).
    pub cancel: CancellationToken,
    /// Resources registered at start-up (pools and the like).
    pub resources: Arc<Resources>,
}

/// A type-erased handler service.
pub type Handler = BoxCloneSyncService<Job, Value, JobError>;

/// What a typed handler gets besides its input.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's metadata.
    pub meta: Arc<JobMeta>,
    /// Fires when the job should stop.
    pub cancel: CancellationToken,
    /// Resources registered at start-up: `ctx.resources.get::<MyPool>()`.
    pub resources: Arc<Resources>,
}

/// Turns `async fn(Input, JobContext) -> Result<Output, JobError>` into a [`Handler`]. Input that
/// does not deserialize into `I` is a permanent error that names the kind.
pub fn handler_fn<I, O, F, Fut>(f: F) -> Handler
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I, JobContext) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<O, JobError>> + Send + 'static,
{
    let svc = tower::service_fn(
        move |job: Job| -> BoxFuture<'static, Result<Value, JobError>> {
            let f = f.clone();
            Box::pin(async move {
                let input: I = serde_json::from_value(job.input).map_err(|e| {
                    JobError::permanent(format!("invalid input for kind {}: {e}", job.meta.kind))
                })?;
                let ctx = JobContext {
                    meta: job.meta,
                    cancel: job.cancel,
                    resources: job.resources,
                };
                let out = f(input, ctx).await?;
                serde_json::to_value(out)
                    .map_err(|e| JobError::permanent(format!("output is not serializable: {e}")))
            })
        },
    );
    BoxCloneSyncService::new(svc)
}

/// Job kinds and their handlers.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Handler>,
    resources: Resources,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `kind`, replacing an earlier one.
    pub fn register(&mut self, kind: impl Into<String>, handler: Handler) -> &mut Self {
        self.handlers.insert(kind.into(), handler);
        self
    }

    /// The resources handlers can borrow; register them at start-up.
    pub fn resources_mut(&mut self) -> &mut Resources {
        &mut self.resources
    }

    /// The resources handlers can borrow.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The handler of `kind`.
    pub fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// Keeps only `kinds`; an unknown name is an error listing the known ones.
    pub fn retain(&mut self, kinds: &[String]) -> crate::Result<()> {
        for k in kinds {
            if !self.handlers.contains_key(k) {
                return Err(crate::Error::Config(format!(
                    "unknown kind {k:?} in --kinds; this worker has: {}",
                    self.kinds().join(", ")
                )));
            }
        }
        self.handlers.retain(|k, _| kinds.contains(k));
        Ok(())
    }
}
