//! Operator steps that reach a worker in its heartbeat replies (PD style),
//! what the worker does about them and what it reports back. Pure: the
//! worker's loops apply the [`Actions`] and send the reports.
//!
//! The owner's coordinator moves a queued subtask by reassigning it (its
//! attempt goes up by one), then sends the step to both nodes:
//! - the node the subtask left drops its stale queued assignment at the old
//!   attempt and stops a run of it that has not claimed yet (its claim
//!   would be refused), so the slot takes other work at once; it reports
//!   `released`;
//! - the node the subtask went to polls its assignments again at once when
//!   they do not list the subtask at the new attempt yet, claims it, and
//!   reports `taken` once its claim was accepted.
//!
//! A node reports a step in every heartbeat until the reply no longer
//! carries it (the owner retired the operator), so a lost heartbeat loses
//! nothing. The owner marks a move done on the `taken` report and times it
//! out when none comes.

use std::collections::{BTreeMap, BTreeSet};

use stoker_proto::api::Assignment;
use stoker_proto::meta::{operator_report, OperatorReport, OperatorStep, SubtaskRef};

use super::worker::{key_of, LocalRun, SubtaskKey};

/// A move of a queued subtask, as a worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveStep {
    pub operator: u64,
    pub key: SubtaskKey,
    /// The attempt it was queued at on `from`; on `to` it is queued at the
    /// next one.
    pub attempt: u32,
    pub from: u64,
    pub to: u64,
}

impl MoveStep {
    /// The step of a heartbeat reply; `None` without a subtask.
    pub fn from_proto(s: &OperatorStep) -> Option<MoveStep> {
        let r = s.subtask.as_ref()?;
        Some(MoveStep {
            operator: s.operator,
            key: (r.task_id, r.step, r.ordinal),
            attempt: s.attempt,
            from: s.from,
            to: s.to,
        })
    }

    /// The attempt the subtask is queued at on the node it went to.
    pub fn moved_attempt(&self) -> u32 {
        self.attempt + 1
    }
}

/// What a worker does about the steps of one heartbeat reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actions {
    /// (operator, subtask, attempt): a subtask queued here at that attempt
    /// moved away. Forget its assignment and stop a local run of it.
    pub drop: Vec<(u64, SubtaskKey, u32)>,
    /// A subtask moved here is not in this node's assignments yet (they
    /// came from a server behind the owner): poll them again now.
    pub repoll: bool,
}

/// The actions for `steps` on node `me`, given its latest assignments and
/// its local runs.
pub fn act(
    me: u64,
    steps: &[MoveStep],
    latest: &[Assignment],
    local: &BTreeMap<SubtaskKey, LocalRun>,
) -> Actions {
    let mut out = Actions::default();
    for s in steps {
        if s.from == me {
            out.drop.push((s.operator, s.key, s.attempt));
        } else if s.to == me {
            let listed = latest.iter().any(|a| {
                a.subtask
                    .as_ref()
                    .is_some_and(|x| key_of(x) == s.key && x.attempt >= s.moved_attempt())
            });
            let here = local
                .get(&s.key)
                .is_some_and(|r| r.attempt >= s.moved_attempt());
            out.repoll |= !listed && !here;
        }
    }
    out
}

/// The reports node `me` sends about `steps`: `released` for the moves
/// away it carried out (`released` holds their operators), `taken` for the
/// moves here whose subtask it claimed at the new attempt (`taken`).
pub fn reports(
    me: u64,
    steps: &[MoveStep],
    released: &BTreeSet<u64>,
    taken: impl Fn(SubtaskKey, u32) -> bool,
) -> Vec<OperatorReport> {
    let report = |s: &MoveStep, attempt: u32, outcome: operator_report::Outcome| OperatorReport {
        operator: s.operator,
        subtask: Some(SubtaskRef {
            task_id: s.key.0,
            step: s.key.1,
            ordinal: s.key.2,
        }),
        attempt,
        outcome: outcome as i32,
    };
    steps
        .iter()
        .filter_map(|s| {
            if s.from == me && released.contains(&s.operator) {
                Some(report(s, s.attempt, operator_report::Outcome::Released))
            } else if s.to == me && taken(s.key, s.moved_attempt()) {
                Some(report(
                    s,
                    s.moved_attempt(),
                    operator_report::Outcome::Taken,
                ))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_proto::meta::SubtaskRecord;

    fn step(operator: u64, ordinal: u32, attempt: u32, from: u64, to: u64) -> MoveStep {
        MoveStep {
            operator,
            key: (7, 0, ordinal),
            attempt,
            from,
            to,
        }
    }

    fn assigned(ordinal: u32, attempt: u32) -> Assignment {
        Assignment {
            subtask: Some(SubtaskRecord {
                task_id: 7,
                ordinal,
                attempt,
                state: "pending".into(),
                ..SubtaskRecord::default()
            }),
            ..Assignment::default()
        }
    }

    #[test]
    fn the_node_a_subtask_left_drops_it_and_the_other_fetches_it() {
        let steps = [step(1, 0, 3, 2, 4), step(2, 1, 1, 4, 2)];
        // Node 2: subtask 0 left it (drop attempt 3); subtask 1 came to it
        // at attempt 2 but its assignments still show attempt 1 elsewhere.
        let a = act(2, &steps, &[assigned(0, 3)], &BTreeMap::new());
        assert_eq!(a.drop, vec![(1, (7, 0, 0), 3)]);
        assert!(a.repoll);
        // Once listed (or already running here), no poll.
        let a = act(
            2,
            &steps,
            &[assigned(0, 3), assigned(1, 2)],
            &BTreeMap::new(),
        );
        assert!(!a.repoll);
        let local = BTreeMap::from([(
            (7, 0, 1),
            LocalRun {
                attempt: 2,
                pausing: false,
            },
        )]);
        assert!(!act(2, &steps, &[], &local).repoll);
        // A node neither step names does nothing.
        assert_eq!(act(9, &steps, &[], &BTreeMap::new()), Actions::default());
    }

    #[test]
    fn reports_only_what_was_done() {
        let steps = [step(1, 0, 3, 2, 4), step(2, 1, 1, 4, 2)];
        let none = reports(2, &steps, &BTreeSet::new(), |_, _| false);
        assert!(none.is_empty(), "nothing carried out yet");
        let taken_here = |key: SubtaskKey, attempt: u32| key == (7, 0, 1) && attempt == 2;
        let got = reports(2, &steps, &BTreeSet::from([1]), taken_here);
        let got: Vec<(u64, u32, i32)> = got
            .iter()
            .map(|r| (r.operator, r.attempt, r.outcome))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 3, operator_report::Outcome::Released as i32),
                (2, 2, operator_report::Outcome::Taken as i32),
            ]
        );
        // A claim of the old attempt is not the move taken.
        let old = |key: SubtaskKey, attempt: u32| key == (7, 0, 1) && attempt == 1;
        assert!(reports(2, &steps, &BTreeSet::new(), old).is_empty());
    }
}
