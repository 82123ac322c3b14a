//! `WatchTask`: a server stream of a task's state and progress. Each
//! applied log entry wakes the stream, which re-reads the task from this
//! node's state and sends an event when anything it shows changed.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use stoker_proto::api::{StepInfo, TaskEvent, WatchTaskRequest};
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::meta::to_status;
use super::service::{state_counts, StokerService};
use crate::meta::{queries, MetaNode};
use crate::model::TaskState;

/// The stream type of `WatchTask`.
pub type TaskEvents = Pin<Box<dyn Stream<Item = Result<TaskEvent, Status>> + Send>>;

/// Longest time without an applied entry before the stream looks again
/// anyway (e.g. after a leader change).
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// The task as a watcher sees it, `None` when missing or not the caller's.
fn snapshot(node: &MetaNode, caller: &Caller, id: u64) -> Result<Option<TaskEvent>, Status> {
    node.read_local(|p, t| {
        let Some(mut task) = queries::task(p, t, id)?.filter(|t| caller.sees(&t.tenant)) else {
            return Ok(None);
        };
        let mut steps = Vec::new();
        if task.started {
            for step in 0..=task.step {
                let counts = queries::step_counts(p, t, id, step)?;
                steps.push(StepInfo {
                    step,
                    counts: state_counts(&counts),
                });
            }
        }
        let finished = task
            .state
            .parse::<TaskState>()
            .is_ok_and(|s| s.is_finished());
        if !finished {
            task.result.clear();
        }
        Ok(Some(TaskEvent {
            task: Some(task),
            steps,
        }))
    })
    .map(|(v, _)| v)
    .map_err(to_status)
}

/// What a watcher compares: everything but times that change on their own.
fn shown(e: &TaskEvent) -> (String, u32, Vec<StepInfo>, u64) {
    let t = e.task.clone().unwrap_or_default();
    (t.state, t.step, e.steps.clone(), t.fuel_used)
}

impl StokerService {
    pub(super) async fn do_watch_task(
        &self,
        request: Request<WatchTaskRequest>,
    ) -> Result<Response<TaskEvents>, Status> {
        let caller = self.caller(&request).await?;
        let id = request.into_inner().id;
        let node = self.node().clone();
        node.read_barrier().await.map_err(to_status)?;
        let first = snapshot(&node, &caller, id)?
            .ok_or_else(|| Status::not_found(format!("task {id} not found")))?;
        let applied = node.applied_watch();
        let state = (node, caller, id, applied, None::<TaskEvent>, Some(first));
        let stream = futures::stream::unfold(
            state,
            |(node, caller, id, mut applied, last, next)| async move {
                // The pending event (the first one) goes out at once.
                if let Some(e) = next {
                    return Some((Ok(e.clone()), (node, caller, id, applied, Some(e), None)));
                }
                let last = last?;
                let done = last
                    .task
                    .as_ref()
                    .and_then(|t| t.state.parse::<TaskState>().ok())
                    .is_some_and(|s| s.is_finished());
                if done {
                    return None;
                }
                loop {
                    if let Ok(Err(_)) = tokio::time::timeout(IDLE_RECHECK, applied.changed()).await
                    {
                        let stopped = Status::unavailable("the metadata node stopped; watch again");
                        return Some((Err(stopped), (node, caller, id, applied, None, None)));
                    }
                    applied.borrow_and_update();
                    match snapshot(&node, &caller, id) {
                        Err(e) => return Some((Err(e), (node, caller, id, applied, None, None))),
                        Ok(None) => {
                            let gone = Status::not_found(format!("task {id} not found"));
                            return Some((Err(gone), (node, caller, id, applied, None, None)));
                        }
                        Ok(Some(e)) if shown(&e) != shown(&last) => {
                            return Some((
                                Ok(e.clone()),
                                (node, caller, id, applied, Some(e), None),
                            ));
                        }
                        Ok(Some(_)) => {}
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
