//! Write Stoker task types in plain Rust.
//!
//! A task type splits a task into steps and each step into subtasks. The
//! cluster calls [`TaskType::plan`] to get the subtasks of a step,
//! [`TaskType::run`] for every subtask (in parallel, on many nodes), then
//! plans the next step with their outputs, and so on until `plan` answers
//! [`Plan::Done`]; [`TaskType::finish`] then turns the last outputs into the
//! task's result. Implement the trait, export it with [`export!`], build
//! with `cargo build --release --target wasm32-wasip1` (crate type
//! `cdylib`), and upload the `.wasm`.
//!
//! Natively the host calls are served in memory (see `testing`), so the
//! same code is unit tested with `cargo test`.
//!
//! # Example
//!
//! Sums whitespace-separated integers: step 0 sums chunks of the input in
//! parallel, `finish` adds the partial sums.
//!
//! ```
//! use stoker_guest::{Error, FinishCtx, Plan, PlanCtx, ResultExt, RunCtx, TaskType};
//!
//! pub struct Sum;
//!
//! impl TaskType for Sum {
//!     fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
//!         if ctx.step > 0 {
//!             return Ok(Plan::done());
//!         }
//!         let text = std::str::from_utf8(&ctx.input)?;
//!         let numbers: Vec<&str> = text.split_whitespace().collect();
//!         let per_chunk = numbers.len().div_ceil(ctx.node_count as usize * 2).max(1);
//!         let chunks: Vec<String> = numbers.chunks(per_chunk).map(|c| c.join(" ")).collect();
//!         // A step needs at least one subtask, even for empty input.
//!         Ok(Plan::subtasks(if chunks.is_empty() { vec![String::new()] } else { chunks }))
//!     }
//!
//!     fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
//!         let mut sum = 0i64;
//!         for word in std::str::from_utf8(&ctx.payload)?.split_whitespace() {
//!             sum += word.parse::<i64>().fatal()?;
//!         }
//!         stoker_guest::log::debug(format_args!("subtask {} sums to {sum}", ctx.ordinal));
//!         Ok(sum.to_string().into_bytes())
//!     }
//!
//!     fn finish(ctx: &FinishCtx) -> Result<Vec<u8>, Error> {
//!         let mut total = 0i64;
//!         for output in &ctx.outputs {
//!             total += std::str::from_utf8(output)?.parse::<i64>()?;
//!         }
//!         Ok(total.to_string().into_bytes())
//!     }
//! }
//!
//! stoker_guest::export!(Sum);
//!
//! // Natively, the whole task runs in-process:
//! let result = stoker_guest::testing::run_task::<Sum>(b"1 2 3 4 5").unwrap();
//! assert_eq!(result, b"15");
//! let error = stoker_guest::testing::run_task::<Sum>(b"1 two").unwrap_err();
//! assert!(!error.is_retryable());
//! ```
//!
//! # Errors and panics
//!
//! Return [`Error::retryable`] for failures that may pass (the subtask runs
//! again, see [`RunCtx::attempt`] and [`checkpoint`]) and [`Error::fatal`]
//! for the others; `?` on common error types gives fatal errors. A panic is
//! logged at level error (`panicked at <file:line:col>: <message>`) and
//! then aborts the call, which the host reports as a trap carrying that
//! message.
//!
//! # Layout
//! - `task`: the [`TaskType`] trait, the contexts each call receives, [`Plan`].
//! - `error`: [`Error`] and [`ResultExt`].
//! - [`blob`]: the tenant's blob store.
//! - [`log`]: log lines; [`progress`] and [`checkpoint`] live at the root.
//! - `abi`: the code behind [`export!`] (memory exports, message coding,
//!   panic hook).
//! - `sys`: the raw host imports on `wasm32`, an in-memory host elsewhere.
//! - `testing`: native only; the in-memory host's state and a local task
//!   driver.

mod abi;
pub mod blob;
mod error;
pub mod log;
mod sys;
mod task;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use error::{Error, ResultExt};
pub use task::{FinishCtx, Plan, PlanCtx, RevertCtx, RunCtx, TaskType, LOCAL_TASK_ID};

/// The limit of a checkpoint, in bytes (1 MiB).
pub const CHECKPOINT_LIMIT: usize = 1 << 20;

/// Reports the progress of this call (for example records done of total);
/// the latest report wins.
pub fn progress(done: u64, total: u64) {
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    sys::progress(clamp(done), clamp(total));
}

/// Saves `data` for later attempts of this subtask: when it runs again (after
/// a retryable error, or a deadline) the next attempt receives the last saved
/// bytes in [`RunCtx::checkpoint`]. Meaningful in `run` only.
///
/// # Errors
/// A fatal error when `data` is larger than [`CHECKPOINT_LIMIT`].
pub fn checkpoint(data: &[u8]) -> Result<(), Error> {
    match sys::checkpoint(data) {
        0.. => Ok(()),
        sys::TOO_LARGE => Err(Error::fatal(format!(
            "checkpoint of {} bytes is over the limit of {CHECKPOINT_LIMIT} bytes",
            data.len()
        ))),
        code => Err(Error::fatal(format!("checkpoint failed with code {code}"))),
    }
}

