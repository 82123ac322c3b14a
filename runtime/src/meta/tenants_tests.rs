//! Tenants, tokens and quotas applied to a real state machine: validation,
//! isolation of modules between tenants, every quota's rejection, and the
//! usage counts the quotas read.

use std::collections::BTreeMap;

use redb::ReadableTable;
use stoker_proto::meta::{
    command_result, CommitModule, CreateTenant, CreateToken, DeleteModule, FinishTask, GcHistory,
    PutModuleChunk, RevokeToken, SetTenant, SubmitTask, TenantQuota, TenantUsage,
};
use stoker_proto::Message;

use super::model_tests::{hash_of, submit_spec, Sm, C};
use super::records::TENANT_USAGE_TABLE;
use super::tx::Tx;
use super::{queries, state_machine, tenants};

fn tenant(sm: &mut Sm, id: &str, quota: TenantQuota) {
    sm.ok(C::CreateTenant(CreateTenant {
        id: id.into(),
        weight: 2,
        quota: Some(quota),
        time_ms: 5,
        ..CreateTenant::default()
    }));
}

fn upload_as(sm: &mut Sm, tenant: &str, bytes: &[u8]) -> Result<String, String> {
    let hash = hash_of(bytes);
    sm.ok(C::PutModuleChunk(PutModuleChunk {
        hash: hash.clone(),
        index: 0,
        data: bytes.to_vec(),
        time_ms: 0,
    }));
    let r = sm.apply(C::CommitModule(CommitModule {
        hash: hash.clone(),
        tenant: tenant.into(),
        name: "m".into(),
        chunks: 1,
        ..CommitModule::default()
    }));
    if r.error.is_empty() {
        Ok(hash)
    } else {
        Err(r.error)
    }
}

fn submit_as(
    sm: &mut Sm,
    tenant: &str,
    hash: &str,
    f: impl FnOnce(&mut SubmitTask),
) -> Result<u64, String> {
    let mut spec = submit_spec(hash, 0, 10);
    spec.tenant = tenant.into();
    f(&mut spec);
    let r = sm.apply(C::SubmitTask(spec));
    match r.kind {
        Some(command_result::Kind::SubmitTask(s)) => Ok(s.id),
        _ => Err(r.error),
    }
}

#[test]
fn tenant_ids_are_checked_and_weights_default_to_one() {
    let mut sm = Sm::new();
    for bad in ["", "A", "a/b", "..", "-x", &"x".repeat(65), "a\0b"] {
        let e = sm.rejected(C::CreateTenant(CreateTenant {
            id: bad.into(),
            ..CreateTenant::default()
        }));
        assert!(e.contains("tenant id"), "{bad:?}: {e}");
    }
    sm.ok(C::CreateTenant(CreateTenant {
        id: "acme".into(),
        ..CreateTenant::default()
    }));
    let t = sm.read(|p, t| queries::tenant(p, t, "acme")).unwrap();
    assert_eq!((t.weight, t.name.as_str()), (1, "acme"));
    let e = sm.rejected(C::SetTenant(SetTenant {
        id: "nope".into(),
        weight: Some(3),
        quota: None,
    }));
    assert_eq!(e, "tenant nope not found");
    sm.ok(C::SetTenant(SetTenant {
        id: "acme".into(),
        weight: Some(3),
        quota: Some(TenantQuota {
            max_slots: 4,
            ..TenantQuota::default()
        }),
    }));
    let t = sm.read(|p, t| queries::tenant(p, t, "acme")).unwrap();
    assert_eq!((t.weight, t.quota.unwrap().max_slots), (3, 4));
}

