//! The aggregator's HTTP API: `GET /jobs/{id}`, `GET /stats`, `GET /health`.

use super::store::Store;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

/// The routes over `store`.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/jobs/{id}", get(job))
        .route("/stats", get(stats))
        .route("/health", get(health))
        .with_state(store)
}

fn internal(e: crate::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

async fn job(State(store): State<Store>, Path(id): Path<String>) -> Response {
    match tokio::task::spawn_blocking(move || store.get(&id).map(|r| (id, r))).await {
        Ok(Ok((_, Some(r)))) => Json(json!({
            "id": r.id,
            "kind": r.kind,
            "status": r.status,
            "attempt": r.attempt,
            "output": r.output,
            "error": r.error,
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

async fn stats(State(store): State<Store>) -> Response {
    match tokio::task::spawn_blocking(move || store.stats()).await {
        Ok(Ok(s)) => Json(s).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(crate::Error::Store(e.to_string())),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}