#[doc(hidden)]
pub mod __private {
    pub use crate::abi::*;
}

/// Exports a [`TaskType`] as a Stoker module: generates `stoker_abi_v1`,
/// `stoker_alloc`, `stoker_free`, `stoker_plan`, `stoker_run`,
/// `stoker_finish` and `stoker_revert` as `docs/guest-abi.md` defines them.
/// Use it once per crate; it generates exports on `wasm32` only, so the crate
/// still links natively with others for tests.
///
/// ```
/// # use stoker_guest::{Error, Plan, PlanCtx, RunCtx, TaskType};
/// struct Echo;
/// impl TaskType for Echo {
///     fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
///         Ok(if ctx.step == 0 { Plan::subtasks([ctx.input.clone()]) } else { Plan::done() })
///     }
///     fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
///         Ok(ctx.payload.clone())
///     }
/// }
/// stoker_guest::export!(Echo);
/// ```
#[macro_export]
macro_rules! export {
    ($task:ty) => {
        // Checks the type on every target, so mistakes show natively too.
        const _: fn() = || {
            fn is_task_type<T: $crate::TaskType>() {}
            is_task_type::<$task>();
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            extern "C" fn stoker_abi_v1() {}

            #[unsafe(no_mangle)]
            extern "C" fn stoker_alloc(len: usize) -> *mut u8 {
                $crate::__private::alloc(len)
            }

            #[unsafe(no_mangle)]
            unsafe extern "C" fn stoker_free(ptr: *mut u8, len: usize) {
                // SAFETY: the host gives back a buffer this module handed out.
                unsafe { $crate::__private::free(ptr, len) }
            }

            #[unsafe(no_mangle)]
            unsafe extern "C" fn stoker_plan(ptr: *mut u8, len: usize) -> u64 {
                // SAFETY: the host hands over the request it wrote into
                // `stoker_alloc(len)`.
                unsafe {
                    $crate::__private::call(ptr, len, $crate::__private::handle_plan::<$task>)
                }
            }

            #[unsafe(no_mangle)]
            unsafe extern "C" fn stoker_run(ptr: *mut u8, len: usize) -> u64 {
                // SAFETY: the host hands over the request it wrote into
                // `stoker_alloc(len)`.
                unsafe { $crate::__private::call(ptr, len, $crate::__private::handle_run::<$task>) }
            }

            #[unsafe(no_mangle)]
            unsafe extern "C" fn stoker_finish(ptr: *mut u8, len: usize) -> u64 {
                // SAFETY: the host hands over the request it wrote into
                // `stoker_alloc(len)`.
                unsafe {
                    $crate::__private::call(ptr, len, $crate::__private::handle_finish::<$task>)
                }
            }

            #[unsafe(no_mangle)]
            unsafe extern "C" fn stoker_revert(ptr: *mut u8, len: usize) -> u64 {
                // SAFETY: the host hands over the request it wrote into
                // `stoker_alloc(len)`.
                unsafe {
                    $crate::__private::call(ptr, len, $crate::__private::handle_revert::<$task>)
                }
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Flaky;

    impl TaskType for Flaky {
        fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
            Ok(if ctx.step == 0 {
                Plan::subtasks(["x"])
            } else {
                Plan::done()
            })
        }

        fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
            progress(ctx.attempt.into(), 3);
            if ctx.attempt < 3 {
                checkpoint(format!("attempt {}", ctx.attempt).as_bytes())?;
                return Err(Error::retryable("not yet"));
            }
            Ok(ctx.checkpoint.clone())
        }
    }

    #[test]
    fn local_run_retries_with_checkpoints() {
        assert_eq!(testing::run_task::<Flaky>(b"").unwrap(), b"attempt 2");
        assert_eq!(testing::last_progress(), Some((3, 3)));
        let two = testing::LocalRun {
            max_attempts: 2,
            ..Default::default()
        };
        let error = two.run::<Flaky>(b"").unwrap_err();
        assert_eq!(error.message(), "step 0 subtask 0: attempt 2: not yet");
    }

    #[test]
    fn checkpoint_limit() {
        assert!(checkpoint(&vec![0; CHECKPOINT_LIMIT]).is_ok());
        let error = checkpoint(&vec![0; CHECKPOINT_LIMIT + 1]).unwrap_err();
        assert!(error.message().contains("over the limit"));
    }

    #[test]
    fn logs_are_recorded() {
        log::warn(format_args!("{} left", 3));
        assert_eq!(
            testing::logs(),
            vec![(log::Level::Warn, "3 left".to_owned())]
        );
    }
}
