//! Subtasks: a step's subtasks added in batches, assignment, and the fenced
//! worker commands (claim, report) that make each output commit exactly
//! once; the owner's requeue and bulk pause/resume/cancel/resolve.
//!
//! The fence: every assignment increments the subtask's attempt, and a
//! worker's claim or report names the (node, attempt) it was given. A
//! command whose pair is not the subtask's current one, or that finds the
//! subtask no longer in the state the command expects, is a stale report:
//! rejected, nothing changes.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::tx::Tx;
use stoker_proto::meta::{
    change_subtasks, AddSubtasks, AssignSubtask, ChangeSubtasks, ClaimSubtask, CountResult,
    ReportSubtask, RequeueSubtask, StepCountsRecord, SubtaskRecord, SubtaskRef, SubtaskStateResult,
    TaskRecord,
};
use stoker_proto::Message;

use super::records::{
    self, by_node_key, get, get_node, get_task, invalid, put, step_key, subtask_key, subtask_name,
    subtask_range, subtask_state, task_key, task_state, Applied, Rejection, MAX_INLINE_BYTES,
    MAX_SUBTASK_BATCH, STEP_COUNTS_TABLE, SUBTASKS_BY_NODE_TABLE, SUBTASKS_TABLE,
    SUBTASKS_WAITING_TABLE, TASKS_TABLE,
};
use crate::model::{check_subtask_transition, SubtaskChange, SubtaskState, TaskState};

/// The first retry's backoff.
pub const RETRY_BASE_MS: u64 = 1000;
/// The longest retry backoff.
pub const RETRY_MAX_MS: u64 = 60_000;

fn get_subtask(txn: &Tx<'_>, r: &SubtaskRef) -> Applied<SubtaskRecord> {
    get(
        txn,
        SUBTASKS_TABLE,
        &subtask_key(r.task_id, r.step, r.ordinal),
    )?
    .ok_or_else(|| {
        Rejection::NotFound {
            what: "subtask",
            id: subtask_name(r.task_id, r.step, r.ordinal),
        }
        .into()
    })
}

/// Writes a subtask and keeps the tables derived from the subtask rows in
/// step: [`SUBTASKS_BY_NODE_TABLE`] (a subtask is listed under its node
/// while it is assigned there and unfinished), [`SUBTASKS_WAITING_TABLE`]
/// (pending, not assigned) and [`STEP_COUNTS_TABLE`].
fn put_subtask(txn: &Tx<'_>, s: &SubtaskRecord) -> Applied<()> {
    let key = subtask_key(s.task_id, s.step, s.ordinal);
    // Each table is opened once: opening is a good part of a write's cost.
    let mut rows = txn.table(SUBTASKS_TABLE)?;
    let before = match rows.get(key.as_slice())? {
        Some(v) => Some(decode_subtask(&key, v.value())?),
        None => None,
    };
    // Everything that can be refused is read and checked before the first
    // write.
    let old_state = before.as_ref().map(subtask_state).transpose()?;
    let new_state = subtask_state(s)?;
    let counts = if old_state == Some(new_state) {
        None
    } else {
        let ck = step_key(s.task_id, s.step);
        let table = txn.table(STEP_COUNTS_TABLE)?;
        let mut counts = match table.get(ck.as_slice())? {
            Some(v) => StepCountsRecord::decode(v.value()).map_err(|_| Rejection::Corrupt {
                table: "sm_step_counts".into(),
                key: hex::encode(ck),
            })?,
            None => StepCountsRecord::default(),
        };
        if let Some(o) = old_state {
            let n = count_of(&mut counts, o);
            *n = n.saturating_sub(1);
        }
        *count_of(&mut counts, new_state) += 1;
        Some((table, ck, counts))
    };
    let (old, new) = (before.as_ref().and_then(node_index_key), node_index_key(s));
    if old != new {
        let mut index = txn.table(SUBTASKS_BY_NODE_TABLE)?;
        if let Some(k) = old {
            index.remove(k.as_slice())?;
        }
        if let Some(k) = new {
            index.insert(k.as_slice(), [].as_slice())?;
        }
    }
    let (was, is) = (before.as_ref().is_some_and(is_waiting), is_waiting(s));
    if was != is {
        let mut index = txn.table(SUBTASKS_WAITING_TABLE)?;
        if is {
            index.insert(key.as_slice(), [].as_slice())?;
        } else {
            index.remove(key.as_slice())?;
        }
    }
    if let Some((mut table, ck, counts)) = counts {
        table.insert(ck.as_slice(), counts.encode_to_vec().as_slice())?;
    }
    rows.insert(key.as_slice(), s.encode_to_vec().as_slice())?;
    Ok(())
}

