//! The owner: the scheduler manager, task schedulers, node manager and
//! balancer of the Raft leader. It runs only while this node leads, started
//! and stopped by the leadership watch, and keeps no state of its own that
//! the replicated state does not hold: a new owner reads the tables and
//! carries on where the last one stopped.
//!
//! One *round* reads the applied state once and
//! 1. asks [`decide`] for each unfinished task's next action and starts it
//!    (one action per task at a time: planning calls the module's `plan` in
//!    a sandbox, finishing its `finish`, reverting its `revert`);
//! 2. admits running tasks in rank order (a task whose key falls in an
//!    active `subtask` placement rule only on the rule's nodes), preempts
//!    slots that admission gave to higher-ranked tasks, and runs the
//!    [coordinator](super::coordinator): its down-node checker marks silent
//!    workers down and takes their subtasks back (requeued for idempotent
//!    steps, failed otherwise), its rule checker and schedulers move queued
//!    subtasks and leadership;
//! 3. assigns pending subtasks to nodes with free slots (never to a node
//!    going down).
//!
//! Rounds run on a timer and whenever this node applies new entries.
//!
//! # Layout
//! - this module: the settings, the leadership watch, the term's loop, a
//!   round, and the collection of history and abandoned uploads.
//! - `view`: what a round reads, in one read transaction.
//! - `place`: step 2 and 3 of a round (admission to assignment) and taking
//!   down nodes the down-node checker found silent.
//! - `actions`: the task actions of step 1 (plan, finish, revert, state
//!   moves), with the module, input and output loading they need.
//! - `commands`: building and proposing the owner's replicated commands.

mod actions;
mod commands;
mod place;
mod view;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stoker_proto::meta::command::Kind as C;
use stoker_proto::meta::{GcHistory, SweepModuleStaging, TaskRecord};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::checkers::DEFAULT_NODE_TIMEOUT_MS;
use super::coordinator::{Board, Coordinator};
use super::task::{decide, Action};
use crate::blob::BlobStore;
use crate::exec::worker::task_logs_prefix;
use crate::meta::queries;
use crate::meta::{now_ms, MetaError, MetaNode};
use crate::model::TaskId;
use crate::sandbox::{CallLimits, Sandbox};
use actions::carry_out;
use commands::propose;
use view::read_view;

/// Default of [`OwnerConfig::queue_per_slot`].
pub const DEFAULT_QUEUE_PER_SLOT: u32 = 4;
/// Largest [`OwnerConfig::queue_per_slot`].
pub const MAX_QUEUE_PER_SLOT: u32 = 64;

/// The owner's settings (`[owner]` in the server config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OwnerConfig {
    /// Period of the scheduling round when nothing is applied, in ms.
    pub tick_ms: u64,
    /// A worker silent for this long is down, in ms.
    pub node_timeout_ms: u64,
    /// Finished tasks are deleted this long after they finish, in seconds.
    pub history_ttl_secs: u64,
    /// How often history is garbage-collected, in seconds.
    pub gc_interval_secs: u64,
    /// A module upload whose chunks stop coming for this long without a
    /// commit is swept (at the history collection), in seconds.
    pub upload_ttl_secs: u64,
    /// Subtasks one `AddSubtasks` command carries at most.
    pub subtask_batch: usize,
    /// Subtasks queued on a node per slot ahead of its free slots
    /// (assigned, not started): its worker starts the next one the moment
    /// a run ends, without waiting for a round and a commit. Only a task's
    /// whole stripe queues; preemption takes queued subtasks back first.
    /// 0 assigns only to free slots.
    pub queue_per_slot: u32,
    /// Attempts at `plan`, `finish` and `revert` calls that fail retryably.
    pub call_attempts: u32,
    /// Limits of the owner's `plan`, `finish` and `revert` calls (a task's
    /// own fuel and memory limits replace these when set).
    pub limits: CallLimits,
}

