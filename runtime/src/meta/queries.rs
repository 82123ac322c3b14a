//! Reads of the task framework's tables, for the owner, workers and the API.
//! Each takes the database path (for error messages) and a read
//! transaction, so it plugs into `MetaNode::read_local` after a read barrier
//! when it must be linearizable:
//!
//! ```ignore
//! let (task, _) = meta.read_local(|path, txn| queries::task(path, txn, id))?;
//! ```

use std::path::Path;

use redb::{ReadTransaction, ReadableTable};
use stoker_proto::meta::{
    ModuleRecord, NodeRecord, StepCountsRecord, SubtaskRecord, TaskRecord, TenantRecord,
    TokenRecord,
};
use stoker_proto::Message;

use super::error::storage_err;
use super::records::{
    by_node_key, chunk_key, history_key, id_of_rank_key, module_key, node_key, rank_of, step_key,
    subtask_range, task_key, task_state, tenant_modules_range, HISTORY_TABLE, MODULES_TABLE,
    MODULE_CHUNKS_TABLE, MODULE_STAGING_TIMES_TABLE, NODES_TABLE, STEP_COUNTS_TABLE,
    SUBTASKS_BY_NODE_TABLE, SUBTASKS_TABLE, SUBTASKS_WAITING_TABLE, TASKS_TABLE, TASK_INPUTS_TABLE,
    TENANTS_TABLE, TOKENS_TABLE, UNFINISHED_TABLE,
};
use super::state_machine::SmTable;
use super::MetaError;
use crate::model::{NodeView, SubtaskState, TaskId, TaskPlacement, TaskState};
use crate::sched::task::StepCounts;

fn corrupt(path: &Path, what: impl Into<String>) -> MetaError {
    MetaError::Corrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn get<M: Message + Default>(
    path: &Path,
    txn: &ReadTransaction,
    def: SmTable,
    key: &[u8],
) -> Result<Option<M>, MetaError> {
    let table = txn.open_table(def).map_err(|e| storage_err(path, e))?;
    let Some(v) = table.get(key).map_err(|e| storage_err(path, e))? else {
        return Ok(None);
    };
    M::decode(v.value()).map(Some).map_err(|_| {
        corrupt(
            path,
            format!(
                "bad record {} in {}",
                hex::encode(key),
                redb::TableHandle::name(&def)
            ),
        )
    })
}

/// Every value of a table in key order (`range` bounds the keys).
fn scan<M: Message + Default>(
    path: &Path,
    txn: &ReadTransaction,
    def: SmTable,
    range: Option<(&[u8], &[u8])>,
) -> Result<Vec<M>, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let table = txn.open_table(def).map_err(|e| storage_err(path, e))?;
    let rows = match range {
        Some((start, end)) => table.range(start..=end).map_err(err)?,
        None => table.range::<&[u8]>(..).map_err(err)?,
    };
    let mut out = Vec::new();
    for row in rows {
        let (k, v) = row.map_err(err)?;
        out.push(M::decode(v.value()).map_err(|_| {
            corrupt(
                path,
                format!(
                    "bad record {} in {}",
                    hex::encode(k.value()),
                    redb::TableHandle::name(&def)
                ),
            )
        })?);
    }
    Ok(out)
}

/// One task, finished or not.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn task(
    path: &Path,
    txn: &ReadTransaction,
    id: TaskId,
) -> Result<Option<TaskRecord>, MetaError> {
    get(path, txn, TASKS_TABLE, &task_key(id))
}

/// A task's inline input (empty when it has none or a blob input).
///
/// # Errors
/// Storage failures.
pub fn task_input(path: &Path, txn: &ReadTransaction, id: TaskId) -> Result<Vec<u8>, MetaError> {
    let table = txn
        .open_table(TASK_INPUTS_TABLE)
        .map_err(|e| storage_err(path, e))?;
    Ok(table
        .get(task_key(id).as_slice())
        .map_err(|e| storage_err(path, e))?
        .map(|v| v.value().to_vec())
        .unwrap_or_default())
}

/// The oldest `limit` finished tasks that finished before `before_ms`: the
/// ones a `GcHistory { before_ms, limit }` command deletes, in its order.
///
/// # Errors
/// Storage failures, an undecodable record.
/// Uploads staged but never committed whose latest chunk came before
/// `before_ms`.
///
/// # Errors
/// Storage failures.
pub fn abandoned_uploads(
    path: &Path,
    txn: &ReadTransaction,
    before_ms: u64,
) -> Result<usize, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let times = txn
        .open_table(MODULE_STAGING_TIMES_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let mut n = 0;
    for row in times.iter().map_err(err)? {
        let (_, time) = row.map_err(err)?;
        if super::records::staging_time(time.value()) < before_ms {
            n += 1;
        }
    }
    Ok(n)
}

