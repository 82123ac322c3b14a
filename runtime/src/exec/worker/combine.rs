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
//!
//! [`EMPTY_COMMAND`]: crate::meta::state_machine::EMPTY_COMMAND

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use stoker_proto::meta::command::Kind;
use stoker_proto::meta::CommandResult;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::debug;

use super::Shared;
use crate::api::batch::next_batch;
use crate::meta::state_machine::{batch_of, read_batch_answer, BatchAnswer};

/// Batches in flight at once; more proposals wait and leave together.
const MAX_IN_FLIGHT: usize = 2;
/// Commands in one batch (well under `MAX_BATCH_COMMANDS`).
const MAX_BATCH: usize = 64;
/// Encoded bytes in one batch: a report may carry a large inline output
/// and checkpoint, and the batch is one log entry; a command beyond this
/// leaves in a batch of its own.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Proposals waiting; executors wait beyond this.
const QUEUE: usize = 1024;
/// How long commands go one by one after a leader refused a batch.
const UNBATCHED_FOR: Duration = Duration::from_secs(60);

type Answer = Result<CommandResult, String>;
/// A command waiting to be proposed, and where its answer goes.
type Queued = (Kind, oneshot::Sender<Answer>);

/// A queue of proposals drained by a task that ends with the worker.
pub(super) struct Combiner {
    queue: mpsc::Sender<Queued>,
    /// Until when commands go one by one (a leader refused a batch).
    unbatched_until: Mutex<Option<Instant>>,
}

impl Combiner {
    /// A combiner and the receiving end its drain task takes
    /// ([`Combiner::drain`]).
    pub(super) fn new() -> (Self, mpsc::Receiver<Queued>) {
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

    /// Drains the queue of `shared`'s combiner until the worker is gone;
    /// `stop` ends the proposals in flight too (they would otherwise retry
    /// for as long as the cluster does not answer).
    pub(super) async fn drain(
        shared: Weak<Shared>,
        mut rx: mpsc::Receiver<Queued>,
        stop: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut carried = None;
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let size = |q: &Queued| q.0.encoded_len();
            let next = next_batch(&mut rx, &mut carried, size, MAX_BATCH, MAX_BATCH_BYTES);
            let Some(batch) = next.await else {
                return;
            };
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let alone = |cmd| shared.propose_alone(cmd);
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    () = shared.combiner.propose_together(batch, alone) => {}
                }
            });
        }
    }

    /// Proposes `batch`'s commands (as one batch when there are several)
    /// with `alone`, which proposes one command, and answers each.
    async fn propose_together<F, Fut>(&self, batch: Vec<Queued>, alone: F)
    where
        F: Fn(Kind) -> Fut,
        Fut: Future<Output = Answer>,
    {
        if batch.len() == 1 || !self.batching() {
            return one_by_one(batch, alone).await;
        }
        let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = commands.len();
        let answer = match alone(batch_of(&commands)).await {
            Ok(r) => read_batch_answer(r, n),
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        };
        match answer {
            BatchAnswer::Each(results) => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
            }
            BatchAnswer::NotTaken => {
                debug!("the leader does not take batches; proposing one by one");
                *self.unbatched_until.lock().expect("combiner lock") =
                    Some(Instant::now() + UNBATCHED_FOR);
                one_by_one(commands.into_iter().zip(replies).collect(), alone).await;
            }
            BatchAnswer::Rejected(r) => {
                for reply in replies {
                    let _ = reply.send(Ok(r.clone()));
                }
            }
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

async fn one_by_one<F, Fut>(batch: Vec<Queued>, alone: F)
where
    F: Fn(Kind) -> Fut,
    Fut: Future<Output = Answer>,
{
    futures::future::join_all(batch.into_iter().map(|(cmd, reply)| {
        let answer = alone(cmd);
        async move {
            let _ = reply.send(answer.await);
        }
    }))
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use stoker_proto::meta::{command_result, CommandResults, CountResult, SetConfig};

    use super::*;
    use crate::meta::state_machine::EMPTY_COMMAND;

    fn set(key: &str) -> Kind {
        Kind::SetConfig(SetConfig {
            key: key.into(),
            value: String::new(),
        })
    }

    fn count(n: u64) -> CommandResult {
        CommandResult {
            kind: Some(command_result::Kind::Count(CountResult { count: n })),
            error: String::new(),
        }
    }

    /// What a leader answers one command: a batch, result by result (the
    /// key's length as a count), when it takes batches; otherwise the
    /// rejection a release before batches gives.
    fn leader(takes_batches: bool, calls: &AtomicUsize, cmd: Kind) -> Answer {
        calls.fetch_add(1, Ordering::SeqCst);
        let one = |k: &Kind| match k {
            Kind::SetConfig(c) => count(c.key.len() as u64),
            _ => unreachable!("the test proposes settings only"),
        };
        Ok(match &cmd {
            Kind::Batch(b) if takes_batches => CommandResult {
                kind: Some(command_result::Kind::Batch(CommandResults {
                    results: b
                        .commands
                        .iter()
                        .map(|c| one(c.kind.as_ref().unwrap()))
                        .collect(),
                })),
                error: String::new(),
            },
            Kind::Batch(_) => CommandResult {
                kind: None,
                error: EMPTY_COMMAND.into(),
            },
            k => one(k),
        })
    }

    /// Queues `keys` and proposes them together; each one's answer.
    async fn together(
        c: &Combiner,
        keys: &[&str],
        takes: bool,
        calls: &AtomicUsize,
    ) -> Vec<Answer> {
        let (batch, answers): (Vec<_>, Vec<_>) = keys
            .iter()
            .map(|k| {
                let (tx, rx) = oneshot::channel();
                ((set(k), tx), rx)
            })
            .unzip();
        let alone = |cmd| std::future::ready(leader(takes, calls, cmd));
        c.propose_together(batch, alone).await;
        let mut out = Vec::new();
        for a in answers {
            out.push(a.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn commands_go_as_one_batch_and_each_gets_its_own_result() {
        let (c, _rx) = Combiner::new();
        let calls = AtomicUsize::new(0);
        let answers = together(&c, &["a", "bb", "ccc"], true, &calls).await;
        assert_eq!(answers, vec![Ok(count(1)), Ok(count(2)), Ok(count(3))]);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one proposal");
    }

    #[tokio::test]
    async fn a_leader_without_batches_gets_them_one_by_one_for_a_while() {
        let (c, _rx) = Combiner::new();
        let calls = AtomicUsize::new(0);
        let answers = together(&c, &["a", "bb"], false, &calls).await;
        assert_eq!(answers, vec![Ok(count(1)), Ok(count(2))]);
        // The refused batch, then each alone.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // No batch is tried meanwhile.
        let calls = AtomicUsize::new(0);
        let answers = together(&c, &["ddd", "e"], true, &calls).await;
        assert_eq!(answers, vec![Ok(count(3)), Ok(count(1))]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Until the time is up.
        *c.unbatched_until.lock().unwrap() = Some(Instant::now());
        let calls = AtomicUsize::new(0);
        together(&c, &["f", "g"], true, &calls).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_batch_is_every_commands_failure() {
        let (c, _rx) = Combiner::new();
        let (batch, answers): (Vec<_>, Vec<_>) = ["a", "b"]
            .iter()
            .map(|k| {
                let (tx, rx) = oneshot::channel();
                ((set(k), tx), rx)
            })
            .unzip();
        let alone = |_| std::future::ready(Err("refused".to_string()));
        c.propose_together(batch, alone).await;
        for a in answers {
            assert_eq!(a.await.unwrap(), Err("refused".to_string()));
        }
    }
}
