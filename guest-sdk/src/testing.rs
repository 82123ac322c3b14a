//! Native test support (not on `wasm32`): the in-memory host's state and a
//! local driver that runs a whole task the way the cluster does.
//!
//! The host state is per thread, and `cargo test` runs each test on its own
//! thread, so tests do not see each other's blobs. Call [`reset`] to start
//! over within one test.
//!
//! ```
//! use stoker_guest::{testing, Error, Plan, PlanCtx, RunCtx, TaskType};
//!
//! struct Upper;
//! impl TaskType for Upper {
//!     fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
//!         Ok(if ctx.step == 0 { Plan::subtasks([ctx.input.clone()]) } else { Plan::done() })
//!     }
//!     fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
//!         Ok(ctx.payload.to_ascii_uppercase())
//!     }
//! }
//!
//! assert_eq!(testing::run_task::<Upper>(b"abc").unwrap(), b"ABC");
//! ```

use std::collections::BTreeMap;

use stoker_proto::guest::{
    FinishRequest, FinishResponse, GuestError, PlanRequest, PlanResponse, RevertRequest,
    RunRequest, RunResponse,
};
use stoker_proto::Message;

use crate::abi;
use crate::log::Level;
use crate::sys::native::{with_state, State};
use crate::{Error, TaskType, LOCAL_TASK_ID};

/// Forgets every blob, log line, progress report and checkpoint of this
/// thread.
pub fn reset() {
    with_state(|state| *state = State::default());
}

/// A copy of this thread's blob store.
pub fn blobs() -> BTreeMap<String, Vec<u8>> {
    with_state(|state| state.blobs.clone())
}

/// The log lines written so far on this thread.
pub fn logs() -> Vec<(Level, String)> {
    with_state(|state| state.logs.clone())
}

/// The latest `progress(done, total)` on this thread.
pub fn last_progress() -> Option<(u64, u64)> {
    with_state(|state| state.progress)
        .map(|(done, total)| (done.unsigned_abs(), total.unsigned_abs()))
}

/// Takes the checkpoint saved since the last call of this function.
pub fn take_checkpoint() -> Option<Vec<u8>> {
    with_state(|state| state.checkpoint.take())
}

/// Runs a whole task in-process: plan step 0, run its subtasks in ordinal
/// order, plan step 1 with their outputs, ... until done, then finish, going
/// through the same message encoding as the cluster.
///
/// Retryable errors are retried (attempt 2, 3, ...) with the subtask's last
/// checkpoint, up to `max_attempts`; a failure calls `revert` and is
/// returned with the step and ordinal in its message.
#[derive(Debug, Clone)]
pub struct LocalRun {
    /// The task id the calls see. Default `local`.
    pub task_id: String,
    /// `PlanRequest.node_count`. Default 1.
    pub node_count: u32,
    /// `PlanRequest.concurrency`. Default 1.
    pub concurrency: u32,
    /// Attempts per subtask. Default 3.
    pub max_attempts: u32,
    /// Steps after which the task is taken as runaway. Default 100.
    pub max_steps: u32,
}

impl Default for LocalRun {
    fn default() -> Self {
        Self {
            task_id: LOCAL_TASK_ID.to_owned(),
            node_count: 1,
            concurrency: 1,
            max_attempts: 3,
            max_steps: 100,
        }
    }
}

fn to_error(error: GuestError) -> Error {
    if error.retryable {
        Error::retryable(error.message)
    } else {
        Error::fatal(error.message)
    }
}

fn decode<M: Message + Default>(bytes: &[u8]) -> M {
    M::decode(bytes).expect("the SDK encodes valid responses")
}

impl LocalRun {
    /// Runs `T` on `input` and returns the task's result.
    ///
    /// # Errors
    /// The error that failed the task, prefixed with where it happened.
    pub fn run<T: TaskType>(&self, input: &[u8]) -> Result<Vec<u8>, Error> {
        match self.steps::<T>(input) {
            Ok(outputs) => self
                .finish::<T>(input, outputs)
                .map_err(|e| e.context("finish")),
            Err((step, error)) => {
                let request = RevertRequest {
                    input: input.to_vec(),
                    step,
                    reason: error.message().to_owned(),
                    task_id: self.task_id.clone(),
                };
                let response: stoker_proto::guest::RevertResponse =
                    decode(&abi::handle_revert::<T>(&request.encode_to_vec()));
                match response.error {
                    None => Err(error),
                    Some(revert) => {
                        Err(error.context(format!("revert failed too ({})", revert.message)))
                    }
                }
            }
        }
    }

    /// Plans and runs every step; the last step's outputs, or the step that
    /// failed and why.
    fn steps<T: TaskType>(&self, input: &[u8]) -> Result<Vec<Vec<u8>>, (u32, Error)> {
        let mut outputs = Vec::new();
        for step in 0..self.max_steps {
            let request = PlanRequest {
                step,
                input: input.to_vec(),
                previous_outputs: std::mem::take(&mut outputs),
                node_count: self.node_count,
                task_id: self.task_id.clone(),
                concurrency: self.concurrency,
            };
            let plan: PlanResponse = decode(&abi::handle_plan::<T>(&request.encode_to_vec()));
            if let Some(error) = plan.error {
                return Err((
                    step,
                    to_error(error).context(format!("plan of step {step}")),
                ));
            }
            if plan.done {
                return Ok(request.previous_outputs);
            }
            for (ordinal, payload) in (0..).zip(plan.subtasks) {
                let output = self
                    .subtask::<T>(step, ordinal, payload)
                    .map_err(|e| (step, e.context(format!("step {step} subtask {ordinal}"))))?;
                outputs.push(output);
            }
        }
        Err((
            self.max_steps,
            Error::fatal(format!(
                "task still planning after {} steps",
                self.max_steps
            )),
        ))
    }

    fn subtask<T: TaskType>(
        &self,
        step: u32,
        ordinal: u32,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        let mut checkpoint = Vec::new();
        take_checkpoint();
        let mut attempt = 1;
        loop {
            let request = RunRequest {
                step,
                ordinal,
                payload: payload.clone(),
                checkpoint: checkpoint.clone(),
                attempt,
                task_id: self.task_id.clone(),
            };
            let response: RunResponse = decode(&abi::handle_run::<T>(&request.encode_to_vec()));
            if let Some(saved) = take_checkpoint() {
                checkpoint = saved;
            }
            match response.error.map(to_error) {
                None => return Ok(response.output),
                Some(error) if error.is_retryable() && attempt < self.max_attempts => attempt += 1,
                Some(error) => return Err(error.context(format!("attempt {attempt}"))),
            }
        }
    }

    fn finish<T: TaskType>(&self, input: &[u8], outputs: Vec<Vec<u8>>) -> Result<Vec<u8>, Error> {
        let request = FinishRequest {
            input: input.to_vec(),
            outputs,
            task_id: self.task_id.clone(),
        };
        let response: FinishResponse = decode(&abi::handle_finish::<T>(&request.encode_to_vec()));
        match response.error {
            None => Ok(response.result),
            Some(error) => Err(to_error(error)),
        }
    }
}

/// [`LocalRun::run`] with the default settings.
///
/// # Errors
/// The error that failed the task.
pub fn run_task<T: TaskType>(input: &[u8]) -> Result<Vec<u8>, Error> {
    LocalRun::default().run::<T>(input)
}
