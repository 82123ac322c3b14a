//! Modules: chunked upload staged until a commit that checks the sha256 of
//! the reassembled bytes, and deletion refused while an unfinished task
//! uses the module.

use redb::ReadableTable;

use super::tx::Tx;
use sha2::{Digest, Sha256};
use stoker_proto::meta::{
    CommitModule, CommitModuleResult, CountResult, DeleteModule, Done, ModuleRecord,
    PutModuleChunk, SweepModuleStaging, TaskRecord,
};

use super::nodes::{ensure_tenant, resolve_tenant};
use super::records::{
    chunk_key, get, get_module, id_of_rank_key, invalid, module_key, put, task_key, Applied,
    Rejection, MAX_CHUNK_BYTES, MAX_MODULE_BYTES, MODULES_TABLE, MODULE_CHUNKS_TABLE,
    MODULE_STAGING_TABLE, MODULE_STAGING_TIMES_TABLE, TASKS_TABLE, UNFINISHED_TABLE,
};
use super::tenants::{count_module, quota_of, usage_of, within};

/// Most chunks of one module.
const MAX_CHUNKS: u32 = (MAX_MODULE_BYTES / MAX_CHUNK_BYTES) as u32;
/// Longest module name and tag.
const MAX_NAME: usize = 256;

/// Whether `hash` looks like a lowercase hex sha256.
pub fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_hash(hash: &str) -> Applied<()> {
    if valid_hash(hash) {
        Ok(())
    } else {
        invalid(format!(
            "module hash {hash:?} is not a lowercase hex sha256"
        ))
    }
}

pub(crate) fn put_module_chunk(txn: &Tx<'_>, c: &PutModuleChunk) -> Applied<Done> {
    check_hash(&c.hash)?;
    if c.index >= MAX_CHUNKS {
        return invalid(format!(
            "module chunk index {} is beyond the {MAX_CHUNKS} chunks of a {MAX_MODULE_BYTES}-byte module",
            c.index
        ));
    }
    if c.data.is_empty() || c.data.len() > MAX_CHUNK_BYTES {
        return invalid(format!("module chunk must be 1..={MAX_CHUNK_BYTES} bytes"));
    }
    txn.table(MODULE_STAGING_TABLE)?
        .insert(chunk_key(&c.hash, c.index).as_slice(), c.data.as_slice())?;
    txn.table(MODULE_STAGING_TIMES_TABLE)?
        .insert(c.hash.as_bytes(), c.time_ms.to_be_bytes().as_slice())?;
    Ok(Done {})
}

/// Drops the staged chunks of `hash` and its staging time.
fn drop_staged(txn: &Tx<'_>, hash: &str) -> Applied<()> {
    let keys = staged_keys(txn, hash)?;
    let mut staging = txn.table(MODULE_STAGING_TABLE)?;
    for k in &keys {
        staging.remove(k.as_slice())?;
    }
    txn.table(MODULE_STAGING_TIMES_TABLE)?
        .remove(hash.as_bytes())?;
    Ok(())
}

/// Sweeps uploads abandoned before `before_ms`; counts them.
pub(crate) fn sweep_module_staging(txn: &Tx<'_>, c: &SweepModuleStaging) -> Applied<CountResult> {
    let mut stale = Vec::new();
    for row in txn.table(MODULE_STAGING_TIMES_TABLE)?.iter()? {
        let (hash, time) = row?;
        if super::records::staging_time(time.value()) < c.before_ms {
            stale.push(String::from_utf8_lossy(hash.value()).into_owned());
        }
    }
    for hash in &stale {
        drop_staged(txn, hash)?;
    }
    Ok(CountResult {
        count: stale.len() as u64,
    })
}

/// The staged chunk keys of `hash`, in index order.
fn staged_keys(txn: &Tx<'_>, hash: &str) -> Applied<Vec<Vec<u8>>> {
    let table = txn.table(MODULE_STAGING_TABLE)?;
    let start = chunk_key(hash, 0);
    let end = chunk_key(hash, u32::MAX);
    let mut keys = Vec::new();
    for row in table.range(start.as_slice()..=end.as_slice())? {
        keys.push(row?.0.value().to_vec());
    }
    Ok(keys)
}

