//! The replicated state machine: typed commands applied to redb tables.
//!
//! Every table of the state machine maps bytes to bytes (keys chosen so that
//! their byte order is the useful order, values protobuf records). That keeps
//! snapshots, restores and digests generic: they walk [`SM_TABLES`].
//!
//! Adding a kind of state (tasks, subtasks, nodes, modules, tenants):
//! 1. add its table definition to [`SM_TABLES`];
//! 2. add its command(s) to `Command` in `proto/proto/meta.proto`;
//! 3. add a match arm in [`apply_command`] calling a function of the form
//!    `fn(&Tx, &TheCommand) -> Result<the_result, MetaError>` ([`Tx`] opens each
//!    table once per run of entries: take tables from it, never from redb).
//!
//! Application must be deterministic: it may read only the tables and the
//! command, never the clock, randomness or local configuration. And a
//! rejected command must write nothing: the apply transaction holds many
//! commands and has no rollback, so validate completely before the first
//! write (the task framework's commands in `records`, `nodes`, `modules`,
//! `tasks` and `subtasks` follow this; `model_replica_tests` checks it).

use std::path::Path;

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use sha2::{Digest, Sha256};
use stoker_proto::meta::{
    command, command_result, query, query_result, Command, CommandBatch, CommandResult,
    CommandResults, DeleteConfig, DeleteConfigResult, GetConfigResult, KeyValue, ListConfigResult,
    MemberRecord, Proposal, Query, QueryResult, SetConfig, SetConfigResult, SnapshotData,
    TableDump, MAX_BATCH_COMMANDS, SNAPSHOT_VERSION,
};
use stoker_proto::Message;

use super::error::storage_err;
use super::records::{self, ApplyError};
use super::tx::Tx;
use super::MetaError;
use super::{modules, nodes, rules, subtasks, tasks, tenants};

/// A state machine table: byte keys to byte values.
pub type SmTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// Cluster-wide settings: UTF-8 key → UTF-8 value.
pub const CONFIG_TABLE: SmTable = TableDefinition::new("sm_config");
/// Raft members: big-endian node id → [`MemberRecord`].
pub const MEMBERS_TABLE: SmTable = TableDefinition::new("sm_members");

/// Applied request ids: request id → 8 bytes big-endian log index, then
/// the encoded [`CommandResult`].
pub const REQUESTS_TABLE: SmTable = TableDefinition::new("sm_requests");
/// The same ids in application order: index ‖ request id → nothing.
pub const REQUEST_ORDER_TABLE: SmTable = TableDefinition::new("sm_request_order");

/// Every table of the state machine, in the order snapshots list them.
pub const SM_TABLES: &[SmTable] = &[
    CONFIG_TABLE,
    MEMBERS_TABLE,
    REQUESTS_TABLE,
    REQUEST_ORDER_TABLE,
    records::TENANTS_TABLE,
    super::stats::TENANT_FUEL_TABLE,
    records::TOKENS_TABLE,
    records::NODES_TABLE,
    records::MODULES_TABLE,
    records::MODULE_CHUNKS_TABLE,
    records::MODULE_STAGING_TABLE,
    records::MODULE_STAGING_TIMES_TABLE,
    records::TASKS_TABLE,
    records::TASK_INPUTS_TABLE,
    records::UNFINISHED_TABLE,
    records::HISTORY_TABLE,
    records::SUBTASKS_TABLE,
    records::SUBTASKS_BY_NODE_TABLE,
    records::SUBTASKS_WAITING_TABLE,
    records::STEP_COUNTS_TABLE,
    records::COUNTERS_TABLE,
    records::TENANT_USAGE_TABLE,
    rules::RULES_TABLE,
    rules::RULES_META_TABLE,
];

/// Request ids remembered for deduplication; the oldest are forgotten
/// beyond this. Far more than the requests that can be retried within a
/// request timeout.
pub const MAX_REMEMBERED_REQUESTS: u64 = 100_000;

/// The rejection of a command of no kind. A release before
/// `CommandBatch` decodes a batch as such a command (it drops the field it
/// does not know), so a proposer takes this answer to a batch as "the
/// leader does not take batches" and proposes the commands one by one.
pub const EMPTY_COMMAND: &str = "empty command";

/// Longest accepted config key, in bytes.
const MAX_CONFIG_KEY: usize = 1024;
/// Longest accepted config value, in bytes.
const MAX_CONFIG_VALUE: usize = 64 * 1024;

