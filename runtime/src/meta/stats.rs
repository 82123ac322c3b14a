//! Aggregates kept for observability: fuel used per tenant (updated by
//! every `ReportSubtask`), and the reads that metrics and the dashboard
//! make of the replicated state (counts by state, config by prefix).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{ReadTransaction, ReadableTable};

use super::tx::Tx;
use stoker_proto::meta::{SubtaskRecord, TaskRecord};
use stoker_proto::Message;

use super::error::storage_err;
use super::records::{Applied, DEFAULT_TENANT, SUBTASKS_TABLE, TASKS_TABLE};
use super::state_machine::{SmTable, CONFIG_TABLE};
use super::MetaError;

/// Fuel used per tenant, summed over every reported subtask run:
/// UTF-8 tenant id → big-endian u64.
pub const TENANT_FUEL_TABLE: SmTable = redb::TableDefinition::new("sm_tenant_fuel");

/// Adds `fuel` to `tenant`'s total (saturating; an empty tenant is the
/// default one).
pub(crate) fn add_tenant_fuel(txn: &Tx<'_>, tenant: &str, fuel: u64) -> Applied<()> {
    if fuel == 0 {
        return Ok(());
    }
    let tenant = if tenant.is_empty() {
        DEFAULT_TENANT
    } else {
        tenant
    };
    let mut table = txn.table(TENANT_FUEL_TABLE)?;
    let before = table
        .get(tenant.as_bytes())?
        .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0);
    table.insert(
        tenant.as_bytes(),
        before.saturating_add(fuel).to_be_bytes().as_slice(),
    )?;
    Ok(())
}

/// Fuel used by each tenant, by tenant id.
///
/// # Errors
/// Storage failures, a value that is not 8 bytes.
pub fn tenant_fuel(path: &Path, txn: &ReadTransaction) -> Result<BTreeMap<String, u64>, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let table = txn
        .open_table(TENANT_FUEL_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let mut out = BTreeMap::new();
    for row in table.iter().map_err(err)? {
        let (k, v) = row.map_err(err)?;
        let fuel =
            v.value()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| MetaError::Corrupt {
                    path: path.to_path_buf(),
                    what: "bad tenant fuel value".into(),
                })?;
        out.insert(String::from_utf8_lossy(k.value()).into_owned(), fuel);
    }
    Ok(out)
}

/// The cluster config entries whose key starts with `prefix`.
///
/// # Errors
/// Storage failures.
pub fn config_with_prefix(
    path: &Path,
    txn: &ReadTransaction,
    prefix: &str,
) -> Result<BTreeMap<String, String>, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let table = txn
        .open_table(CONFIG_TABLE)
        .map_err(|e| storage_err(path, e))?;
    let mut out = BTreeMap::new();
    for row in table.range(prefix.as_bytes()..).map_err(err)? {
        let (k, v) = row.map_err(err)?;
        let key = String::from_utf8_lossy(k.value()).into_owned();
        if !key.starts_with(prefix) {
            break;
        }
        out.insert(key, String::from_utf8_lossy(v.value()).into_owned());
    }
    Ok(out)
}

/// Counts of the replicated state by state name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Tasks (finished ones too, until history is collected) by
    /// (tenant, state).
    pub tasks: BTreeMap<(String, String), u64>,
    /// Subtasks of every stored task by (tenant, state).
    pub subtasks: BTreeMap<(String, String), u64>,
    /// Fuel used by the stored tasks, by tenant.
    pub task_fuel: BTreeMap<String, u64>,
}

/// Counts every stored task and subtask by tenant and state. It reads the
/// task and subtask tables whole, so callers cache it per applied index.
///
/// # Errors
/// Storage failures, an undecodable record.
pub fn state_counts(path: &Path, txn: &ReadTransaction) -> Result<StateCounts, MetaError> {
    let err = |e: redb::StorageError| storage_err(path, e);
    let bad = |table: &str| MetaError::Corrupt {
        path: path.to_path_buf(),
        what: format!("bad record in {table}"),
    };
    let mut out = StateCounts::default();
    let mut tenants: BTreeMap<u64, String> = BTreeMap::new();
    let tasks = txn
        .open_table(TASKS_TABLE)
        .map_err(|e| storage_err(path, e))?;
    for row in tasks.iter().map_err(err)? {
        let (_, v) = row.map_err(err)?;
        let t = TaskRecord::decode(v.value()).map_err(|_| bad("sm_tasks"))?;
        *out.tasks.entry((t.tenant.clone(), t.state)).or_default() += 1;
        *out.task_fuel.entry(t.tenant.clone()).or_default() += t.fuel_used;
        tenants.insert(t.id, t.tenant);
    }
    let subtasks = txn
        .open_table(SUBTASKS_TABLE)
        .map_err(|e| storage_err(path, e))?;
    for row in subtasks.iter().map_err(err)? {
        let (_, v) = row.map_err(err)?;
        let s = SubtaskRecord::decode(v.value()).map_err(|_| bad("sm_subtasks"))?;
        let tenant = tenants.get(&s.task_id).cloned().unwrap_or_default();
        *out.subtasks.entry((tenant, s.state)).or_default() += 1;
    }
    Ok(out)
}

/// Checks a `SetConfig` of a `resource.*` key against the other resource
/// keys (see [`crate::resource::settings`]); other keys pass. The outer
/// error is a storage failure, the inner one the rejection.
pub(crate) fn check_config_change(
    txn: &Tx<'_>,
    key: &str,
    value: &str,
) -> Result<Result<(), String>, redb::Error> {
    use crate::resource::settings::{check_change, RESOURCE_CONFIG_PREFIX};
    if !key.starts_with(RESOURCE_CONFIG_PREFIX) {
        return Ok(Ok(()));
    }
    let table = txn.table(CONFIG_TABLE)?;
    let mut current = BTreeMap::new();
    for row in table.range(RESOURCE_CONFIG_PREFIX.as_bytes()..)? {
        let (k, v) = row?;
        let k = String::from_utf8_lossy(k.value()).into_owned();
        if !k.starts_with(RESOURCE_CONFIG_PREFIX) {
            break;
        }
        current.insert(k, String::from_utf8_lossy(v.value()).into_owned());
    }
    Ok(check_change(&current, key, Some(value)).map_err(|e| e.to_string()))
}
