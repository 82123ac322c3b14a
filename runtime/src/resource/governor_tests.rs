//! Governor tests on tokio's paused clock: time advances only when every
//! task waits, so progress per virtual second is exactly what the bucket
//! grants.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

const Q: u64 = 1_000_000;

fn governor(slots: usize) -> Governor {
    Governor::new(GovernorConfig {
        slots,
        quantum: Q,
        burst: Duration::from_millis(20),
    })
    .unwrap()
}

fn task(tenant: &str, priority: u32, id: &str) -> TaskInfo {
    TaskInfo {
        tenant: tenant.into(),
        rank: Rank {
            priority,
            create_time_ms: 0,
            id: id.bytes().map(u64::from).sum(),
        },
        concurrency: 4,
    }
}

/// A sandbox that burns quanta as fast as it gets them; its progress in fuel.
fn spin(lease: Arc<Lease>) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let handle = tokio::spawn(async move {
        loop {
            lease.clone().acquire(Q).await;
            p.fetch_add(Q, Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    });
    (progress, handle)
}

fn total(ps: &[Arc<AtomicU64>]) -> u64 {
    ps.iter().map(|p| p.load(Ordering::SeqCst)).sum()
}

#[tokio::test(start_paused = true)]
async fn a_rate_of_r_gives_r_fuel_per_second_across_slots() {
    for (slots, rate) in [(4, 200e6), (2, 50e6), (3, 1e9)] {
        let g = governor(slots);
        g.set_rate(Some(rate));
        let t = task("acme", 0, "t");
        let spinners: Vec<_> = (0..slots).map(|_| spin(g.lease("t", &t))).collect();
        let progress: Vec<_> = spinners.iter().map(|(p, _)| p.clone()).collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = total(&progress);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let per_sec = (total(&progress) - before) as f64 / 10.0;
        assert!(
            (per_sec - rate).abs() <= rate * 0.02 + Q as f64,
            "slots {slots} rate {rate}: got {per_sec} fuel/s"
        );
        // Every slot made progress: the bucket is shared, not taken by one.
        for p in &progress {
            let share = p.load(Ordering::SeqCst) as f64 / total(&progress) as f64;
            assert!(share > 0.5 / slots as f64, "share {share} of {slots} slots");
        }
        for (_, h) in spinners {
            h.abort();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_rate_change_takes_effect() {
    let g = governor(2);
    g.set_rate(Some(100e6));
    let t = task("acme", 0, "t");
    let (p, h) = spin(g.lease("t", &t));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_100 = p.load(Ordering::SeqCst);
    g.set_rate(Some(10e6));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_10 = p.load(Ordering::SeqCst) - at_100;
    assert!((190e6..=202e6).contains(&(at_100 as f64)), "{at_100}");
    assert!((18e6..=22e6).contains(&(at_10 as f64)), "{at_10}");
    h.abort();
}

#[tokio::test(start_paused = true)]
async fn tasks_share_by_rank_and_tenants_equally() {
    let g = governor(8);
    g.set_rate(Some(100e6));
    // acme: two tasks of rank 0 and 1 (weights 2:1 inside acme's half);
    // beta: one task with a single subtask (the other half).
    let a0 = task("acme", 0, "a0");
    let a1 = task("acme", 1, "a1");
    let b = task("beta", 5, "b");
    let runs = [
        spin(g.lease("a0", &a0)),
        spin(g.lease("a0", &a0)),
        spin(g.lease("a1", &a1)),
        spin(g.lease("a1", &a1)),
        spin(g.lease("a1", &a1)),
        spin(g.lease("b", &b)),
    ];
    tokio::time::sleep(Duration::from_secs(20)).await;
    let fuel = |i: usize| runs[i].0.load(Ordering::SeqCst) as f64;
    let (a0f, a1f, bf) = (fuel(0) + fuel(1), fuel(2) + fuel(3) + fuel(4), fuel(5));
    let all = a0f + a1f + bf;
    assert!((bf / all - 0.5).abs() < 0.03, "beta {bf} of {all}");
    assert!((a0f / a1f - 2.0).abs() < 0.15, "a0 {a0f} a1 {a1f}");
    let snap = g.snapshot();
    assert_eq!(snap.tenants.len(), 2);
    assert!((snap.tenants["beta"] as f64 - bf).abs() <= 6.0 * Q as f64);
    for (_, h) in runs {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn shed_subtasks_are_suspended_between_quanta_and_resumed() {
    let g = governor(2);
    g.set_rate(Some(100e6));
    let t = task("acme", 0, "t");
    let first = g.lease("t", &t);
    tokio::time::advance(Duration::from_millis(10)).await;
    let second = g.lease("t", &t);
    let (p1, h1) = spin(first.clone());
    let (p2, h2) = spin(second.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(p1.load(Ordering::SeqCst) > 0 && p2.load(Ordering::SeqCst) > 0);

    assert_eq!(g.set_concurrency(1), 1);
    // Same task: the most recently started subtask gives way.
    assert!(second.is_suspended() && !first.is_suspended());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (a, b) = (p1.load(Ordering::SeqCst), p2.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p2.load(Ordering::SeqCst), b, "a suspended subtask got fuel");
    // The survivor gets the whole rate.
    let gained = (p1.load(Ordering::SeqCst) - a) as f64;
    assert!((195e6..=205e6).contains(&gained), "{gained}");
    let snap = g.snapshot();
    assert_eq!((snap.active, snap.suspended, snap.allowed), (1, 1, 1));

    g.set_concurrency(2);
    assert!(!second.is_suspended());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        p2.load(Ordering::SeqCst) > b,
        "resumed subtask made no progress"
    );
    h1.abort();
    h2.abort();
}

#[tokio::test(start_paused = true)]
async fn a_new_lease_waits_for_a_free_place_and_a_release_frees_one() {
    let g = governor(2);
    g.set_rate(Some(10e6));
    g.set_concurrency(1);
    let t = task("acme", 0, "t");
    let first = g.lease("t", &t);
    let second = g.lease("t", &t);
    assert!(!first.is_suspended() && second.is_suspended());
    let waiter = tokio::spawn(second.clone().acquire(Q));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    drop(first);
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("admitted after the release")
        .unwrap();
    assert!(!second.is_suspended());
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_clamped_to_the_slots() {
    let g = governor(3);
    assert_eq!(g.set_concurrency(0), 1);
    assert_eq!(g.set_concurrency(99), 3);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_wait_does_not_block_the_queue() {
    let g = governor(2);
    g.set_rate(Some(1e6)); // one quantum per second
    let t = task("acme", 0, "t");
    let (a, b) = (g.lease("t", &t), g.lease("t", &t));
    a.clone().acquire(Q).await; // drains the bucket
    let head = tokio::spawn(a.clone().acquire(Q));
    tokio::task::yield_now().await;
    let next = tokio::spawn(b.clone().acquire(Q));
    tokio::task::yield_now().await;
    head.abort();
    tokio::time::timeout(Duration::from_millis(1100), next)
        .await
        .expect("the next waiter is served")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn unlimited_rate_grants_at_once_and_counts_fuel() {
    let g = governor(1);
    let t = task("acme", 0, "t");
    let lease = g.lease("t", &t);
    for _ in 0..1000 {
        lease.clone().acquire(Q).await;
    }
    let snap = g.snapshot();
    assert_eq!(snap.fuel_granted, 1000 * Q);
    assert_eq!(snap.tasks[0].fuel_used, 1000 * Q);
    assert_eq!(snap.fuel_rate, None);
    drop(lease);
    assert!(g.snapshot().tasks.is_empty());
}

#[test]
fn config_is_validated() {
    GovernorConfig::default().validate().unwrap();
    let zero = GovernorConfig {
        slots: 0,
        ..GovernorConfig::default()
    };
    assert!(zero.validate().unwrap_err().to_string().contains("slots"));
}

#[tokio::test(start_paused = true)]
async fn a_tenant_rate_caps_that_tenant_only() {
    let g = governor(4);
    g.set_rate(Some(100e6));
    g.set_tenant_rate("slow", Some(10_000_000));
    assert_eq!(g.tenant_rate("slow"), Some(10e6));
    let slow = task("slow", 0, "s");
    let fast = task("fast", 0, "f");
    let (ps, _hs) = spin(g.lease("s", &slow));
    let (pf, _hf) = spin(g.lease("f", &fast));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s0, f0) = (ps.load(Ordering::SeqCst), pf.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let slow_rate = (ps.load(Ordering::SeqCst) - s0) as f64 / 10.0;
    assert!(
        (slow_rate - 10e6).abs() <= 1.5e6,
        "the capped tenant gets its rate: {slow_rate}"
    );
    let fast_rate = (pf.load(Ordering::SeqCst) - f0) as f64 / 10.0;
    assert!(
        fast_rate > 80e6,
        "the other tenant takes the rest of the node's rate: {fast_rate}"
    );
    // Lifting the limit lets it run freely.
    g.set_tenant_rate("slow", None);
    let s1 = ps.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        ps.load(Ordering::SeqCst) - s1 > 30 * Q,
        "about half the node's rate now"
    );
    // Setting the same rate again keeps the bucket.
    g.set_tenant_rate("x", Some(5));
    g.set_tenant_rate("x", Some(5));
    assert_eq!(g.tenant_rate("x"), Some(5.0));
}
