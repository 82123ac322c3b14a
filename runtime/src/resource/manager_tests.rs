//! Manager tests: the level arithmetic (pure) and ticks driven with given
//! CPU readings on a paused clock.

use super::*;
use crate::model::Rank;
use crate::resource::governor::{GovernorConfig, TaskInfo};

const FUEL_PER_CORE: f64 = 1e9;

fn config() -> ManagerConfig {
    ManagerConfig {
        // The background ticker stays out of the way: ticks are driven by hand.
        tick: Duration::from_secs(3600),
        ..ManagerConfig::default()
    }
}

fn manager(slots: usize, config: ManagerConfig) -> ResourceManager {
    let governor = Governor::new(GovernorConfig {
        slots,
        ..GovernorConfig::default()
    })
    .unwrap();
    ResourceManager::start(governor, FUEL_PER_CORE, config).unwrap()
}

#[test]
fn level_moves_by_factor_and_stays_in_bounds() {
    let c = ManagerConfig::default();
    assert_eq!(next_level(2.0, Command::Hold, &c, 2), 2.0);
    assert!((next_level(2.0, Command::Downclock, &c, 2) - 1.4).abs() < 1e-9);
    assert!((next_level(1.0, Command::Overclock, &c, 2) - 1.2).abs() < 1e-9);
    assert_eq!(next_level(1.9, Command::Overclock, &c, 2), 2.0);
    // Small levels still move by at least min_step, and never below min_level.
    assert!((next_level(0.1, Command::Overclock, &c, 2) - 0.15).abs() < 1e-9);
    assert_eq!(next_level(0.06, Command::Downclock, &c, 2), 0.05);
    assert_eq!(next_level(0.05, Command::Downclock, &c, 2), 0.05);
}

#[test]
fn knobs_follow_the_level() {
    assert_eq!(knobs(2.0, 2, 10.0), (2, None));
    assert_eq!(knobs(1.4, 2, 10.0), (2, Some(14.0)));
    assert_eq!(knobs(1.0, 2, 10.0), (1, Some(10.0)));
    assert_eq!(knobs(0.98, 2, 10.0), (1, Some(9.8)));
    assert_eq!(knobs(0.05, 4, 100.0), (1, Some(5.0)));
    assert_eq!(knobs(3.5, 4, 1.0), (4, Some(3.5)));
}

#[test]
fn config_is_validated() {
    ManagerConfig::default().validate().unwrap();
    for (bad, word) in [
        (
            ManagerConfig {
                scheduler: "nope".into(),
                ..ManagerConfig::default()
            },
            "nope",
        ),
        (
            ManagerConfig {
                downclock_factor: 1.5,
                ..ManagerConfig::default()
            },
            "downclock_factor",
        ),
        (
            ManagerConfig {
                min_level: 0.0,
                ..ManagerConfig::default()
            },
            "min_level",
        ),
    ] {
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(word), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn downclock_sheds_then_overclock_admits_again() {
    let m = manager(2, config());
    let t = TaskInfo {
        tenant: "acme".into(),
        rank: Rank {
            priority: 512,
            create_time_ms: 0,
            id: 1,
        },
        concurrency: 2,
    };
    let (a, b) = (m.governor().lease("t", &t), m.governor().lease("t", &t));
    assert_eq!(m.state().fuel_rate, None);

    let mut trail = Vec::new();
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(300)).await;
        trail.push(m.tick_with(Some(0.95)));
    }
    let levels: Vec<_> = trail
        .iter()
        .map(|r| (r.level * 100.0).round() / 100.0)
        .collect();
    assert_eq!(levels, [1.4, 0.98, 0.69]);
    assert!(trail.iter().all(|r| r.command == Command::Downclock));
    assert_eq!(trail[0].allowed, 2);
    assert_eq!(trail[1].allowed, 1);
    let rate = trail[1].fuel_rate.expect("a limited rate");
    assert!((rate - 0.98 * FUEL_PER_CORE).abs() < 1.0, "{rate}");
    assert!(a.is_suspended() != b.is_suspended(), "exactly one is shed");
    assert_eq!(m.state().suspended, 1);

    // In the band: nothing moves.
    tokio::time::advance(Duration::from_millis(300)).await;
    let hold = m.tick_with(Some(0.6));
    assert_eq!((hold.command, hold.allowed), (Command::Hold, 1));

    for _ in 0..6 {
        tokio::time::advance(Duration::from_millis(300)).await;
        m.tick_with(Some(0.1));
    }
    let state = m.state();
    assert_eq!(
        (state.level, state.allowed, state.fuel_rate),
        (2.0, 2, None)
    );
    assert!(!a.is_suspended() && !b.is_suspended());
}

#[tokio::test(start_paused = true)]
async fn commands_wait_the_minimum_interval() {
    let m = manager(2, config());
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(m.tick_with(Some(0.99)).command, Command::Hold);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(m.tick_with(Some(0.99)).command, Command::Downclock);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(m.tick_with(Some(0.99)).command, Command::Hold);
}

#[tokio::test(start_paused = true)]
async fn schedulers_switch_at_runtime() {
    let m = manager(2, config());
    assert_eq!(m.state().scheduler, "cpu");
    m.set_scheduler("fixed").unwrap();
    assert_eq!(m.state().scheduler, "fixed");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(m.tick_with(Some(1.0)).command, Command::Hold);
    assert!(matches!(
        m.set_scheduler("turbo"),
        Err(ResourceError::UnknownScheduler(_))
    ));
    assert_eq!(m.state().scheduler, "fixed");
    m.set_scheduler("cpu").unwrap();
    assert_eq!(m.tick_with(Some(1.0)).command, Command::Downclock);
    assert_eq!(m.schedulers(), ["cpu", "fixed"]);
}

#[tokio::test(start_paused = true)]
async fn ticks_are_broadcast() {
    let m = manager(
        2,
        ManagerConfig {
            initial_level: Some(0.5),
            ..config()
        },
    );
    let mut rx = m.subscribe();
    tokio::time::advance(Duration::from_secs(1)).await;
    let sent = m.tick_with(Some(0.2));
    let got = rx.recv().await.unwrap();
    assert_eq!(got, sent);
    assert_eq!(got.command, Command::Overclock);
    assert!((got.level - 0.6).abs() < 1e-9);
    assert_eq!(m.state().ticks, 1);
}