#[test]
fn tokens_are_kept_hashed_and_revoked_only_by_their_tenant_or_the_admin() {
    let mut sm = Sm::new();
    tenant(&mut sm, "a", TenantQuota::default());
    tenant(&mut sm, "b", TenantQuota::default());
    let sha = hash_of(b"stk_t1_secret");
    let token = |id: &str, tenant: &str| {
        C::CreateToken(CreateToken {
            id: id.into(),
            tenant: tenant.into(),
            sha256: sha.clone(),
            time_ms: 1,
            description: String::new(),
        })
    };
    sm.ok(token("t1", "a"));
    assert!(sm.rejected(token("t1", "a")).contains("already exists"));
    assert!(sm
        .rejected(token("t2", "zz"))
        .contains("tenant zz not found"));
    let rec = sm.read(|p, t| queries::token(p, t, "t1")).unwrap();
    assert_eq!(
        (rec.tenant.as_str(), rec.sha256.as_str()),
        ("a", sha.as_str())
    );
    // Tenant b cannot revoke a's token, and is told it does not exist.
    let e = sm.rejected(C::RevokeToken(RevokeToken {
        id: "t1".into(),
        tenant: "b".into(),
    }));
    assert_eq!(e, "token t1 not found");
    sm.ok(C::RevokeToken(RevokeToken {
        id: "t1".into(),
        tenant: "a".into(),
    }));
    assert!(sm.read(|p, t| queries::token(p, t, "t1")).is_none());
    sm.ok(token("t3", "b"));
    sm.ok(C::RevokeToken(RevokeToken {
        id: "t3".into(),
        tenant: String::new(),
    }));
}

#[test]
fn modules_are_per_tenant_and_shared_bytes_outlive_one_deletion() {
    let mut sm = Sm::new();
    tenant(&mut sm, "a", TenantQuota::default());
    tenant(&mut sm, "b", TenantQuota::default());
    let hash = upload_as(&mut sm, "a", b"module bytes").unwrap();
    // b cannot use a's module, whether by hash or by name.
    let e = submit_as(&mut sm, "b", &hash, |_| {}).unwrap_err();
    assert!(e.contains("not found"), "{e}");
    assert!(sm
        .read(|p, t| queries::find_module(p, t, Some("b"), "m", ""))
        .is_none());
    // The same bytes uploaded by b: its own record, the bytes stored once.
    assert_eq!(upload_as(&mut sm, "b", b"module bytes").unwrap(), hash);
    assert_eq!(sm.read(|p, t| queries::modules(p, t, None)).len(), 2);
    assert_eq!(sm.read(|p, t| queries::modules(p, t, Some("b"))).len(), 1);
    submit_as(&mut sm, "b", &hash, |_| {}).unwrap();
    sm.ok(C::DeleteModule(DeleteModule {
        hash: hash.clone(),
        tenant: "a".into(),
    }));
    assert_eq!(
        sm.read(|p, t| queries::module_bytes(p, t, &hash)),
        Some(b"module bytes".to_vec()),
        "b still has it"
    );
    assert!(sm.read(|p, t| queries::module(p, t, "a", &hash)).is_none());
}

#[test]
fn every_quota_rejects_with_its_name() {
    let mut sm = Sm::new();
    tenant(
        &mut sm,
        "q",
        TenantQuota {
            max_fuel_per_subtask: 1000,
            max_memory_bytes: 1 << 20,
            max_module_bytes: 20,
            max_queued_tasks: 2,
            ..TenantQuota::default()
        },
    );
    let hash = upload_as(&mut sm, "q", b"0123456789").unwrap();
    let e = upload_as(&mut sm, "q", b"abcdefghijk").unwrap_err();
    assert!(
        e.starts_with("quota exceeded") && e.contains("max_module_bytes"),
        "{e}"
    );
    let e = submit_as(&mut sm, "q", &hash, |s| s.fuel_limit = 1001).unwrap_err();
    assert!(e.contains("max_fuel_per_subtask"), "{e}");
    let e = submit_as(&mut sm, "q", &hash, |s| s.memory_limit = 2 << 20).unwrap_err();
    assert!(e.contains("max_memory_bytes"), "{e}");
    // A task that asks for nothing gets the caps.
    let id = submit_as(&mut sm, "q", &hash, |_| {}).unwrap();
    let t = sm.task(id);
    assert_eq!((t.fuel_limit, t.memory_limit), (1000, 1 << 20));
    submit_as(&mut sm, "q", &hash, |s| s.fuel_limit = 10).unwrap();
    let e = submit_as(&mut sm, "q", &hash, |_| {}).unwrap_err();
    assert!(
        e.contains("max_queued_tasks") && e.contains("2 unfinished"),
        "{e}"
    );
}

