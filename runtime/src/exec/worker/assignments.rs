//! The assignment loop: long polls of the subtasks assigned to this node,
//! reconciled with the local runs by [`decide`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use stoker_proto::api::AssignmentsRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::decide::task_state_is;
use super::endpoints::next_backoff;
use super::executor::Executor;
use super::{decide, key_of, Entry, LocalRun, Shared, State, SubtaskKey};
use crate::model::TaskState;

pub(super) async fn assignment_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut fingerprint = 0;
    let mut backoff = Duration::from_millis(50);
    // Expires refused claims even when nothing else happens.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let req = AssignmentsRequest {
            node: shared.id,
            fingerprint,
            wait_ms: shared.cfg.assignment_wait_ms,
        };
        let poll = async {
            if let Some(node) = &shared.local {
                return crate::api::workers::assignments(node, req)
                    .await
                    .map(tonic::Response::new)
                    .map_err(|s| format!("local metadata node: {}", s.message()));
            }
            let (i, mut client) = shared.endpoints.stoker()?;
            client.assignments(req).await.map_err(|s| {
                shared.endpoints.failed(i);
                format!("{}: {}", shared.endpoints.addr(i), s.message())
            })
        };
        tokio::pin!(poll);
        let answer = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                answer = &mut poll => break Some(answer),
                _ = tick.tick() => reconcile(&shared),
                () = shared.repoll.notified() => break None,
            }
        };
        let Some(answer) = answer else {
            // A subtask moved here is not in the assignments yet: ask for
            // them now rather than wait for a change.
            fingerprint = 0;
            continue;
        };
        match answer {
            Ok(resp) => {
                backoff = Duration::from_millis(50);
                let resp = resp.into_inner();
                let accepted = {
                    let mut st = shared.state.lock().expect("state lock");
                    if resp.applied_index >= st.latest_index {
                        st.latest_index = resp.applied_index;
                        st.latest = resp.assignments;
                        true
                    } else {
                        false
                    }
                };
                if accepted {
                    fingerprint = resp.fingerprint;
                    reconcile(&shared);
                } else {
                    // A server behind one already heard from: its view would
                    // undo newer facts. Ask again shortly.
                    debug!(
                        node_id = shared.id,
                        applied_index = resp.applied_index,
                        "stale assignments ignored"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(e) => {
                warn!(node_id = shared.id, error = %e, "assignment poll failed");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
            }
        }
    }
}

/// What this process is running, as [`decide`] and the step actions see it.
pub(super) fn local_runs(st: &State) -> BTreeMap<SubtaskKey, LocalRun> {
    st.running
        .iter()
        .map(|(k, e)| {
            (
                *k,
                LocalRun {
                    attempt: e.attempt,
                    pausing: e.pausing,
                },
            )
        })
        .collect()
}

/// Applies [`decide`] to the latest assignments: aborts, pauses, starts.
pub(super) fn reconcile(shared: &Arc<Shared>) {
    let mut guard = shared.state.lock().expect("state lock");
    let st = &mut *guard;
    if st.stopped {
        return;
    }
    let now = Instant::now();
    st.blocked.retain(|_, until| *until > now);
    let listed: FxHashSet<(SubtaskKey, u32)> = st
        .latest
        .iter()
        .filter_map(|a| a.subtask.as_ref().map(|s| (key_of(s), s.attempt)))
        .collect();
    st.finished.retain(|k| listed.contains(k));
    let skip: FxHashSet<(SubtaskKey, u32)> = st
        .finished
        .iter()
        .chain(st.blocked.keys())
        .chain(st.reporting.keys())
        .copied()
        .collect();
    let local = local_runs(st);
    let d = decide(&st.latest, &local, &skip, shared.cfg.slots as usize);
    for key in &d.stop {
        if let Some(e) = st.running.remove(key) {
            e.abort.abort();
            info!(
                node_id = shared.id,
                task_id = key.0,
                step = key.1,
                ordinal = key.2,
                attempt = e.attempt,
                "subtask no longer assigned here: stopped"
            );
        }
    }
    for key in &d.pause {
        if let Some(e) = st.running.get_mut(key) {
            e.pausing = true;
            let _ = e.pause.send(true);
        }
    }
    let mut per_task: FxHashMap<u64, u32> = FxHashMap::default();
    for a in &st.latest {
        if let Some(s) = &a.subtask {
            *per_task.entry(s.task_id).or_default() += 1;
        }
    }
    for s in d.start {
        let a = st.latest[s.index].clone();
        let Some(sub) = &a.subtask else { continue };
        let key = key_of(sub);
        let attempt = sub.attempt;
        let concurrency = per_task.get(&key.0).copied().unwrap_or(1);
        st.next_run += 1;
        let run = st.next_run;
        // A run adopted while its task is pausing reports paused at once.
        let pausing = task_state_is(&a, &[TaskState::Pausing]);
        let (pause, pause_rx) = watch::channel(pausing);
        // A root span: the loop may run inside another run's span (a run's
        // release starts the next one), and runs do not nest.
        let span = tracing::info_span!(
            parent: None,
            "subtask",
            node_id = shared.id,
            task_id = key.0,
            step = key.1,
            ordinal = key.2,
            attempt
        );
        let exec = Executor {
            shared: shared.clone(),
            assignment: a,
            adopt: s.adopt,
            run,
            pause: pause_rx,
            concurrency,
            claimed: std::sync::OnceLock::new(),
        };
        let handle = tokio::spawn(exec.run().instrument(span));
        st.running.insert(
            key,
            Entry {
                attempt,
                run,
                abort: handle.abort_handle(),
                pause,
                pausing,
            },
        );
    }
}
