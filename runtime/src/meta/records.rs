//! The task framework's tables, their key encodings, typed record access and
//! the reasons a command is rejected ([`Rejection`]).
//!
//! Keys are big-endian so that byte order is the useful order: tasks by id,
//! subtasks by (task, step, ordinal), unfinished tasks by rank, history by
//! finish time.
//!
//! Rejections are decided before anything is written: the state machine has
//! no rollback inside an apply transaction, so a command either validates
//! completely and then writes, or writes nothing.

use redb::ReadableTable;

use super::tx::Tx;
use stoker_proto::meta::{
    ModuleRecord, NodeRecord, SubtaskRecord, TaskRecord, TenantRecord, TokenRecord,
};
use stoker_proto::Message;

use super::state_machine::SmTable;
use crate::model::{IllegalTransition, Rank, SubtaskState, TaskId, TaskState};

/// Tenants: UTF-8 id → [`TenantRecord`].
pub const TENANTS_TABLE: SmTable = redb::TableDefinition::new("sm_tenants");
/// Nodes: big-endian id → [`NodeRecord`].
pub const NODES_TABLE: SmTable = redb::TableDefinition::new("sm_nodes");
/// API tokens: UTF-8 token id → [`TokenRecord`] (its sha256, never the
/// token itself).
pub const TOKENS_TABLE: SmTable = redb::TableDefinition::new("sm_tokens");
/// Committed modules: [`module_key`] (tenant ‖ 0 ‖ hex sha256) →
/// [`ModuleRecord`]. Two tenants uploading the same bytes each get their
/// own record; the bytes are stored once.
pub const MODULES_TABLE: SmTable = redb::TableDefinition::new("sm_modules");
/// Committed module bytes: hex sha256 ‖ big-endian chunk index → bytes.
pub const MODULE_CHUNKS_TABLE: SmTable = redb::TableDefinition::new("sm_module_chunks");
/// Chunks of uploads not committed yet, keyed like [`MODULE_CHUNKS_TABLE`].
pub const MODULE_STAGING_TABLE: SmTable = redb::TableDefinition::new("sm_module_staging");
/// Uploads in staging: hash → the time (u64 big-endian ms) of its latest
/// chunk, for sweeping abandoned ones.
pub const MODULE_STAGING_TIMES_TABLE: SmTable =
    redb::TableDefinition::new("sm_module_staging_times");
/// Tasks, finished or not: big-endian id → [`TaskRecord`].
pub const TASKS_TABLE: SmTable = redb::TableDefinition::new("sm_tasks");
/// Inline task inputs: big-endian task id → bytes.
pub const TASK_INPUTS_TABLE: SmTable = redb::TableDefinition::new("sm_task_inputs");
/// Unfinished tasks in rank order: [`rank_key`] → nothing.
pub const UNFINISHED_TABLE: SmTable = redb::TableDefinition::new("sm_tasks_unfinished");
/// Finished tasks by finish time: time ‖ id (big-endian) → nothing.
pub const HISTORY_TABLE: SmTable = redb::TableDefinition::new("sm_tasks_history");
/// Subtasks: [`subtask_key`] → [`SubtaskRecord`].
pub const SUBTASKS_TABLE: SmTable = redb::TableDefinition::new("sm_subtasks");
/// Subtasks assigned to a node and unfinished (pending or running):
/// [`by_node_key`] → nothing. What a worker's heartbeat is answered from.
pub const SUBTASKS_BY_NODE_TABLE: SmTable = redb::TableDefinition::new("sm_subtasks_by_node");
/// Subtasks waiting for a node (pending, not assigned): [`subtask_key`] →
/// nothing. The owner reads the first few of each step from here instead
/// of every subtask.
pub const SUBTASKS_WAITING_TABLE: SmTable = redb::TableDefinition::new("sm_subtasks_waiting");
/// Subtask counts by state of each step: [`step_key`] →
/// [`StepCountsRecord`](stoker_proto::meta::StepCountsRecord), maintained
/// with the subtask rows; a step without subtasks has no row.
pub const STEP_COUNTS_TABLE: SmTable = redb::TableDefinition::new("sm_step_counts");
/// Counters (the next task id): UTF-8 name → big-endian u64.
pub const COUNTERS_TABLE: SmTable = redb::TableDefinition::new("sm_counters");
/// What each tenant uses of its count quotas: UTF-8 tenant id →
/// [`TenantUsage`](stoker_proto::meta::TenantUsage), maintained with the
/// rows it counts; a tenant using nothing has no row.
pub const TENANT_USAGE_TABLE: SmTable = redb::TableDefinition::new("sm_tenant_usage");

