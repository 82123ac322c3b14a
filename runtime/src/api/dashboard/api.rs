//! The dashboard's JSON endpoints. Every handler first calls
//! [`authorize`], the one authorization of these endpoints, and shows only
//! what the [`Viewer`] may see; another tenant's task is "not found".

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use stoker_proto::meta::{NodeRecord, SubtaskRecord, TaskRecord};

use crate::api::http::{
    authorize, meta_of, read, ApiError, HttpState, JsonResult, LogParams, SubtaskPath, TaskPath,
    TasksParams, Viewer,
};
use crate::api::logs::{self, LogAt, LogError};
use crate::meta::queries::{self, TaskFilter};
use crate::meta::stats;
use crate::model::SubtaskState;

/// Default and largest number of tasks `/api/tasks` returns.
const DEFAULT_TASKS: usize = 200;
const MAX_TASKS: usize = 1000;

fn node_json(n: &NodeRecord, assigned: u32) -> Value {
    let load = n.load.as_ref().map(|l| {
        json!({
            "scheduler": l.scheduler,
            "command": l.command,
            "allowed": l.allowed,
            "active": l.active,
            "suspended": l.suspended,
            "fuel_rate": l.fuel_rate,
            "cpu": l.cpu,
            "level": l.level,
            "running": l.running,
            "fuel_granted": l.fuel_granted,
        })
    });
    json!({
        "id": n.id,
        "addr": n.addr,
        "labels": n.labels,
        "scope": n.scope,
        "slots": n.slots,
        "assigned": assigned,
        "up": n.up,
        "scheduler": n.scheduler,
        "worker": n.worker,
        "last_heartbeat_ms": n.last_heartbeat_ms,
        "load": load,
    })
}

