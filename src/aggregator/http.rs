//! The aggregator's HTTP API: `GET /jobs/{id}`, `GET /groups/{id}`, `GET /stats`, `GET /workers`,
//! `GET /health` (the schedules' routes are in [`super::schedules`]).

use super::store::Store;
use super::workers::Liveness;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    store: Store,
    liveness: Arc<Liveness>,
}

/// The routes over `store` and the workers' liveness.
pub fn router(store: Store, liveness: Arc<Liveness>) -> Router {
    Router::new()
        .route("/jobs/{id}", get(job))
        .route("/groups/{id}", get(group))
        .route("/stats", get(stats))
        .route("/workers", get(workers))
        .route("/health", get(health))
        .with_state(AppState { store, liveness })
}

fn internal(e: crate::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

async fn job(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let store = state.store;
    match tokio::task::spawn_blocking(move || store.get(&id).map(|r| (id, r))).await {
        Ok(Ok((_, Some(r)))) => Json(json!({
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "attempt": r.attempt,
            "output": r.output,
            "error": r.error,
            "worker": r.worker,
        }))
        .into_response(),
        Ok(Ok((id, None))) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no result recorded for job {id}")})),
        )
            .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(crate::Error::Store(e.to_string())),
    }
}

/// `?offset=` and `?limit=` of `GET /groups/{id}`.
#[derive(Debug, serde::Deserialize)]
struct Page {
    #[serde(default)]
    offset: u32,
    #[serde(default = "default_limit")]
    limit: u32,
}

/// Member results per page of `GET /groups/{id}` unless `?limit=` says fewer.
const PAGE_LIMIT: u32 = 10_000;

fn default_limit() -> u32 {
    PAGE_LIMIT
}

async fn group(
    State(state): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Response {
    let store = state.store;
    let limit = page.limit.min(PAGE_LIMIT);
    let read = move || store.group_page(&id, page.offset, limit).map(|g| (id, g));
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok((_, Some(g)))) => Json(g).into_response(),
        Ok(Ok((id, None))) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no member of group {id} recorded")})),
        )
            .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(crate::Error::Store(e.to_string())),
    }
}

async fn stats(State(state): State<AppState>) -> Response {
    let store = state.store;
    match tokio::task::spawn_blocking(move || store.stats()).await {
        Ok(Ok(s)) => Json(json!({
            "results": s.results,
            "duplicates": s.duplicates,
            "by_status": s.by_status,
            "workers": state.liveness.live(),
        }))
        .into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(crate::Error::Store(e.to_string())),
    }
}

async fn workers(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "workers": state.liveness.view() }))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}
