//! The local runner: all steps of one task on this machine. Plans each step
//! in a sandbox, runs its subtasks concurrently in N slots with retries and
//! exponential back-off, then finishes (or reverts on failure).
//!
//! It is the single-machine form of what the cluster's task scheduler and
//! executors do across nodes, and shares their building blocks: the sandbox,
//! the retry policy and the blob store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stoker_proto::guest::{FinishRequest, PlanRequest, RevertRequest, RunRequest};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::blob::TenantBlobs;
use crate::model::{Rank, DEFAULT_PRIORITY};
use crate::resource::{Governor, TaskInfo};
use crate::sandbox::{
    CallEnv, CallLimits, CallReport, ErrorKind, Plan, Sandbox, SandboxError, TaskModule,
};

/// Retries of failed calls: exponential back-off from `base`, doubling, up to
/// `max`, for at most `max_attempts` attempts in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `next` (2, 3, ...).
    pub fn backoff(&self, next: u32) -> Duration {
        let exp = next.saturating_sub(2).min(20);
        self.base.saturating_mul(1 << exp).min(self.max)
    }
}

/// How to run a task locally.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Subtasks that run at once.
    pub slots: usize,
    /// Limits of every call.
    pub limits: CallLimits,
    pub retry: RetryPolicy,
    /// The task's id (names its intermediate blobs `tasks/<id>/...`).
    pub task_id: String,
}

/// What happened while the task ran, for progress displays.
#[derive(Debug, Clone)]
pub enum Event {
    StepPlanned {
        step: u32,
        subtasks: usize,
    },
    SubtaskDone {
        step: u32,
        ordinal: u32,
        attempts: u32,
    },
    SubtaskRetry {
        step: u32,
        ordinal: u32,
        attempt: u32,
        error: SandboxError,
    },
    Finishing,
}

/// The end of a local run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub result: Result<Vec<u8>, SandboxError>,
    pub steps: u32,
    pub subtasks: u64,
    pub attempts: u64,
    pub fuel_used: u64,
    pub elapsed: Duration,
}

/// Runs tasks on this machine.
pub struct LocalRunner {
    sandbox: Arc<Sandbox>,
    blobs: Option<TenantBlobs>,
    governor: Option<Governor>,
}

/// The tenant of local runs in the fuel governor's accounting.
const LOCAL_TENANT: &str = "local";

struct Totals {
    steps: u32,
    subtasks: u64,
    attempts: u64,
    fuel_used: u64,
}

impl LocalRunner {
    pub fn new(sandbox: Arc<Sandbox>, blobs: Option<TenantBlobs>) -> Self {
        LocalRunner {
            sandbox,
            blobs,
            governor: None,
        }
    }

    /// Runs every subtask under `governor`: each takes its fuel quanta from
    /// it and may be suspended by it, so the governor (and the resource
    /// manager driving it) decides how many of the `slots` really run.
    /// Plan and finish calls stay ungoverned.
    pub fn with_governor(mut self, governor: Governor) -> Self {
        self.governor = Some(governor);
        self
    }

    fn env(&self, limits: &CallLimits) -> CallEnv {
        CallEnv {
            limits: limits.clone(),
            blobs: self.blobs.clone(),
            gate: None,
        }
    }

