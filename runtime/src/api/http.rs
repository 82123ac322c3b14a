//! HTTP beside gRPC on a node's listening address: `/healthz`, `/readyz`,
//! `/metrics`, the web dashboard at `/` and the JSON endpoints it reads
//! (`/api/...`). Scheduler nodes serve it with their gRPC services (tonic
//! routes by path; HTTP/1.1 and h2c both accepted); worker-only nodes serve
//! it alone on their `listen` address.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Authenticator;
use super::dashboard;
use super::metrics::{self, CountsCache};
use crate::blob::BlobStore;
use crate::exec::worker::WorkerView;
use crate::meta::{MetaError, MetaNode};
use crate::sched::coordinator::Board;

/// How long `/readyz` waits for a linearizable read before it says no.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What the HTTP handlers of one node read.
#[derive(Clone)]
pub struct HttpState {
    pub node_id: u64,
    /// The metadata node (scheduler nodes).
    pub meta: Option<MetaNode>,
    /// The worker (worker nodes).
    pub worker: Option<WorkerView>,
    /// Scheduler endpoints a worker-only node points the dashboard to.
    pub schedulers: Vec<String>,
    /// Who a token belongs to (the gRPC API's authentication).
    pub auth: Authenticator,
    /// Where subtask logs are read from.
    pub blobs: BlobStore,
    /// What the owner loop of a scheduler node publishes of its
    /// coordinator (operator metrics).
    pub board: Option<Board>,
    cache: CountsCache,
}

impl HttpState {
    pub fn new(
        node_id: u64,
        meta: Option<MetaNode>,
        worker: Option<WorkerView>,
        schedulers: Vec<String>,
        auth: Authenticator,
        blobs: BlobStore,
        board: Option<Board>,
    ) -> Self {
        HttpState {
            node_id,
            meta,
            worker,
            schedulers,
            auth,
            blobs,
            board,
            cache: CountsCache::default(),
        }
    }
}

/// The HTTP routes of a node.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/api/overview", get(super::dashboard::api::overview))
        .route("/api/tasks", get(super::dashboard::api::tasks))
        .route("/api/tasks/{id}", get(super::dashboard::api::task))
        .route(
            "/api/tasks/{id}/subtasks/{step}/{ordinal}/log",
            get(super::dashboard::api::subtask_log),
        )
        .route("/api/rules", get(super::dashboard::api::rules))
        .merge(dashboard::static_routes())
        .with_state(Arc::new(state))
}

/// An error answer of the JSON endpoints: a status and a message a user
/// can act on, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        let status = if e.is_retriable() || matches!(e, MetaError::Timeout { .. }) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Who a JSON request is answered for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// Sees every tenant's objects.
    Admin,
    /// Sees only this tenant's objects.
    Tenant(String),
}

impl Viewer {
    /// Whether objects of `tenant` are visible.
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Viewer::Admin => true,
            Viewer::Tenant(t) => t == tenant,
        }
    }
}

/// The bearer token of a request, if it has one.
///
/// # Errors
/// 401 for an `Authorization` header that is not `Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "authorization header is not text"))?;
    match v.strip_prefix("Bearer ") {
        Some(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization must be `Bearer <token>`",
        )),
    }
}

/// The one authorization of the dashboard's JSON endpoints: who the
/// request is answered for, by the same rules as the gRPC API. An open
/// cluster (no `admin_token`) shows everything; otherwise the admin token
/// sees all tenants, a tenant token its own tenant.
///
/// # Errors
/// 401 for a missing, malformed, unknown or revoked token; 503 on a
/// worker-only node of an authenticated cluster (it cannot check tokens).
pub async fn authorize(state: &HttpState, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let token = bearer(headers)?;
    if !state.auth.enabled() {
        return Ok(Viewer::Admin);
    }
    let Some(meta) = &state.meta else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "a worker-only node cannot check tokens; open the dashboard of a scheduler: {}",
                state.schedulers.join(", ")
            ),
        ));
    };
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this cluster requires a token: log in with your tenant token (or the admin token)",
        ));
    };
    match state.auth.caller(meta, Ok(Some(token))).await {
        Ok(caller) if caller.admin => Ok(Viewer::Admin),
        Ok(caller) => Ok(Viewer::Tenant(caller.tenant)),
        Err(status) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            status.message().to_string(),
        )),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when the node can serve reads: on a scheduler node a leader is
/// known and a linearizable read (ReadIndex, then waiting until applied)
/// succeeds in time; a worker-only node is ready while it runs.
async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    let Some(meta) = &state.meta else {
        return (
            StatusCode::OK,
            Json(json!({ "ready": true, "role": "worker" })),
        )
            .into_response();
    };
    let leader = meta.leader_watch().borrow().leader_id;
    let read = tokio::time::timeout(READY_TIMEOUT, meta.read_barrier()).await;
    let status = meta.status().await.ok();
    let (ready, why) = match (leader, read) {
        (None, _) => (false, "no known leader".to_string()),
        (Some(_), Ok(Ok(_))) => (true, String::new()),
        (Some(_), Ok(Err(e))) => (false, format!("cannot serve reads: {e}")),
        (Some(_), Err(_)) => (false, "a read did not complete in time".to_string()),
    };
    let body = json!({
        "ready": ready,
        "reason": why,
        "leader_id": leader,
        "term": status.as_ref().map(|s| s.term),
        "commit_index": status.as_ref().map(|s| s.commit_index),
        "applied_index": status.as_ref().map(|s| s.applied_index),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics_handler(State(state): State<Arc<HttpState>>) -> Response {
    let parts = metrics::Parts {
        meta: state.meta.as_ref(),
        board: state.board.as_ref(),
        worker: state.worker.as_ref(),
    };
    match metrics::render(parts, &state.cache).await {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The metadata node a JSON endpoint reads, or 503 on a worker-only node.
pub fn meta_of(state: &HttpState) -> Result<&MetaNode, ApiError> {
    state.meta.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {} is a worker only and holds no cluster state; open the dashboard on a scheduler node ({})",
                state.node_id,
                state.schedulers.join(", ")
            ),
        )
    })
}

/// Reads after a read barrier (linearizable).
///
/// # Errors
/// The metadata layer's errors.
pub async fn read<T>(
    meta: &MetaNode,
    f: impl FnOnce(&std::path::Path, &redb::ReadTransaction) -> Result<T, MetaError>,
) -> Result<T, ApiError> {
    meta.read_barrier().await?;
    Ok(meta.read_local(f)?.0)
}

/// Query parameters of `/api/tasks`.
#[derive(Debug, Default, Deserialize)]
pub struct TasksQuery {
    /// Only this tenant's tasks (an admin's filter).
    pub tenant: Option<String>,
    /// At most this many tasks (default 200, at most 1000).
    pub limit: Option<usize>,
}

/// Path parameter of `/api/tasks/{id}` (parsed by the handler, so a bad
/// id gets a JSON error).
pub type TaskPath = Path<String>;
/// Path parameters of `/api/tasks/{id}/subtasks/{step}/{ordinal}/log`,
/// parsed by the handler like [`TaskPath`].
pub type SubtaskPath = Path<(String, String, String)>;

/// Query parameters of a subtask's log (parsed by the handler).
#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {
    /// Which attempt's log; absent or 0 for the latest.
    pub attempt: Option<String>,
}
/// Query parameters of a subtask's log.
pub type LogParams = Query<LogQuery>;
/// Query parameters of `/api/tasks`.
pub type TasksParams = Query<TasksQuery>;

/// The answer of a JSON endpoint.
pub type JsonResult = Result<Json<Value>, ApiError>;