/// Writes a checked batch of new subtasks (none of them exists yet): what
/// [`put_subtask`] does for each, with the step's counts read and written
/// once for the batch. New subtasks are pending and unassigned: waiting,
/// and in no node's index.
fn put_new_subtasks(txn: &Tx<'_>, c: &AddSubtasks) -> Applied<()> {
    if c.subtasks.is_empty() {
        return Ok(());
    }
    let ck = step_key(c.task_id, c.step);
    let mut counts_table = txn.table(STEP_COUNTS_TABLE)?;
    let mut counts = match counts_table.get(ck.as_slice())? {
        Some(v) => StepCountsRecord::decode(v.value()).map_err(|_| Rejection::Corrupt {
            table: "sm_step_counts".into(),
            key: hex::encode(ck),
        })?,
        None => StepCountsRecord::default(),
    };
    let added = u32::try_from(c.subtasks.len()).unwrap_or(u32::MAX);
    counts.pending = counts.pending.saturating_add(added);
    let mut rows = txn.table(SUBTASKS_TABLE)?;
    let mut waiting = txn.table(SUBTASKS_WAITING_TABLE)?;
    let pending = SubtaskState::Pending.to_string();
    let mut value = Vec::new();
    for n in &c.subtasks {
        let s = SubtaskRecord {
            task_id: c.task_id,
            step: c.step,
            ordinal: n.ordinal,
            payload: n.payload.clone(),
            state: pending.clone(),
            idempotent: n.idempotent,
            ..Default::default()
        };
        debug_assert!(is_waiting(&s) && node_index_key(&s).is_none());
        let key = subtask_key(s.task_id, s.step, s.ordinal);
        value.clear();
        s.encode(&mut value).expect("vec grows");
        waiting.insert(key.as_slice(), [].as_slice())?;
        rows.insert(key.as_slice(), value.as_slice())?;
    }
    counts_table.insert(ck.as_slice(), counts.encode_to_vec().as_slice())?;
    Ok(())
}

fn decode_subtask(key: &[u8], bytes: &[u8]) -> Applied<SubtaskRecord> {
    SubtaskRecord::decode(bytes).map_err(|_| {
        Rejection::Corrupt {
            table: "sm_subtasks".into(),
            key: hex::encode(key),
        }
        .into()
    })
}

/// The subtask's key in the by-node index, if it belongs there.
fn node_index_key(s: &SubtaskRecord) -> Option<[u8; 24]> {
    let active =
        s.state == SubtaskState::Pending.as_str() || s.state == SubtaskState::Running.as_str();
    (s.node != 0 && active).then(|| by_node_key(s.node, s.task_id, s.step, s.ordinal))
}

/// Whether the subtask waits for a node: pending and not assigned.
pub(crate) fn is_waiting(s: &SubtaskRecord) -> bool {
    s.node == 0 && s.state == SubtaskState::Pending.as_str()
}

/// The counter of `state` in a step's counts.
pub(crate) fn count_of(c: &mut StepCountsRecord, state: SubtaskState) -> &mut u32 {
    match state {
        SubtaskState::Pending => &mut c.pending,
        SubtaskState::Running => &mut c.running,
        SubtaskState::Succeed => &mut c.succeed,
        SubtaskState::Failed => &mut c.failed,
        SubtaskState::Canceled => &mut c.canceled,
        SubtaskState::Paused => &mut c.paused,
    }
}

/// What [`SUBTASKS_WAITING_TABLE`] and [`STEP_COUNTS_TABLE`] must hold.
struct SubtaskTables {
    waiting: Vec<[u8; 16]>,
    counts: BTreeMap<[u8; 12], StepCountsRecord>,
}

