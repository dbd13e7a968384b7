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
    /// Kinds given to [`Registry::register`] that are no valid kind (a wildcard, say): the
    /// worker refuses to start with them, naming them.
    invalid: Vec<String>,
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

    /// Registers `handler` for `kind`, replacing an earlier one. A kind that is not valid
    /// ([`crate::protocol::validate_kind`]: a wildcard such as `a.*` or `>`, an empty word) is
    /// not registered, and [`Registry::check`] (which the worker calls before it starts) names it.
    pub fn register(&mut self, kind: impl Into<String>, handler: Handler) -> &mut Self {
        let kind = kind.into();
        if crate::protocol::validate_kind(&kind).is_ok() {
            self.handlers.insert(kind, handler);
        } else {
            self.invalid.push(kind);
        }
        self
    }

    /// An error naming the first kind given to [`Registry::register`] that is not a valid kind.
    pub fn check(&self) -> crate::Result<()> {
        match self.invalid.first() {
            Some(kind) => crate::protocol::validate_kind(kind)
                .map_err(|e| crate::Error::Config(format!("cannot register a handler: {e}"))),
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Handler {
        handler_fn(|v: Value, _ctx: JobContext| async move { Ok::<_, JobError>(v) })
    }

    #[test]
    fn wildcard_and_empty_kinds_are_refused() {
        for bad in ["a.*", ">", "jobs.>", "a..b", "", "a b"] {
            let mut r = Registry::new();
            r.register(bad, noop()).register("echo", noop());
            assert_eq!(r.kinds(), vec!["echo".to_string()], "{bad:?} registered");
            let err = r.check().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("invalid job kind"), "{bad:?}: {err}");
        }
        let mut ok = Registry::new();
        ok.register("wordcount.map", noop());
        assert!(ok.check().is_ok());
    }
}
