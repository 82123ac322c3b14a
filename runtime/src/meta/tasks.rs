//! Tasks: submission (ids from a replicated counter), state changes checked
//! against the task state machine, modification, finishing into history and
//! its garbage collection.

use redb::ReadableTable;

use super::tx::Tx;
use stoker_proto::meta::{
    CountResult, Done, FinishTask, GcHistory, ModifyTask, SetTaskState, SubmitTask,
    SubmitTaskResult, TaskModification, TaskRecord,
};

use super::modules::valid_hash;
use super::nodes::{ensure_tenant, resolve_tenant};
use super::records::{
    get_module, get_task, history_key, invalid, put, rank_key, rank_of, task_key, task_state,
    Applied, Rejection, COUNTERS_TABLE, DEFAULT_MAX_ATTEMPTS, HISTORY_TABLE, MAX_INLINE_BYTES,
    TASKS_TABLE, TASK_INPUTS_TABLE, UNFINISHED_TABLE,
};
use super::subtasks;
use super::tenants::{count_unfinished, quota_of, usage_of, within};
use crate::model::{check_task_transition, TaskId, TaskState, DEFAULT_PRIORITY, PRIORITY_RANGE};

/// The counter the next task id comes from.
const NEXT_TASK_ID: &str = "next_task_id";
/// Longest task key, scope, blob key or selector part.
const MAX_NAME: usize = 1024;
/// Most attempts a task may ask for.
const MAX_ATTEMPTS: u32 = 100;
/// Tasks one `GcHistory` deletes when it does not say.
const DEFAULT_GC_LIMIT: u32 = 1000;

/// Takes the next value of a counter (starting at 1).
fn next_id(txn: &Tx<'_>, name: &str) -> Applied<u64> {
    let mut table = txn.table(COUNTERS_TABLE)?;
    let current = table
        .get(name.as_bytes())?
        .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(1);
    table.insert(name.as_bytes(), (current + 1).to_be_bytes().as_slice())?;
    Ok(current)
}

fn check_modification(m: &TaskModification) -> Applied<()> {
    if let Some(p) = m.priority {
        check_priority(p)?;
    }
    if m.concurrency == Some(0) {
        return invalid("concurrency must be at least 1");
    }
    Ok(())
}

