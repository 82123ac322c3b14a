//! The decision of the assignment loop: which executors to start, which
//! local runs to stop or pause, given the latest assignments (pure).

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;

use rustc_hash::FxHashMap;
use stoker_proto::api::Assignment;
use stoker_proto::meta::SubtaskRecord;

use crate::model::{SubtaskState, TaskState};

/// A subtask: (task id, step, ordinal).
pub type SubtaskKey = (u64, u32, u32);

/// The key of an assigned subtask.
pub fn key_of(s: &SubtaskRecord) -> SubtaskKey {
    (s.task_id, s.step, s.ordinal)
}

/// What the decision needs of a subtask running locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRun {
    pub attempt: u32,
    /// Already told to stop and report `paused`.
    pub pausing: bool,
}

/// One executor to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Index into the assignments.
    pub index: usize,
    /// The subtask already runs on this node at this attempt in the
    /// cluster's view, but not in this process (it restarted): run it (or
    /// give it up) without claiming it again.
    pub adopt: bool,
}

/// What to change locally given the latest assignments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Executors to start: adopted runs first, then pending subtasks in rank
    /// order, no more than the free slots.
    pub start: Vec<Start>,
    /// Local runs to abort without reporting: not assigned to this node at
    /// their attempt any more.
    pub stop: Vec<SubtaskKey>,
    /// Local runs of `pausing` tasks: abort and report `paused`.
    pub pause: Vec<SubtaskKey>,
}

pub(super) fn task_state_is(a: &Assignment, states: &[TaskState]) -> bool {
    a.task_state
        .parse::<TaskState>()
        .is_ok_and(|s| states.contains(&s))
}

