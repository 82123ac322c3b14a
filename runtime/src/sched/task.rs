//! The decision core of a task scheduler: from a task's state and the states
//! of its current step's subtasks, the next thing the owner must do. Pure, so
//! every path of the state machine is tested without a cluster; the owner's
//! loop carries the action out (by proposing replicated commands, calling
//! the module's `plan`, `finish` or `revert`) and asks again.

use std::collections::BTreeMap;

use crate::model::{SubtaskState, TaskState};

/// How many subtasks of the current step are in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepCounts(pub BTreeMap<SubtaskState, u32>);

impl StepCounts {
    pub fn of(states: impl IntoIterator<Item = SubtaskState>) -> Self {
        let mut counts = BTreeMap::new();
        for s in states {
            *counts.entry(s).or_insert(0) += 1;
        }
        StepCounts(counts)
    }

    pub fn get(&self, s: SubtaskState) -> u32 {
        self.0.get(&s).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u32 {
        self.0.values().sum()
    }

    fn unfinished(&self) -> u32 {
        self.get(SubtaskState::Pending)
            + self.get(SubtaskState::Running)
            + self.get(SubtaskState::Paused)
    }
}

/// What the task scheduler does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until subtasks move.
    Wait,
    /// Call `plan` for the next step (step 0 for a pending task); its
    /// subtasks, or "done" then `finish`, come back as commands.
    PlanNextStep,
    /// A subtask failed for good: revert (or await resolution when manual
    /// recovery is on).
    Fail { manual_recovery: bool },
    /// Cancel the step's unfinished subtasks (stopping running ones).
    CancelSubtasks,
    /// Pause the step's pending subtasks. Running ones are stopped by their
    /// workers, which see the task pausing and report them paused; the
    /// scheduler waits for that.
    PauseSubtasks,
    /// Every subtask is stopped: the task is now `to`.
    MoveTo(TaskState),
    /// Paused subtasks go back to pending, then the task runs.
    ResumeSubtasks,
    /// Run the guest's revert hook and delete intermediate blobs, then
    /// `reverted`.
    Revert,
    /// Apply the modification, then go back to the state it came from.
    ApplyModification,
}

