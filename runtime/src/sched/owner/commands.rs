//! The owner's replicated commands: building them and proposing them, with
//! rejections and failures logged and left to the next round.

use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{
    change_subtasks, ChangeSubtasks, Command, CommandResult, RequeueSubtask, SetTaskState,
    SubtaskRef,
};
use tracing::{debug, warn};

use crate::meta::{now_ms, MetaNode};
use crate::model::{TaskId, TaskState};

/// Takes (step, ordinal) back from the node it holds at `attempt`;
/// `only_pending` leaves it alone if it has started since.
pub(super) fn requeue(
    task: TaskId,
    (step, ordinal, attempt): (u32, u32, u32),
    why: &str,
    only_pending: bool,
    now: u64,
) -> C {
    C::RequeueSubtask(RequeueSubtask {
        subtask: Some(SubtaskRef {
            task_id: task,
            step,
            ordinal,
        }),
        attempt,
        or_fail: false,
        reason: why.into(),
        time_ms: now,
        only_pending,
    })
}

/// Proposes one owner command; a rejection or failure is logged and left
/// to the next round, which decides again from the replicated state.
/// Whether it was applied and accepted.
pub(super) async fn propose(node: &MetaNode, kind: C) -> bool {
    propose_for(node, kind)
        .await
        .is_some_and(|r| r.error.is_empty())
}

/// [`propose`], returning the applied result (an accepted command or a
/// rejection); `None` when the command was not applied.
pub(super) async fn propose_for(node: &MetaNode, kind: C) -> Option<CommandResult> {
    let what = command_name(&kind);
    match node.propose(Command { kind: Some(kind) }).await {
        Ok(r) => {
            if !r.error.is_empty() {
                debug!(command = what, error = %r.error, "owner command rejected");
            }
            Some(r)
        }
        Err(e) => {
            warn!(command = what, error = %e, "owner command failed");
            None
        }
    }
}

/// Proposes many commands at once (they share log entries).
pub(super) async fn propose_all(node: &MetaNode, commands: Vec<C>) {
    futures::future::join_all(commands.into_iter().map(|c| propose(node, c))).await;
}

fn command_name(kind: &C) -> &'static str {
    match kind {
        C::AddSubtasks(_) => "add_subtasks",
        C::AssignSubtask(_) => "assign_subtask",
        C::RequeueSubtask(_) => "requeue_subtask",
        C::SetTaskState(_) => "set_task_state",
        C::FinishTask(_) => "finish_task",
        C::ChangeSubtasks(_) => "change_subtasks",
        C::MarkNodeDown(_) => "mark_node_down",
        C::GcHistory(_) => "gc_history",
        _ => "command",
    }
}

pub(super) fn set_state(id: TaskId, state: TaskState, error: String) -> C {
    C::SetTaskState(SetTaskState {
        id,
        state: state.to_string(),
        error,
    })
}

pub(super) fn change(id: TaskId, kind: change_subtasks::Kind, include_running: bool) -> C {
    C::ChangeSubtasks(ChangeSubtasks {
        task_id: id,
        kind: kind as i32,
        include_running,
        time_ms: now_ms(),
    })
}
