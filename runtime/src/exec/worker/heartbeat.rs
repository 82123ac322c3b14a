//! The heartbeat loop: the node's description and load every interval,
//! the operator steps its replies carry, and the reports of them the next
//! beats make.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use stoker_proto::api::HeartbeatRequest;
use stoker_proto::meta::RegisterNode;
use tokio::sync::watch;
use tracing::{info, warn};

use super::assignments::{local_runs, reconcile};
use super::{key_of, Shared, State, SubtaskKey};
use crate::exec::steps::{self, MoveStep};
use crate::meta::now_ms;

/// Claims remembered for `taken` reports.
const TAKEN: usize = 1024;

impl Shared {
    fn description(&self) -> RegisterNode {
        RegisterNode {
            id: self.id,
            addr: self.addr.clone(),
            labels: self
                .cfg
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            scope: self.cfg.scope.clone(),
            slots: self.cfg.slots,
            memory_bytes: self.cfg.memory_bytes,
            scheduler: self.is_scheduler,
            worker: true,
            time_ms: now_ms(),
        }
    }
}

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut interval = Duration::from_millis(shared.cfg.heartbeat_interval_ms);
    // Node CPU over one heartbeat period, for nodes without a resource
    // manager (which reports its own reading): the owner's hot-node
    // scheduler compares nodes by it.
    let mut cpu = crate::resource::cpu::CpuSampler::default();
    loop {
        let sampled = cpu.sample();
        let beat = async {
            let (i, mut client) = shared.endpoints.stoker()?;
            let mut load = shared.load();
            load.cpu = load.cpu.or(sampled);
            let req = HeartbeatRequest {
                node: Some(shared.description()),
                load: Some(load),
                operator_reports: shared.step_reports(),
                forwarded: false,
            };
            match client.heartbeat(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if let Some(control) = &shared.resource {
                        control.apply_cluster(&r.resource_config).await;
                    }
                    on_steps(&shared, &r.operator_steps);
                    Ok(r.interval_ms)
                }
                Err(s) => {
                    shared.endpoints.failed(i);
                    Err(format!("{}: {}", shared.endpoints.addr(i), s.message()))
                }
            }
        };
        let wait = match beat.await {
            Ok(ms) => {
                if ms > 0 {
                    interval = Duration::from_millis(ms);
                }
                interval
            }
            Err(e) => {
                warn!(node_id = shared.id, error = %e, "heartbeat failed");
                interval.min(Duration::from_millis(500))
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
            () = shared.beat_now.notified() => {}
        }
    }
}

impl Shared {
    /// What this node reports about the steps it holds.
    fn step_reports(&self) -> Vec<stoker_proto::meta::OperatorReport> {
        let mut guard = self.state.lock().expect("state lock");
        let st = &mut *guard;
        let reports = steps::reports(self.id, &st.steps, &st.released, |key, attempt| {
            st.was_taken(key, attempt)
        });
        st.reported = reports.iter().map(|r| (r.operator, r.outcome)).collect();
        reports
    }

    /// Whether a report is ready that no heartbeat carried yet (a
    /// subtask claimed before its step arrived, a move away carried out).
    fn new_report(&self, st: &State) -> bool {
        steps::reports(self.id, &st.steps, &st.released, |key, attempt| {
            st.was_taken(key, attempt)
        })
        .iter()
        .any(|r| !st.reported.contains(&(r.operator, r.outcome)))
    }

    /// Remembers that this process holds `key` at `attempt` (claimed or
    /// adopted); beats at once when a move here waits for that report.
    pub(super) fn took(&self, key: SubtaskKey, attempt: u32) {
        let mut st = self.state.lock().expect("state lock");
        if st.taken.len() >= TAKEN {
            st.taken.pop_front();
        }
        st.taken.push_back((key, attempt));
        let report = self.new_report(&st);
        drop(st);
        if report {
            self.beat_now.notify_one();
        }
    }
}

/// Acts on the operator steps of a heartbeat reply: forgets subtasks that
/// moved away (stopping runs of them that have not claimed), polls again
/// when one that moved here is not listed yet, and beats at once when that
/// makes a new report (the owner waits for it to finish the move).
fn on_steps(shared: &Arc<Shared>, sent: &[stoker_proto::meta::OperatorStep]) {
    let (actions, report) = {
        let mut guard = shared.state.lock().expect("state lock");
        let st = &mut *guard;
        st.steps = sent.iter().filter_map(MoveStep::from_proto).collect();
        let live: BTreeSet<u64> = st.steps.iter().map(|s| s.operator).collect();
        st.released.retain(|op| live.contains(op));
        let local = local_runs(st);
        let actions = steps::act(shared.id, &st.steps, &st.latest, &local);
        for &(operator, key, attempt) in &actions.drop {
            st.latest.retain(|a| {
                a.subtask
                    .as_ref()
                    .is_none_or(|s| key_of(s) != key || s.attempt > attempt)
            });
            st.finished.insert((key, attempt));
            if st.running.get(&key).is_some_and(|e| e.attempt <= attempt) {
                let e = st.running.remove(&key).expect("checked");
                e.abort.abort();
                info!(
                    node_id = shared.id,
                    operator,
                    task_id = key.0,
                    step = key.1,
                    ordinal = key.2,
                    attempt = e.attempt,
                    "subtask moved away by an operator: stopped"
                );
            }
            st.released.insert(operator);
        }
        (actions, shared.new_report(st))
    };
    if report {
        shared.beat_now.notify_one();
    }
    if actions.repoll {
        shared.repoll.notify_one();
    }
    if !actions.drop.is_empty() {
        reconcile(shared);
    }
}