/// The next action of a task in `state` whose current step has `counts`.
/// `planned` is whether the current step's subtasks exist yet.
pub fn decide(
    state: TaskState,
    planned: bool,
    counts: &StepCounts,
    manual_recovery: bool,
) -> Action {
    use SubtaskState as S;
    match state {
        TaskState::Pending => Action::PlanNextStep,
        TaskState::Running => {
            if !planned {
                Action::PlanNextStep
            } else if counts.get(S::Failed) > 0 {
                Action::Fail { manual_recovery }
            } else if counts.total() > 0 && counts.get(S::Succeed) == counts.total() {
                Action::PlanNextStep
            } else {
                Action::Wait
            }
        }
        TaskState::Cancelling => {
            if counts.unfinished() > 0 {
                Action::CancelSubtasks
            } else {
                Action::MoveTo(TaskState::Reverting)
            }
        }
        TaskState::Pausing => {
            if counts.get(S::Pending) > 0 {
                Action::PauseSubtasks
            } else if counts.get(S::Running) > 0 {
                Action::Wait
            } else {
                Action::MoveTo(TaskState::Paused)
            }
        }
        TaskState::Resuming => {
            if counts.get(S::Paused) > 0 {
                Action::ResumeSubtasks
            } else {
                Action::MoveTo(TaskState::Running)
            }
        }
        // Siblings of the failed subtask still queued or running are
        // cancelled before the revert hook runs.
        TaskState::Reverting if counts.unfinished() > 0 => Action::CancelSubtasks,
        TaskState::Reverting => Action::Revert,
        TaskState::Modifying => Action::ApplyModification,
        TaskState::Paused
        | TaskState::AwaitingResolution
        | TaskState::Succeed
        | TaskState::Failed
        | TaskState::Reverted => Action::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SubtaskState as S;

    fn counts(list: &[(SubtaskState, u32)]) -> StepCounts {
        StepCounts(list.iter().copied().collect())
    }

    #[test]
    fn running_task_waits_then_plans_the_next_step() {
        let c = counts(&[(S::Succeed, 2), (S::Running, 1)]);
        assert_eq!(decide(TaskState::Running, true, &c, false), Action::Wait);
        let c = counts(&[(S::Succeed, 3)]);
        assert_eq!(
            decide(TaskState::Running, true, &c, false),
            Action::PlanNextStep
        );
        assert_eq!(
            decide(TaskState::Pending, false, &StepCounts::default(), false),
            Action::PlanNextStep
        );
    }

    #[test]
    fn a_failed_subtask_fails_the_task_or_awaits_resolution() {
        let c = counts(&[(S::Succeed, 2), (S::Failed, 1), (S::Running, 1)]);
        assert_eq!(
            decide(TaskState::Running, true, &c, false),
            Action::Fail {
                manual_recovery: false
            }
        );
        assert_eq!(
            decide(TaskState::Running, true, &c, true),
            Action::Fail {
                manual_recovery: true
            }
        );
        assert_eq!(
            decide(TaskState::AwaitingResolution, true, &c, true),
            Action::Wait
        );
    }

    #[test]
    fn cancel_stops_subtasks_then_reverts() {
        let c = counts(&[(S::Running, 1), (S::Pending, 3)]);
        assert_eq!(
            decide(TaskState::Cancelling, true, &c, false),
            Action::CancelSubtasks
        );
        let c = counts(&[(S::Canceled, 3), (S::Succeed, 1)]);
        assert_eq!(
            decide(TaskState::Cancelling, true, &c, false),
            Action::MoveTo(TaskState::Reverting)
        );
        assert_eq!(
            decide(TaskState::Reverting, true, &c, false),
            Action::Revert
        );
        // A failed subtask's siblings are stopped before the revert hook.
        let c = counts(&[(S::Failed, 1), (S::Running, 1), (S::Pending, 2)]);
        assert_eq!(
            decide(TaskState::Reverting, true, &c, false),
            Action::CancelSubtasks
        );
    }

    #[test]
    fn pause_and_resume() {
        // Only running ones left: their workers report them paused.
        let c = counts(&[(S::Running, 1), (S::Paused, 2)]);
        assert_eq!(decide(TaskState::Pausing, true, &c, false), Action::Wait);
        let c = counts(&[(S::Running, 1), (S::Pending, 1), (S::Paused, 2)]);
        assert_eq!(
            decide(TaskState::Pausing, true, &c, false),
            Action::PauseSubtasks
        );
        let c = counts(&[(S::Paused, 3), (S::Succeed, 1)]);
        assert_eq!(
            decide(TaskState::Pausing, true, &c, false),
            Action::MoveTo(TaskState::Paused)
        );
        assert_eq!(decide(TaskState::Paused, true, &c, false), Action::Wait);
        assert_eq!(
            decide(TaskState::Resuming, true, &c, false),
            Action::ResumeSubtasks
        );
        let c = counts(&[(S::Pending, 3), (S::Succeed, 1)]);
        assert_eq!(
            decide(TaskState::Resuming, true, &c, false),
            Action::MoveTo(TaskState::Running)
        );
    }

    #[test]
    fn every_move_to_is_a_legal_transition() {
        let samples = [
            counts(&[]),
            counts(&[(S::Pending, 1)]),
            counts(&[(S::Running, 1)]),
            counts(&[(S::Paused, 1)]),
            counts(&[(S::Succeed, 1)]),
            counts(&[(S::Failed, 1)]),
            counts(&[(S::Canceled, 1)]),
        ];
        for state in TaskState::ALL {
            for c in &samples {
                for planned in [false, true] {
                    if let Action::MoveTo(to) = decide(state, planned, c, false) {
                        crate::model::check_task_transition(state, to, None)
                            .unwrap_or_else(|e| panic!("decide proposes {e}"));
                    }
                }
            }
        }
    }

    #[test]
    fn finished_tasks_do_nothing() {
        for state in TaskState::ALL.into_iter().filter(|s| s.is_finished()) {
            assert_eq!(
                decide(state, true, &counts(&[(S::Pending, 1)]), false),
                Action::Wait
            );
        }
    }
}