/// The tables derived from the subtask rows, as the rows say: waiting keys
/// and step counts (the by-node index is kept in snapshots since it was
/// introduced with the rows).
fn counted_subtask_tables(txn: &Tx<'_>) -> Applied<SubtaskTables> {
    let table = txn.table(SUBTASKS_TABLE)?;
    let mut waiting = Vec::new();
    let mut counts: BTreeMap<[u8; 12], StepCountsRecord> = BTreeMap::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let s = decode_subtask(k.value(), v.value())?;
        if is_waiting(&s) {
            waiting.push(subtask_key(s.task_id, s.step, s.ordinal));
        }
        let c = counts.entry(step_key(s.task_id, s.step)).or_default();
        *count_of(c, subtask_state(&s)?) += 1;
    }
    Ok(SubtaskTables { waiting, counts })
}

/// Rewrites [`SUBTASKS_WAITING_TABLE`] and [`STEP_COUNTS_TABLE`] from the
/// subtask rows: for a snapshot or a database from a build that did not
/// keep them.
pub(crate) fn rebuild_subtask_tables(txn: &Tx<'_>) -> Applied<()> {
    let SubtaskTables { waiting, counts } = counted_subtask_tables(txn)?;
    let mut table = txn.table(SUBTASKS_WAITING_TABLE)?;
    table.retain(|_, _| false)?;
    for k in &waiting {
        table.insert(k.as_slice(), [].as_slice())?;
    }
    drop(table);
    txn.table(STEP_COUNTS_TABLE)?.retain(|_, _| false)?;
    for (k, c) in &counts {
        put(txn, STEP_COUNTS_TABLE, k, c)?;
    }
    Ok(())
}

fn subtask_ref(c: Option<&SubtaskRef>) -> Applied<&SubtaskRef> {
    c.ok_or_else(|| Rejection::Invalid("the command names no subtask".into()).into())
}

/// Every subtask of one step (or of the task), in ordinal order.
pub(crate) fn subtasks_of(
    txn: &Tx<'_>,
    task: u64,
    step: Option<u32>,
) -> Applied<Vec<SubtaskRecord>> {
    let table = txn.table(SUBTASKS_TABLE)?;
    let (start, end) = subtask_range(task, step);
    let mut out = Vec::new();
    for row in table.range(start.as_slice()..=end.as_slice())? {
        let (k, v) = row?;
        out.push(decode_subtask(k.value(), v.value())?);
    }
    Ok(out)
}

/// Deletes every subtask of a task (garbage collection of history), with
/// its rows in the derived tables.
pub(crate) fn delete_subtasks_of(txn: &Tx<'_>, task: u64) -> Applied<()> {
    let all = subtasks_of(txn, task, None)?;
    let mut index = txn.table(SUBTASKS_BY_NODE_TABLE)?;
    for k in all.iter().filter_map(node_index_key) {
        index.remove(k.as_slice())?;
    }
    drop(index);
    let (start, end) = subtask_range(task, None);
    txn.table(SUBTASKS_TABLE)?
        .retain_in(start.as_slice()..=end.as_slice(), |_, _| false)?;
    txn.table(SUBTASKS_WAITING_TABLE)?
        .retain_in(start.as_slice()..=end.as_slice(), |_, _| false)?;
    let (first, last) = (step_key(task, 0), step_key(task, u32::MAX));
    txn.table(STEP_COUNTS_TABLE)?
        .retain_in(first.as_slice()..=last.as_slice(), |_, _| false)?;
    Ok(())
}

/// The subtasks of the task's current step that have not ended, if any.
pub(crate) fn unfinished_in_step(txn: &Tx<'_>, task: &TaskRecord) -> Applied<usize> {
    let mut n = 0;
    for s in subtasks_of(txn, task.id, Some(task.step))? {
        if !subtask_state(&s)?.is_finished() {
            n += 1;
        }
    }
    Ok(n)
}