/// Applies one command inside the apply transaction and returns its result.
/// A command that fails validation is applied as a no-op whose result
/// carries the error, identically on every node.
///
/// # Errors
/// Only storage failures; they stop the node.
pub fn apply_command(path: &Path, txn: &Tx<'_>, cmd: &Command) -> Result<CommandResult, MetaError> {
    use command::Kind as C;
    use command_result::Kind as R;
    let outcome = match &cmd.kind {
        Some(C::SetConfig(c)) => set_config(txn, c).map(|r| r.map(R::SetConfig)),
        Some(C::DeleteConfig(c)) => delete_config(txn, c).map(|r| r.map(R::DeleteConfig)),
        Some(C::CreateTenant(c)) => framework(tenants::create_tenant(txn, c), R::Done),
        Some(C::SetTenant(c)) => framework(tenants::set_tenant(txn, c), R::Done),
        Some(C::CreateToken(c)) => framework(tenants::create_token(txn, c), R::Done),
        Some(C::RevokeToken(c)) => framework(tenants::revoke_token(txn, c), R::Done),
        Some(C::RegisterNode(c)) => framework(nodes::register_node(txn, c), R::Done),
        Some(C::NodeHeartbeat(c)) => framework(nodes::node_heartbeat(txn, c), R::Done),
        Some(C::MarkNodeDown(c)) => framework(nodes::mark_node_down(txn, c), R::Done),
        Some(C::PutModuleChunk(c)) => framework(modules::put_module_chunk(txn, c), R::Done),
        Some(C::CommitModule(c)) => framework(modules::commit_module(txn, c), R::CommitModule),
        Some(C::DeleteModule(c)) => framework(modules::delete_module(txn, c), R::Done),
        Some(C::SubmitTask(c)) => framework(tasks::submit_task(txn, c), R::SubmitTask),
        Some(C::SetTaskState(c)) => framework(tasks::set_task_state(txn, c), R::Done),
        Some(C::ModifyTask(c)) => framework(tasks::modify_task(txn, c), R::Done),
        Some(C::FinishTask(c)) => framework(tasks::finish_task(txn, c), R::Done),
        Some(C::GcHistory(c)) => framework(tasks::gc_history(txn, c), R::Count),
        Some(C::SweepModuleStaging(c)) => {
            framework(modules::sweep_module_staging(txn, c), R::Count)
        }
        Some(C::AddSubtasks(c)) => framework(subtasks::add_subtasks(txn, c), R::Count),
        Some(C::AssignSubtask(c)) => framework(subtasks::assign_subtask(txn, c), R::SubtaskState),
        Some(C::ClaimSubtask(c)) => framework(subtasks::claim_subtask(txn, c), R::SubtaskState),
        Some(C::ReportSubtask(c)) => framework(subtasks::report_subtask(txn, c), R::SubtaskState),
        Some(C::RequeueSubtask(c)) => framework(subtasks::requeue_subtask(txn, c), R::SubtaskState),
        Some(C::ChangeSubtasks(c)) => framework(subtasks::change_subtasks(txn, c), R::Count),
        Some(C::SetRules(c)) => framework(rules::set_rules(txn, c), R::Done),
        Some(C::Batch(b)) => return apply_batch(path, txn, b),
        None => Ok(Err(EMPTY_COMMAND.to_string())),
    };
    match outcome.map_err(|e| storage_err(path, e))? {
        Ok(kind) => Ok(CommandResult {
            kind: Some(kind),
            error: String::new(),
        }),
        Err(error) => Ok(CommandResult { kind: None, error }),
    }
}

/// Applies a batch's commands in order, each exactly as if proposed
/// alone; a batch that is too big or holds a batch is rejected whole.
fn apply_batch(path: &Path, txn: &Tx<'_>, b: &CommandBatch) -> Result<CommandResult, MetaError> {
    let rejected = |error: String| Ok(CommandResult { kind: None, error });
    if b.commands.len() > MAX_BATCH_COMMANDS {
        return rejected(format!(
            "a batch holds at most {MAX_BATCH_COMMANDS} commands, not {}",
            b.commands.len()
        ));
    }
    if b.commands
        .iter()
        .any(|c| matches!(c.kind, Some(command::Kind::Batch(_))))
    {
        return rejected("a batch cannot hold a batch".into());
    }
    let results = b
        .commands
        .iter()
        .map(|c| apply_command(path, txn, c))
        .collect::<Result<_, _>>()?;
    Ok(CommandResult {
        kind: Some(command_result::Kind::Batch(CommandResults { results })),
        error: String::new(),
    })
}

