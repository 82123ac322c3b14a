//! Task and subtask states and their legal transitions (the DXF state
//! machines). The replicated state machine rejects every transition these
//! functions do not allow, so an illegal request fails with a clear error
//! instead of being applied.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The state of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    Pending,
    Running,
    Succeed,
    /// The framework could not run the task (bad module, plan trap at init).
    Failed,
    Reverting,
    /// A task that failed while running, or was cancelled, ends here.
    Reverted,
    Cancelling,
    Pausing,
    Paused,
    Resuming,
    Modifying,
    /// Manual recovery is on and a subtask failed: an operator retries the
    /// failed subtasks or cancels.
    AwaitingResolution,
}

impl TaskState {
    pub const ALL: [TaskState; 12] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Succeed,
        TaskState::Failed,
        TaskState::Reverting,
        TaskState::Reverted,
        TaskState::Cancelling,
        TaskState::Pausing,
        TaskState::Paused,
        TaskState::Resuming,
        TaskState::Modifying,
        TaskState::AwaitingResolution,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeed => "succeed",
            TaskState::Failed => "failed",
            TaskState::Reverting => "reverting",
            TaskState::Reverted => "reverted",
            TaskState::Cancelling => "cancelling",
            TaskState::Pausing => "pausing",
            TaskState::Paused => "paused",
            TaskState::Resuming => "resuming",
            TaskState::Modifying => "modifying",
            TaskState::AwaitingResolution => "awaiting-resolution",
        }
    }

    /// Finished tasks never change again and move to history.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Succeed | TaskState::Failed | TaskState::Reverted
        )
    }

    /// Whether subtasks of a task in this state may be assigned and
    /// started: it runs, resumes, or is modified while it runs
    /// (`modifying_from` is the state a `modifying` task came from).
    pub fn accepts_work(self, modifying_from: Option<TaskState>) -> bool {
        match self {
            TaskState::Running | TaskState::Resuming => true,
            TaskState::Modifying => modifying_from == Some(TaskState::Running),
            _ => false,
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown task state {s:?}"))
    }
}

/// A rejected state change, with what was asked and why it cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal {what} transition {from} -> {to}{}", hint.map(|h| format!(": {h}")).unwrap_or_default())]
pub struct IllegalTransition {
    pub what: &'static str,
    pub from: String,
    pub to: String,
    pub hint: Option<&'static str>,
}

/// Checks a task transition. `modifying_from` is the state a task in
/// `modifying` came from: it may only go back there.
///
/// # Errors
/// [`IllegalTransition`] when the state machine has no such edge.
pub fn check_task_transition(
    from: TaskState,
    to: TaskState,
    modifying_from: Option<TaskState>,
) -> Result<(), IllegalTransition> {
    use TaskState::*;
    let ok = match (from, to) {
        (Pending, Running | Failed) => true,
        (Running, Succeed | Reverting | AwaitingResolution) => true,
        (Reverting, Reverted) => true,
        (Pending | Running | AwaitingResolution, Cancelling) => true,
        (Cancelling, Reverting) => true,
        (Pending | Running, Pausing) => true,
        (Pausing, Paused) => true,
        (Paused, Resuming) => true,
        // As the state before `paused` is not kept, resuming always runs.
        (Resuming, Running) => true,
        (Pending | Running | Paused, Modifying) => true,
        (Modifying, back) => modifying_from == Some(back),
        // `resolve`: the failed subtasks are retried.
        (AwaitingResolution, Running) => true,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let hint = if from.is_finished() {
        Some("the task has finished")
    } else if from == Modifying {
        Some("a modifying task returns to the state it came from")
    } else {
        None
    };
    Err(IllegalTransition {
        what: "task",
        from: from.to_string(),
        to: to.to_string(),
        hint,
    })
}

/// The state of a subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubtaskState {
    Pending,
    Running,
    Succeed,
    Failed,
    Canceled,
    Paused,
}

impl SubtaskState {
    pub const ALL: [SubtaskState; 6] = [
        SubtaskState::Pending,
        SubtaskState::Running,
        SubtaskState::Succeed,
        SubtaskState::Failed,
        SubtaskState::Canceled,
        SubtaskState::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubtaskState::Pending => "pending",
            SubtaskState::Running => "running",
            SubtaskState::Succeed => "succeed",
            SubtaskState::Failed => "failed",
            SubtaskState::Canceled => "canceled",
            SubtaskState::Paused => "paused",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            SubtaskState::Succeed | SubtaskState::Failed | SubtaskState::Canceled
        )
    }
}

impl fmt::Display for SubtaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SubtaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SubtaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown subtask state {s:?}"))
    }
}

/// Why a subtask changes state; some edges exist only for some reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubtaskChange {
    /// The normal lifecycle: claimed, reported, paused, cancelled.
    Normal,
    /// Its node was taken as dead, or it was moved or preempted: running →
    /// pending, allowed only for idempotent steps.
    Requeue,
    /// A retryable failure, run again later (running → pending).
    Retry,
    /// Manual recovery: an operator retries a failed subtask (failed → pending).
    Resolve,
}