/// The tenant everything belongs to until tenancy arrives.
pub const DEFAULT_TENANT: &str = "default";
/// Largest module, in bytes.
pub const MAX_MODULE_BYTES: usize = 32 * 1024 * 1024;
/// Largest module chunk, in bytes.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest inline task input, subtask payload, output or checkpoint, in
/// bytes; larger data goes through the blob store.
pub const MAX_INLINE_BYTES: usize = 1024 * 1024;
/// Most subtasks one `AddSubtasks` may carry.
pub const MAX_SUBTASK_BATCH: usize = 10_000;
/// Attempts of a subtask when the task does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Why a task framework command is rejected. The message becomes the
/// command result's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    #[error("stale report for subtask {subtask}: {why}")]
    StaleReport { subtask: String, why: String },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Invalid(String),
    #[error("module {hash} is used by unfinished task {task}")]
    ModuleInUse { hash: String, task: TaskId },
    #[error("module upload {hash}: {why}")]
    BadUpload { hash: String, why: String },
    /// A tenant's quota forbids it; mapped to `ResourceExhausted`.
    #[error("quota exceeded: tenant {tenant}'s {quota} is {limit}, {detail}")]
    Quota {
        tenant: String,
        quota: &'static str,
        limit: u64,
        detail: String,
    },
    #[error("corrupt record in {table}: {key}")]
    Corrupt { table: String, key: String },
}

/// A failed application: rejected (applied as a no-op) or a storage error
/// (stops the node).
#[derive(Debug)]
pub(crate) enum ApplyError {
    Rejected(Rejection),
    Storage(redb::Error),
}

impl From<Rejection> for ApplyError {
    fn from(r: Rejection) -> Self {
        ApplyError::Rejected(r)
    }
}

impl From<IllegalTransition> for ApplyError {
    fn from(e: IllegalTransition) -> Self {
        ApplyError::Rejected(e.into())
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ApplyError {
            fn from(e: $t) -> Self {
                ApplyError::Storage(e.into())
            }
        }
    )*};
}
storage_from!(redb::Error, redb::TableError, redb::StorageError);

pub(crate) type Applied<T> = Result<T, ApplyError>;

/// Shorthand for an [`Rejection::Invalid`] rejection.
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Applied<T> {
    Err(Rejection::Invalid(msg.into()).into())
}

pub fn task_key(id: TaskId) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn node_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// (task, step, ordinal), big-endian: a task's subtasks are contiguous, by
/// step then ordinal.
pub fn subtask_key(task: TaskId, step: u32, ordinal: u32) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&task.to_be_bytes());
    k[8..12].copy_from_slice(&step.to_be_bytes());
    k[12..].copy_from_slice(&ordinal.to_be_bytes());
    k
}

/// A staged upload's time from [`MODULE_STAGING_TIMES_TABLE`]; an
/// unreadable one is 0, the oldest, so that a sweep drops it.
pub fn staging_time(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_be_bytes)
}

/// task ‖ step, big-endian.
pub fn step_key(task: TaskId, step: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&task.to_be_bytes());
    k[8..].copy_from_slice(&step.to_be_bytes());
    k
}

/// node ‖ task ‖ step ‖ ordinal.
pub fn by_node_key(node: u64, task: TaskId, step: u32, ordinal: u32) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&node.to_be_bytes());
    k[8..].copy_from_slice(&subtask_key(task, step, ordinal));
    k
}

/// The key range of one step's subtasks (`step = None`: all of the task's).
pub fn subtask_range(task: TaskId, step: Option<u32>) -> ([u8; 16], [u8; 16]) {
    match step {
        Some(s) => (subtask_key(task, s, 0), subtask_key(task, s, u32::MAX)),
        None => (
            subtask_key(task, 0, 0),
            subtask_key(task, u32::MAX, u32::MAX),
        ),
    }
}

/// priority ‖ create time ‖ id, big-endian: byte order is rank order.
pub fn rank_key(rank: &Rank) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&rank.priority.to_be_bytes());
    k[4..12].copy_from_slice(&rank.create_time_ms.to_be_bytes());
    k[12..].copy_from_slice(&rank.id.to_be_bytes());
    k
}

