//! Tenants, tokens and quotas applied to a real state machine: validation,
//! isolation of modules between tenants, and every quota's rejection.

use stoker_proto::meta::{
    command_result, CommitModule, CreateTenant, CreateToken, DeleteModule, PutModuleChunk,
    RevokeToken, SetTenant, SubmitTask, TenantQuota,
};

use super::model_tests::{hash_of, submit_spec, Sm, C};
use super::queries;

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