impl Default for OwnerConfig {
    fn default() -> Self {
        OwnerConfig {
            tick_ms: 200,
            node_timeout_ms: DEFAULT_NODE_TIMEOUT_MS,
            history_ttl_secs: 7 * 24 * 3600,
            gc_interval_secs: 60,
            upload_ttl_secs: 3600,
            subtask_batch: 1000,
            queue_per_slot: DEFAULT_QUEUE_PER_SLOT,
            call_attempts: 3,
            limits: CallLimits::default(),
        }
    }
}

impl OwnerConfig {
    /// Checks the values.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 || self.node_timeout_ms == 0 || self.gc_interval_secs == 0 {
            return Err("owner tick_ms, node_timeout_ms and gc_interval_secs must be > 0".into());
        }
        if self.subtask_batch == 0 || self.subtask_batch > crate::meta::records::MAX_SUBTASK_BATCH {
            return Err(format!(
                "owner subtask_batch must be 1..={}",
                crate::meta::records::MAX_SUBTASK_BATCH
            ));
        }
        if self.queue_per_slot > MAX_QUEUE_PER_SLOT {
            return Err(format!(
                "owner queue_per_slot must be at most {MAX_QUEUE_PER_SLOT}"
            ));
        }
        if self.call_attempts == 0 {
            return Err("owner call_attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// What every part of the owner shares.
struct Ctx {
    node: MetaNode,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    config: OwnerConfig,
    /// Where the coordinator's state is published for this node's API.
    board: Board,
}

/// Watches leadership and runs the owner while this node leads. Returns
/// when `stop` fires.
pub async fn run(
    node: MetaNode,
    sandbox: Arc<Sandbox>,
    blobs: BlobStore,
    config: OwnerConfig,
    board: Board,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ctx = Arc::new(Ctx {
        node: node.clone(),
        sandbox,
        blobs,
        config,
        board,
    });
    let mut leader = node.is_leader_watch();
    loop {
        let leading = *leader.borrow_and_update();
        if leading {
            info!(node_id = node.id(), "became owner");
            let term = tokio::spawn(own(ctx.clone()));
            tokio::select! {
                _ = leader.wait_for(|l| !*l) => {}
                _ = stop.wait_for(|s| *s) => {
                    term.abort();
                    return;
                }
            }
            term.abort();
            let _ = term.await;
            ctx.board.lock().expect("board lock").owner = false;
            info!(node_id = node.id(), "no longer owner");
        } else {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// One term of ownership: rounds until aborted.
async fn own(ctx: Arc<Ctx>) {
    // Apply everything committed before acting on it.
    while let Err(e) = ctx.node.read_barrier().await {
        debug!(error = %e, "owner waits for a read barrier");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut owner = Owner {
        ctx: ctx.clone(),
        since_ms: now_ms(),
        actions: JoinSet::new(),
        busy: HashMap::new(),
        last_gc_ms: 0,
        coordinator: Coordinator::continuing(
            Duration::from_millis(ctx.config.node_timeout_ms),
            &ctx.board,
        ),
    };
    let mut applied = ctx.node.applied_watch();
    let tick = Duration::from_millis(ctx.config.tick_ms);
    loop {
        if let Err(e) = owner.round().await {
            warn!(error = %e, "scheduling round failed");
        }
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(tick) => {}
            Some(done) = owner.actions.join_next_with_id() => owner.ended(done),
        }
        // Reap every other action that ended meanwhile.
        while let Some(done) = owner.actions.try_join_next_with_id() {
            owner.ended(done);
        }
    }
}

struct Owner {
    ctx: Arc<Ctx>,
    /// When this term began: nodes get a full timeout from then before
    /// the down-node checker takes them as down.
    since_ms: u64,
    actions: JoinSet<()>,
    /// Tasks with an action in flight, and its tokio task.
    busy: HashMap<TaskId, tokio::task::Id>,
    last_gc_ms: u64,
    coordinator: Coordinator,
}

impl Owner {
    /// An action ended (or panicked): its task may act again.
    fn ended(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        self.busy.retain(|_, v| *v != id);
    }

    async fn round(&mut self) -> Result<(), MetaError> {
        let now = now_ms();
        let watched = self.coordinator.operators.watched_subtasks();
        let view = read_view(&self.ctx.node, &watched, now)?;
        for t in &view.tasks {
            if self.busy.contains_key(&t.task.id) {
                continue;
            }
            let planned = t.task.started && t.task.step_planned;
            let action = decide(t.state, planned, &t.counts, t.task.manual_recovery);
            if action == Action::Wait {
                continue;
            }
            debug!(task_id = t.task.id, state = %t.state, ?action, "task action");
            let (ctx, task) = (self.ctx.clone(), t.task.clone());
            let handle = self
                .actions
                .spawn(async move { carry_out(&ctx, task, action).await });
            self.busy.insert(t.task.id, handle.id());
        }
        self.place(&view, now).await;
        if now.saturating_sub(self.last_gc_ms) >= self.ctx.config.gc_interval_secs * 1000 {
            self.last_gc_ms = now;
            self.collect_history(now).await?;
            self.sweep_uploads(now).await?;
        }
        Ok(())
    }

    /// Drops the staged chunks of module uploads abandoned for longer than
    /// `upload_ttl_secs` (a client that died between chunks and commit).
    async fn sweep_uploads(&self, now: u64) -> Result<(), MetaError> {
        let before = now.saturating_sub(self.ctx.config.upload_ttl_secs * 1000);
        let abandoned = self
            .ctx
            .node
            .read_local(|p, t| queries::abandoned_uploads(p, t, before))?
            .0;
        if abandoned > 0 {
            info!(uploads = abandoned, "sweeping abandoned module uploads");
            propose(
                &self.ctx.node,
                C::SweepModuleStaging(SweepModuleStaging { before_ms: before }),
            )
            .await;
        }
        Ok(())
    }

    /// Deletes tasks that finished more than `history_ttl_secs` ago: first
    /// their blobs (`tasks/<id>/`, a blob input, the subtask logs under
    /// `logs/<id>/`), then their records.
    /// A crash in between only repeats the blob deletion next time.
    async fn collect_history(&self, now: u64) -> Result<(), MetaError> {
        let before = now.saturating_sub(self.ctx.config.history_ttl_secs * 1000);
        let old = self
            .ctx
            .node
            .read_local(|p, t| queries::history_before(p, t, before, GC_BATCH))?
            .0;
        if old.is_empty() {
            return Ok(());
        }
        for task in &old {
            if let Err(e) = delete_task_blobs(&self.ctx.blobs, task).await {
                // Keep the records so that the next collection tries again.
                warn!(task_id = task.id, error = %e, "cannot delete the blobs of an old task");
                return Ok(());
            }
        }
        propose(
            &self.ctx.node,
            C::GcHistory(GcHistory {
                before_ms: before,
                limit: old.len() as u32,
            }),
        )
        .await;
        Ok(())
    }
}

/// Finished tasks deleted by one history collection at most.
const GC_BATCH: usize = 1000;

/// The blobs a task owns: everything under `tasks/<id>/` and `logs/<id>/`
/// (its subtasks' logs) of its tenant, and its input when that was stored
/// as a blob.
async fn delete_task_blobs(blobs: &BlobStore, task: &TaskRecord) -> Result<(), String> {
    let blobs = blobs.tenant(&task.tenant).map_err(|e| e.to_string())?;
    for prefix in [format!("tasks/{}", task.id), task_logs_prefix(task.id)] {
        blobs
            .delete_prefix(&prefix)
            .await
            .map_err(|e| e.to_string())?;
    }
    if !task.input_blob.is_empty() {
        blobs
            .delete(&task.input_blob)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_per_slot_is_bounded() {
        assert!(OwnerConfig::default().validate().is_ok());
        let at_most = OwnerConfig {
            queue_per_slot: MAX_QUEUE_PER_SLOT,
            ..OwnerConfig::default()
        };
        assert!(at_most.validate().is_ok());
        let none = OwnerConfig {
            queue_per_slot: 0,
            ..OwnerConfig::default()
        };
        assert!(none.validate().is_ok());
        let over = OwnerConfig {
            queue_per_slot: MAX_QUEUE_PER_SLOT + 1,
            ..OwnerConfig::default()
        };
        let e = over.validate().unwrap_err();
        assert!(e.contains("queue_per_slot"), "{e}");
    }
}