/// Which step a batch goes to: the current one while unplanned, the next
/// one once the current one is planned and every subtask of it succeeded.
fn target_step(txn: &Tx<'_>, task: &TaskRecord, step: u32) -> Applied<bool> {
    if (!task.started && step == 0) || (task.started && !task.step_planned && step == task.step) {
        return Ok(false);
    }
    if task.started && task.step_planned && Some(step) == task.step.checked_add(1) {
        let current = subtasks_of(txn, task.id, Some(task.step))?;
        for s in &current {
            if subtask_state(s)? != SubtaskState::Succeed {
                return invalid(format!(
                    "step {} of task {} has unfinished or failed subtasks",
                    task.step, task.id
                ));
            }
        }
        return Ok(true);
    }
    invalid(format!(
        "task {} cannot take subtasks of step {step} (current step {}, {})",
        task.id,
        task.step,
        if task.step_planned {
            "planned"
        } else {
            "planning"
        }
    ))
}

pub(crate) fn add_subtasks(txn: &Tx<'_>, c: &AddSubtasks) -> Applied<CountResult> {
    let task = get_task(txn, c.task_id)?;
    let state = task_state(&task)?;
    if !matches!(state, TaskState::Pending | TaskState::Running) {
        return invalid(format!(
            "subtasks are added to pending or running tasks; task {} is {state}",
            c.task_id
        ));
    }
    if c.subtasks.len() > MAX_SUBTASK_BATCH {
        return invalid(format!("at most {MAX_SUBTASK_BATCH} subtasks per batch"));
    }
    if c.subtasks.is_empty() && !c.last {
        return invalid("an empty batch must seal the step");
    }
    if c.start && !(c.last && state == TaskState::Pending) {
        return invalid(format!(
            "only the batch that seals a step of a pending task starts it; task {} is {state}",
            c.task_id
        ));
    }
    let advance = target_step(txn, &task, c.step)?;
    {
        let table = txn.table(SUBTASKS_TABLE)?;
        let mut seen = std::collections::BTreeSet::new();
        for n in &c.subtasks {
            if n.payload.len() > MAX_INLINE_BYTES {
                return invalid(format!("subtask payload exceeds {MAX_INLINE_BYTES} bytes"));
            }
            let key = subtask_key(c.task_id, c.step, n.ordinal);
            if !seen.insert(n.ordinal) || table.get(key.as_slice())?.is_some() {
                return invalid(format!(
                    "subtask {} already exists",
                    subtask_name(c.task_id, c.step, n.ordinal)
                ));
            }
        }
    }
    put_new_subtasks(txn, c)?;
    let mut next = task;
    if advance {
        next.step = c.step;
    }
    next.started = true;
    next.step_planned = c.last;
    put(txn, TASKS_TABLE, &task_key(next.id), &next)?;
    if c.start {
        super::tasks::start_planned(txn, &next)?;
    }
    Ok(CountResult {
        count: c.subtasks.len() as u64,
    })
}

fn state_result(s: &SubtaskRecord) -> SubtaskStateResult {
    SubtaskStateResult {
        state: s.state.clone(),
        attempt: s.attempt,
    }
}

pub(crate) fn assign_subtask(txn: &Tx<'_>, c: &AssignSubtask) -> Applied<SubtaskStateResult> {
    let r = subtask_ref(c.subtask.as_ref())?;
    let task = get_task(txn, r.task_id)?;
    if !records::accepts_work(&task)? {
        return invalid(format!(
            "task {} is {}: its subtasks are not assigned",
            task.id, task.state
        ));
    }
    let mut s = get_subtask(txn, r)?;
    let state = subtask_state(&s)?;
    if state != SubtaskState::Pending {
        return invalid(format!(
            "only pending subtasks are assigned; {} is {state}",
            subtask_name(r.task_id, r.step, r.ordinal)
        ));
    }
    let node = get_node(txn, c.node)?;
    if !node.up || !node.worker {
        return invalid(format!("node {} is not an up worker", c.node));
    }
    s.node = c.node;
    s.attempt += 1;
    put_subtask(txn, &s)?;
    Ok(state_result(&s))
}

/// The fence: the subtask is still assigned to `node` at `attempt` and in
/// `expected` state.
fn fence(
    s: &SubtaskRecord,
    node: u64,
    attempt: u32,
    expected: SubtaskState,
) -> Applied<SubtaskState> {
    let state = subtask_state(s)?;
    let why = if s.node != node || s.attempt != attempt {
        format!(
            "assigned to node {} attempt {}, not node {node} attempt {attempt}",
            s.node, s.attempt
        )
    } else if state != expected {
        format!("it is {state}, not {expected}")
    } else {
        return Ok(state);
    };
    Err(Rejection::StaleReport {
        subtask: subtask_name(s.task_id, s.step, s.ordinal),
        why,
    }
    .into())
}

