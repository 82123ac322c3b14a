//! Bad input of every kind gets a clear, classified error; the host keeps
//! running and other subtasks are unaffected.

use std::sync::Arc;
use std::time::Duration;

use stoker::blob::BlobStore;
use stoker::sandbox::{
    CallEnv, CallLimits, ErrorKind, Plan, Sandbox, SandboxConfig, SandboxError, TaskModule,
};
use stoker_proto::guest::{PlanRequest, RunRequest};

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig::default()).expect("sandbox")
}

fn misbehave() -> Vec<u8> {
    stoker_test_artifacts::read("misbehave")
}

/// A minimal module in WAT with all the required exports plus `extra`;
/// `marker` is the ABI version marker export.
fn wat_module(marker: &str, extra: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            {extra}
            (memory (export "memory") 1)
            (func (export "{marker}"))
            (func (export "stoker_alloc") (param i32) (result i32) i32.const 1024)
            (func (export "stoker_plan") (param i32 i32) (result i64) i64.const 0)
            (func (export "stoker_run") (param i32 i32) (result i64) i64.const 0)
        )"#
    ))
    .expect("test WAT parses")
}

fn limits() -> CallLimits {
    CallLimits {
        fuel: 200_000_000,
        memory_bytes: 32 << 20,
        deadline: Duration::from_secs(20),
        ..CallLimits::default()
    }
}

async fn run_payload(
    sandbox: &Sandbox,
    module: &TaskModule,
    payload: &str,
    limits: CallLimits,
) -> Result<Vec<u8>, SandboxError> {
    let env = CallEnv {
        limits,
        blobs: None,
        gate: None,
    };
    let request = RunRequest {
        payload: payload.as_bytes().to_vec(),
        attempt: 1,
        task_id: "t".into(),
        ..RunRequest::default()
    };
    sandbox.run(module, &env, &request).await.result
}

/// After a failure the same sandbox still runs a healthy subtask.
async fn assert_still_healthy(sandbox: &Sandbox, module: &TaskModule) {
    let out = run_payload(sandbox, module, "ok", limits())
        .await
        .expect("healthy call succeeds");
    assert_eq!(out, b"ok");
}

async fn expect_kind(payload: &str, limits: CallLimits, kind: ErrorKind) -> SandboxError {
    let sandbox = sandbox();
    let module = sandbox.load(&misbehave()).await.expect("misbehave loads");
    let err = run_payload(&sandbox, &module, payload, limits)
        .await
        .expect_err("call must fail");
    assert_eq!(err.kind, kind, "payload {payload:?}: {err}");
    assert_still_healthy(&sandbox, &module).await;
    err
}

#[tokio::test]
async fn not_wasm_at_all() {
    let err = sandbox()
        .load(b"this is not a wasm module")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidModule);
    assert!(err.message.contains("not a WebAssembly module"), "{err}");
    // Right header, broken body.
    let err = sandbox()
        .load(b"\0asm\x01\0\0\0\x99garbage")
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidModule, "{err}");
}

#[tokio::test]
async fn valid_wasm_without_the_exports() {
    let bytes = wat::parse_str("(module (func (export \"hello\")))").unwrap();
    let err = sandbox().load(&bytes).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidModule);
    for name in [
        "memory",
        "stoker_abi_v1",
        "stoker_alloc",
        "stoker_plan",
        "stoker_run",
    ] {
        assert!(
            err.message.contains(&format!("`{name}`")),
            "{name} not named in: {err}"
        );
    }
}

#[tokio::test]
async fn mistyped_export_is_named() {
    let bytes = wat_module(
        "stoker_abi_v1",
        r#"(func (export "stoker_finish") (param i32) (result i32) i32.const 0)"#,
    );
    let err = sandbox().load(&bytes).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidModule);
    assert!(err.message.contains("stoker_finish"), "{err}");
}

#[tokio::test]
async fn wrong_abi_version() {
    let err = sandbox()
        .load(&wat_module("stoker_abi_v7", ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Abi);
    assert!(
        err.message.contains("v7") && err.message.contains("v1"),
        "{err}"
    );
}

#[tokio::test]
async fn unknown_host_function_is_a_link_error_naming_it() {
    let bytes = wat_module(
        "stoker_abi_v1",
        r#"(import "stoker" "launch_missiles" (func))"#,
    );
    let err = sandbox().load(&bytes).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidModule);
    assert!(err.message.contains("stoker::launch_missiles"), "{err}");
    let bytes = wat_module("stoker_abi_v1", r#"(import "env" "abort" (func))"#);
    let err = sandbox().load(&bytes).await.unwrap_err();
    assert!(err.message.contains("env::abort"), "{err}");
    let bytes = wat_module(
        "stoker_abi_v1",
        r#"(import "wasi_snapshot_preview1" "no_such_call" (func))"#,
    );
    let err = sandbox().load(&bytes).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidModule);
    assert!(err.message.contains("no_such_call"), "{err}");
}