/// The command that proposes `commands` as one [`CommandBatch`].
pub fn batch_of<'a>(commands: impl IntoIterator<Item = &'a command::Kind>) -> command::Kind {
    command::Kind::Batch(CommandBatch {
        commands: commands
            .into_iter()
            .map(|k| Command {
                kind: Some(k.clone()),
            })
            .collect(),
    })
}

/// The applied answer to a batch, as its proposer reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchAnswer {
    /// Each command's own result, in order.
    Each(Vec<CommandResult>),
    /// The leader runs a release before batches and applied none of it
    /// (see [`EMPTY_COMMAND`]): propose the commands one by one.
    NotTaken,
    /// The batch was rejected whole (too big, nested) or answered in
    /// another shape: this is every command's rejection.
    Rejected(CommandResult),
}

/// Reads `answer`, the applied result of a batch of `n` commands.
pub fn read_batch_answer(answer: CommandResult, n: usize) -> BatchAnswer {
    match answer {
        CommandResult {
            kind: Some(command_result::Kind::Batch(b)),
            ..
        } if b.results.len() == n => BatchAnswer::Each(b.results),
        CommandResult { kind: None, error } if error == EMPTY_COMMAND => BatchAnswer::NotTaken,
        CommandResult { kind: None, error } if !error.is_empty() => {
            BatchAnswer::Rejected(CommandResult { kind: None, error })
        }
        _ => BatchAnswer::Rejected(CommandResult {
            kind: None,
            error: format!("a batch of {n} commands was answered with another result"),
        }),
    }
}

/// A run of proposals applied in one transaction: their request ids
/// checked and recorded, their commands applied, with every table opened
/// once for the whole run (opening a table is a good part of a small
/// command's cost).
pub struct Requests<'txn> {
    path: &'txn Path,
    /// The tables, each opened once for the whole run.
    txn: Tx<'txn>,
    /// Ids remembered: each new one forgets the oldest beyond this.
    keep: u64,
}

impl<'txn> Requests<'txn> {
    /// A run in `txn` of the database at `path`, remembering the last
    /// `keep` ids (a node keeps [`MAX_REMEMBERED_REQUESTS`]). Tables open
    /// as the run first needs them and close when it is dropped.
    ///
    /// # Errors
    /// Storage failures (none today; kept for callers that open eagerly).
    pub fn open(
        path: &'txn Path,
        txn: &'txn WriteTransaction,
        keep: u64,
    ) -> Result<Self, MetaError> {
        Ok(Requests {
            path,
            txn: Tx::new(txn),
            keep,
        })
    }

    /// Applies a proposal at log `index`: its command, unless its request
    /// id was applied before, in which case the first result is returned
    /// again. A new id makes the oldest one beyond `keep` forgotten at
    /// once, so what a replica remembers at each index never depends on
    /// how its applies were batched.
    ///
    /// # Errors
    /// Storage failures, an undecodable remembered result.
    pub fn apply(&mut self, index: u64, p: &Proposal) -> Result<CommandResult, MetaError> {
        let path = self.path;
        let none = Command::default();
        let cmd = p.command.as_ref().unwrap_or(&none);
        if p.request_id.is_empty() {
            return apply_command(path, &self.txn, cmd);
        }
        let err = |e: redb::Error| storage_err(path, e);
        let id = p.request_id.as_slice();
        let remembered = {
            let results = self.txn.table(REQUESTS_TABLE).map_err(|e| err(e.into()))?;
            let found = results.get(id).map_err(|e| err(e.into()))?;
            found.map(|v| v.value().get(8..).map(CommandResult::decode))
        };
        if let Some(first) = remembered {
            return first
                .and_then(Result::ok)
                .ok_or_else(|| MetaError::Corrupt {
                    path: path.to_path_buf(),
                    what: "bad remembered request".into(),
                });
        }
        let result = apply_command(path, &self.txn, cmd)?;
        let mut record = index.to_be_bytes().to_vec();
        result.encode(&mut record).expect("vec grows");
        let mut order_key = index.to_be_bytes().to_vec();
        order_key.extend_from_slice(id);
        let mut results = self.txn.table(REQUESTS_TABLE).map_err(|e| err(e.into()))?;
        let mut order = self
            .txn
            .table(REQUEST_ORDER_TABLE)
            .map_err(|e| err(e.into()))?;
        results
            .insert(id, record.as_slice())
            .map_err(|e| err(e.into()))?;
        order
            .insert(order_key.as_slice(), [].as_slice())
            .map_err(|e| err(e.into()))?;
        // Forget the oldest ids beyond `keep`, by application order.
        while redb::ReadableTableMetadata::len(&*order).map_err(|e| err(e.into()))? > self.keep {
            let Some((key, _)) = order.pop_first().map_err(|e| err(e.into()))? else {
                break;
            };
            results
                .remove(&key.value()[8..])
                .map_err(|e| err(e.into()))?;
        }
        Ok(result)
    }
}