pub fn history_before(
    path: &Path,
    txn: &ReadTransaction,
    before_ms: u64,
    limit: usize,
) -> Result<Vec<TaskRecord>, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let history = txn
        .open_table(HISTORY_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let end = history_key(before_ms, 0);
    let mut out = Vec::new();
    for row in history.range(..end.as_slice()).map_err(err)?.take(limit) {
        let id = history_id(path, row.map_err(err)?.0.value())?;
        out.push(
            task(path, txn, id)?
                .ok_or_else(|| corrupt(path, format!("task {id} in history is missing")))?,
        );
    }
    Ok(out)
}

/// The task id of a history key (finish time, then id).
fn history_id(path: &Path, key: &[u8]) -> Result<TaskId, MetaError> {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(TaskId::from_be_bytes)
        .ok_or_else(|| corrupt(path, "bad history key"))
}

/// Which tasks [`list_tasks`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only tasks in one of these states (empty: any).
    pub states: Vec<TaskState>,
    /// Also finished tasks (after the unfinished ones, oldest finish first).
    pub include_finished: bool,
    /// At most this many (0: no limit).
    pub limit: usize,
    /// Only this tenant's tasks (None: every tenant's).
    pub tenant: Option<String>,
    /// Only tasks with an id greater than this (paging: the last id of the
    /// previous page; 0 = from the start).
    pub after_id: TaskId,
}

/// Unfinished tasks in rank order, then (when asked) finished ones by
/// finish time.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn list_tasks(
    path: &Path,
    txn: &ReadTransaction,
    filter: &TaskFilter,
) -> Result<Vec<TaskRecord>, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let mut ids = Vec::new();
    let unfinished = txn
        .open_table(UNFINISHED_TABLE)
        .map_err(|e| storage_err(path, e))?;
    for row in unfinished.iter().map_err(err)? {
        let key = row.map_err(err)?.0;
        ids.push(id_of_rank_key(key.value()).ok_or_else(|| corrupt(path, "bad rank key"))?);
    }
    if filter.include_finished {
        let history = txn
            .open_table(HISTORY_TABLE)
            .map_err(|e| storage_err(path, e))?;
        for row in history.iter().map_err(err)? {
            let id = history_id(path, row.map_err(err)?.0.value())?;
            ids.push(id);
        }
    }
    let mut out = Vec::new();
    for id in ids {
        let t = task(path, txn, id)?
            .ok_or_else(|| corrupt(path, format!("indexed task {id} is missing")))?;
        let state = task_state(&t).map_err(|e| corrupt(path, e.to_string()))?;
        let tenant_ok = filter.tenant.as_ref().is_none_or(|x| *x == t.tenant);
        if tenant_ok
            && t.id > filter.after_id
            && (filter.states.is_empty() || filter.states.contains(&state))
        {
            out.push(t);
            if out.len() == filter.limit {
                break;
            }
        }
    }
    Ok(out)
}

/// The subtasks of one step of a task in ordinal order, with their counts
/// by state.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn step_subtasks(
    path: &Path,
    txn: &ReadTransaction,
    task: TaskId,
    step: u32,
) -> Result<(Vec<SubtaskRecord>, StepCounts), MetaError> {
    let (start, end) = subtask_range(task, Some(step));
    let subtasks: Vec<SubtaskRecord> = scan(path, txn, SUBTASKS_TABLE, Some((&start, &end)))?;
    let states = subtasks
        .iter()
        .map(|s| s.state.parse::<SubtaskState>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| corrupt(path, e))?;
    Ok((subtasks, StepCounts::of(states)))
}

/// One subtask's record, if it exists.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn subtask(
    path: &Path,
    txn: &ReadTransaction,
    task: TaskId,
    step: u32,
    ordinal: u32,
) -> Result<Option<SubtaskRecord>, MetaError> {
    get(
        path,
        txn,
        SUBTASKS_TABLE,
        &super::records::subtask_key(task, step, ordinal),
    )
}

/// How many subtasks of one step are in each state, from the counts kept
/// with the rows (no scan).
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn step_counts(
    path: &Path,
    txn: &ReadTransaction,
    task: TaskId,
    step: u32,
) -> Result<StepCounts, MetaError> {
    let rec: StepCountsRecord =
        get(path, txn, STEP_COUNTS_TABLE, &step_key(task, step))?.unwrap_or_default();
    let pairs = [
        (SubtaskState::Pending, rec.pending),
        (SubtaskState::Running, rec.running),
        (SubtaskState::Succeed, rec.succeed),
        (SubtaskState::Failed, rec.failed),
        (SubtaskState::Canceled, rec.canceled),
        (SubtaskState::Paused, rec.paused),
    ];
    Ok(StepCounts(
        pairs.into_iter().filter(|(_, n)| *n > 0).collect(),
    ))
}