    /// Runs every step of a task from module bytes and input.
    pub async fn run(
        &self,
        module: &[u8],
        input: Vec<u8>,
        opts: &LocalOptions,
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> Summary {
        let started = Instant::now();
        let mut totals = Totals {
            steps: 0,
            subtasks: 0,
            attempts: 0,
            fuel_used: 0,
        };
        let result = match self.sandbox.load(module).await {
            Ok(module) => {
                let result = self
                    .drive(&module, &input, opts, on_event, &mut totals)
                    .await;
                if let Err(e) = &result {
                    self.revert(&module, &input, opts, totals.steps.saturating_sub(1), e)
                        .await;
                }
                result
            }
            Err(e) => Err(e),
        };
        Summary {
            result,
            steps: totals.steps,
            subtasks: totals.subtasks,
            attempts: totals.attempts,
            fuel_used: totals.fuel_used,
            elapsed: started.elapsed(),
        }
    }

    async fn drive(
        &self,
        module: &Arc<TaskModule>,
        input: &[u8],
        opts: &LocalOptions,
        on_event: &(dyn Fn(Event) + Send + Sync),
        totals: &mut Totals,
    ) -> Result<Vec<u8>, SandboxError> {
        let env = self.env(&opts.limits);
        let mut previous = Vec::new();
        for step in 0u32.. {
            let request = PlanRequest {
                step,
                input: input.to_vec(),
                previous_outputs: std::mem::take(&mut previous),
                node_count: 1,
                task_id: opts.task_id.clone(),
                concurrency: opts.slots as u32,
            };
            let plan = self
                .with_retries(opts, totals, |_| self.sandbox.plan(module, &env, &request))
                .await?;
            let Plan::Step { subtasks, .. } = plan else {
                // The outputs of the last step that ran go to finish.
                previous = request.previous_outputs;
                break;
            };
            totals.steps += 1;
            on_event(Event::StepPlanned {
                step,
                subtasks: subtasks.len(),
            });
            previous = self
                .run_step(module, step, subtasks, opts, on_event, totals)
                .await?;
        }
        on_event(Event::Finishing);
        let request = FinishRequest {
            input: input.to_vec(),
            outputs: previous,
            task_id: opts.task_id.clone(),
        };
        self.with_retries(opts, totals, |_| {
            self.sandbox.finish(module, &env, &request)
        })
        .await
    }

    /// Calls `call` until it succeeds, fails for good, or attempts run out.
    async fn with_retries<T, F, Fut>(
        &self,
        opts: &LocalOptions,
        totals: &mut Totals,
        call: F,
    ) -> Result<T, SandboxError>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = CallReport<T>>,
    {
        let mut attempt = 1;
        loop {
            let report = call(attempt).await;
            totals.fuel_used += report.fuel_used;
            match report.result {
                Err(e) if e.retryable && attempt < opts.retry.max_attempts => {
                    attempt += 1;
                    tokio::time::sleep(opts.retry.backoff(attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// Runs a step's subtasks in `opts.slots` slots; their outputs by ordinal.
    /// The first subtask that fails for good cancels the others.
    async fn run_step(
        &self,
        module: &Arc<TaskModule>,
        step: u32,
        payloads: Vec<Vec<u8>>,
        opts: &LocalOptions,
        on_event: &(dyn Fn(Event) + Send + Sync),
        totals: &mut Totals,
    ) -> Result<Vec<Vec<u8>>, SandboxError> {
        let slots = Arc::new(Semaphore::new(opts.slots.max(1)));
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut running = JoinSet::new();
        let count = payloads.len();
        let task = TaskInfo {
            tenant: LOCAL_TENANT.into(),
            // A local run is the only task of its runner.
            rank: Rank {
                priority: DEFAULT_PRIORITY,
                create_time_ms: 0,
                id: 0,
            },
            concurrency: opts.slots as u32,
        };
        for (ordinal, payload) in payloads.into_iter().enumerate() {
            let subtask = Subtask {
                sandbox: self.sandbox.clone(),
                module: module.clone(),
                env: self.env(&opts.limits),
                retry: opts.retry,
                task_id: opts.task_id.clone(),
                step,
                ordinal: ordinal as u32,
                payload,
            };
            let (slots, events) = (slots.clone(), events_tx.clone());
            let governed = self.governor.clone().map(|g| (g, task.clone()));
            running.spawn(async move {
                let _slot = slots
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let mut subtask = subtask;
                if let Some((governor, task)) = governed {
                    let lease = governor.lease(&subtask.task_id, &task);
                    subtask.env.gate = Some(lease);
                }
                subtask.run(&events).await
            });
        }
        drop(events_tx);
        let mut outputs = vec![Vec::new(); count];
        let mut failure = None;
        loop {
            tokio::select! {
                Some(event) = events_rx.recv() => on_event(event),
                joined = running.join_next() => {
                    let Some(joined) = joined else { break };
                    let done = match joined {
                        Ok(done) => done,
                        // Aborted after another subtask failed for good.
                        Err(e) if e.is_cancelled() => continue,
                        Err(e) => return Err(SandboxError::new(ErrorKind::Trap, format!("subtask task failed: {e}"))),
                    };
                    totals.subtasks += 1;
                    totals.attempts += u64::from(done.attempts);
                    totals.fuel_used += done.fuel_used;
                    match done.output {
                        Ok(output) => outputs[done.ordinal as usize] = output,
                        // The first subtask to fail for good is the cause;
                        // one that fails while the rest are being stopped is not.
                        Err(e) if failure.is_none() => {
                            failure = Some(SandboxError {
                                message: format!("subtask {step}/{}: {}", done.ordinal, e.message),
                                ..e
                            });
                            running.abort_all();
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        while let Ok(event) = events_rx.try_recv() {
            on_event(event);
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(outputs),
        }
    }

    /// Best-effort cleanup of a failed task: the guest's revert, then the
    /// task's intermediate blobs.
    async fn revert(
        &self,
        module: &TaskModule,
        input: &[u8],
        opts: &LocalOptions,
        step: u32,
        error: &SandboxError,
    ) {
        let request = RevertRequest {
            input: input.to_vec(),
            step,
            reason: error.to_string(),
            task_id: opts.task_id.clone(),
        };
        if let Some(report) = self
            .sandbox
            .revert(module, &self.env(&opts.limits), &request)
            .await
        {
            if let Err(e) = report.result {
                tracing::warn!(task_id = %opts.task_id, error = %e, "revert failed");
            }
        }
        if let Some(blobs) = &self.blobs {
            let prefix = format!("tasks/{}", opts.task_id);
            if let Err(e) = blobs.delete_prefix(&prefix).await {
                tracing::warn!(task_id = %opts.task_id, error = %e, "cannot delete intermediate blobs");
            }
        }
    }
}

/// One subtask with everything it needs to run on its own tokio task.
struct Subtask {
    sandbox: Arc<Sandbox>,
    module: Arc<TaskModule>,
    env: CallEnv,
    retry: RetryPolicy,
    task_id: String,
    step: u32,
    ordinal: u32,
    payload: Vec<u8>,
}

struct SubtaskDone {
    ordinal: u32,
    attempts: u32,
    fuel_used: u64,
    output: Result<Vec<u8>, SandboxError>,
}

impl Subtask {
    async fn run(self, events: &tokio::sync::mpsc::UnboundedSender<Event>) -> SubtaskDone {
        let mut fuel_used = 0;
        let mut checkpoint = Vec::new();
        let mut attempt = 1;
        loop {
            let request = RunRequest {
                step: self.step,
                ordinal: self.ordinal,
                payload: self.payload.clone(),
                checkpoint: checkpoint.clone(),
                attempt,
                task_id: self.task_id.clone(),
            };
            let report = self.sandbox.run(&self.module, &self.env, &request).await;
            fuel_used += report.fuel_used;
            if let Some(saved) = report.checkpoint {
                checkpoint = saved;
            }
            match report.result {
                Err(error) if error.retryable && attempt < self.retry.max_attempts => {
                    let _ = events.send(Event::SubtaskRetry {
                        step: self.step,
                        ordinal: self.ordinal,
                        attempt,
                        error,
                    });
                    attempt += 1;
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                output => {
                    if output.is_ok() {
                        let _ = events.send(Event::SubtaskDone {
                            step: self.step,
                            ordinal: self.ordinal,
                            attempts: attempt,
                        });
                    }
                    return SubtaskDone {
                        ordinal: self.ordinal,
                        attempts: attempt,
                        fuel_used,
                        output,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_millis(500),
        };
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(400));
        assert_eq!(p.backoff(5), Duration::from_millis(500));
        assert_eq!(p.backoff(60), Duration::from_millis(500));
    }
}
