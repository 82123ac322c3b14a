//! The trait an author implements, what each entry point receives, and what
//! `plan` answers.

use crate::Error;

/// The task id the contexts' `Default` impls use, for native tests.
pub const LOCAL_TASK_ID: &str = "local";

/// A task type: the code behind every step of a task.
///
/// Every call runs in a fresh instance of the module, so nothing kept in
/// memory (statics included) survives from one call to the next: pass state
/// along in payloads and outputs, in blobs, or in a [`crate::checkpoint`].
/// Export an implementation with [`crate::export!`].
pub trait TaskType {
    /// Plans step `ctx.step`: the subtasks that run it, or [`Plan::Done`]
    /// when the previous step was the last. Step 0 must not be done.
    ///
    /// # Errors
    /// A planning failure; the task fails unless it is retryable.
    fn plan(ctx: &PlanCtx) -> Result<Plan, Error>;

    /// Runs one subtask and returns its output, which becomes one entry of
    /// the next step's [`PlanCtx::previous_outputs`] (or of
    /// [`FinishCtx::outputs`] after the last step). A subtask can run more
    /// than once; only one output is kept.
    ///
    /// # Errors
    /// A retryable error runs the subtask again (attempt 2, 3, ...); a fatal
    /// one fails the task.
    fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error>;

    /// Produces the task's result from the last step's outputs. The default
    /// concatenates them in ordinal order, which is also what the host does
    /// for a module without `stoker_finish`.
    ///
    /// # Errors
    /// A failure fails the task.
    fn finish(ctx: &FinishCtx) -> Result<Vec<u8>, Error> {
        Ok(ctx.outputs.concat())
    }

    /// Cleans up after a failed or cancelled task (best effort, called
    /// once). The framework itself deletes the blobs under
    /// `tasks/<task_id>/`. The default does nothing.
    ///
    /// # Errors
    /// A failure is recorded; the task is reverted anyway.
    fn revert(ctx: &RevertCtx) -> Result<(), Error> {
        let _ = ctx;
        Ok(())
    }
}

/// What `plan` receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanCtx {
    /// The 0-based step to plan.
    pub step: u32,
    /// The task's input, as submitted.
    pub input: Vec<u8>,
    /// The outputs of the previous step's subtasks in ordinal order; empty
    /// for step 0.
    pub previous_outputs: Vec<Vec<u8>>,
    /// How many worker nodes may run the task (at least 1): a hint for how
    /// finely to split.
    pub node_count: u32,
    /// How many slots the task may use at once (at least 1): a hint too.
    pub concurrency: u32,
    /// The task's id, for naming intermediate blobs.
    pub task_id: String,
}

impl Default for PlanCtx {
    /// Step 0, empty input, one node, concurrency 1, task id `local`.
    fn default() -> Self {
        Self {
            step: 0,
            input: Vec::new(),
            previous_outputs: Vec::new(),
            node_count: 1,
            concurrency: 1,
            task_id: LOCAL_TASK_ID.to_owned(),
        }
    }
}

/// What `run` receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCtx {
    /// The step this subtask belongs to.
    pub step: u32,
    /// The subtask's 0-based position within its step.
    pub ordinal: u32,
    /// The payload `plan` produced for this subtask.
    pub payload: Vec<u8>,
    /// The last checkpoint an earlier attempt saved, or empty.
    pub checkpoint: Vec<u8>,
    /// 1 for the first attempt, then 2, 3, ...
    pub attempt: u32,
    /// The task's id.
    pub task_id: String,
}

impl Default for RunCtx {
    /// Step 0, ordinal 0, empty payload and checkpoint, attempt 1, task id
    /// `local`.
    fn default() -> Self {
        Self {
            step: 0,
            ordinal: 0,
            payload: Vec::new(),
            checkpoint: Vec::new(),
            attempt: 1,
            task_id: LOCAL_TASK_ID.to_owned(),
        }
    }
}

/// What `finish` receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishCtx {
    /// The task's input.
    pub input: Vec<u8>,
    /// The last step's outputs in ordinal order.
    pub outputs: Vec<Vec<u8>>,
    /// The task's id.
    pub task_id: String,
}

impl Default for FinishCtx {
    /// Empty input and outputs, task id `local`.
    fn default() -> Self {
        Self {
            input: Vec::new(),
            outputs: Vec::new(),
            task_id: LOCAL_TASK_ID.to_owned(),
        }
    }
}

/// What `revert` receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertCtx {
    /// The task's input.
    pub input: Vec<u8>,
    /// The step that was running when the task failed.
    pub step: u32,
    /// Why the task is reverted.
    pub reason: String,
    /// The task's id.
    pub task_id: String,
}

impl Default for RevertCtx {
    /// Empty input and reason, step 0, task id `local`.
    fn default() -> Self {
        Self {
            input: Vec::new(),
            step: 0,
            reason: String::new(),
            task_id: LOCAL_TASK_ID.to_owned(),
        }
    }
}

/// The answer of `plan`.
///
/// ```
/// use stoker_guest::Plan;
/// let step = Plan::subtasks(["a", "b"]).non_idempotent();
/// assert_eq!(step.payloads().len(), 2);
/// assert!(Plan::done().is_done());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The previous step was the last one.
    Done,
    /// The step runs as one subtask per payload; ordinals follow the order.
    Subtasks {
        /// One payload per subtask, at least one.
        payloads: Vec<Vec<u8>>,
        /// Running a subtask of this step twice is not safe (it has side
        /// effects outside its output), so the framework fails such a
        /// subtask rather than re-running it when its node is lost.
        non_idempotent: bool,
    },
}

impl Plan {
    /// No more steps.
    pub fn done() -> Self {
        Self::Done
    }

    /// An idempotent step with one subtask per payload.
    pub fn subtasks<I>(payloads: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Vec<u8>>,
    {
        Self::Subtasks {
            payloads: payloads.into_iter().map(Into::into).collect(),
            non_idempotent: false,
        }
    }

    /// Marks the step's subtasks as unsafe to run twice; no effect on
    /// [`Plan::Done`].
    #[must_use]
    pub fn non_idempotent(self) -> Self {
        match self {
            Self::Done => Self::Done,
            Self::Subtasks { payloads, .. } => Self::Subtasks {
                payloads,
                non_idempotent: true,
            },
        }
    }

    /// Whether this is [`Plan::Done`].
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Done)
    }

    /// The subtask payloads; empty for [`Plan::Done`].
    pub fn payloads(&self) -> &[Vec<u8>] {
        match self {
            Self::Done => &[],
            Self::Subtasks { payloads, .. } => payloads,
        }
    }

    /// Rejects the plans the host would reject as an ABI violation, with a
    /// message that names the mistake.
    pub(crate) fn validate(&self, step: u32) -> Result<(), Error> {
        match self {
            Self::Done if step == 0 => Err(Error::fatal(
                "plan answered done at step 0: a task has at least one step",
            )),
            Self::Subtasks { payloads, .. } if payloads.is_empty() => Err(Error::fatal(format!(
                "plan of step {step} has no subtasks: answer Plan::Done to end the task"
            ))),
            _ => Ok(()),
        }
    }
}