/// The records of the subtask keys listed in an index table (`key_at`
/// finds the subtask key within an index key), in index order, while
/// `keep` accepts them: up to `limit` accepted ones.
fn indexed_subtasks(
    path: &Path,
    txn: &ReadTransaction,
    index: SmTable,
    range: (&[u8], &[u8]),
    key_at: usize,
    limit: usize,
    keep: impl Fn(&SubtaskRecord) -> bool,
) -> Result<Vec<SubtaskRecord>, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let index = txn.open_table(index).map_err(|e| storage_err(path, e))?;
    let subtasks = txn
        .open_table(SUBTASKS_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let mut out = Vec::new();
    for row in index.range(range.0..=range.1).map_err(err)? {
        if out.len() >= limit {
            break;
        }
        let key = row.map_err(err)?.0;
        let subtask_key = key.value().get(key_at..).unwrap_or_default();
        let missing = || {
            corrupt(
                path,
                format!("indexed subtask {} is missing", hex::encode(subtask_key)),
            )
        };
        let v = subtasks
            .get(subtask_key)
            .map_err(err)?
            .ok_or_else(missing)?;
        let s = SubtaskRecord::decode(v.value()).map_err(|_| {
            corrupt(
                path,
                format!("bad record {} in sm_subtasks", hex::encode(subtask_key)),
            )
        })?;
        if keep(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Every subtask assigned to a node and not ended (pending or running),
/// by node, task, step and ordinal: at most the cluster's slots plus the
/// queued moves, whatever the size of the tasks.
///
/// # Errors
/// Storage failures, an undecodable record, an index entry without subtask.
pub fn assigned_subtasks(
    path: &Path,
    txn: &ReadTransaction,
) -> Result<Vec<SubtaskRecord>, MetaError> {
    by_node(path, txn, 0..=u64::MAX)
}

/// The subtasks of the by-node index for the nodes in `nodes`.
fn by_node(
    path: &Path,
    txn: &ReadTransaction,
    nodes: std::ops::RangeInclusive<u64>,
) -> Result<Vec<SubtaskRecord>, MetaError> {
    let (start, end) = (
        by_node_key(*nodes.start(), 0, 0, 0),
        by_node_key(*nodes.end(), u64::MAX, u32::MAX, u32::MAX),
    );
    let subtask_key_at = 8;
    indexed_subtasks(
        path,
        txn,
        SUBTASKS_BY_NODE_TABLE,
        (&start, &end),
        subtask_key_at,
        usize::MAX,
        |_| true,
    )
}

/// The first `limit` subtasks of a step that wait for a node (pending, not
/// assigned) and whose retry backoff has passed at `now_ms`, in ordinal
/// order.
///
/// # Errors
/// Storage failures, an undecodable record, an index entry without subtask.
pub fn waiting_subtasks(
    path: &Path,
    txn: &ReadTransaction,
    task: TaskId,
    step: u32,
    now_ms: u64,
    limit: usize,
) -> Result<Vec<SubtaskRecord>, MetaError> {
    let (start, end) = subtask_range(task, Some(step));
    indexed_subtasks(
        path,
        txn,
        SUBTASKS_WAITING_TABLE,
        (&start, &end),
        0,
        limit,
        |s| s.retry_after_ms <= now_ms,
    )
}

/// How many subtasks of a step wait for a node (pending, not assigned),
/// counted from the waiting index without reading them.
///
/// # Errors
/// Storage failures.
pub fn waiting_count(
    path: &Path,
    txn: &ReadTransaction,
    task: TaskId,
    step: u32,
) -> Result<usize, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let (start, end) = subtask_range(task, Some(step));
    let index = txn
        .open_table(SUBTASKS_WAITING_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let mut n = 0;
    for row in index
        .range(start.as_slice()..=end.as_slice())
        .map_err(err)?
    {
        row.map_err(err)?;
        n += 1;
    }
    Ok(n)
}

/// The subtasks assigned to `node` that have not ended (pending or
/// running), by task, step and ordinal: what its heartbeat is answered with.
///
/// # Errors
/// Storage failures, an undecodable record, an index entry without subtask.
pub fn node_subtasks(
    path: &Path,
    txn: &ReadTransaction,
    node: u64,
) -> Result<Vec<SubtaskRecord>, MetaError> {
    by_node(path, txn, node..=node)
}

/// Every node's record, by id.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn node_records(path: &Path, txn: &ReadTransaction) -> Result<Vec<NodeRecord>, MetaError> {
    scan(path, txn, NODES_TABLE, None)
}

/// One node's record.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn node(path: &Path, txn: &ReadTransaction, id: u64) -> Result<Option<NodeRecord>, MetaError> {
    get(path, txn, NODES_TABLE, &node_key(id))
}

/// Every node as placement sees it: up means heartbeating and a worker.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn nodes(path: &Path, txn: &ReadTransaction) -> Result<Vec<NodeView>, MetaError> {
    Ok(node_records(path, txn)?.iter().map(node_view).collect())
}

