//! The executors' claims and reports, proposed together: what the executors
//! queue while earlier proposals are in flight leaves as one
//! `CommandBatch` under one request id. Every replica then records one
//! request id for many reports instead of one each, and the leader takes
//! one proposal.
//!
//! A leader of a release before batches answers a batch with the rejection
//! [`EMPTY_COMMAND`] (it cannot decode the batch and applies nothing, on
//! every node alike); the commands are then proposed one by one, and no
//! batch is tried again for [`UNBATCHED_FOR`].

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use stoker_proto::meta::command::Kind;
use stoker_proto::meta::{command_result, Command, CommandBatch, CommandResult};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::debug;

use super::Shared;
use crate::meta::state_machine::EMPTY_COMMAND;

/// Batches in flight at once; more proposals wait and leave together.
const MAX_IN_FLIGHT: usize = 2;
/// Commands in one batch (well under `MAX_BATCH_COMMANDS`; a report may
/// carry up to an inline output).
const MAX_BATCH: usize = 64;
/// Proposals waiting; executors wait beyond this.
const QUEUE: usize = 1024;
/// How long commands go one by one after a leader refused a batch.
const UNBATCHED_FOR: Duration = Duration::from_secs(60);

type Answer = Result<CommandResult, String>;

/// A queue of proposals drained by a task that ends with the worker.
pub(super) struct Combiner {
    queue: mpsc::Sender<(Kind, oneshot::Sender<Answer>)>,
    /// Until when commands go one by one (a leader refused a batch).
    unbatched_until: Mutex<Option<Instant>>,
}

impl Combiner {
    /// A combiner and the receiving end its drain task takes
    /// ([`Combiner::drain`]).
    pub(super) fn new() -> (Self, mpsc::Receiver<(Kind, oneshot::Sender<Answer>)>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let combiner = Combiner {
            queue,
            unbatched_until: Mutex::new(None),
        };
        (combiner, rx)
    }

    /// Proposes `cmd` with whatever else is queued; its own result, as
    /// [`Shared::propose_alone`] gives it.
    pub(super) async fn propose(&self, cmd: Kind) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((cmd, reply))
            .await
            .map_err(|_| "the worker is stopping".to_string())?;
        answer
            .await
            .map_err(|_| "the worker is stopping".to_string())?
    }

    /// Drains the queue of `shared`'s combiner until the worker is gone.
    pub(super) async fn drain(
        shared: Weak<Shared>,
        mut rx: mpsc::Receiver<(Kind, oneshot::Sender<Answer>)>,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                let Ok(q) = rx.try_recv() else { break };
                batch.push(q);
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            tokio::spawn(async move {
                let _permit = permit;
                shared.propose_together(batch).await;
            });
        }
    }

    fn batching(&self) -> bool {
        let mut until = self.unbatched_until.lock().expect("combiner lock");
        match *until {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                *until = None;
                true
            }
            None => true,
        }
    }
}

impl Shared {
    /// Proposes `batch`'s commands (as one batch when there are several)
    /// and answers each.
    async fn propose_together(&self, batch: Vec<(Kind, oneshot::Sender<Answer>)>) {
        if batch.len() == 1 || !self.combiner.batching() {
            return self.one_by_one(batch).await;
        }
        let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = commands.len();
        let cmd = Kind::Batch(CommandBatch {
            commands: commands
                .iter()
                .map(|k| Command {
                    kind: Some(k.clone()),
                })
                .collect(),
        });
        match self.propose_alone(cmd).await {
            Ok(CommandResult {
                kind: Some(command_result::Kind::Batch(b)),
                ..
            }) if b.results.len() == n => {
                for (reply, r) in replies.into_iter().zip(b.results) {
                    let _ = reply.send(Ok(r));
                }
            }
            Ok(r) if r.kind.is_none() && r.error == EMPTY_COMMAND => {
                debug!(
                    node_id = self.id,
                    "the leader does not take batches; proposing one by one"
                );
                *self.combiner.unbatched_until.lock().expect("combiner lock") =
                    Some(Instant::now() + UNBATCHED_FOR);
                self.one_by_one(commands.into_iter().zip(replies).collect())
                    .await;
            }
            Ok(r) => {
                let error = if r.error.is_empty() {
                    format!("a batch of {n} commands was answered with another result")
                } else {
                    r.error
                };
                for reply in replies {
                    let _ = reply.send(Ok(CommandResult {
                        kind: None,
                        error: error.clone(),
                    }));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    async fn one_by_one(&self, batch: Vec<(Kind, oneshot::Sender<Answer>)>) {
        futures::future::join_all(batch.into_iter().map(|(cmd, reply)| async move {
            let _ = reply.send(self.propose_alone(cmd).await);
        }))
        .await;
    }
}
