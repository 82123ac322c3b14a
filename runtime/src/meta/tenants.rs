//! Tenants and their API tokens: creation, weight and quota changes, token
//! creation and revocation. Tokens are stored as their sha256 only. And
//! what the quotas check: each tenant's usage (unfinished tasks, module
//! bytes), kept up to date by the commands that change it.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::tx::Tx;
use stoker_proto::meta::{
    CreateTenant, CreateToken, Done, ModuleRecord, RevokeToken, SetTenant, TaskRecord,
    TenantRecord, TenantUsage, TokenRecord,
};

use super::records::{
    get, get_tenant, get_token, id_of_rank_key, invalid, put, task_key, Applied, Rejection,
    MODULES_TABLE, TASKS_TABLE, TENANTS_TABLE, TENANT_USAGE_TABLE, TOKENS_TABLE, UNFINISHED_TABLE,
};
use stoker_proto::Message;

/// Longest tenant id and token id.
pub const MAX_ID: usize = 64;
/// Longest tenant name and token description.
const MAX_TEXT: usize = 256;
/// Largest tenant weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// Whether `id` may name a tenant or a token: 1..=64 of `[a-z0-9_-]`,
/// starting with a letter or digit. Tenant ids become blob path segments
/// (`tenants/<id>/`) and key prefixes, so nothing else is allowed.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_id(what: &str, id: &str) -> Applied<()> {
    if valid_id(id) {
        Ok(())
    } else {
        invalid(format!(
            "{what} id {id:?} must be 1..={MAX_ID} characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        ))
    }
}

fn check_weight(w: u32) -> Applied<()> {
    if w > MAX_WEIGHT {
        return invalid(format!("tenant weight must be at most {MAX_WEIGHT}"));
    }
    Ok(())
}

pub(crate) fn create_tenant(txn: &Tx<'_>, c: &CreateTenant) -> Applied<Done> {
    check_id("tenant", &c.id)?;
    if c.name.len() > MAX_TEXT {
        return invalid(format!("tenant name must be at most {MAX_TEXT} bytes"));
    }
    check_weight(c.weight)?;
    if get_tenant(txn, &c.id)?.is_some() {
        return invalid(format!("tenant {} already exists", c.id));
    }
    let record = TenantRecord {
        id: c.id.clone(),
        name: if c.name.is_empty() {
            c.id.clone()
        } else {
            c.name.clone()
        },
        weight: c.weight.max(1),
        quota: c.quota,
        create_time_ms: c.time_ms,
    };
    put(txn, TENANTS_TABLE, c.id.as_bytes(), &record)?;
    Ok(Done {})
}

fn tenant_or_not_found(txn: &Tx<'_>, id: &str) -> Applied<TenantRecord> {
    get_tenant(txn, id)?.ok_or_else(|| {
        Rejection::NotFound {
            what: "tenant",
            id: id.to_string(),
        }
        .into()
    })
}

pub(crate) fn set_tenant(txn: &Tx<'_>, c: &SetTenant) -> Applied<Done> {
    let mut record = tenant_or_not_found(txn, &c.id)?;
    if let Some(w) = c.weight {
        check_weight(w)?;
        record.weight = w.max(1);
    }
    if let Some(q) = c.quota {
        record.quota = Some(q);
    }
    put(txn, TENANTS_TABLE, c.id.as_bytes(), &record)?;
    Ok(Done {})
}

pub(crate) fn create_token(txn: &Tx<'_>, c: &CreateToken) -> Applied<Done> {
    check_id("token", &c.id)?;
    tenant_or_not_found(txn, &c.tenant)?;
    if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return invalid("token sha256 must be 64 hex digits");
    }
    if c.description.len() > MAX_TEXT {
        return invalid(format!(
            "token description must be at most {MAX_TEXT} bytes"
        ));
    }
    if get_token(txn, &c.id)?.is_some() {
        return invalid(format!("token {} already exists", c.id));
    }
    let record = TokenRecord {
        id: c.id.clone(),
        tenant: c.tenant.clone(),
        sha256: c.sha256.to_ascii_lowercase(),
        create_time_ms: c.time_ms,
        description: c.description.clone(),
    };
    put(txn, TOKENS_TABLE, c.id.as_bytes(), &record)?;
    Ok(Done {})
}

pub(crate) fn revoke_token(txn: &Tx<'_>, c: &RevokeToken) -> Applied<Done> {
    let not_found = || -> Applied<Done> {
        Err(Rejection::NotFound {
            what: "token",
            id: c.id.clone(),
        }
        .into())
    };
    // Another tenant's token is answered exactly like a missing one.
    match get_token(txn, &c.id)? {
        Some(t) if c.tenant.is_empty() || t.tenant == c.tenant => {}
        _ => return not_found(),
    }
    txn.table(TOKENS_TABLE)?.remove(c.id.as_bytes())?;
    Ok(Done {})
}

