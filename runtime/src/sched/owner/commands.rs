//! The owner's replicated commands: building them and proposing them, with
//! rejections and failures logged and left to the next round.

use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{
    change_subtasks, ChangeSubtasks, Command, CommandResult, RequeueSubtask, SetTaskState,
    SubtaskRef, MAX_BATCH_COMMANDS,
};
use tracing::{debug, warn};

use crate::meta::state_machine::{batch_of, read_batch_answer, BatchAnswer};
use crate::meta::{now_ms, MetaError, MetaNode};
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

/// [`propose_for`] for many commands (each rejection or failure logged),
/// as one [`CommandBatch`] proposal (a few for very many): each is applied
/// as if proposed alone, but the batch costs every replica one request id
/// and the leader one proposal. The results are in the order of
/// `commands`.
pub(super) async fn propose_batch(node: &MetaNode, commands: Vec<C>) -> Vec<Option<CommandResult>> {
    if commands.len() <= 1 {
        return futures::future::join_all(commands.into_iter().map(|c| propose_for(node, c))).await;
    }
    let answers =
        futures::future::join_all(commands.chunks(MAX_BATCH_COMMANDS).map(|chunk| async move {
            let answer = node.propose(Command {
                kind: Some(batch_of(chunk)),
            });
            let names = chunk.iter().map(command_name).collect();
            match split(names, answer.await) {
                Some(results) => results,
                None => {
                    debug!("the leader does not take batches; proposing one by one");
                    let each = chunk.iter().map(|c| propose_for(node, c.clone()));
                    futures::future::join_all(each).await
                }
            }
        }))
        .await;
    answers.into_iter().flatten().collect()
}

/// One result per command of a batch from the batch's answer (a failure
/// or a rejection of the whole batch is every command's); `None` when the
/// leader does not take batches and applied none of it.
fn split(
    names: Vec<&'static str>,
    answer: Result<CommandResult, MetaError>,
) -> Option<Vec<Option<CommandResult>>> {
    let n = names.len();
    let answer = match answer {
        Ok(r) => r,
        Err(e) => {
            warn!(commands = n, error = %e, "owner batch failed");
            return Some(vec![None; n]);
        }
    };
    match read_batch_answer(answer, n) {
        BatchAnswer::Each(results) => Some(
            names
                .into_iter()
                .zip(results)
                .map(|(what, r)| {
                    if !r.error.is_empty() {
                        debug!(command = what, error = %r.error, "owner command rejected");
                    }
                    Some(r)
                })
                .collect(),
        ),
        BatchAnswer::NotTaken => None,
        BatchAnswer::Rejected(r) => {
            warn!(commands = n, error = %r.error, "owner batch rejected");
            Some(vec![Some(r); n])
        }
    }
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

#[cfg(test)]
mod tests {
    use stoker_proto::meta::{command_result, CommandResults, CountResult};

    use crate::meta::state_machine::EMPTY_COMMAND;

    use super::*;

    fn count(n: u64) -> CommandResult {
        CommandResult {
            kind: Some(command_result::Kind::Count(CountResult { count: n })),
            error: String::new(),
        }
    }

    #[test]
    fn a_batch_answer_is_split_per_command() {
        let rejected = CommandResult {
            kind: None,
            error: "no such subtask".into(),
        };
        let answer = CommandResult {
            kind: Some(command_result::Kind::Batch(CommandResults {
                results: vec![count(1), rejected.clone(), count(3)],
            })),
            error: String::new(),
        };
        let names = vec!["assign_subtask"; 3];
        assert_eq!(
            split(names, Ok(answer)),
            Some(vec![Some(count(1)), Some(rejected), Some(count(3))])
        );
        // A leader of a release before batches.
        let old = CommandResult {
            kind: None,
            error: EMPTY_COMMAND.into(),
        };
        assert_eq!(split(vec!["a"; 2], Ok(old)), None);
    }

    #[test]
    fn a_batch_rejected_or_failed_whole_is_every_commands_outcome() {
        let whole = CommandResult {
            kind: None,
            error: "a batch cannot hold a batch".into(),
        };
        let out = split(vec!["a"; 2], Ok(whole.clone()));
        assert_eq!(out, Some(vec![Some(whole.clone()), Some(whole)]));
        // An answer of the wrong shape (fewer results) is a rejection.
        let short = CommandResult {
            kind: Some(command_result::Kind::Batch(CommandResults {
                results: vec![count(1)],
            })),
            error: String::new(),
        };
        let out = split(vec!["a"; 2], Ok(short)).unwrap();
        assert!(out.iter().all(|r| r
            .as_ref()
            .is_some_and(|r| r.error.contains("another result"))));
        // Not applied: no result for any.
        assert_eq!(
            split(vec!["a"; 2], Err(MetaError::LeaderChanged)),
            Some(vec![None, None])
        );
    }
}