/// Every tenant's usage as kept in the table.
fn usage(sm: &Sm) -> BTreeMap<String, TenantUsage> {
    let txn = sm.s.read().unwrap();
    let table = txn.open_table(TENANT_USAGE_TABLE).unwrap();
    table
        .iter()
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            let tenant = String::from_utf8(k.value().to_vec()).unwrap();
            (tenant, TenantUsage::decode(v.value()).unwrap())
        })
        .collect()
}

/// Every tenant's usage counted from the rows.
fn counted(sm: &Sm) -> BTreeMap<String, TenantUsage> {
    let tx = sm.s.begin_apply().unwrap();
    let counted = tenants::counted_usage(&Tx::new(tx.txn()))
        .map_err(|_| "count")
        .unwrap();
    drop(tx);
    counted
}

fn used(unfinished_tasks: u64, module_bytes: u64) -> TenantUsage {
    TenantUsage {
        unfinished_tasks,
        module_bytes,
    }
}

#[track_caller]
fn assert_usage(sm: &Sm, want: &[(&str, TenantUsage)]) {
    let want: BTreeMap<String, TenantUsage> =
        want.iter().map(|(t, u)| (t.to_string(), *u)).collect();
    assert_eq!(usage(sm), want);
    assert_eq!(counted(sm), want, "the rows say the same");
}

fn finish(sm: &mut Sm, id: u64, time_ms: u64) {
    sm.ok(C::FinishTask(FinishTask {
        id,
        state: "failed".into(),
        error: "cannot run".into(),
        time_ms,
        ..FinishTask::default()
    }));
}

#[test]
fn usage_counts_follow_submits_finishes_collections_and_modules() {
    let mut sm = Sm::new();
    tenant(&mut sm, "a", TenantQuota::default());
    tenant(&mut sm, "b", TenantQuota::default());
    assert_usage(&sm, &[]);
    let shared = upload_as(&mut sm, "a", b"0123456789").unwrap();
    let own = upload_as(&mut sm, "a", &[7; 20]).unwrap();
    // b's record of bytes a stored already counts for b too.
    assert_eq!(upload_as(&mut sm, "b", b"0123456789").unwrap(), shared);
    // Uploading what it has again changes nothing.
    upload_as(&mut sm, "a", &[7; 20]).unwrap();
    assert_usage(&sm, &[("a", used(0, 30)), ("b", used(0, 10))]);

    let a1 = submit_as(&mut sm, "a", &shared, |_| {}).unwrap();
    let a2 = submit_as(&mut sm, "a", &own, |_| {}).unwrap();
    let b1 = submit_as(&mut sm, "b", &shared, |_| {}).unwrap();
    assert_usage(&sm, &[("a", used(2, 30)), ("b", used(1, 10))]);
    // A rejected submit or finish counts nothing (and writes nothing).
    sm.rejected(C::SubmitTask(SubmitTask {
        tenant: "a".into(),
        concurrency: 0,
        ..submit_spec(&shared, 0, 11)
    }));
    sm.rejected(C::FinishTask(FinishTask {
        id: a1,
        state: "running".into(),
        ..FinishTask::default()
    }));
    finish(&mut sm, a1, 100);
    assert_usage(&sm, &[("a", used(1, 30)), ("b", used(1, 10))]);
    // A module an unfinished task uses stays, and stays counted.
    let e = sm.rejected(C::DeleteModule(DeleteModule {
        hash: own.clone(),
        tenant: "a".into(),
    }));
    assert!(e.contains("used by unfinished task"), "{e}");
    finish(&mut sm, a2, 200);
    finish(&mut sm, b1, 300);
    assert_usage(&sm, &[("a", used(0, 30)), ("b", used(0, 10))]);
    // Collecting history deletes finished tasks only: no usage changes.
    let c = sm.ok(C::GcHistory(GcHistory {
        before_ms: 250,
        limit: 0,
    }));
    assert_eq!(
        c,
        command_result::Kind::Count(stoker_proto::meta::CountResult { count: 2 })
    );
    let b2 = submit_as(&mut sm, "b", &shared, |_| {}).unwrap();
    assert_usage(&sm, &[("a", used(0, 30)), ("b", used(1, 10))]);
    sm.ok(C::DeleteModule(DeleteModule {
        hash: own,
        tenant: "a".into(),
    }));
    sm.ok(C::DeleteModule(DeleteModule {
        hash: shared.clone(),
        tenant: "a".into(),
    }));
    // A tenant using nothing has no row.
    assert_usage(&sm, &[("b", used(1, 10))]);
    finish(&mut sm, b2, 400);
    sm.ok(C::DeleteModule(DeleteModule {
        hash: shared,
        tenant: "b".into(),
    }));
    assert_usage(&sm, &[]);
}