type Applied<T> = Result<Result<T, String>, redb::Error>;

/// A task framework command's outcome in the dispatch's terms: a rejection
/// becomes the result's error message.
fn framework<T>(
    r: records::Applied<T>,
    wrap: impl FnOnce(T) -> command_result::Kind,
) -> Applied<command_result::Kind> {
    match r {
        Ok(v) => Ok(Ok(wrap(v))),
        Err(ApplyError::Rejected(why)) => Ok(Err(why.to_string())),
        Err(ApplyError::Storage(e)) => Err(e),
    }
}

fn set_config(txn: &Tx<'_>, c: &SetConfig) -> Applied<SetConfigResult> {
    if c.key.is_empty() || c.key.len() > MAX_CONFIG_KEY {
        return Ok(Err(format!(
            "config key must be 1..={MAX_CONFIG_KEY} bytes"
        )));
    }
    if c.value.len() > MAX_CONFIG_VALUE {
        return Ok(Err(format!(
            "config value exceeds {MAX_CONFIG_VALUE} bytes"
        )));
    }
    if let Err(why) = super::stats::check_config_change(txn, &c.key, &c.value)? {
        return Ok(Err(why));
    }
    let mut table = txn.table(CONFIG_TABLE)?;
    let previous = table
        .insert(c.key.as_bytes(), c.value.as_bytes())?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned());
    Ok(Ok(SetConfigResult { previous }))
}

fn delete_config(txn: &Tx<'_>, c: &DeleteConfig) -> Applied<DeleteConfigResult> {
    let mut table = txn.table(CONFIG_TABLE)?;
    let existed = table.remove(c.key.as_bytes())?.is_some();
    Ok(Ok(DeleteConfigResult { existed }))
}

/// Answers a query from a read transaction.
///
/// # Errors
/// Storage failures.
pub fn query(path: &Path, txn: &ReadTransaction, q: &Query) -> Result<QueryResult, MetaError> {
    let err = |e: redb::Error| storage_err(path, e);
    let kind = match &q.kind {
        Some(query::Kind::GetConfig(g)) => {
            let table = txn.open_table(CONFIG_TABLE).map_err(|e| err(e.into()))?;
            let value = table
                .get(g.key.as_bytes())
                .map_err(|e| err(e.into()))?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            Some(query_result::Kind::GetConfig(GetConfigResult { value }))
        }
        Some(query::Kind::ListConfig(_)) => {
            let entries = dump_table(txn, CONFIG_TABLE).map_err(err)?;
            Some(query_result::Kind::ListConfig(ListConfigResult { entries }))
        }
        None => return Err(MetaError::Invalid("empty query".into())),
    };
    Ok(QueryResult { kind })
}

/// Records a member's address (applied with its conf change).
pub fn put_member(txn: &WriteTransaction, id: u64, addr: &str) -> Result<(), redb::Error> {
    let record = MemberRecord {
        addr: addr.to_string(),
    }
    .encode_to_vec();
    txn.open_table(MEMBERS_TABLE)?
        .insert(id.to_be_bytes().as_slice(), record.as_slice())?;
    Ok(())
}

/// Forgets a removed member.
pub fn remove_member(txn: &WriteTransaction, id: u64) -> Result<(), redb::Error> {
    txn.open_table(MEMBERS_TABLE)?
        .remove(id.to_be_bytes().as_slice())?;
    Ok(())
}

/// Every member's id and address.
pub fn members(path: &Path, txn: &ReadTransaction) -> Result<Vec<(u64, String)>, MetaError> {
    let rows = dump_table(txn, MEMBERS_TABLE).map_err(|e| storage_err(path, e))?;
    rows.into_iter()
        .map(|kv| {
            let id: [u8; 8] = kv.key.as_slice().try_into().map_err(|_| corrupt(path))?;
            let rec = MemberRecord::decode(kv.value.as_slice()).map_err(|_| corrupt(path))?;
            Ok((u64::from_be_bytes(id), rec.addr))
        })
        .collect()
}

fn corrupt(path: &Path) -> MetaError {
    MetaError::Corrupt {
        path: path.to_path_buf(),
        what: "bad member record".into(),
    }
}

