//! The worker's controls as `tower` layers of one shape, stacked per job kind in one order.
//!
//! Every control implements [`Control`]: an *admission*, which the worker awaits before it takes
//! the kind's next job from the broker (so jobs waiting on a control stay in the broker), and a
//! *call*, which runs the job through the rest of the stack. [`ControlLayer`] turns a control
//! into a `tower::Layer`: its admission is the service's `poll_ready`, and what the admission
//! returns (a slot, a permit) is held until the job ends.
//!
//! A kind's [`Stack`] applies its controls in [`ORDER`], outermost first: every admission is
//! awaited outer to inner before the job is taken, then the job passes each call outer to inner
//! on its way to the handler. A control the kind is not configured with is left out.

use super::registry::{Handler, Job};
use crate::job::JobError;
use futures::future::BoxFuture;
use serde_json::Value;
use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

/// The controls in the order a job passes them, outermost first.
///
/// - `breaker`: waits while the kind's circuit is open; counts the job's outcome.
/// - `rate`: a token of this worker's rate and one of the cluster's (a bucket on the broker).
/// - `concurrency`: a slot of the kind in this worker, then a permit of the cluster-wide cap.
/// - `cancel`: a job named by a cancel request ends `cancelled` before it runs, or is stopped.
/// - `singleflight`: jobs with one dedup key in flight together run once across the cluster.
/// - `timeout`: the job's deadline; the handler's token fires, then it is left after a grace.
pub const ORDER: [&str; 6] = [
    "breaker",
    "rate",
    "concurrency",
    "cancel",
    "singleflight",
    "timeout",
];

/// What an admission holds until its job ends (a slot, a permit); dropping it gives it back.
pub type Held = Box<dyn Any + Send>;

tokio::task_local! {
    /// Where a stack run inside [`until_settled`] leaves what its admissions held.
    static SETTLING: std::cell::RefCell<Vec<Held>>;
}

/// Runs `job_task` (a job from its stack's call to its ack) so that what the admissions of its
/// stack held is given back when the task ends, after the job is settled, rather than when the
/// handler returns: a job holds its kind's slot and cluster permit until its result is recorded.
pub async fn until_settled<F: Future>(job_task: F) -> F::Output {
    SETTLING
        .scope(std::cell::RefCell::new(Vec::new()), job_task)
        .await
}

/// Keeps `held` until the job task running inside [`until_settled`] ends; outside one it is
/// given back at once.
pub fn hold_until_settled(held: Held) {
    let mut held = Some(held);
    let _ = SETTLING.try_with(|kept| kept.borrow_mut().extend(held.take()));
}

/// The rest of the stack, as one control sees it: the inner controls and the handler.
pub type Next = BoxCloneService<Job, Value, JobError>;

/// One control of the worker runtime (see the module docs).
pub trait Control: Send + Sync + 'static {
    /// Its name in [`ORDER`].
    fn name(&self) -> &'static str;

    /// Waits until the next job of the kind may be taken from the broker; what it returns is
    /// held until that job ends. By default at once, holding nothing.
    fn admit(self: Arc<Self>) -> BoxFuture<'static, Held> {
        Box::pin(async { Box::new(()) as Held })
    }

    /// Runs `job` through `next`. By default passes it on unchanged.
    fn call(self: Arc<Self>, job: Job, next: Next) -> BoxFuture<'static, Result<Value, JobError>> {
        Box::pin(next.oneshot(job))
    }
}

/// A [`Control`] as a `tower::Layer`.
#[derive(Clone)]
pub struct ControlLayer(pub Arc<dyn Control>);

impl Layer<Next> for ControlLayer {
    type Service = Controlled;

    fn layer(&self, inner: Next) -> Controlled {
        Controlled {
            control: self.0.clone(),
            inner,
            admitting: None,
            held: None,
        }
    }
}

/// The service a [`ControlLayer`] makes: ready once its control admitted a job and the inner
/// service is ready; a clone starts unadmitted.
pub struct Controlled {
    control: Arc<dyn Control>,
    inner: Next,
    admitting: Option<BoxFuture<'static, Held>>,
    held: Option<Held>,
}

impl Clone for Controlled {
    fn clone(&self) -> Self {
        Controlled {
            control: self.control.clone(),
            inner: self.inner.clone(),
            admitting: None,
            held: None,
        }
    }
}

impl Service<Job> for Controlled {
    type Response = Value;
    type Error = JobError;
    type Future = BoxFuture<'static, Result<Value, JobError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), JobError>> {
        if self.held.is_none() {
            let control = &self.control;
            let admitting = self
                .admitting
                .get_or_insert_with(|| control.clone().admit());
            let held = ready!(admitting.as_mut().poll(cx));
            self.admitting = None;
            self.held = Some(held);
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, job: Job) -> Self::Future {
        let held = self.held.take();
        // The inner service that was polled ready is the one that is called.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        let run = self.control.clone().call(job, inner);
        Box::pin(async move {
            let outcome = run.await;
            let mut held = held;
            // Kept until the job is settled when the worker runs it so; else given back now.
            let _ = SETTLING.try_with(|kept| kept.borrow_mut().extend(held.take()));
            drop(held);
            outcome
        })
    }
}

/// One kind's controls around its handler.
#[derive(Clone)]
pub struct Stack {
    controls: Vec<Arc<dyn Control>>,
    handler: Handler,
}

impl Stack {
    /// The bare handler.
    pub fn new(handler: Handler) -> Stack {
        Stack {
            controls: Vec::new(),
            handler,
        }
    }

