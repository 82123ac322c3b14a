//! The task actions a round starts (one per task at a time): planning a
//! step through the module's `plan`, writing its subtasks, finishing,
//! reverting, failing, and the state moves; with the module, input and
//! step-output loading they need and retries of guest calls.

use std::collections::BTreeSet;
use std::sync::Arc;

use stoker_proto::guest::{FinishRequest, PlanRequest, RevertRequest};
use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{change_subtasks, AddSubtasks, FinishTask, NewSubtask, TaskRecord};
use tracing::{info, warn};

use super::commands::{change, propose, set_state};
use super::view::is_state;
use super::Ctx;
use crate::exec::local::RetryPolicy;
use crate::meta::queries;
use crate::meta::records::{subtask_name, MAX_INLINE_BYTES};
use crate::meta::{now_ms, MetaError};
use crate::model::{SubtaskState, TaskState};
use crate::sandbox::{CallEnv, CallLimits, Plan, SandboxError, TaskModule};
use crate::sched::task::Action;

/// Carries out one task scheduler action.
pub(super) async fn carry_out(ctx: &Ctx, task: TaskRecord, action: Action) {
    let id = task.id;
    let node = &ctx.node;
    match action {
        Action::Wait => {}
        Action::PlanNextStep => {
            if let Err(e) = plan_next(ctx, &task).await {
                warn!(task_id = id, error = %e, "planning failed");
            }
        }
        Action::Fail { manual_recovery } => {
            // The round's view holds only active subtasks: read the step.
            let step = node.read_local(|p, t| queries::step_subtasks(p, t, id, task.step));
            let failed = step
                .map(|((subtasks, _), _)| subtasks)
                .unwrap_or_default()
                .into_iter()
                .find(|s| is_state(s, SubtaskState::Failed))
                .map(|s| {
                    format!(
                        "subtask {} failed: {}",
                        subtask_name(s.task_id, s.step, s.ordinal),
                        s.error
                    )
                })
                .unwrap_or_else(|| "a subtask failed".into());
            let to = if manual_recovery {
                TaskState::AwaitingResolution
            } else {
                TaskState::Reverting
            };
            info!(task_id = id, to = %to, error = %failed, "task failed");
            propose(node, set_state(id, to, failed)).await;
        }
        Action::CancelSubtasks => {
            propose(node, change(id, change_subtasks::Kind::Cancel, true)).await;
        }
        Action::PauseSubtasks => {
            propose(node, change(id, change_subtasks::Kind::Pause, false)).await;
        }
        Action::ResumeSubtasks => {
            propose(node, change(id, change_subtasks::Kind::Resume, false)).await;
        }
        Action::MoveTo(to) => {
            let error = if to == TaskState::Reverting && task.error.is_empty() {
                "cancelled".to_string()
            } else {
                String::new()
            };
            propose(node, set_state(id, to, error)).await;
        }
        Action::ApplyModification => match task.modifying_from.parse::<TaskState>() {
            Ok(back) => {
                propose(node, set_state(id, back, String::new())).await;
            }
            Err(e) => warn!(task_id = id, error = %e, "modifying task has no state to return to"),
        },
        Action::Revert => revert(ctx, &task).await,
    }
}

/// Why an owner-side step of a task could not be taken (retried next round).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Missing(String),
    #[error("blob store: {0}")]
    Blob(String),
}

fn limits_of(ctx: &Ctx, task: &TaskRecord) -> CallLimits {
    let mut limits = ctx.config.limits.clone();
    if task.fuel_limit > 0 {
        limits.fuel = task.fuel_limit;
    }
    if task.memory_limit > 0 {
        limits.memory_bytes = task.memory_limit;
    }
    limits
}

async fn load_module(ctx: &Ctx, task: &TaskRecord) -> Result<Arc<TaskModule>, (bool, String)> {
    // The hash was checked against the bytes at upload: a module loaded
    // under it needs no second read (megabytes from the chunk table) nor
    // hashing on every plan and finish.
    if let Some(module) = ctx.sandbox.loaded(&task.module_hash) {
        return Ok(module);
    }
    let bytes = ctx
        .node
        .read_local(|p, t| queries::module_bytes(p, t, &task.module_hash))
        .map_err(|e| (true, e.to_string()))?
        .0
        .ok_or_else(|| (false, format!("module {} not found", task.module_hash)))?;
    ctx.sandbox
        .load(&bytes)
        .await
        .map_err(|e| (false, e.to_string()))
}

async fn task_input(ctx: &Ctx, task: &TaskRecord) -> Result<Vec<u8>, StepError> {
    if !task.input_blob.is_empty() {
        return read_blob(ctx, task, &task.input_blob).await;
    }
    Ok(ctx
        .node
        .read_local(|p, t| queries::task_input(p, t, task.id))?
        .0)
}