/// Reconciles the node's assignments with what runs locally. `skip` lists
/// (subtask, attempt) pairs not to start: runs this process already
/// finished (their end may not show in the assignments yet) and claims
/// refused a moment ago.
pub fn decide(
    assignments: &[Assignment],
    local: &BTreeMap<SubtaskKey, LocalRun>,
    skip: &HashSet<(SubtaskKey, u32), impl BuildHasher>,
    slots: usize,
) -> Decision {
    let mut d = Decision::default();
    let assigned: FxHashMap<SubtaskKey, &Assignment> = assignments
        .iter()
        .filter_map(|a| a.subtask.as_ref().map(|s| (key_of(s), a)))
        .collect();
    for (key, run) in local {
        let current = assigned
            .get(key)
            .filter(|a| a.subtask.as_ref().is_some_and(|s| s.attempt == run.attempt));
        match current {
            // Pending at the same attempt is our claim not yet visible in
            // this (possibly stale) view: every way back to pending
            // unassigns the subtask or bumps the attempt.
            None => d.stop.push(*key),
            Some(a) if !run.pausing && task_state_is(a, &[TaskState::Pausing]) => {
                d.pause.push(*key)
            }
            Some(_) => {}
        }
    }
    let mut free = slots.saturating_sub(local.len() - d.stop.len());
    let mut adopt = Vec::new();
    let mut claim = Vec::new();
    for (index, a) in assignments.iter().enumerate() {
        let Some(s) = &a.subtask else { continue };
        let key = key_of(s);
        if local.contains_key(&key) && !d.stop.contains(&key) {
            continue;
        }
        if skip.contains(&(key, s.attempt)) {
            continue;
        }
        match s.state.parse::<SubtaskState>() {
            Ok(SubtaskState::Running) => adopt.push(index),
            Ok(SubtaskState::Pending) if a.accepts_work => claim.push(index),
            _ => {}
        }
    }
    let rank = |&i: &usize| {
        let a = &assignments[i];
        let s = a.subtask.as_ref().expect("filtered above");
        (
            a.priority,
            a.task_create_time_ms,
            s.task_id,
            s.step,
            s.ordinal,
        )
    };
    adopt.sort_by_key(rank);
    claim.sort_by_key(rank);
    // Runs per task: a task's queued subtasks start only while fewer than
    // its concurrency run here.
    let mut per_task: FxHashMap<u64, usize> = FxHashMap::default();
    for key in local.keys().filter(|k| !d.stop.contains(k)) {
        *per_task.entry(key.0).or_default() += 1;
    }
    for (index, adopt) in adopt
        .into_iter()
        .map(|i| (i, true))
        .chain(claim.into_iter().map(|i| (i, false)))
    {
        if free == 0 {
            break;
        }
        let a = &assignments[index];
        let task = a.subtask.as_ref().map_or(0, |s| s.task_id);
        let runs = per_task.entry(task).or_default();
        let cap = match a.concurrency {
            0 => slots,
            c => (c as usize).min(slots),
        };
        if !adopt && *runs >= cap {
            continue;
        }
        *runs += 1;
        free -= 1;
        d.start.push(Start { index, adopt });
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(task: u64, ordinal: u32, attempt: u32, state: &str, task_state: &str) -> Assignment {
        Assignment {
            subtask: Some(SubtaskRecord {
                task_id: task,
                ordinal,
                attempt,
                state: state.into(),
                idempotent: true,
                ..SubtaskRecord::default()
            }),
            task_state: task_state.into(),
            accepts_work: task_state
                .parse::<TaskState>()
                .is_ok_and(|s| s.accepts_work(None)),
            priority: 512,
            ..Assignment::default()
        }
    }

    fn local(runs: &[(SubtaskKey, u32)]) -> BTreeMap<SubtaskKey, LocalRun> {
        runs.iter()
            .map(|(k, attempt)| {
                (
                    *k,
                    LocalRun {
                        attempt: *attempt,
                        pausing: false,
                    },
                )
            })
            .collect()
    }

    fn started(d: &Decision, list: &[Assignment]) -> Vec<(SubtaskKey, bool)> {
        d.start
            .iter()
            .map(|s| (key_of(list[s.index].subtask.as_ref().unwrap()), s.adopt))
            .collect()
    }

    #[test]
    fn starts_pending_work_up_to_the_free_slots_in_rank_order() {
        let mut list = vec![
            a(2, 0, 1, "pending", "running"),
            a(1, 1, 1, "pending", "running"),
            a(1, 0, 1, "pending", "resuming"),
            a(3, 0, 1, "pending", "running"),
        ];
        // Task 3 ranks first by priority.
        list[3].priority = 1;
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 3);
        assert_eq!(
            started(&d, &list),
            vec![((3, 0, 0), false), ((1, 0, 0), false), ((1, 0, 1), false)]
        );
        assert!(d.stop.is_empty() && d.pause.is_empty());
        // One slot taken by a local run of task 2: two free.
        let d = decide(&list, &local(&[((2, 0, 0), 1)]), &HashSet::new(), 3);
        assert_eq!(
            started(&d, &list),
            vec![((3, 0, 0), false), ((1, 0, 0), false)]
        );
        assert!(d.stop.is_empty());
        // No free slot: nothing starts.
        let full = local(&[((7, 0, 0), 1), ((2, 0, 0), 1)]);
        let mut with7 = list.clone();
        with7.push(a(7, 0, 1, "running", "running"));
        let d = decide(&with7, &full, &HashSet::new(), 2);
        assert!(d.start.is_empty());
    }

    #[test]
    fn a_task_runs_at_most_its_concurrency_however_many_are_queued() {
        let mut list: Vec<Assignment> = (0..6)
            .map(|i| Assignment {
                concurrency: 2,
                ..a(1, i, 1, "pending", "running")
            })
            .collect();
        list.push(Assignment {
            concurrency: 3,
            ..a(2, 0, 1, "pending", "running")
        });
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 8);
        assert_eq!(
            started(&d, &list),
            vec![((1, 0, 0), false), ((1, 0, 1), false), ((2, 0, 0), false)]
        );
        // One of task 1's runs is local already: one more starts.
        let d = decide(&list, &local(&[((1, 0, 0), 1)]), &HashSet::new(), 8);
        assert_eq!(
            started(&d, &list),
            vec![((1, 0, 1), false), ((2, 0, 0), false)]
        );
        // A concurrency above the slots is capped by them; 0 means the
        // slots alone (a server that does not send it).
        for c in [0, 50] {
            let list: Vec<Assignment> = (0..6)
                .map(|i| Assignment {
                    concurrency: c,
                    ..a(1, i, 1, "pending", "running")
                })
                .collect();
            let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 4);
            assert_eq!(d.start.len(), 4, "concurrency {c}");
        }
    }

    #[test]
    fn only_tasks_that_accept_work_are_claimed() {
        for (state, claims) in [
            ("running", true),
            ("resuming", true),
            ("pending", false),
            ("pausing", false),
            ("paused", false),
            ("modifying", false),
            ("cancelling", false),
            ("reverting", false),
            ("bogus", false),
        ] {
            let list = vec![a(1, 0, 1, "pending", state)];
            let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 4);
            assert_eq!(!d.start.is_empty(), claims, "{state}");
        }
        // The server says whether the task accepts work: a task modified
        // while it runs does.
        let modified = Assignment {
            accepts_work: true,
            ..a(1, 0, 1, "pending", "modifying")
        };
        let d = decide(&[modified], &BTreeMap::new(), &HashSet::new(), 4);
        assert_eq!(d.start.len(), 1);
    }

    #[test]
    fn skipped_attempts_do_not_start_again() {
        let list = vec![
            a(1, 0, 1, "running", "running"),
            a(1, 1, 2, "pending", "running"),
        ];
        let skip: HashSet<_> = [((1, 0, 0), 1), ((1, 0, 1), 2)].into_iter().collect();
        let d = decide(&list, &BTreeMap::new(), &skip, 4);
        assert!(d.start.is_empty());
        // Another attempt of a skipped subtask is new work.
        let list = vec![a(1, 1, 3, "pending", "running")];
        let d = decide(&list, &BTreeMap::new(), &skip, 4);
        assert_eq!(started(&d, &list), vec![((1, 0, 1), false)]);
    }

    #[test]
    fn running_here_but_not_local_is_adopted_first() {
        let list = vec![
            a(1, 0, 1, "pending", "running"),
            a(2, 0, 4, "running", "running"),
        ];
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 1);
        assert_eq!(started(&d, &list), vec![((2, 0, 0), true)]);
        // Adopted even when its task is pausing (the executor reports it
        // paused at once).
        let list = vec![a(2, 0, 4, "running", "pausing")];
        let d = decide(&list, &BTreeMap::new(), &HashSet::new(), 1);
        assert_eq!(started(&d, &list), vec![((2, 0, 0), true)]);
    }

    #[test]
    fn runs_no_longer_assigned_at_their_attempt_stop() {
        let list = vec![
            // Still ours, running.
            a(1, 0, 1, "running", "running"),
            // Claimed locally; this view predates the claim.
            a(1, 1, 1, "pending", "running"),
            // Requeued and assigned to us again: a new attempt.
            a(1, 2, 3, "pending", "running"),
            // Task cancelling: keeps running until its subtasks go.
            a(4, 0, 1, "running", "cancelling"),
        ];
        let runs = local(&[
            ((1, 0, 0), 1),
            ((1, 0, 1), 1),
            ((1, 0, 2), 2),
            ((4, 0, 0), 1),
            // Gone from the assignments (moved, cancelled, preempted).
            ((5, 0, 0), 1),
        ]);
        let d = decide(&list, &runs, &HashSet::new(), 8);
        assert_eq!(d.stop, vec![(1, 0, 2), (5, 0, 0)]);
        assert!(d.pause.is_empty());
        // The new attempt starts in the freed slot.
        assert_eq!(started(&d, &list), vec![((1, 0, 2), false)]);
        // Two stopped of five local runs with five slots: the new attempt
        // still fits.
        let d = decide(&list, &runs, &HashSet::new(), 4);
        assert_eq!(started(&d, &list), vec![((1, 0, 2), false)]);
        let d = decide(&list, &runs, &HashSet::new(), 3);
        assert!(d.start.is_empty());
    }

    #[test]
    fn runs_of_pausing_tasks_pause_once() {
        let list = vec![
            a(1, 0, 1, "running", "pausing"),
            a(1, 1, 1, "pending", "pausing"),
        ];
        let mut runs = local(&[((1, 0, 0), 1)]);
        let d = decide(&list, &runs, &HashSet::new(), 4);
        assert_eq!(d.pause, vec![(1, 0, 0)]);
        assert!(d.stop.is_empty());
        // Pending work of a pausing task does not start.
        assert!(d.start.is_empty());
        runs.get_mut(&(1, 0, 0)).unwrap().pausing = true;
        let d = decide(&list, &runs, &HashSet::new(), 4);
        assert!(d.pause.is_empty());
    }
}
