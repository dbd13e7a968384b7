//! The `timeout` control: a job's deadline (`Conveyor-Timeout-Ms`, else the kind's `--timeout`).
//! At the deadline the handler's token fires; a handler that has not returned after the grace
//! period is left behind (dropped), so its slot is freed. The outcome is a retryable
//! [`JobError::Timeout`].

use super::controls::{Control, Next};
use super::registry::Job;
use crate::job::JobError;
use futures::future::BoxFuture;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

/// How long the handler of a timed-out or cancelled job has to stop before it is left behind.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// See the module docs.
pub struct TimeoutControl {
    grace: Duration,
}

impl TimeoutControl {
    /// Deadlines with `grace` for the handler to stop.
    pub fn new(grace: Duration) -> TimeoutControl {
        TimeoutControl { grace }
    }
}

impl Control for TimeoutControl {
    fn name(&self) -> &'static str {
        "timeout"
    }

    fn call(self: Arc<Self>, job: Job, next: Next) -> BoxFuture<'static, Result<Value, JobError>> {
        Box::pin(async move {
            let Some(limit) = job.meta.timeout else {
                return next.oneshot(job).await;
            };
            let token = job.cancel.clone();
            let run = next.oneshot(job);
            tokio::pin!(run);
            match tokio::time::timeout(limit, &mut run).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    token.cancel();
                    let _ = tokio::time::timeout(self.grace, &mut run).await;
                    Err(JobError::Timeout(format!(
                        "deadline of {} ms passed",
                        limit.as_millis()
                    )))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::controls::Stack;

    #[tokio::test]
    async fn a_handler_that_ignores_its_deadline_is_left_after_the_grace() {
        let handler = tower::util::BoxCloneSyncService::new(tower::service_fn(|_job: Job| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, JobError>(Value::Null)
        }));
        let stack = Stack::new(handler)
            .with(Arc::new(TimeoutControl::new(Duration::from_millis(50))))
            .expect("stack");
        let mut job = crate::worker::controls::tests::job();
        let mut meta = (*job.meta).clone();
        meta.timeout = Some(Duration::from_millis(30));
        job.meta = Arc::new(meta);
        let token = job.cancel.clone();
        let started = tokio::time::Instant::now();
        let outcome = stack.service().oneshot(job).await;
        assert!(matches!(outcome, Err(JobError::Timeout(_))), "{outcome:?}");
        assert!(token.is_cancelled(), "the handler's token fired");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