pub(crate) fn commit_module(txn: &Tx<'_>, c: &CommitModule) -> Applied<CommitModuleResult> {
    check_hash(&c.hash)?;
    if c.name.is_empty() || c.name.len() > MAX_NAME || c.tag.len() > MAX_NAME {
        return invalid(format!(
            "module name must be 1..={MAX_NAME} bytes and its tag at most {MAX_NAME}"
        ));
    }
    let tenant = resolve_tenant(txn, &c.tenant)?;
    if get_module(txn, &tenant, &c.hash)?.is_some() {
        return Ok(CommitModuleResult { created: false });
    }
    if let Some(size) = committed_size(txn, &c.hash)? {
        // Another tenant stored these bytes already: this tenant gets its
        // own record of them; what it staged is dropped.
        check_module_quota(txn, &tenant, size)?;
        drop_staged(txn, &c.hash)?;
        ensure_tenant(txn, &tenant)?;
        let record = ModuleRecord {
            hash: c.hash.clone(),
            tenant: tenant.clone(),
            name: c.name.clone(),
            tag: c.tag.clone(),
            size,
            abi_version: c.abi_version,
            upload_time_ms: c.upload_time_ms,
            chunks: c.chunks,
        };
        put(txn, MODULES_TABLE, &module_key(&tenant, &c.hash), &record)?;
        count_module(txn, &tenant, size, true)?;
        return Ok(CommitModuleResult { created: true });
    }
    let bad = |why: String| -> Applied<CommitModuleResult> {
        Err(Rejection::BadUpload {
            hash: c.hash.clone(),
            why,
        }
        .into())
    };
    let keys = staged_keys(txn, &c.hash)?;
    let expected: Vec<Vec<u8>> = (0..c.chunks).map(|i| chunk_key(&c.hash, i)).collect();
    if c.chunks == 0 || keys != expected {
        return bad(format!(
            "expected chunks 0..{}, {} are staged",
            c.chunks,
            keys.len()
        ));
    }
    let mut hasher = Sha256::new();
    let mut size = 0usize;
    {
        let staging = txn.table(MODULE_STAGING_TABLE)?;
        for k in &keys {
            let v = staging.get(k.as_slice())?.expect("listed above");
            size += v.value().len();
            hasher.update(v.value());
        }
    }
    if size > MAX_MODULE_BYTES {
        return bad(format!("{size} bytes exceed {MAX_MODULE_BYTES}"));
    }
    let actual = hex::encode(hasher.finalize());
    if actual != c.hash {
        return bad(format!("the bytes hash to {actual}"));
    }
    check_module_quota(txn, &tenant, size as u64)?;
    {
        let mut staging = txn.table(MODULE_STAGING_TABLE)?;
        let mut chunks = txn.table(MODULE_CHUNKS_TABLE)?;
        for k in &keys {
            let data = staging.remove(k.as_slice())?.expect("listed above");
            chunks.insert(k.as_slice(), data.value())?;
        }
    }
    txn.table(MODULE_STAGING_TIMES_TABLE)?
        .remove(c.hash.as_bytes())?;
    ensure_tenant(txn, &tenant)?;
    let record = ModuleRecord {
        hash: c.hash.clone(),
        tenant: tenant.clone(),
        name: c.name.clone(),
        tag: c.tag.clone(),
        size: size as u64,
        abi_version: c.abi_version,
        upload_time_ms: c.upload_time_ms,
        chunks: c.chunks,
    };
    put(txn, MODULES_TABLE, &module_key(&tenant, &c.hash), &record)?;
    count_module(txn, &tenant, size as u64, true)?;
    Ok(CommitModuleResult { created: true })
}

/// The size of bytes with sha256 `hash` when some tenant committed them
/// (their chunks are stored), from the chunks themselves.
fn committed_size(txn: &Tx<'_>, hash: &str) -> Applied<Option<u64>> {
    let table = txn.table(MODULE_CHUNKS_TABLE)?;
    let (start, end) = (chunk_key(hash, 0), chunk_key(hash, u32::MAX));
    let mut size = None;
    for row in table.range(start.as_slice()..=end.as_slice())? {
        *size.get_or_insert(0u64) += row?.1.value().len() as u64;
    }
    Ok(size)
}

/// Whether any tenant still has a module record with `hash`.
fn hash_in_use(txn: &Tx<'_>, hash: &str) -> Applied<bool> {
    let table = txn.table(MODULES_TABLE)?;
    for row in table.iter()? {
        if row?.0.value().ends_with(hash.as_bytes()) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn check_module_quota(txn: &Tx<'_>, tenant: &str, size: u64) -> Applied<()> {
    let quota = quota_of(txn, tenant)?;
    let used = usage_of(txn, tenant)?.module_bytes;
    within(
        tenant,
        "max_module_bytes",
        quota.max_module_bytes,
        used + size,
        || format!("its modules use {used} bytes and this one has {size}"),
    )
}

pub(crate) fn delete_module(txn: &Tx<'_>, c: &DeleteModule) -> Applied<Done> {
    let tenant = resolve_tenant(txn, &c.tenant)?;
    let Some(module) = get_module(txn, &tenant, &c.hash)? else {
        return Err(Rejection::NotFound {
            what: "module",
            id: c.hash.clone(),
        }
        .into());
    };
    let ids: Vec<u64> = {
        let unfinished = txn.table(UNFINISHED_TABLE)?;
        let mut ids = Vec::new();
        for row in unfinished.iter()? {
            ids.extend(id_of_rank_key(row?.0.value()));
        }
        ids
    };
    for id in ids {
        let task: Option<TaskRecord> = get(txn, TASKS_TABLE, &task_key(id))?;
        if task.is_some_and(|t| t.module_hash == c.hash && t.tenant == tenant) {
            return Err(Rejection::ModuleInUse {
                hash: c.hash.clone(),
                task: id,
            }
            .into());
        }
    }
    txn.table(MODULES_TABLE)?
        .remove(module_key(&tenant, &c.hash).as_slice())?;
    count_module(txn, &tenant, module.size, false)?;
    if !hash_in_use(txn, &c.hash)? {
        let mut chunks = txn.table(MODULE_CHUNKS_TABLE)?;
        for i in 0..module.chunks {
            chunks.remove(chunk_key(&c.hash, i).as_slice())?;
        }
    }
    Ok(Done {})
}