/// The task id at the end of a [`rank_key`].
pub fn id_of_rank_key(k: &[u8]) -> Option<TaskId> {
    Some(u64::from_be_bytes(k.get(12..20)?.try_into().ok()?))
}

pub fn history_key(finish_time_ms: u64, id: TaskId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&finish_time_ms.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

/// tenant ‖ 0 ‖ hash: a tenant's module record.
pub fn module_key(tenant: &str, hash: &str) -> Vec<u8> {
    let mut k = tenant.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(hash.as_bytes());
    k
}

/// The key range of one tenant's module records.
pub fn tenant_modules_range(tenant: &str) -> (Vec<u8>, Vec<u8>) {
    let mut start = tenant.as_bytes().to_vec();
    start.push(0);
    let mut end = tenant.as_bytes().to_vec();
    end.push(1);
    (start, end)
}

/// hash ‖ chunk index.
pub fn chunk_key(hash: &str, index: u32) -> Vec<u8> {
    let mut k = hash.as_bytes().to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn rank_of(t: &TaskRecord) -> Rank {
    Rank {
        priority: t.priority,
        create_time_ms: t.create_time_ms,
        id: t.id,
    }
}

/// Decodes the state of a stored task.
pub fn task_state(t: &TaskRecord) -> Result<TaskState, Rejection> {
    t.state.parse().map_err(|_| Rejection::Corrupt {
        table: "sm_tasks".into(),
        key: t.id.to_string(),
    })
}

/// Whether a stored task's subtasks may be assigned and started (see
/// [`TaskState::accepts_work`]).
pub fn accepts_work(t: &TaskRecord) -> Result<bool, Rejection> {
    Ok(task_state(t)?.accepts_work(t.modifying_from.parse().ok()))
}

pub fn subtask_state(s: &SubtaskRecord) -> Result<SubtaskState, Rejection> {
    s.state.parse().map_err(|_| Rejection::Corrupt {
        table: "sm_subtasks".into(),
        key: subtask_name(s.task_id, s.step, s.ordinal),
    })
}

/// How a subtask is named in messages: `task/step/ordinal`.
pub fn subtask_name(task: TaskId, step: u32, ordinal: u32) -> String {
    format!("{task}/{step}/{ordinal}")
}

/// Reads and decodes one record of a write transaction's table.
pub(crate) fn get<M: Message + Default>(
    txn: &Tx<'_>,
    def: SmTable,
    key: &[u8],
) -> Applied<Option<M>> {
    let table = txn.table(def)?;
    let Some(v) = table.get(key)? else {
        return Ok(None);
    };
    M::decode(v.value()).map(Some).map_err(|_| {
        Rejection::Corrupt {
            table: redb::TableHandle::name(&def).to_string(),
            key: hex::encode(key),
        }
        .into()
    })
}

pub(crate) fn put<M: Message>(txn: &Tx<'_>, def: SmTable, key: &[u8], record: &M) -> Applied<()> {
    txn.table(def)?
        .insert(key, record.encode_to_vec().as_slice())?;
    Ok(())
}

pub(crate) fn get_task(txn: &Tx<'_>, id: TaskId) -> Applied<TaskRecord> {
    get(txn, TASKS_TABLE, &task_key(id))?.ok_or_else(|| {
        Rejection::NotFound {
            what: "task",
            id: id.to_string(),
        }
        .into()
    })
}

pub(crate) fn get_node(txn: &Tx<'_>, id: u64) -> Applied<NodeRecord> {
    get(txn, NODES_TABLE, &node_key(id))?.ok_or_else(|| {
        Rejection::NotFound {
            what: "node",
            id: id.to_string(),
        }
        .into()
    })
}

pub(crate) fn get_module(txn: &Tx<'_>, tenant: &str, hash: &str) -> Applied<Option<ModuleRecord>> {
    get(txn, MODULES_TABLE, &module_key(tenant, hash))
}

pub(crate) fn get_token(txn: &Tx<'_>, id: &str) -> Applied<Option<TokenRecord>> {
    get(txn, TOKENS_TABLE, id.as_bytes())
}

pub(crate) fn get_tenant(txn: &Tx<'_>, id: &str) -> Applied<Option<TenantRecord>> {
    get(txn, TENANTS_TABLE, id.as_bytes())
}
