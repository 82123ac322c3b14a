//! Sandbox hot paths:
//! (a) one no-op subtask: instantiate + call + teardown (a minimal WAT guest
//!     and an SDK-built guest);
//! (b) the `primes` kernel in wasm with fuel vs the same Rust code native;
//! (c) the same wasm with and without fuel metering.
//!
//! `cargo bench -p stoker --bench sandbox`; per-core throughput of (a) is
//! 1 / latency, since each call runs on one core.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use stoker::exec::local::{LocalOptions, LocalRunner, RetryPolicy};
use stoker::sandbox::{CallEnv, Sandbox, SandboxConfig};
use stoker_proto::guest::RunRequest;

const NOOP_WAT: &str = r#"(module
    (memory (export "memory") 1)
    (func (export "stoker_abi_v1"))
    (func (export "stoker_alloc") (param i32) (result i32) i32.const 1024)
    (func (export "stoker_plan") (param i32 i32) (result i64) i64.const 0)
    (func (export "stoker_run") (param i32 i32) (result i64) i64.const 0))"#;

/// The primes range of (b) and (c): big enough that planning is noise.
const PRIMES_END: u64 = 300_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn noop_subtask(c: &mut Criterion) {
    let rt = runtime();
    let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
    let env = CallEnv::default();
    let request = RunRequest {
        attempt: 1,
        payload: b"ok".to_vec(),
        ..RunRequest::default()
    };
    let mut group = c.benchmark_group("noop_subtask");
    for (name, bytes) in [
        ("wat", wat::parse_str(NOOP_WAT).unwrap()),
        ("sdk", stoker_test_artifacts::read("misbehave")),
    ] {
        let module = rt.block_on(sandbox.load(&bytes)).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let report = rt.block_on(sandbox.run(&module, &env, &request));
                report.result.unwrap()
            })
        });
    }
    group.finish();
}

fn primes_wasm(rt: &tokio::runtime::Runtime, runner: &LocalRunner, module: &[u8]) -> Vec<u8> {
    let opts = LocalOptions {
        slots: 1,
        limits: Default::default(),
        retry: RetryPolicy::default(),
        task_id: "bench".into(),
    };
    let input = format!(r#"{{"start": 0, "end": {PRIMES_END}, "chunks": 1}}"#);
    let summary = rt.block_on(runner.run(module, input.into_bytes(), &opts, &|_| {}));
    summary.result.unwrap()
}

fn primes_kernel(c: &mut Criterion) {
    let rt = runtime();
    let module = stoker_test_artifacts::read("primes");
    let metered = LocalRunner::new(
        Arc::new(Sandbox::new(SandboxConfig::default()).unwrap()),
        None,
    );
    let unmetered = LocalRunner::new(
        Arc::new(
            Sandbox::new(SandboxConfig {
                consume_fuel: false,
                ..SandboxConfig::default()
            })
            .unwrap(),
        ),
        None,
    );
    let expected = serde_json::json!({ "count": primes::count_primes(0, PRIMES_END) });
    let count = |bytes: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&bytes).unwrap();
    let mut group = c.benchmark_group("primes_kernel");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("native", |b| {
        b.iter(|| primes::count_primes(std::hint::black_box(0), PRIMES_END))
    });
    group.bench_function("wasm_fuel", |b| {
        b.iter(|| assert_eq!(count(primes_wasm(&rt, &metered, &module)), expected))
    });
    group.bench_function("wasm_no_fuel", |b| {
        b.iter(|| assert_eq!(count(primes_wasm(&rt, &unmetered, &module)), expected))
    });
    group.finish();
}

criterion_group!(benches, noop_subtask, primes_kernel);
criterion_main!(benches);