#[tokio::test]
async fn start_function_that_loops_forever() {
    let bytes = wat_module("stoker_abi_v1", r#"(func $spin (loop br 0)) (start $spin)"#);
    let sandbox = sandbox();
    let module = sandbox
        .load(&bytes)
        .await
        .expect("loads: the start function runs per call");
    let err = run_payload(&sandbox, &module, "", limits())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::FuelExhausted, "{err}");
    // With fuel to spare, the wall-clock deadline stops it.
    let tight = CallLimits {
        fuel: u64::MAX / 2,
        deadline: Duration::from_millis(300),
        ..limits()
    };
    let err = run_payload(&sandbox, &module, "", tight).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Deadline, "{err}");
    assert!(err.retryable);
}

#[tokio::test]
async fn infinite_loop_runs_out_of_fuel() {
    let err = expect_kind("loop", limits(), ErrorKind::FuelExhausted).await;
    assert!(!err.retryable);
}

#[tokio::test]
async fn infinite_loop_hits_the_deadline() {
    let tight = CallLimits {
        fuel: u64::MAX / 2,
        deadline: Duration::from_millis(300),
        ..limits()
    };
    expect_kind("loop", tight, ErrorKind::Deadline).await;
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_limit() {
    let limits = CallLimits {
        fuel: u64::MAX / 2,
        ..limits()
    };
    expect_kind("oom", limits, ErrorKind::MemoryLimit).await;
}

#[tokio::test]
async fn unbounded_recursion_overflows_the_stack() {
    let limits = CallLimits {
        fuel: u64::MAX / 2,
        ..limits()
    };
    let err = expect_kind("recurse", limits, ErrorKind::StackOverflow).await;
    assert!(err.message.contains("backtrace"), "{err}");
}

#[tokio::test]
async fn guest_panic_carries_its_message() {
    let err = expect_kind("panic:the answer is not 41", limits(), ErrorKind::Trap).await;
    assert!(err.message.contains("the answer is not 41"), "{err}");
}

#[tokio::test]
async fn unreachable_trap_has_a_backtrace() {
    let err = expect_kind("trap", limits(), ErrorKind::Trap).await;
    assert!(err.message.contains("unreachable"), "{err}");
    assert!(err.message.contains("wasm backtrace"), "{err}");
}

#[tokio::test]
async fn output_larger_than_the_limit() {
    let small = CallLimits {
        max_output_bytes: 1000,
        ..limits()
    };
    let err = expect_kind("big:5000", small.clone(), ErrorKind::Abi).await;
    assert!(
        err.message.contains("exceeds the limit of 1000 bytes"),
        "{err}"
    );
    // Just under the limit is fine.
    let sandbox = sandbox();
    let module = sandbox.load(&misbehave()).await.unwrap();
    let out = run_payload(&sandbox, &module, "big:900", small)
        .await
        .unwrap();
    assert_eq!(out.len(), 900);
}

#[tokio::test]
async fn opening_a_file_is_denied() {
    let err = expect_kind("open", limits(), ErrorKind::GuestError).await;
    assert!(!err.message.contains("opened"), "{err}");
    assert!(!err.retryable);
}

#[tokio::test]
async fn guest_errors_say_whether_to_retry() {
    let err = expect_kind("fail-retryable", limits(), ErrorKind::GuestError).await;
    assert!(err.retryable);
    let err = expect_kind("fail-fatal", limits(), ErrorKind::GuestError).await;
    assert!(!err.retryable);
}

#[tokio::test]
async fn chatty_guest_log_is_bounded() {
    let sandbox = sandbox();
    let module = sandbox.load(&misbehave()).await.unwrap();
    let env = CallEnv {
        limits: CallLimits {
            log_bytes: 4096,
            ..limits()
        },
        blobs: None,
        gate: None,
    };
    let request = RunRequest {
        payload: b"log:10000".to_vec(),
        attempt: 1,
        ..RunRequest::default()
    };
    let report = sandbox.run(&module, &env, &request).await;
    report.result.expect("logging too much is not an error");
    assert!(report.log.len() < 4200, "log is {} bytes", report.log.len());
    assert!(report.log.ends_with("[log truncated]\n"));
}

#[tokio::test]
async fn blobs_are_confined_to_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::local(dir.path()).unwrap();
    let sandbox = sandbox();
    let module = sandbox.load(&misbehave()).await.unwrap();
    let env = CallEnv {
        limits: limits(),
        blobs: Some(store.tenant("acme").unwrap()),
        gate: None,
    };
    let request = RunRequest {
        payload: b"blob".to_vec(),
        attempt: 1,
        ..RunRequest::default()
    };
    let report = sandbox.run(&module, &env, &request).await;
    let out = report
        .result
        .unwrap_or_else(|e| panic!("blob round trip failed: {e}\nlog:\n{}", report.log));
    assert!(!out.is_empty());
    // Nothing was written outside the tenant's prefix.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        assert_eq!(entry.unwrap().file_name(), "tenants");
    }
}