/// `GET /api/overview`: the leader, every node, fuel used by tenant.
///
/// # Errors
/// 401 (bad token), 503 (worker-only node, no quorum).
pub async fn overview(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> JsonResult {
    let viewer = authorize(&state, &headers).await?;
    let meta = meta_of(&state)?;
    let (nodes, assigned, fuel) = read(meta, |p, t| {
        let nodes = queries::node_records(p, t)?;
        let mut assigned = Vec::with_capacity(nodes.len());
        for n in &nodes {
            assigned.push(queries::node_subtasks(p, t, n.id)?.len() as u32);
        }
        Ok((nodes, assigned, stats::tenant_fuel(p, t)?))
    })
    .await?;
    let leader = meta.leader_watch().borrow().leader_id;
    let fuel: BTreeMap<String, u64> = fuel
        .into_iter()
        .filter(|(tenant, _)| viewer.sees(tenant))
        .collect();
    let nodes: Vec<Value> = nodes
        .iter()
        .zip(assigned)
        .map(|(n, a)| node_json(n, a))
        .collect();
    Ok(Json(json!({
        "node_id": state.node_id,
        "leader_id": leader,
        "admin": viewer == Viewer::Admin,
        "nodes": nodes,
        "tenant_fuel": fuel,
    })))
}

/// Progress of a task: its current step's subtasks that succeeded, of all.
fn progress(
    p: &std::path::Path,
    t: &redb::ReadTransaction,
    task: &TaskRecord,
) -> Result<(u32, u32), crate::meta::MetaError> {
    if !task.started {
        return Ok((0, 0));
    }
    let counts = queries::step_counts(p, t, task.id, task.step)?;
    Ok((counts.get(SubtaskState::Succeed), counts.total()))
}

fn task_json(t: &TaskRecord, done: u32, total: u32) -> Value {
    json!({
        "id": t.id,
        "tenant": t.tenant,
        "key": t.key,
        "module": t.module_hash,
        "state": t.state,
        "priority": t.priority,
        "concurrency": t.concurrency,
        "step": t.step,
        "create_time_ms": t.create_time_ms,
        "finish_time_ms": t.finish_time_ms,
        "fuel_used": t.fuel_used,
        "fuel_limit": t.fuel_limit,
        "error": t.error,
        "progress": { "done": done, "total": total },
    })
}

/// `GET /api/tasks?tenant=&limit=`: unfinished tasks in rank order, then
/// finished ones, newest first.
///
/// # Errors
/// 401 (bad token), 503 (worker-only node, no quorum).
pub async fn tasks(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    params: TasksParams,
) -> JsonResult {
    let viewer = authorize(&state, &headers).await?;
    let meta = meta_of(&state)?;
    let limit = params.limit.unwrap_or(DEFAULT_TASKS).clamp(1, MAX_TASKS);
    let tenant = params.tenant.clone().filter(|t| !t.is_empty());
    let list = read(meta, |p, t| {
        let all = queries::list_tasks(
            p,
            t,
            &TaskFilter {
                include_finished: true,
                ..TaskFilter::default()
            },
        )?;
        let (mut unfinished, mut finished): (Vec<TaskRecord>, Vec<TaskRecord>) = all
            .into_iter()
            .filter(|task| viewer.sees(&task.tenant))
            .filter(|task| tenant.as_ref().is_none_or(|w| *w == task.tenant))
            .partition(|task| task.finish_time_ms == 0);
        finished.reverse();
        unfinished.append(&mut finished);
        unfinished.truncate(limit);
        let mut out = Vec::with_capacity(unfinished.len());
        for task in unfinished {
            let (done, total) = progress(p, t, &task)?;
            out.push(task_json(&task, done, total));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(json!({ "tasks": list })))
}

fn subtask_json(s: &SubtaskRecord) -> Value {
    json!({
        "step": s.step,
        "ordinal": s.ordinal,
        "state": s.state,
        "node": s.node,
        "attempt": s.attempt,
        "retries": s.retries,
        "fuel_used": s.fuel_used,
        "start_time_ms": s.start_time_ms,
        "end_time_ms": s.end_time_ms,
        "output_bytes": s.output.len(),
        "output_blob": s.output_blob,
        "error": s.error,
    })
}

/// `GET /api/tasks/{id}`: a task with its steps (counts by state) and
/// subtasks (payloads and outputs left out).
///
/// # Errors
/// 400 (not a task id), 401 (bad token), 404 (unknown or another
/// tenant's), 503 (worker-only node, no quorum).
pub async fn task(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    path: TaskPath,
) -> JsonResult {
    let viewer = authorize(&state, &headers).await?;
    let meta = meta_of(&state)?;
    let id: u64 = number("task id", &path.0)?;
    let found = read(meta, |p, t| {
        let Some(task) = queries::task(p, t, id)? else {
            return Ok(None);
        };
        if !viewer.sees(&task.tenant) {
            return Ok(None);
        }
        let mut steps = Vec::new();
        let mut subtasks = Vec::new();
        if task.started {
            for step in 0..=task.step {
                let (list, counts) = queries::step_subtasks(p, t, id, step)?;
                let counts: BTreeMap<String, u32> =
                    counts.0.iter().map(|(s, n)| (s.to_string(), *n)).collect();
                steps.push(json!({ "step": step, "counts": counts }));
                subtasks.extend(list.iter().map(subtask_json));
            }
        }
        let (done, total) = progress(p, t, &task)?;
        let mut json = task_json(&task, done, total);
        json["result_bytes"] = json!(task.result.len());
        json["result_preview"] = json!(String::from_utf8_lossy(
            &task.result[..task.result.len().min(256)]
        ));
        Ok(Some(
            json!({ "task": json, "steps": steps, "subtasks": subtasks }),
        ))
    })
    .await?;
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("task {id} not found")))
}

/// A number from a path or query parameter, or 400 naming it.
fn number<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, ApiError> {
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} must be a number, got {text:?}"),
        )
    })
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::NotFound(m) => ApiError::not_found(m),
            LogError::Meta(e) => e.into(),
            LogError::Blob { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

/// `GET /api/tasks/{id}/subtasks/{step}/{ordinal}/log?attempt=`: one run's
/// log (the latest attempt's without `attempt`), by the same lookup and
/// tenant scoping as `GetSubtaskLog`.
///
/// # Errors
/// 400 (not a number), 401 (bad token), 404 (unknown task, subtask or
/// attempt, or another tenant's task), 503 (worker-only node, no quorum,
/// blob store unreachable).
pub async fn subtask_log(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    path: SubtaskPath,
    query: LogParams,
) -> JsonResult {
    let viewer = authorize(&state, &headers).await?;
    let meta = meta_of(&state)?;
    let (task, step, ordinal) = &path.0;
    let at = LogAt {
        task: number("task id", task)?,
        step: number("step", step)?,
        ordinal: number("ordinal", ordinal)?,
        attempt: match query.attempt.as_deref() {
            None | Some("") => 0,
            Some(a) => number("attempt", a)?,
        },
    };
    let found = logs::subtask_log(meta, &state.blobs, |t| viewer.sees(t), at).await?;
    Ok(Json(json!({
        "task_id": at.task,
        "step": at.step,
        "ordinal": at.ordinal,
        "attempt": found.attempt,
        "log": found.log,
    })))
}

/// `GET /api/rules`: placement rules and their status. The cluster has no
/// placement rules yet, so the list is empty.
///
/// # Errors
/// 401 (bad token).
pub async fn rules(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> JsonResult {
    authorize(&state, &headers).await?;
    Ok(Json(json!({ "rules": [] })))
}