fn check_priority(p: u32) -> Applied<()> {
    if PRIORITY_RANGE.contains(&p) {
        Ok(())
    } else {
        invalid(format!(
            "priority {p} is outside {}..={}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        ))
    }
}

fn check_submit(txn: &Tx<'_>, c: &SubmitTask) -> Applied<String> {
    let tenant = resolve_tenant(txn, &c.tenant)?;
    if c.priority != 0 {
        check_priority(c.priority)?;
    }
    if c.concurrency == 0 {
        return invalid("concurrency must be at least 1");
    }
    if c.max_attempts > MAX_ATTEMPTS {
        return invalid(format!("max attempts must be at most {MAX_ATTEMPTS}"));
    }
    if c.input.len() > MAX_INLINE_BYTES {
        return invalid(format!(
            "inline input exceeds {MAX_INLINE_BYTES} bytes; store it as a blob"
        ));
    }
    if !c.input.is_empty() && !c.input_blob.is_empty() {
        return invalid("a task has an inline input or a blob input, not both");
    }
    let long = |s: &String| s.len() > MAX_NAME;
    if long(&c.key)
        || long(&c.scope)
        || long(&c.input_blob)
        || c.selector
            .iter()
            .any(|(k, v)| k.is_empty() || long(k) || long(v))
    {
        return invalid(format!(
            "task key, scope, input blob and selector labels must be at most {MAX_NAME} bytes"
        ));
    }
    if !valid_hash(&c.module_hash) {
        return invalid(format!(
            "module hash {:?} is not a lowercase hex sha256",
            c.module_hash
        ));
    }
    if get_module(txn, &tenant, &c.module_hash)?.is_none() {
        return Err(Rejection::NotFound {
            what: "module",
            id: c.module_hash.clone(),
        }
        .into());
    }
    let quota = quota_of(txn, &tenant)?;
    within(
        &tenant,
        "max_fuel_per_subtask",
        quota.max_fuel_per_subtask,
        c.fuel_limit,
        || format!("the task asks for {} fuel per subtask", c.fuel_limit),
    )?;
    within(
        &tenant,
        "max_memory_bytes",
        quota.max_memory_bytes,
        c.memory_limit,
        || format!("the task asks for {} bytes of memory", c.memory_limit),
    )?;
    if quota.max_queued_tasks != 0 {
        let queued = usage_of(txn, &tenant)?.unfinished_tasks;
        within(
            &tenant,
            "max_queued_tasks",
            u64::from(quota.max_queued_tasks),
            queued + 1,
            || format!("it has {queued} unfinished tasks; wait for some to finish or cancel them"),
        )?;
    }
    Ok(tenant)
}

/// A limit the task asked for, or the tenant's cap when it asked for none.
fn capped(asked: u64, cap: u64) -> u64 {
    if asked == 0 {
        cap
    } else {
        asked
    }
}

pub(crate) fn submit_task(txn: &Tx<'_>, c: &SubmitTask) -> Applied<SubmitTaskResult> {
    let tenant = check_submit(txn, c)?;
    let quota = quota_of(txn, &tenant)?;
    ensure_tenant(txn, &tenant)?;
    let id = next_id(txn, NEXT_TASK_ID)?;
    let task = TaskRecord {
        id,
        tenant,
        key: c.key.clone(),
        module_hash: c.module_hash.clone(),
        input_size: if c.input_blob.is_empty() {
            c.input.len() as u64
        } else {
            c.input_blob_size
        },
        input_blob: c.input_blob.clone(),
        priority: if c.priority == 0 {
            DEFAULT_PRIORITY
        } else {
            c.priority
        },
        create_time_ms: c.create_time_ms,
        concurrency: c.concurrency,
        max_nodes: c.max_nodes,
        scope: c.scope.clone(),
        selector: c.selector.clone(),
        fuel_limit: capped(c.fuel_limit, quota.max_fuel_per_subtask),
        memory_limit: capped(c.memory_limit, quota.max_memory_bytes),
        max_attempts: if c.max_attempts == 0 {
            DEFAULT_MAX_ATTEMPTS
        } else {
            c.max_attempts
        },
        manual_recovery: c.manual_recovery,
        state: TaskState::Pending.to_string(),
        ..Default::default()
    };
    put(txn, TASKS_TABLE, &task_key(id), &task)?;
    if !c.input.is_empty() {
        txn.table(TASK_INPUTS_TABLE)?
            .insert(task_key(id).as_slice(), c.input.as_slice())?;
    }
    txn.table(UNFINISHED_TABLE)?
        .insert(rank_key(&rank_of(&task)).as_slice(), [].as_slice())?;
    count_unfinished(txn, &task.tenant, true)?;
    Ok(SubmitTaskResult { id })
}

/// Writes a task whose rank may have changed since `old` was read.
fn put_unfinished(txn: &Tx<'_>, old: &TaskRecord, new: &TaskRecord) -> Applied<()> {
    let (before, after) = (rank_key(&rank_of(old)), rank_key(&rank_of(new)));
    if before != after {
        let mut index = txn.table(UNFINISHED_TABLE)?;
        index.remove(before.as_slice())?;
        index.insert(after.as_slice(), [].as_slice())?;
    }
    put(txn, TASKS_TABLE, &task_key(new.id), new)
}

fn parse_state(s: &str) -> Applied<TaskState> {
    s.parse::<TaskState>()
        .map_err(|e| Rejection::Invalid(e).into())
}

/// The checked transition of `task` to `to`: the `modifying` bookkeeping
/// included, the unfinished index left to the caller.
fn transition(task: &TaskRecord, to: TaskState) -> Applied<TaskRecord> {
    let from = task_state(task)?;
    let modifying_from = if task.modifying_from.is_empty() {
        None
    } else {
        Some(parse_state(&task.modifying_from)?)
    };
    check_task_transition(from, to, modifying_from)?;
    let mut next = task.clone();
    next.state = to.to_string();
    if to == TaskState::Modifying {
        next.modifying_from = from.to_string();
    } else if from == TaskState::Modifying {
        next.modifying_from.clear();
        let m = next.modification.take().unwrap_or_default();
        if let Some(c) = m.concurrency {
            next.concurrency = c;
        }
        if let Some(n) = m.max_nodes {
            next.max_nodes = n;
        }
        if let Some(p) = m.priority {
            next.priority = p;
        }
    }
    Ok(next)
}

/// A pending task whose first step was just sealed starts running (the
/// `start` of an `AddSubtasks`); `task` is its record as written by it.
pub(crate) fn start_planned(txn: &Tx<'_>, task: &TaskRecord) -> Applied<()> {
    let next = transition(task, TaskState::Running)?;
    put_unfinished(txn, task, &next)
}

pub(crate) fn set_task_state(txn: &Tx<'_>, c: &SetTaskState) -> Applied<Done> {
    let task = get_task(txn, c.id)?;
    let to = parse_state(&c.state)?;
    if to.is_finished() {
        return invalid(format!("task {} finishes through finish_task", c.id));
    }
    if to == TaskState::Modifying {
        return invalid(format!("task {} is modified through modify_task", c.id));
    }
    let mut next = transition(&task, to)?;
    if task.state == TaskState::Pending.as_str() && to == TaskState::Running && !task.step_planned {
        return invalid(format!("task {} runs once its first step is planned", c.id));
    }
    if !c.error.is_empty() {
        next.error = c.error.clone();
    }
    put_unfinished(txn, &task, &next)?;
    Ok(Done {})
}

pub(crate) fn modify_task(txn: &Tx<'_>, c: &ModifyTask) -> Applied<Done> {
    let task = get_task(txn, c.id)?;
    let m = c.modification.unwrap_or_default();
    check_modification(&m)?;
    if m == TaskModification::default() {
        return invalid("a modification changes concurrency, max nodes or priority");
    }
    let mut next = transition(&task, TaskState::Modifying)?;
    next.modification = Some(m);
    put(txn, TASKS_TABLE, &task_key(c.id), &next)?;
    Ok(Done {})
}

pub(crate) fn finish_task(txn: &Tx<'_>, c: &FinishTask) -> Applied<Done> {
    let task = get_task(txn, c.id)?;
    let to = parse_state(&c.state)?;
    if !to.is_finished() {
        return invalid(format!(
            "a task finishes as succeed, failed or reverted, not {to}"
        ));
    }
    if c.result.len() > MAX_INLINE_BYTES {
        return invalid(format!("task result exceeds {MAX_INLINE_BYTES} bytes"));
    }
    let mut next = transition(&task, to)?;
    let unfinished = subtasks::unfinished_in_step(txn, &task)?;
    if unfinished > 0 {
        return invalid(format!(
            "task {} has {unfinished} unfinished subtasks in step {}; cancel them first",
            c.id, task.step
        ));
    }
    next.result = c.result.clone();
    if !c.error.is_empty() {
        next.error = c.error.clone();
    }
    next.finish_time_ms = c.time_ms;
    txn.table(UNFINISHED_TABLE)?
        .remove(rank_key(&rank_of(&task)).as_slice())?;
    count_unfinished(txn, &task.tenant, false)?;
    txn.table(HISTORY_TABLE)?
        .insert(history_key(c.time_ms, c.id).as_slice(), [].as_slice())?;
    put(txn, TASKS_TABLE, &task_key(c.id), &next)?;
    Ok(Done {})
}

pub(crate) fn gc_history(txn: &Tx<'_>, c: &GcHistory) -> Applied<CountResult> {
    let limit = if c.limit == 0 {
        DEFAULT_GC_LIMIT
    } else {
        c.limit
    };
    let old: Vec<Vec<u8>> = {
        let history = txn.table(HISTORY_TABLE)?;
        let end = history_key(c.before_ms, 0);
        let mut keys = Vec::new();
        for row in history.range(..end.as_slice())?.take(limit as usize) {
            keys.push(row?.0.value().to_vec());
        }
        keys
    };
    for key in &old {
        let id = TaskId::from_be_bytes(key[8..16].try_into().expect("history key"));
        delete_task(txn, id)?;
        txn.table(HISTORY_TABLE)?.remove(key.as_slice())?;
    }
    Ok(CountResult {
        count: old.len() as u64,
    })
}

fn delete_task(txn: &Tx<'_>, id: TaskId) -> Applied<()> {
    txn.table(TASKS_TABLE)?.remove(task_key(id).as_slice())?;
    txn.table(TASK_INPUTS_TABLE)?
        .remove(task_key(id).as_slice())?;
    subtasks::delete_subtasks_of(txn, id)
}