/// A tenant's quota (all zero, i.e. unlimited, when it has none or the
/// tenant has no record yet, like the implicit default tenant).
pub(crate) fn quota_of(txn: &Tx<'_>, tenant: &str) -> Applied<stoker_proto::meta::TenantQuota> {
    Ok(get_tenant(txn, tenant)?
        .and_then(|t| t.quota)
        .unwrap_or_default())
}

/// What `tenant` uses of its count quotas (unfinished tasks, module
/// bytes): one read, whatever the number of its tasks and modules.
pub(crate) fn usage_of(txn: &Tx<'_>, tenant: &str) -> Applied<TenantUsage> {
    Ok(get(txn, TENANT_USAGE_TABLE, tenant.as_bytes())?.unwrap_or_default())
}

/// Changes `tenant`'s usage row by `f`. Called in the write phase of the
/// command that changes the counted rows, after it validated; a usage of
/// nothing leaves no row (as [`rebuild_usage`] would).
fn change_usage(txn: &Tx<'_>, tenant: &str, f: impl FnOnce(&mut TenantUsage)) -> Applied<()> {
    let mut usage = usage_of(txn, tenant)?;
    f(&mut usage);
    if usage == TenantUsage::default() {
        txn.table(TENANT_USAGE_TABLE)?.remove(tenant.as_bytes())?;
        Ok(())
    } else {
        put(txn, TENANT_USAGE_TABLE, tenant.as_bytes(), &usage)
    }
}

/// A task of `tenant` entered (`true`) or left (`false`) the unfinished
/// index.
pub(crate) fn count_unfinished(txn: &Tx<'_>, tenant: &str, entered: bool) -> Applied<()> {
    change_usage(txn, tenant, |u| {
        u.unfinished_tasks = if entered {
            u.unfinished_tasks + 1
        } else {
            u.unfinished_tasks.saturating_sub(1)
        };
    })
}

/// A module record of `size` bytes of `tenant` was stored (`true`) or
/// deleted (`false`).
pub(crate) fn count_module(txn: &Tx<'_>, tenant: &str, size: u64, stored: bool) -> Applied<()> {
    change_usage(txn, tenant, |u| {
        u.module_bytes = if stored {
            u.module_bytes + size
        } else {
            u.module_bytes.saturating_sub(size)
        };
    })
}

/// Every tenant's usage counted from the rows themselves: the unfinished
/// index and the module records. What [`TENANT_USAGE_TABLE`] must hold.
pub(crate) fn counted_usage(txn: &Tx<'_>) -> Applied<BTreeMap<String, TenantUsage>> {
    let mut out: BTreeMap<String, TenantUsage> = BTreeMap::new();
    let ids: Vec<u64> = {
        let unfinished = txn.table(UNFINISHED_TABLE)?;
        let mut ids = Vec::new();
        for row in unfinished.iter()? {
            ids.extend(id_of_rank_key(row?.0.value()));
        }
        ids
    };
    for id in ids {
        if let Some(task) = get::<TaskRecord>(txn, TASKS_TABLE, &task_key(id))? {
            out.entry(task.tenant).or_default().unfinished_tasks += 1;
        }
    }
    let modules = txn.table(MODULES_TABLE)?;
    for row in modules.iter()? {
        let (k, v) = row?;
        let m = ModuleRecord::decode(v.value()).map_err(|_| Rejection::Corrupt {
            table: "sm_modules".into(),
            key: hex::encode(k.value()),
        })?;
        out.entry(m.tenant).or_default().module_bytes += m.size;
    }
    Ok(out)
}

/// Replaces [`TENANT_USAGE_TABLE`] by [`counted_usage`]: for a snapshot or
/// a database from a build that did not keep it.
pub(crate) fn rebuild_usage(txn: &Tx<'_>) -> Applied<()> {
    let usage = counted_usage(txn)?;
    txn.table(TENANT_USAGE_TABLE)?.retain(|_, _| false)?;
    for (tenant, u) in &usage {
        put(txn, TENANT_USAGE_TABLE, tenant.as_bytes(), u)?;
    }
    Ok(())
}

/// A [`Rejection::Quota`] when `asked` exceeds a non-zero `limit`.
pub(crate) fn within(
    tenant: &str,
    quota: &'static str,
    limit: u64,
    asked: u64,
    detail: impl FnOnce() -> String,
) -> Applied<()> {
    if limit != 0 && asked > limit {
        return Err(Rejection::Quota {
            tenant: tenant.to_string(),
            quota,
            limit,
            detail: detail(),
        }
        .into());
    }
    Ok(())
}
