//! The executor of one subtask: fetch its module, claim it (fenced by node
//! and attempt), run it in the sandbox, report the outcome (fenced too).
//! A subtask of an idempotent step runs before its claim: a run that ends
//! within the claim delay claims with its report, a longer one is claimed
//! while it runs and stopped if the claim is refused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use stoker_proto::api::Assignment;
use stoker_proto::guest::RunRequest;
use stoker_proto::meta::command::Kind;
use stoker_proto::meta::{ClaimSubtask, ReportSubtask, SubtaskRecord, SubtaskRef};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::assignments::reconcile;
use super::modules::{ModuleError, MODULE_TRIES};
use super::{key_of, subtask_log_key, Shared};
use crate::meta::now_ms;
use crate::meta::records::MAX_INLINE_BYTES;
use crate::model::{Rank, SubtaskState};
use crate::resource::{FuelGate, TaskInfo};
use crate::sandbox::{CallEnv, CallLimits, SandboxError, TaskModule};

/// How long a refused claim is not retried.
const CLAIM_BLOCK: Duration = Duration::from_millis(500);

/// How a run ended, for the bookkeeping after it.
enum Ended {
    /// Reported, or dropped as stale: do not start it again.
    Done,
    /// The claim was refused: maybe try again after a moment.
    ClaimRefused,
}

/// One subtask on its own tokio task.
pub(super) struct Executor {
    pub(super) shared: Arc<Shared>,
    pub(super) assignment: Assignment,
    pub(super) adopt: bool,
    pub(super) run: u64,
    pub(super) pause: watch::Receiver<bool>,
    pub(super) concurrency: u32,
    /// When this process's claim was accepted (not set for adopted runs).
    pub(super) claimed: std::sync::OnceLock<Instant>,
}

/// What a report says.
#[derive(Default)]
struct Outcome {
    state: &'static str,
    output: Vec<u8>,
    output_blob: String,
    error: String,
    retryable: bool,
    fuel_used: u64,
    checkpoint: Vec<u8>,
    /// When an unclaimed run started; 0: the run was claimed.
    start_time_ms: u64,
}

impl Executor {
    fn subtask(&self) -> &SubtaskRecord {
        self.assignment
            .subtask
            .as_ref()
            .expect("assignments without a subtask are never started")
    }

    fn subtask_ref(&self) -> SubtaskRef {
        let s = self.subtask();
        SubtaskRef {
            task_id: s.task_id,
            step: s.step,
            ordinal: s.ordinal,
        }
    }

    pub(super) async fn run(self) {
        let ended = self.execute().await;
        let key = key_of(self.subtask());
        let attempt = self.subtask().attempt;
        {
            let mut st = self.shared.state.lock().expect("state lock");
            if st.running.get(&key).is_some_and(|e| e.run == self.run) {
                st.running.remove(&key);
            }
            st.reporting.remove(&(key, attempt));
            match ended {
                Ended::Done => {
                    st.finished.insert((key, attempt));
                }
                Ended::ClaimRefused => {
                    st.blocked
                        .insert((key, attempt), Instant::now() + CLAIM_BLOCK);
                }
            }
        }
        // A slot is free: start the next subtask.
        reconcile(&self.shared);
    }