    /// Adds `control` inside the ones added before. It must come after them in [`ORDER`].
    pub fn with(mut self, control: Arc<dyn Control>) -> crate::Result<Stack> {
        let rank = |name: &str| ORDER.iter().position(|n| *n == name);
        let new = rank(control.name());
        let last = self.controls.last().and_then(|c| rank(c.name()));
        match (new, last) {
            (None, _) => {
                return Err(crate::Error::Config(format!(
                    "unknown control {:?}",
                    control.name()
                )))
            }
            (Some(n), Some(l)) if n <= l => {
                return Err(crate::Error::Config(format!(
                    "control {:?} cannot go inside {:?}: the order is {}",
                    control.name(),
                    ORDER[l],
                    ORDER.join(" → ")
                )))
            }
            _ => {}
        }
        self.controls.push(control);
        Ok(self)
    }

    /// The controls' names, outermost first.
    pub fn names(&self) -> Vec<&'static str> {
        self.controls.iter().map(|c| c.name()).collect()
    }

    /// A fresh service of the whole stack, not yet admitted: await `ready()` on it, then call it
    /// with one job.
    pub fn service(&self) -> Next {
        self.controls
            .iter()
            .rev()
            .fold(BoxCloneService::new(self.handler.clone()), |inner, c| {
                BoxCloneService::new(ControlLayer(c.clone()).layer(inner))
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::job::JobMeta;
    use std::sync::Mutex;
    use tokio::sync::Notify;

    /// Records its admissions and calls; its admission waits for `open` when given.
    struct Probe {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        open: Option<Arc<Notify>>,
    }

    impl Control for Probe {
        fn name(&self) -> &'static str {
            self.name
        }
        fn admit(self: Arc<Self>) -> BoxFuture<'static, Held> {
            Box::pin(async move {
                if let Some(open) = &self.open {
                    open.notified().await;
                }
                self.log
                    .lock()
                    .expect("log")
                    .push(format!("admit {}", self.name));
                Box::new(()) as Held
            })
        }
        fn call(
            self: Arc<Self>,
            job: Job,
            next: Next,
        ) -> BoxFuture<'static, Result<Value, JobError>> {
            Box::pin(async move {
                self.log
                    .lock()
                    .expect("log")
                    .push(format!("call {}", self.name));
                next.oneshot(job).await
            })
        }
    }

    pub(crate) fn job() -> Job {
        let msg = crate::message::Message::new(crate::message::Headers::new(), "{}");
        Job {
            meta: Arc::new(JobMeta::from_message("echo", &msg, 1, || "j1".into()).expect("meta")),
            input: serde_json::json!({}),
            cancel: tokio_util::sync::CancellationToken::new(),
            resources: Arc::default(),
        }
    }

    fn handler(log: Arc<Mutex<Vec<String>>>) -> Handler {
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |_job: Job| {
            let log = log.clone();
            async move {
                log.lock().expect("log").push("handler".into());
                Ok::<_, JobError>(serde_json::json!("done"))
            }
        }))
    }

    #[tokio::test]
    async fn admissions_then_calls_outer_to_inner_and_a_closed_admission_holds_readiness() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Notify::new());
        let probe = |name, open: Option<Arc<Notify>>| {
            Arc::new(Probe {
                name,
                log: log.clone(),
                open,
            }) as Arc<dyn Control>
        };
        let stack = Stack::new(handler(log.clone()))
            .with(probe("breaker", None))
            .and_then(|s| s.with(probe("concurrency", Some(gate.clone()))))
            .and_then(|s| s.with(probe("timeout", None)))
            .expect("in order");
        assert_eq!(stack.names(), ["breaker", "concurrency", "timeout"]);
        let mut svc = stack.service();
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), svc.ready()).await;
        assert!(waiting.is_err(), "not ready while an admission waits");
        gate.notify_one();
        let out = svc.ready().await.expect("ready").call(job()).await;
        assert_eq!(out, Ok(serde_json::json!("done")));
        assert_eq!(
            *log.lock().expect("log"),
            [
                "admit breaker",
                "admit concurrency",
                "admit timeout",
                "call breaker",
                "call concurrency",
                "call timeout",
                "handler"
            ]
        );
    }

    /// Holds one of its semaphore's permits per job.
    struct Slot(Arc<tokio::sync::Semaphore>);

    impl Control for Slot {
        fn name(&self) -> &'static str {
            "concurrency"
        }
        fn admit(self: Arc<Self>) -> BoxFuture<'static, Held> {
            Box::pin(async move { Box::new(self.0.clone().acquire_owned().await.ok()) as Held })
        }
    }

    #[tokio::test]
    async fn what_an_admission_holds_is_kept_until_the_job_is_settled() {
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let stack = Stack::new(handler(Arc::default()))
            .with(Arc::new(Slot(slots.clone())))
            .expect("stack");
        // Outside a settling task: given back when the stack's call returns.
        let out = stack.service().oneshot(job()).await;
        assert!(out.is_ok());
        assert_eq!(slots.available_permits(), 1);
        // Inside one: kept until the task ends.
        let during = until_settled(async {
            let out = stack.service().oneshot(job()).await;
            assert!(out.is_ok());
            slots.available_permits()
        })
        .await;
        assert_eq!(during, 0, "held while the job is settled");
        assert_eq!(slots.available_permits(), 1, "given back after");
    }

    #[test]
    fn a_stack_refuses_controls_out_of_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let probe = |name| {
            Arc::new(Probe {
                name,
                log: log.clone(),
                open: None,
            }) as Arc<dyn Control>
        };
        let err = Stack::new(handler(log.clone()))
            .with(probe("timeout"))
            .and_then(|s| s.with(probe("rate")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("\"rate\" cannot go inside \"timeout\""),
            "{err}"
        );
        assert!(Stack::new(handler(log.clone()))
            .with(probe("nope"))
            .is_err());
    }
}
