//! Fuel governor hot path: what taking one fuel quantum costs a sandbox
//! (once per `fuel_yield_interval`, about every 0.1 ms of guest time).
//! (a) unlimited rate: the lock and accounting only;
//! (b) a rate that never binds: the token bucket and the fair queue too;
//! (c) (b) with four tasks of two tenants in the weights.
//!
//! `cargo bench -p stoker --bench governor`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use stoker::model::Rank;
use stoker::resource::{FuelGate, Governor, GovernorConfig, Lease, TaskInfo};

const Q: u64 = 1_000_000;

fn task(tenant: &str, id: u64) -> TaskInfo {
    TaskInfo {
        tenant: tenant.into(),
        rank: Rank {
            priority: 512,
            create_time_ms: 0,
            id,
        },
        concurrency: 2,
    }
}

fn governor(rate: Option<f64>) -> Governor {
    let g = Governor::new(GovernorConfig {
        slots: 8,
        quantum: Q,
        burst: Duration::from_millis(20),
    })
    .expect("valid config");
    g.set_rate(rate);
    g
}

/// Time of `iters` acquisitions by one lease.
fn acquire_loop(rt: &tokio::runtime::Runtime, lease: &Arc<Lease>, iters: u64) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            lease.clone().acquire(Q).await;
        }
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("governor");

    let unlimited = governor(None);
    let lease = unlimited.lease("t", &task("acme", 1));
    group.bench_function("acquire_unlimited", |b| {
        b.iter_custom(|iters| acquire_loop(&rt, &lease, iters))
    });

    // 1e18 fuel/s: the bucket never empties, every step of the queue runs.
    let bucket = governor(Some(1e18));
    let lease = bucket.lease("t", &task("acme", 1));
    group.bench_function("acquire_bucket", |b| {
        b.iter_custom(|iters| acquire_loop(&rt, &lease, iters))
    });

    let crowded = governor(Some(1e18));
    let _others: Vec<_> = [("acme", 2), ("beta", 3), ("beta", 4)]
        .iter()
        .map(|(tenant, id)| crowded.lease(&format!("t{id}"), &task(tenant, *id)))
        .collect();
    let lease = crowded.lease("t1", &task("acme", 1));
    group.bench_function("acquire_bucket_4_tasks", |b| {
        b.iter_custom(|iters| acquire_loop(&rt, &lease, iters))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