    async fn execute(&self) -> Ended {
        let mut tries = 0;
        let module = loop {
            tries += 1;
            match self.shared.module(&self.assignment.module_hash).await {
                Ok(m) => break Ok(m),
                Err(ModuleError::Bad(e)) => break Err(e),
                // A server behind the one that assigned the subtask may not
                // have the module yet; give up only after asking around.
                Err(ModuleError::NotFound(e)) if tries >= MODULE_TRIES => {
                    break Err(SandboxError::invalid_module(e))
                }
                Err(ModuleError::NotFound(e) | ModuleError::Unreachable(e)) => {
                    warn!(error = %e, "cannot fetch the module; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // A subtask of an idempotent step runs at once and is claimed only
        // if it is still running after the claim delay: running it twice is
        // harmless, and the fenced report commits one run's output.
        let lazy = !self.adopt
            && self.subtask().idempotent
            && module.is_ok()
            && !self.shared.cfg.claim_delay().is_zero();
        if !self.adopt && !lazy {
            if let Err(e) = self.claim().await {
                debug!(error = %e, "claim refused: dropped");
                return Ended::ClaimRefused;
            }
            debug!("claimed");
            self.started(Instant::now());
        }
        let checkpoint = self.subtask().checkpoint.clone();
        if *self.pause.borrow() {
            if lazy {
                // Pending still: the pause takes it from the pool.
                return Ended::ClaimRefused;
            }
            self.took();
            return self.paused(checkpoint).await;
        }
        if !lazy {
            // Claimed now, or already running here at this attempt (adopted).
            self.took();
        }
        if self.adopt && !self.subtask().idempotent {
            warn!("a non-idempotent subtask was running when this worker restarted: failing it");
            return self
                .report(Outcome {
                    state: SubtaskState::Failed.as_str(),
                    error:
                        "the worker restarted while the subtask ran, and its step is not idempotent"
                            .into(),
                    ..Outcome::default()
                })
                .await;
        }
        let module = match module {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "module unusable: subtask failed");
                return self
                    .report(Outcome {
                        state: SubtaskState::Failed.as_str(),
                        error: e.to_string(),
                        retryable: e.retryable,
                        checkpoint,
                        ..Outcome::default()
                    })
                    .await;
            }
        };
        // Per subtask: debug, or a busy node's log is mostly these lines.
        debug!(adopted = self.adopt, claimed = !lazy, "subtask running");
        let start_time_ms = now_ms();
        if lazy {
            self.started(Instant::now());
        }
        // Boxed so that a pause or a refused claim drops the call (and its
        // instance and governor lease) at once.
        let mut sandbox_run = Box::pin(self.call(&module, checkpoint.clone()));
        let mut pause = self.pause.clone();
        let paused = async move {
            if pause.wait_for(|p| *p).await.is_err() {
                // The worker forgot this run: it is being aborted.
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(paused);
        let mut ended = None;
        if lazy {
            tokio::select! {
                outcome = &mut sandbox_run => {
                    // Done before the claim was due: the report claims.
                    let o = Outcome { start_time_ms, ..outcome };
                    return self.report(o).await;
                }
                () = tokio::time::sleep(self.shared.cfg.claim_delay()) => {}
                // Pending still: the pause takes it from the pool.
                () = &mut paused => return Ended::ClaimRefused,
            }
            // Still running: claim it while it goes on. A pause waits for
            // the claim's answer, so that no claim lands after the run is
            // gone.
            let claim = self.claim();
            tokio::pin!(claim);
            let claimed = loop {
                tokio::select! {
                    r = &mut claim => break r,
                    outcome = &mut sandbox_run, if ended.is_none() => ended = Some(outcome),
                }
            };
            if let Err(e) = claimed {
                debug!(error = %e, "claim refused: run stopped");
                return Ended::ClaimRefused;
            }
            debug!("claimed");
            self.took();
        }
        let outcome = match ended {
            Some(outcome) => outcome,
            None => tokio::select! {
                outcome = &mut sandbox_run => outcome,
                () = &mut paused => {
                    drop(sandbox_run);
                    return self.paused(checkpoint).await;
                }
            },
        };
        self.report(outcome).await
    }

    /// The run starts (claimed, or unclaimed for a quick idempotent run):
    /// its clock for the run-time metric, and the start delay of a first
    /// step's first attempt.
    fn started(&self, at: Instant) {
        let _ = self.claimed.set(at);
        let s = self.subtask();
        if s.step == 0 && s.attempt == 1 {
            let delay_ms = now_ms().saturating_sub(self.assignment.task_create_time_ms);
            self.shared
                .stats
                .start_delay_seconds
                .observe(delay_ms as f64 / 1000.0);
        }
    }

    /// This process holds the subtask at its attempt (claimed or adopted).
    fn took(&self) {
        let s = self.subtask();
        self.shared.took(key_of(s), s.attempt);
    }

    /// Runs the subtask in the sandbox; the report to make.
    async fn call(&self, module: &TaskModule, checkpoint: Vec<u8>) -> Outcome {
        let a = &self.assignment;
        let s = self.subtask();
        let cfg = &self.shared.cfg;
        let pick = |task: u64, default: u64| if task == 0 { default } else { task };
        let limits = CallLimits {
            fuel: pick(a.fuel_limit, cfg.fuel_limit),
            memory_bytes: pick(a.memory_limit, cfg.memory_limit)
                .min(self.shared.sandbox.config().max_memory_bytes),
            deadline: Duration::from_millis(cfg.deadline_ms),
            ..CallLimits::default()
        };
        let blobs = match self.shared.blobs.tenant(&a.tenant) {
            Ok(b) => b,
            Err(e) => {
                return Outcome {
                    state: SubtaskState::Failed.as_str(),
                    error: format!("blob store: {e}"),
                    checkpoint,
                    ..Outcome::default()
                }
            }
        };
        let task_id = s.task_id.to_string();
        let gate = self.shared.resource.as_ref().map(|r| {
            let g = r.governor();
            g.set_tenant_rate(&a.tenant, Some(a.tenant_fuel_per_second));
            let info = TaskInfo {
                tenant: a.tenant.clone(),
                rank: Rank {
                    priority: a.priority,
                    create_time_ms: a.task_create_time_ms,
                    id: s.task_id,
                },
                concurrency: self.concurrency,
            };
            g.lease(&task_id, &info) as Arc<dyn FuelGate>
        });
        let env = CallEnv {
            limits,
            blobs: Some(blobs.clone()),
            gate,
        };
        let request = RunRequest {
            step: s.step,
            ordinal: s.ordinal,
            payload: s.payload.clone(),
            checkpoint: checkpoint.clone(),
            attempt: s.attempt,
            task_id: task_id.clone(),
        };
        let report = self.shared.sandbox.run(module, &env, &request).await;
        if !report.log.is_empty() {
            // Kept in the tenant's blobs for `GetSubtaskLog`; losing it
            // does not fail the subtask.
            let key = subtask_log_key(s.task_id, s.step, s.ordinal, s.attempt);
            if let Err(e) = blobs.put(&key, Bytes::from(report.log.clone())).await {
                warn!(error = %e, blob = %key, "cannot store the subtask's log");
            }
        }
        let checkpoint = report.checkpoint.unwrap_or(checkpoint);
        let fuel_used = report.fuel_used;
        match report.result {
            Ok(output) if output.len() <= MAX_INLINE_BYTES => {
                debug!(fuel_used, bytes = output.len(), "subtask succeeded");
                Outcome {
                    state: SubtaskState::Succeed.as_str(),
                    output,
                    fuel_used,
                    checkpoint,
                    ..Outcome::default()
                }
            }
            Ok(output) => {
                let key = format!("tasks/{task_id}/out/{}-{}-{}", s.step, s.ordinal, s.attempt);
                let size = output.len();
                match blobs.put(&key, Bytes::from(output)).await {
                    Ok(()) => {
                        debug!(fuel_used, bytes = size, blob = %key, "subtask succeeded");
                        Outcome {
                            state: SubtaskState::Succeed.as_str(),
                            output_blob: key,
                            fuel_used,
                            checkpoint,
                            ..Outcome::default()
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot store the output");
                        Outcome {
                            state: SubtaskState::Failed.as_str(),
                            error: format!("cannot store the output in {key}: {e}"),
                            retryable: true,
                            fuel_used,
                            checkpoint,
                            ..Outcome::default()
                        }
                    }
                }
            }
            Err(e) => {
                info!(fuel_used, error = %e, retryable = e.retryable, "subtask failed");
                Outcome {
                    state: SubtaskState::Failed.as_str(),
                    error: e.to_string(),
                    retryable: e.retryable,
                    fuel_used,
                    checkpoint,
                    ..Outcome::default()
                }
            }
        }
    }

    /// Reports the run `paused` (its task is pausing). The guest's
    /// checkpoints of the aborted call are lost with it; the subtask's last
    /// committed checkpoint is kept.
    async fn paused(&self, checkpoint: Vec<u8>) -> Ended {
        info!("task pausing: subtask stopped");
        self.report(Outcome {
            state: SubtaskState::Paused.as_str(),
            checkpoint,
            ..Outcome::default()
        })
        .await
    }

    async fn claim(&self) -> Result<(), String> {
        let cmd = Kind::ClaimSubtask(ClaimSubtask {
            subtask: Some(self.subtask_ref()),
            node: self.shared.id,
            attempt: self.subtask().attempt,
            time_ms: now_ms(),
        });
        let result = self.shared.propose(cmd).await?;
        if result.error.is_empty() {
            Ok(())
        } else {
            Err(result.error)
        }
    }

    /// The run is over and only its report is left: the slot goes to the
    /// next subtask (a queued one starts at once) while the report commits;
    /// the run is not started again meanwhile.
    fn release(&self) {
        let key = key_of(self.subtask());
        {
            let mut st = self.shared.state.lock().expect("state lock");
            let Some(e) = st.running.remove(&key) else {
                return;
            };
            if e.run != self.run {
                // Another run of the key (a later attempt) holds it.
                st.running.insert(key, e);
                return;
            }
            st.reporting.insert((key, e.attempt), e.abort);
        }
        reconcile(&self.shared);
    }

    async fn report(&self, o: Outcome) -> Ended {
        self.release();
        let state = o.state;
        let unclaimed = o.start_time_ms != 0;
        if let Some(claimed) = self.claimed.get() {
            self.shared
                .stats
                .observe_run(state, claimed.elapsed().as_secs_f64());
        }
        let cmd = Kind::ReportSubtask(ReportSubtask {
            subtask: Some(self.subtask_ref()),
            node: self.shared.id,
            attempt: self.subtask().attempt,
            state: o.state.to_string(),
            output: o.output,
            output_blob: o.output_blob,
            error: o.error,
            retryable: o.retryable,
            fuel_used: o.fuel_used,
            checkpoint: o.checkpoint,
            time_ms: now_ms(),
            start_time_ms: o.start_time_ms,
        });
        match self.shared.propose(cmd).await {
            Ok(r) if r.error.is_empty() => {
                debug!(state, unclaimed, "reported");
                if unclaimed {
                    self.took();
                }
            }
            // Its claim was refused, or the report was lost: as after a
            // claim of its own, the subtask is tried again if it is still
            // assigned here (pending) after a moment.
            Ok(r) if unclaimed => {
                debug!(state, error = %r.error, "unclaimed run's report refused");
                return Ended::ClaimRefused;
            }
            Err(e) if unclaimed => {
                warn!(state, error = %e, "unclaimed run's report refused");
                return Ended::ClaimRefused;
            }
            Ok(r) => debug!(state, error = %r.error, "stale report dropped"),
            Err(e) => warn!(state, error = %e, "report refused"),
        }
        Ended::Done
    }
}