fn dump_table(txn: &ReadTransaction, def: SmTable) -> Result<Vec<KeyValue>, redb::Error> {
    let table = txn.open_table(def)?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        out.push(KeyValue {
            key: k.value().to_vec(),
            value: v.value().to_vec(),
        });
    }
    Ok(out)
}

/// Exports every state machine table (the payload of a Raft snapshot).
///
/// # Errors
/// Storage failures.
pub fn export(txn: &ReadTransaction) -> Result<SnapshotData, redb::Error> {
    let mut tables = Vec::with_capacity(SM_TABLES.len());
    for def in SM_TABLES {
        tables.push(TableDump {
            name: redb::TableHandle::name(def).to_string(),
            entries: dump_table(txn, *def)?,
        });
    }
    Ok(SnapshotData {
        version: SNAPSHOT_VERSION,
        tables,
    })
}

/// Replaces every state machine table by the snapshot's contents.
///
/// # Errors
/// [`MetaError::UnsupportedVersion`] or [`MetaError::Decode`] for a snapshot
/// this build cannot read (nothing is changed then), storage failures.
pub fn import(path: &Path, txn: &WriteTransaction, data: &SnapshotData) -> Result<(), MetaError> {
    if data.version != SNAPSHOT_VERSION {
        return Err(MetaError::UnsupportedVersion {
            what: "snapshot",
            version: data.version,
            supported: SNAPSHOT_VERSION,
        });
    }
    for dump in &data.tables {
        if !SM_TABLES
            .iter()
            .any(|d| redb::TableHandle::name(d) == dump.name)
        {
            return Err(MetaError::Decode {
                what: "snapshot",
                reason: format!("unknown table {}", dump.name),
            });
        }
    }
    let err = |e: redb::Error| storage_err(path, e);
    let tx = Tx::new(txn);
    for def in SM_TABLES {
        let mut table = tx.table(*def).map_err(|e| err(e.into()))?;
        table.retain(|_, _| false).map_err(|e| err(e.into()))?;
        let name = redb::TableHandle::name(def);
        for dump in data.tables.iter().filter(|d| d.name == name) {
            for kv in &dump.entries {
                table
                    .insert(kv.key.as_slice(), kv.value.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
        }
    }
    // A snapshot of a build that did not keep some derived tables.
    rebuild_in(path, &tx, |name| data.tables.iter().any(|d| d.name == name))
}

/// Recounts the derived tables (tenant usage; waiting subtasks and step
/// counts) that `present` says a database or snapshot of an older build
/// lacks, from the rows they count.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn rebuild_missing(
    path: &Path,
    txn: &WriteTransaction,
    present: impl Fn(&str) -> bool,
) -> Result<(), MetaError> {
    rebuild_in(path, &Tx::new(txn), present)
}

fn rebuild_in(path: &Path, txn: &Tx<'_>, present: impl Fn(&str) -> bool) -> Result<(), MetaError> {
    let has = |def: &SmTable| present(redb::TableHandle::name(def));
    if !has(&records::TENANT_USAGE_TABLE) {
        rebuilt(path, tenants::rebuild_usage(txn))?;
    }
    if !has(&records::STEP_COUNTS_TABLE) || !has(&records::SUBTASKS_WAITING_TABLE) {
        rebuilt(path, subtasks::rebuild_subtask_tables(txn))?;
    }
    Ok(())
}

fn rebuilt(path: &Path, result: Result<(), ApplyError>) -> Result<(), MetaError> {
    match result {
        Ok(()) => Ok(()),
        Err(ApplyError::Storage(e)) => Err(storage_err(path, e)),
        Err(ApplyError::Rejected(why)) => Err(MetaError::Corrupt {
            path: path.to_path_buf(),
            what: why.to_string(),
        }),
    }
}

/// A SHA-256 digest of every state machine table, equal on two nodes exactly
/// when their replicated state is equal.
///
/// # Errors
/// Storage failures.
pub fn digest(txn: &ReadTransaction) -> Result<[u8; 32], redb::Error> {
    let mut hasher = Sha256::new();
    for def in SM_TABLES {
        let name = redb::TableHandle::name(def);
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        for kv in dump_table(txn, *def)? {
            hasher.update((kv.key.len() as u64).to_be_bytes());
            hasher.update(&kv.key);
            hasher.update((kv.value.len() as u64).to_be_bytes());
            hasher.update(&kv.value);
        }
    }
    Ok(hasher.finalize().into())
}