pub(crate) fn claim_subtask(txn: &Tx<'_>, c: &ClaimSubtask) -> Applied<SubtaskStateResult> {
    let r = subtask_ref(c.subtask.as_ref())?;
    let mut s = get_subtask(txn, r)?;
    let task = get_task(txn, r.task_id)?;
    claim(&mut s, &task, c.node, c.attempt, c.time_ms)?;
    put_subtask(txn, &s)?;
    Ok(state_result(&s))
}

/// A claim's checks and change, in memory: `s` must be pending on `node`
/// at `attempt`, and its task accept work; it becomes running since
/// `time_ms`.
fn claim(
    s: &mut SubtaskRecord,
    task: &TaskRecord,
    node: u64,
    attempt: u32,
    time_ms: u64,
) -> Applied<()> {
    fence(s, node, attempt, SubtaskState::Pending)?;
    if !records::accepts_work(task)? {
        return invalid(format!(
            "task {} is {}: its subtasks do not start",
            task.id, task.state
        ));
    }
    check_subtask_transition(
        SubtaskState::Pending,
        SubtaskState::Running,
        SubtaskChange::Normal,
        s.idempotent,
    )?;
    s.state = SubtaskState::Running.to_string();
    s.start_time_ms = time_ms;
    s.error.clear();
    Ok(())
}

pub(crate) fn report_subtask(txn: &Tx<'_>, c: &ReportSubtask) -> Applied<SubtaskStateResult> {
    let r = subtask_ref(c.subtask.as_ref())?;
    let mut s = get_subtask(txn, r)?;
    let unclaimed = c.start_time_ms != 0;
    if !unclaimed {
        fence(&s, c.node, c.attempt, SubtaskState::Running)?;
    }
    let reported = c
        .state
        .parse::<SubtaskState>()
        .map_err(Rejection::Invalid)?;
    if c.output.len() > MAX_INLINE_BYTES || c.checkpoint.len() > MAX_INLINE_BYTES {
        return invalid(format!(
            "inline output and checkpoint must be at most {MAX_INLINE_BYTES} bytes"
        ));
    }
    let mut task = get_task(txn, r.task_id)?;
    if unclaimed {
        if !s.idempotent {
            return invalid(format!(
                "{} is of a step that is not idempotent: it must be claimed before it runs",
                subtask_name(r.task_id, r.step, r.ordinal)
            ));
        }
        claim(&mut s, &task, c.node, c.attempt, c.start_time_ms)?;
    }
    let retry = reported == SubtaskState::Failed
        && c.retryable
        && s.retries.saturating_add(1) < task.max_attempts;
    let (to, change) = if retry {
        (SubtaskState::Pending, SubtaskChange::Retry)
    } else {
        (reported, SubtaskChange::Normal)
    };
    check_subtask_transition(SubtaskState::Running, to, change, s.idempotent)?;
    s.state = to.to_string();
    s.fuel_used += c.fuel_used;
    s.error = c.error.clone();
    if !c.checkpoint.is_empty() {
        s.checkpoint = c.checkpoint.clone();
    }
    match to {
        SubtaskState::Succeed => {
            s.output = c.output.clone();
            s.output_blob = c.output_blob.clone();
            s.end_time_ms = c.time_ms;
        }
        SubtaskState::Failed | SubtaskState::Canceled => s.end_time_ms = c.time_ms,
        // Back in the pool: the next assignment picks a node.
        SubtaskState::Pending | SubtaskState::Paused => s.node = 0,
        SubtaskState::Running => {}
    }
    if retry {
        s.retries += 1;
        s.retry_after_ms = c.time_ms.saturating_add(retry_backoff_ms(s.retries));
    }
    put_subtask(txn, &s)?;
    task.fuel_used += c.fuel_used;
    put(txn, TASKS_TABLE, &task_key(task.id), &task)?;
    super::stats::add_tenant_fuel(txn, &task.tenant, c.fuel_used)?;
    Ok(state_result(&s))
}