pub fn node_view(n: &NodeRecord) -> NodeView {
    NodeView {
        id: n.id,
        labels: n.labels.clone(),
        scope: n.scope.clone(),
        slots: n.slots,
        up: n.up && n.worker,
    }
}

/// What placement needs of a task.
pub fn task_placement(t: &TaskRecord) -> TaskPlacement {
    TaskPlacement {
        rank: rank_of(t),
        concurrency: t.concurrency,
        max_nodes: t.max_nodes,
        scope: t.scope.clone(),
        selector: t.selector.clone(),
    }
}

/// A tenant's committed module.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn module(
    path: &Path,
    txn: &ReadTransaction,
    tenant: &str,
    hash: &str,
) -> Result<Option<ModuleRecord>, MetaError> {
    get(path, txn, MODULES_TABLE, &module_key(tenant, hash))
}

/// Every committed module of `tenant` (None: of every tenant), by tenant
/// and hash.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn modules(
    path: &Path,
    txn: &ReadTransaction,
    tenant: Option<&str>,
) -> Result<Vec<ModuleRecord>, MetaError> {
    match tenant {
        Some(t) => {
            let (start, end) = tenant_modules_range(t);
            scan(path, txn, MODULES_TABLE, Some((&start, &end)))
        }
        None => scan(path, txn, MODULES_TABLE, None),
    }
}

/// Finds a module by hash, or by name (and tag when not empty): the most
/// recently uploaded match among `tenant`'s modules (None: any tenant's).
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn find_module(
    path: &Path,
    txn: &ReadTransaction,
    tenant: Option<&str>,
    name_or_hash: &str,
    tag: &str,
) -> Result<Option<ModuleRecord>, MetaError> {
    let all = modules(path, txn, tenant)?;
    if super::modules::valid_hash(name_or_hash) {
        if let Some(m) = all.iter().find(|m| m.hash == name_or_hash) {
            return Ok(Some(m.clone()));
        }
    }
    Ok(all
        .into_iter()
        .filter(|m| m.name == name_or_hash && (tag.is_empty() || m.tag == tag))
        .max_by_key(|m| (m.upload_time_ms, m.hash.clone())))
}

/// Every tenant, by id.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn tenants(path: &Path, txn: &ReadTransaction) -> Result<Vec<TenantRecord>, MetaError> {
    scan(path, txn, TENANTS_TABLE, None)
}

/// One tenant.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn tenant(
    path: &Path,
    txn: &ReadTransaction,
    id: &str,
) -> Result<Option<TenantRecord>, MetaError> {
    get(path, txn, TENANTS_TABLE, id.as_bytes())
}

/// One API token's record.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn token(
    path: &Path,
    txn: &ReadTransaction,
    id: &str,
) -> Result<Option<TokenRecord>, MetaError> {
    get(path, txn, TOKENS_TABLE, id.as_bytes())
}

/// Every API token's record, by id.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn tokens(path: &Path, txn: &ReadTransaction) -> Result<Vec<TokenRecord>, MetaError> {
    scan(path, txn, TOKENS_TABLE, None)
}

/// A committed module's bytes, reassembled from its chunks.
///
/// # Errors
/// Storage failures, a missing chunk.
pub fn module_bytes(
    path: &Path,
    txn: &ReadTransaction,
    hash: &str,
) -> Result<Option<Vec<u8>>, MetaError> {
    // The bytes are shared by every tenant that uploaded them; a module
    // is committed only with all of its chunks, in index order.
    let err = |e: redb::StorageError| storage_err(path, e);
    let chunks = txn
        .open_table(MODULE_CHUNKS_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let (start, end) = (chunk_key(hash, 0), chunk_key(hash, u32::MAX));
    let mut bytes: Option<Vec<u8>> = None;
    for row in chunks
        .range(start.as_slice()..=end.as_slice())
        .map_err(err)?
    {
        bytes
            .get_or_insert_with(Vec::new)
            .extend_from_slice(row.map_err(err)?.1.value());
    }
    Ok(bytes)
}