/// Checks a subtask transition.
///
/// # Errors
/// [`IllegalTransition`] when the state machine has no such edge for this
/// reason.
pub fn check_subtask_transition(
    from: SubtaskState,
    to: SubtaskState,
    change: SubtaskChange,
    idempotent: bool,
) -> Result<(), IllegalTransition> {
    use SubtaskState::*;
    let (ok, hint) = match (from, to, change) {
        (Pending, Running | Paused | Canceled, SubtaskChange::Normal) => (true, None),
        (Running, Succeed | Failed | Canceled | Paused, SubtaskChange::Normal) => (true, None),
        (Paused, Pending, SubtaskChange::Normal) => (true, None),
        (Running, Pending, SubtaskChange::Retry) => (true, None),
        (Running, Pending, SubtaskChange::Requeue) => (
            idempotent,
            Some("only subtasks of idempotent steps are re-run elsewhere"),
        ),
        (Failed, Pending, SubtaskChange::Resolve) => (true, None),
        (s, _, _) if s.is_finished() => (false, Some("the subtask has finished")),
        _ => (false, None),
    };
    if ok {
        return Ok(());
    }
    Err(IllegalTransition {
        what: "subtask",
        from: from.to_string(),
        to: to.to_string(),
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    #[test]
    fn only_running_resuming_or_modified_while_running_tasks_accept_work() {
        for s in TaskState::ALL {
            assert_eq!(s.accepts_work(None), matches!(s, Running | Resuming), "{s}");
        }
        assert!(Modifying.accepts_work(Some(Running)));
        assert!(!Modifying.accepts_work(Some(Paused)));
        assert!(!Modifying.accepts_work(Some(Pending)));
    }

    #[test]
    fn task_edges_are_exactly_the_design() {
        let expected: &[(TaskState, TaskState)] = &[
            (Pending, Running),
            (Pending, Failed),
            (Running, Succeed),
            (Running, Reverting),
            (Reverting, Reverted),
            (Pending, Cancelling),
            (Running, Cancelling),
            (AwaitingResolution, Cancelling),
            (Cancelling, Reverting),
            (Running, AwaitingResolution),
            (AwaitingResolution, Running),
            (Pending, Pausing),
            (Running, Pausing),
            (Pausing, Paused),
            (Paused, Resuming),
            (Resuming, Running),
            (Pending, Modifying),
            (Running, Modifying),
            (Paused, Modifying),
        ];
        for from in TaskState::ALL {
            for to in TaskState::ALL {
                if from == Modifying {
                    continue;
                }
                let allowed = check_task_transition(from, to, None).is_ok();
                assert_eq!(allowed, expected.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn modifying_returns_only_to_where_it_came_from() {
        for origin in [Pending, Running, Paused] {
            for to in TaskState::ALL {
                let allowed = check_task_transition(Modifying, to, Some(origin)).is_ok();
                assert_eq!(allowed, to == origin, "modifying(from {origin}) -> {to}");
            }
        }
    }

    #[test]
    fn finished_tasks_never_move() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_finished()) {
            for to in TaskState::ALL {
                let err = check_task_transition(from, to, None).unwrap_err();
                assert!(err.to_string().contains("has finished"), "{err}");
            }
        }
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("done".parse::<TaskState>().is_err());
        for s in SubtaskState::ALL {
            assert_eq!(s.as_str().parse::<SubtaskState>().unwrap(), s);
        }
        assert!("done".parse::<SubtaskState>().is_err());
    }

    #[test]
    fn subtask_requeue_needs_idempotence() {
        use SubtaskState::*;
        assert!(check_subtask_transition(Running, Pending, SubtaskChange::Requeue, true).is_ok());
        let err =
            check_subtask_transition(Running, Pending, SubtaskChange::Requeue, false).unwrap_err();
        assert!(err.to_string().contains("idempotent"), "{err}");
        assert!(check_subtask_transition(Running, Pending, SubtaskChange::Normal, true).is_err());
        assert!(check_subtask_transition(Failed, Pending, SubtaskChange::Resolve, false).is_ok());
        assert!(check_subtask_transition(Succeed, Pending, SubtaskChange::Resolve, true).is_err());
        for to in SubtaskState::ALL {
            for change in [
                SubtaskChange::Normal,
                SubtaskChange::Requeue,
                SubtaskChange::Retry,
            ] {
                assert!(check_subtask_transition(Succeed, to, change, true).is_err());
                assert!(check_subtask_transition(Canceled, to, change, true).is_err());
            }
        }
        assert!(check_subtask_transition(Pending, Running, SubtaskChange::Normal, false).is_ok());
        assert!(check_subtask_transition(Paused, Pending, SubtaskChange::Normal, false).is_ok());
        assert!(check_subtask_transition(Pending, Succeed, SubtaskChange::Normal, true).is_err());
    }
}