#[tokio::test]
async fn one_trapping_subtask_does_not_disturb_the_others() {
    let sandbox = Arc::new(sandbox());
    let module = sandbox.load(&misbehave()).await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (sandbox, module) = (sandbox.clone(), module.clone());
        calls.spawn(async move {
            let payload = match i {
                5 => "trap".to_string(),
                7 => "loop".to_string(),
                _ => format!("ok-{i}"),
            };
            (i, run_payload(&sandbox, &module, &payload, limits()).await)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        match i {
            5 => assert_eq!(result.unwrap_err().kind, ErrorKind::Trap),
            7 => assert_eq!(result.unwrap_err().kind, ErrorKind::FuelExhausted),
            _ => assert_eq!(result.unwrap(), format!("ok-{i}").into_bytes()),
        }
    }
}

#[tokio::test]
async fn plan_splits_input_lines() {
    let sandbox = sandbox();
    let module = sandbox.load(&misbehave()).await.unwrap();
    let request = PlanRequest {
        step: 0,
        input: b"ok\ntrap\nok".to_vec(),
        node_count: 1,
        concurrency: 1,
        ..PlanRequest::default()
    };
    let plan = sandbox
        .plan(&module, &CallEnv::default(), &request)
        .await
        .result
        .unwrap();
    let Plan::Step { subtasks, .. } = plan else {
        panic!("step 0 has subtasks")
    };
    assert_eq!(
        subtasks,
        vec![b"ok".to_vec(), b"trap".to_vec(), b"ok".to_vec()]
    );
}

#[tokio::test]
async fn modules_compile_once_and_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..SandboxConfig::default()
    };
    let bytes = misbehave();
    let first = Sandbox::new(config.clone()).unwrap();
    let a = first.load(&bytes).await.unwrap();
    let b = first.load(&bytes).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b), "same hash, same compiled module");
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with(&a.hash));

    // A new process (sandbox) reuses the compiled code.
    let second = Sandbox::new(config.clone()).unwrap();
    let module = second.load(&bytes).await.unwrap();
    assert_eq!(
        run_payload(&second, &module, "ok", limits()).await.unwrap(),
        b"ok"
    );

    // A corrupted cache file is detected and replaced, never trusted.
    let mut data = std::fs::read(&files[0]).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&files[0], &data).unwrap();
    let third = Sandbox::new(config).unwrap();
    let module = third.load(&bytes).await.unwrap();
    assert_eq!(
        run_payload(&third, &module, "ok", limits()).await.unwrap(),
        b"ok"
    );
    assert_ne!(
        std::fs::read(&files[0]).unwrap(),
        data,
        "the corrupt file was rewritten"
    );
}

/// Every run is a fresh instance from the module's image: nothing a run
/// leaves in a static or in memory it grew is seen by the next one, however
/// the freed slot is reset (madvise, or rewriting the pages it dirtied).
#[tokio::test]
async fn runs_never_see_what_an_earlier_run_left_in_memory() {
    let sandbox = Arc::new(sandbox());
    let module = sandbox.load(&misbehave()).await.unwrap();
    for round in 0..3 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..6 {
            let (sandbox, module) = (sandbox.clone(), module.clone());
            calls.spawn(async move {
                let payload = format!("remember:secret-{round}-{i}");
                run_payload(&sandbox, &module, &payload, limits()).await
            });
        }
        while let Some(joined) = calls.join_next().await {
            let out = joined.unwrap().expect("remember runs");
            assert_eq!(String::from_utf8_lossy(&out), "|0", "round {round}");
        }
    }
}