/// The wait before retry number `retry` (1-based): [`RETRY_BASE_MS`]
/// doubled per retry, at most [`RETRY_MAX_MS`].
pub fn retry_backoff_ms(retry: u32) -> u64 {
    let doublings = retry.saturating_sub(1).min(20);
    (RETRY_BASE_MS << doublings).min(RETRY_MAX_MS)
}

pub(crate) fn requeue_subtask(txn: &Tx<'_>, c: &RequeueSubtask) -> Applied<SubtaskStateResult> {
    let r = subtask_ref(c.subtask.as_ref())?;
    let mut s = get_subtask(txn, r)?;
    if c.attempt != 0 && c.attempt != s.attempt {
        return Err(Rejection::StaleReport {
            subtask: subtask_name(r.task_id, r.step, r.ordinal),
            why: format!("it is at attempt {}, not {}", s.attempt, c.attempt),
        }
        .into());
    }
    let from = subtask_state(&s)?;
    if c.only_pending && from != SubtaskState::Pending {
        return Err(Rejection::StaleReport {
            subtask: subtask_name(r.task_id, r.step, r.ordinal),
            why: format!("it is {from}, and only a pending subtask is moved"),
        }
        .into());
    }
    if from == SubtaskState::Pending && s.node != 0 {
        s.node = 0;
        s.error = c.reason.clone();
        put_subtask(txn, &s)?;
        return Ok(state_result(&s));
    }
    let requeue = check_subtask_transition(
        from,
        SubtaskState::Pending,
        SubtaskChange::Requeue,
        s.idempotent,
    );
    match requeue {
        Ok(()) => {
            s.state = SubtaskState::Pending.to_string();
            s.node = 0;
        }
        Err(_) if c.or_fail && from == SubtaskState::Running => {
            s.state = SubtaskState::Failed.to_string();
            s.end_time_ms = c.time_ms;
        }
        Err(e) => return Err(e.into()),
    }
    s.error = c.reason.clone();
    put_subtask(txn, &s)?;
    Ok(state_result(&s))
}

/// The bulk change's edge: (from, to, reason).
fn bulk_edges(
    kind: change_subtasks::Kind,
    include_running: bool,
) -> Vec<(SubtaskState, SubtaskState, SubtaskChange)> {
    use change_subtasks::Kind;
    use SubtaskState as S;
    match kind {
        Kind::Pause => vec![(S::Pending, S::Paused, SubtaskChange::Normal)],
        Kind::Resume => vec![(S::Paused, S::Pending, SubtaskChange::Normal)],
        Kind::Cancel if include_running => vec![
            (S::Pending, S::Canceled, SubtaskChange::Normal),
            (S::Running, S::Canceled, SubtaskChange::Normal),
        ],
        Kind::Cancel => vec![(S::Pending, S::Canceled, SubtaskChange::Normal)],
        Kind::Resolve => vec![(S::Failed, S::Pending, SubtaskChange::Resolve)],
    }
}

pub(crate) fn change_subtasks(txn: &Tx<'_>, c: &ChangeSubtasks) -> Applied<CountResult> {
    let kind = change_subtasks::Kind::try_from(c.kind)
        .map_err(|_| Rejection::Invalid(format!("unknown subtask change {}", c.kind)))?;
    let task = get_task(txn, c.task_id)?;
    if task_state(&task)?.is_finished() {
        return invalid(format!("task {} has finished", c.task_id));
    }
    let edges = bulk_edges(kind, c.include_running);
    // Every change is checked before the first is written.
    let mut changes = Vec::new();
    for mut s in subtasks_of(txn, c.task_id, Some(task.step))? {
        let from = subtask_state(&s)?;
        let Some(&(_, to, change)) = edges.iter().find(|e| e.0 == from) else {
            continue;
        };
        check_subtask_transition(from, to, change, s.idempotent)?;
        s.state = to.to_string();
        match to {
            SubtaskState::Canceled => s.end_time_ms = c.time_ms,
            SubtaskState::Pending | SubtaskState::Paused => s.node = 0,
            _ => {}
        }
        if change == SubtaskChange::Resolve {
            s.error.clear();
            s.retry_after_ms = 0;
            s.retries = 0;
        }
        changes.push(s);
    }
    for s in &changes {
        put_subtask(txn, s)?;
    }
    let changed = changes.len() as u64;
    Ok(CountResult { count: changed })
}