#[test]
fn quotas_read_the_counts_and_free_up_as_tasks_finish_and_modules_go() {
    let mut sm = Sm::new();
    tenant(
        &mut sm,
        "q",
        TenantQuota {
            max_module_bytes: 20,
            max_queued_tasks: 2,
            ..TenantQuota::default()
        },
    );
    let hash = upload_as(&mut sm, "q", b"0123456789").unwrap();
    let spare = upload_as(&mut sm, "q", b"9876543210").unwrap();
    assert!(upload_as(&mut sm, "q", b"x")
        .unwrap_err()
        .contains("max_module_bytes"));
    sm.ok(C::DeleteModule(DeleteModule {
        hash: spare,
        tenant: "q".into(),
    }));
    upload_as(&mut sm, "q", b"abcde").unwrap();
    let first = submit_as(&mut sm, "q", &hash, |_| {}).unwrap();
    submit_as(&mut sm, "q", &hash, |_| {}).unwrap();
    let e = submit_as(&mut sm, "q", &hash, |_| {}).unwrap_err();
    assert!(
        e.contains("max_queued_tasks") && e.contains("2 unfinished"),
        "{e}"
    );
    finish(&mut sm, first, 10);
    submit_as(&mut sm, "q", &hash, |_| {}).unwrap();
    assert_usage(&sm, &[("q", used(2, 15))]);
}

#[test]
fn usage_counts_come_back_from_snapshots_and_older_databases() {
    let mut sm = Sm::new();
    tenant(&mut sm, "a", TenantQuota::default());
    let hash = upload_as(&mut sm, "a", b"0123456789").unwrap();
    let id = submit_as(&mut sm, "a", &hash, |_| {}).unwrap();
    submit_as(&mut sm, "a", &hash, |_| {}).unwrap();
    finish(&mut sm, id, 5);
    let want = [("a", used(1, 10))];
    assert_usage(&sm, &want);
    let data = state_machine::export(&sm.s.read().unwrap()).unwrap();

    // A snapshot carries them.
    let b = Sm::new();
    let tx = b.s.begin_apply().unwrap();
    state_machine::import(tx.path(), tx.txn(), &data).unwrap();
    tx.commit().unwrap();
    assert_usage(&b, &want);
    assert_eq!(b.s.digest().unwrap(), sm.s.digest().unwrap());

    // A snapshot without them (an older build's) gets them counted.
    let mut old = data.clone();
    old.tables.retain(|t| t.name != "sm_tenant_usage");
    assert_eq!(old.tables.len() + 1, data.tables.len());
    let c = Sm::new();
    let tx = c.s.begin_apply().unwrap();
    state_machine::import(tx.path(), tx.txn(), &old).unwrap();
    tx.commit().unwrap();
    assert_usage(&c, &want);
    assert_eq!(c.s.digest().unwrap(), sm.s.digest().unwrap());

    // A database without the table (an older build's) gets it at open.
    // (These commands were applied without a Raft log: the applied index
    // goes back to 0 so that opening finds it consistent with the log.)
    let mut tx = sm.s.begin_apply().unwrap();
    assert!(tx.txn().delete_table(TENANT_USAGE_TABLE).unwrap());
    tx.set_applied(0, 0);
    tx.commit().unwrap();
    let sm = sm.reopen();
    assert_usage(&sm, &want);
    assert_eq!(sm.s.digest().unwrap(), b.s.digest().unwrap());
    // Reopening a database that has it changes nothing.
    let sm = sm.reopen();
    assert_usage(&sm, &want);
}
