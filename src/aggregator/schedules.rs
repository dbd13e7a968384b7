//! The schedules over HTTP: `GET /schedules`, `GET`, `PUT` and `DELETE /schedules/{name}`,
//! `POST /schedules/{name}/pause` and `/resume`. They read and change the namespace's broker
//! register, as `conveyor-producer schedule` does; the leading scheduler reads it every second.

use crate::error::Error;
use crate::schedule::request::ScheduleRequest;
use crate::schedule::{table, Schedule};
use crate::transport::Transport;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long one request may wait for the broker.
const BROKER_WAIT: Duration = Duration::from_secs(10);

/// The routes over the namespace's schedules.
pub fn router(transport: Arc<dyn Transport>) -> Router {
    Router::new()
        .route("/schedules", get(list))
        .route("/schedules/{name}", get(one).put(put).delete(remove))
        .route("/schedules/{name}/pause", post(pause))
        .route("/schedules/{name}/resume", post(resume))
        .with_state(transport)
}

type Shared = State<Arc<dyn Transport>>;

/// A schedule as listed: its stored fields and its next tick (`next_ms`).
fn listed(s: &Schedule) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_else(|_| json!({ "name": s.name }));
    v["next_ms"] = json!(s.next_after(crate::job::now_ms()));
    v
}

/// An error as a status and `{"error": ...}`: bad input 400, unknown name 404, lost races 409,
/// refused permissions 403, broker trouble 503.
fn refusal(e: Error) -> Response {
    let status = match &e {
        Error::Config(_) | Error::Codec(_) => StatusCode::BAD_REQUEST,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Denied { .. } => StatusCode::FORBIDDEN,
        e if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, Json(json!({ "error": e.to_string() }))).into_response()
}

/// `op` on the broker, bounded by [`BROKER_WAIT`].
async fn bounded<T>(op: impl Future<Output = crate::Result<T>>) -> crate::Result<T> {
    tokio::time::timeout(BROKER_WAIT, op)
        .await
        .unwrap_or(Err(Error::Timeout(BROKER_WAIT, "a schedules request")))
}

async fn list(State(t): Shared) -> Response {
    match bounded(table::list(t.as_ref())).await {
        Ok(all) => Json(all.values().map(listed).collect::<Vec<_>>()).into_response(),
        Err(e) => refusal(e),
    }
}

async fn one(State(t): Shared, Path(name): Path<String>) -> Response {
    match bounded(table::list(t.as_ref())).await {
        Ok(all) => match all.get(&name) {
            Some(s) => Json(listed(s)).into_response(),
            None => refusal(Error::NotFound(format!("no schedule named {name:?}"))),
        },
        Err(e) => refusal(e),
    }
}

/// Adds the schedule, or replaces the one of that name (which resumes it and catches up none
/// of its earlier ticks); answers with it as stored.
async fn put(State(t): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    let schedule = match ScheduleRequest::from_json(&body).and_then(|r| r.into_schedule(&name)) {
        Ok(s) => s,
        Err(e) => return refusal(e),
    };
    match bounded(table::put(t.as_ref(), schedule)).await {
        Ok(stored) => Json(listed(&stored)).into_response(),
        Err(e) => refusal(e),
    }
}

async fn remove(State(t): Shared, Path(name): Path<String>) -> Response {
    match bounded(table::remove(t.as_ref(), &name)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refusal(e),
    }
}

async fn pause(state: Shared, name: Path<String>) -> Response {
    set_paused(state, name, true).await
}

async fn resume(state: Shared, name: Path<String>) -> Response {
    set_paused(state, name, false).await
}

async fn set_paused(State(t): Shared, Path(name): Path<String>, paused: bool) -> Response {
    match bounded(table::set_paused(t.as_ref(), &name, paused)).await {
        Ok(()) => Json(json!({ "name": name, "paused": paused })).into_response(),
        Err(e) => refusal(e),
    }
}