async fn read_blob(ctx: &Ctx, task: &TaskRecord, key: &str) -> Result<Vec<u8>, StepError> {
    let blobs = ctx
        .blobs
        .tenant(&task.tenant)
        .map_err(|e| StepError::Blob(e.to_string()))?;
    blobs
        .get(key)
        .await
        .map_err(|e| StepError::Blob(e.to_string()))?
        .map(|b| b.to_vec())
        .ok_or_else(|| StepError::Missing(format!("blob {key} of task {} is missing", task.id)))
}

/// The outputs of one step in ordinal order (blob outputs read back).
async fn step_outputs(ctx: &Ctx, task: &TaskRecord, step: u32) -> Result<Vec<Vec<u8>>, StepError> {
    let (subtasks, _) = ctx
        .node
        .read_local(|p, t| queries::step_subtasks(p, t, task.id, step))?
        .0;
    let mut out = Vec::with_capacity(subtasks.len());
    for s in subtasks {
        if s.output_blob.is_empty() {
            out.push(s.output);
        } else {
            out.push(read_blob(ctx, task, &s.output_blob).await?);
        }
    }
    Ok(out)
}

/// Runs a guest call, retrying retryable failures with back-off.
async fn with_retries<T, F, Fut>(ctx: &Ctx, mut call: F) -> Result<T, SandboxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SandboxError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.retryable && attempt < ctx.config.call_attempts => {
                tokio::time::sleep(RetryPolicy::default().backoff(attempt + 1)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The task failed at the owner (its plan or finish): a pending task fails
/// at once, a running one reverts.
async fn fail_task(ctx: &Ctx, task: &TaskRecord, error: String) {
    info!(task_id = task.id, error = %error, "task failed");
    if task.state == TaskState::Pending.as_str() {
        propose(
            &ctx.node,
            C::FinishTask(FinishTask {
                id: task.id,
                state: TaskState::Failed.to_string(),
                result: Vec::new(),
                error,
                time_ms: now_ms(),
            }),
        )
        .await;
    } else {
        propose(&ctx.node, set_state(task.id, TaskState::Reverting, error)).await;
    }
}

/// Plans the next step (or re-plans a partly written one), or finishes.
async fn plan_next(ctx: &Ctx, task: &TaskRecord) -> Result<(), StepError> {
    let id = task.id;
    let pending = task.state == TaskState::Pending.as_str();
    if pending && task.started && task.step_planned {
        // Step 0 was written by an owner that stopped before starting it.
        propose(&ctx.node, set_state(id, TaskState::Running, String::new())).await;
        return Ok(());
    }
    let step = if !task.started {
        0
    } else if !task.step_planned {
        task.step
    } else {
        task.step + 1
    };
    let module = match load_module(ctx, task).await {
        Ok(m) => m,
        Err((true, e)) => return Err(StepError::Missing(e)),
        Err((false, e)) => {
            fail_task(ctx, task, e).await;
            return Ok(());
        }
    };
    let input = task_input(ctx, task).await?;
    let previous_outputs = if step == 0 {
        Vec::new()
    } else {
        step_outputs(ctx, task, step - 1).await?
    };
    let node_count = ctx
        .node
        .read_local(queries::nodes)?
        .0
        .iter()
        .filter(|n| n.up)
        .count()
        .max(1) as u32;
    let env = CallEnv {
        limits: limits_of(ctx, task),
        blobs: ctx.blobs.tenant(&task.tenant).ok(),
        gate: None,
    };
    let request = PlanRequest {
        step,
        input: input.clone(),
        previous_outputs,
        node_count,
        task_id: id.to_string(),
        concurrency: task.concurrency,
    };
    let plan = with_retries(ctx, || async {
        ctx.sandbox.plan(&module, &env, &request).await.result
    })
    .await;
    match plan {
        Err(e) => {
            fail_task(ctx, task, format!("plan of step {step} failed: {e}")).await;
        }
        Ok(Plan::Done) => {
            finish(ctx, task, &module, &env, input, request.previous_outputs).await;
        }
        Ok(Plan::Step {
            subtasks,
            non_idempotent,
        }) => {
            info!(
                task_id = id,
                step,
                subtasks = subtasks.len(),
                "step planned"
            );
            // Re-planning the current step: skip what an earlier owner wrote.
            let written: BTreeSet<u32> = if task.started && step == task.step {
                let (subtasks, _) = ctx
                    .node
                    .read_local(|p, t| queries::step_subtasks(p, t, id, step))?
                    .0;
                subtasks.iter().map(|s| s.ordinal).collect()
            } else {
                BTreeSet::new()
            };
            // A pending task starts with the batch that seals its step.
            write_step(
                ctx,
                task,
                step,
                subtasks,
                !non_idempotent,
                &written,
                pending,
            )
            .await?;
        }
    }
    Ok(())
}

/// Writes a step's subtasks in batches, skipping those an earlier owner
/// already wrote; the last batch seals the step.
async fn write_step(
    ctx: &Ctx,
    task: &TaskRecord,
    step: u32,
    payloads: Vec<Vec<u8>>,
    idempotent: bool,
    existing: &BTreeSet<u32>,
    start: bool,
) -> Result<(), StepError> {
    let fresh: Vec<NewSubtask> = payloads
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !existing.contains(&(*i as u32)))
        .map(|(i, payload)| NewSubtask {
            ordinal: i as u32,
            payload,
            idempotent,
        })
        .collect();
    // Batches bounded by count and by bytes, so one log entry stays small.
    let mut batches: Vec<Vec<NewSubtask>> = vec![Vec::new()];
    let mut bytes = 0;
    for s in fresh {
        let current = batches.last_mut().expect("one batch");
        if !current.is_empty()
            && (current.len() >= ctx.config.subtask_batch
                || bytes + s.payload.len() > MAX_INLINE_BYTES)
        {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += s.payload.len();
        batches.last_mut().expect("one batch").push(s);
    }
    let n = batches.len();
    for (i, subtasks) in batches.into_iter().enumerate() {
        let cmd = C::AddSubtasks(AddSubtasks {
            task_id: task.id,
            step,
            subtasks,
            last: i + 1 == n,
            start: start && i + 1 == n,
        });
        if !propose(&ctx.node, cmd).await {
            return Err(StepError::Missing(format!(
                "subtasks of step {step} of task {} were not written",
                task.id
            )));
        }
    }
    Ok(())
}

async fn finish(
    ctx: &Ctx,
    task: &TaskRecord,
    module: &TaskModule,
    env: &CallEnv,
    input: Vec<u8>,
    outputs: Vec<Vec<u8>>,
) {
    let request = FinishRequest {
        input,
        outputs,
        task_id: task.id.to_string(),
    };
    let result = with_retries(ctx, || async {
        ctx.sandbox.finish(module, env, &request).await.result
    })
    .await;
    match result {
        Ok(result) if result.len() > MAX_INLINE_BYTES => {
            fail_task(
                ctx,
                task,
                format!(
                    "finish returned {} bytes; a task result is at most {MAX_INLINE_BYTES}",
                    result.len()
                ),
            )
            .await;
        }
        Ok(result) => {
            let finished = propose(
                &ctx.node,
                C::FinishTask(FinishTask {
                    id: task.id,
                    state: TaskState::Succeed.to_string(),
                    result,
                    error: String::new(),
                    time_ms: now_ms(),
                }),
            )
            .await;
            // Blobs under `tasks/<id>/` stay: a result may name one.
            if finished {
                info!(task_id = task.id, "task succeeded");
            }
        }
        Err(e) => fail_task(ctx, task, format!("finish failed: {e}")).await,
    }
}

/// Deletes the task's intermediate blobs (`tasks/<id>/…`).
async fn delete_intermediate(ctx: &Ctx, task: &TaskRecord) {
    if let Ok(blobs) = ctx.blobs.tenant(&task.tenant) {
        if let Err(e) = blobs.delete_prefix(&format!("tasks/{}", task.id)).await {
            warn!(task_id = task.id, error = %e, "cannot delete intermediate blobs");
        }
    }
}

/// Runs the guest's revert hook, deletes intermediate blobs, and ends the
/// task `reverted`. A failing hook is logged: reverting always ends.
async fn revert(ctx: &Ctx, task: &TaskRecord) {
    if let Ok(module) = load_module(ctx, task).await {
        let input = task_input(ctx, task).await.unwrap_or_default();
        let env = CallEnv {
            limits: limits_of(ctx, task),
            blobs: ctx.blobs.tenant(&task.tenant).ok(),
            gate: None,
        };
        let request = RevertRequest {
            input,
            step: task.step,
            reason: task.error.clone(),
            task_id: task.id.to_string(),
        };
        let report = with_retries(ctx, || async {
            match ctx.sandbox.revert(&module, &env, &request).await {
                Some(r) => r.result.map(|_| true),
                None => Ok(false),
            }
        })
        .await;
        match report {
            Ok(true) => info!(task_id = task.id, "revert hook ran"),
            Ok(false) => {}
            Err(e) => warn!(task_id = task.id, error = %e, "revert hook failed"),
        }
    }
    delete_intermediate(ctx, task).await;
    propose(
        &ctx.node,
        C::FinishTask(FinishTask {
            id: task.id,
            state: TaskState::Reverted.to_string(),
            result: Vec::new(),
            error: String::new(),
            time_ms: now_ms(),
        }),
    )
    .await;
}
