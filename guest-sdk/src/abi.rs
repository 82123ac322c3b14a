//! The glue behind [`crate::export!`]: memory exports, request decoding,
//! response encoding and the panic hook. Not a public API.
//!
//! The `handle_*` functions turn an encoded request into an encoded response
//! and build on every target, so the native [`crate::testing`] driver goes
//! through the same code as the host. The raw entry points, which move
//! pointers across the boundary, exist on `wasm32` only.

use stoker_proto::guest::{
    FinishRequest, FinishResponse, GuestError, PlanRequest, PlanResponse, RevertRequest,
    RevertResponse, RunRequest, RunResponse,
};
use stoker_proto::Message;

use crate::{Error, FinishCtx, Plan, PlanCtx, RevertCtx, RunCtx, TaskType};

impl From<Error> for GuestError {
    fn from(error: Error) -> Self {
        GuestError {
            retryable: error.is_retryable(),
            message: error.message().to_owned(),
        }
    }
}

fn decode<M: Message + Default>(bytes: &[u8], what: &str) -> Result<M, Error> {
    M::decode(bytes).map_err(|e| Error::fatal(format!("decoding {what}: {e}")))
}

/// `stoker_plan` on encoded messages.
pub fn handle_plan<T: TaskType>(request: &[u8]) -> Vec<u8> {
    let answer = decode::<PlanRequest>(request, "plan request").and_then(|request| {
        let ctx = PlanCtx {
            step: request.step,
            input: request.input,
            previous_outputs: request.previous_outputs,
            node_count: request.node_count,
            concurrency: request.concurrency,
            task_id: request.task_id,
        };
        let plan = T::plan(&ctx)?;
        plan.validate(ctx.step)?;
        Ok(plan)
    });
    let response = match answer {
        Ok(Plan::Done) => PlanResponse {
            done: true,
            ..PlanResponse::default()
        },
        Ok(Plan::Subtasks {
            payloads,
            non_idempotent,
        }) => PlanResponse {
            subtasks: payloads,
            non_idempotent,
            ..PlanResponse::default()
        },
        Err(error) => PlanResponse {
            error: Some(error.into()),
            ..PlanResponse::default()
        },
    };
    response.encode_to_vec()
}

/// `stoker_run` on encoded messages.
pub fn handle_run<T: TaskType>(request: &[u8]) -> Vec<u8> {
    let answer = decode::<RunRequest>(request, "run request").and_then(|request| {
        T::run(&RunCtx {
            step: request.step,
            ordinal: request.ordinal,
            payload: request.payload,
            checkpoint: request.checkpoint,
            attempt: request.attempt,
            task_id: request.task_id,
        })
    });
    let response = match answer {
        Ok(output) => RunResponse {
            output,
            error: None,
        },
        Err(error) => RunResponse {
            output: Vec::new(),
            error: Some(error.into()),
        },
    };
    response.encode_to_vec()
}

/// `stoker_finish` on encoded messages.
pub fn handle_finish<T: TaskType>(request: &[u8]) -> Vec<u8> {
    let answer = decode::<FinishRequest>(request, "finish request").and_then(|request| {
        T::finish(&FinishCtx {
            input: request.input,
            outputs: request.outputs,
            task_id: request.task_id,
        })
    });
    let response = match answer {
        Ok(result) => FinishResponse {
            result,
            error: None,
        },
        Err(error) => FinishResponse {
            result: Vec::new(),
            error: Some(error.into()),
        },
    };
    response.encode_to_vec()
}

/// `stoker_revert` on encoded messages.
pub fn handle_revert<T: TaskType>(request: &[u8]) -> Vec<u8> {
    let answer = decode::<RevertRequest>(request, "revert request").and_then(|request| {
        T::revert(&RevertCtx {
            input: request.input,
            step: request.step,
            reason: request.reason,
            task_id: request.task_id,
        })
    });
    RevertResponse {
        error: answer.err().map(Into::into),
    }
    .encode_to_vec()
}

#[cfg(target_arch = "wasm32")]
pub use entry::*;

/// The raw exports. Memory handed across the boundary is allocated with
/// alignment 1 and `max(len, 1)` bytes, so `stoker_alloc(0)` still returns a
/// valid, non-null pointer and every pointer can be given back to the
/// allocator with the same layout.
#[cfg(target_arch = "wasm32")]
mod entry {
    use std::alloc::Layout;
    use std::sync::Once;

    use crate::{log, sys};

    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len.max(1), 1).ok()
    }

    /// `stoker_alloc`: `len` writable bytes, or null when out of memory.
    pub fn alloc(len: usize) -> *mut u8 {
        match layout(len) {
            // SAFETY: the layout has a non-zero size; a null result (out of
            // memory) is passed on to the host, as the ABI asks.
            Some(layout) => unsafe { std::alloc::alloc(layout) },
            None => std::ptr::null_mut(),
        }
    }

    /// `stoker_free`: gives back a response (or request) buffer.
    ///
    /// # Safety
    /// `(ptr, len)` with `len > 0` must come from [`alloc`] or be a response
    /// of an entry point, and not have been freed. `len == 0` does nothing
    /// (an empty response owns no memory).
    pub unsafe fn free(ptr: *mut u8, len: usize) {
        if ptr.is_null() || len == 0 {
            return;
        }
        if let Some(layout) = layout(len) {
            // SAFETY: by the contract above, `ptr` was allocated with this
            // very layout (alignment 1, `len` bytes) and is still live.
            unsafe { std::alloc::dealloc(ptr, layout) }
        }
    }

    /// Logs a panic at level error, starting with "panicked at", so the host
    /// can put it into the trap error; the panic then aborts, which traps.
    fn install_panic_hook() {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                let message = info.payload_as_str().unwrap_or("Box<dyn Any>");
                let line = match info.location() {
                    Some(at) => format!("panicked at {at}: {message}"),
                    None => format!("panicked at an unknown location: {message}"),
                };
                sys::log(log::Level::Error as i32, &line);
            }));
        });
    }

    /// Runs `handle` on the request at `(ptr, len)` and leaks the encoded
    /// response, returning `ptr << 32 | len`. The instance is discarded after
    /// the call, so the leak lasts exactly as long as the host needs it.
    ///
    /// # Safety
    /// When `len > 0`, `(ptr, len)` must be a buffer from [`alloc`] that the
    /// host filled and hands over; it is freed here.
    pub unsafe fn call(ptr: *mut u8, len: usize, handle: fn(&[u8]) -> Vec<u8>) -> u64 {
        install_panic_hook();
        let response = if len == 0 {
            handle(&[])
        } else {
            // SAFETY: by the contract above, `ptr` points to `len` bytes the
            // host initialised and no one else uses.
            let request = unsafe { std::slice::from_raw_parts(ptr, len) };
            let response = handle(request);
            // SAFETY: `(ptr, len)` came from `alloc(len)`, is still live, and
            // `request` is no longer used.
            unsafe { free(ptr, len) };
            response
        };
        let response = Box::leak(response.into_boxed_slice());
        // wasm32 pointers and lengths are 32 bits wide, so nothing is lost.
        let ptr = response.as_mut_ptr() as usize as u64;
        let len = response.len() as u64;
        (ptr << 32) | len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl TaskType for Echo {
        fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
            match ctx.step {
                0 => Ok(
                    Plan::subtasks(ctx.input.split(|b| *b == b',').map(<[u8]>::to_vec))
                        .non_idempotent(),
                ),
                1 => Ok(Plan::done()),
                _ => Ok(Plan::subtasks(Vec::<Vec<u8>>::new())),
            }
        }

        fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
            if ctx.payload == b"fail" {
                return Err(Error::retryable("asked to fail"));
            }
            Ok(ctx.payload.clone())
        }
    }

    #[test]
    fn plan_round_trip() {
        let request = PlanRequest {
            step: 0,
            input: b"a,b".to_vec(),
            node_count: 1,
            concurrency: 1,
            task_id: "t".into(),
            ..PlanRequest::default()
        };
        let response =
            PlanResponse::decode(&handle_plan::<Echo>(&request.encode_to_vec())[..]).unwrap();
        assert_eq!(response.subtasks, vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(response.non_idempotent && !response.done && response.error.is_none());

        let done = PlanRequest {
            step: 1,
            ..request.clone()
        };
        let response =
            PlanResponse::decode(&handle_plan::<Echo>(&done.encode_to_vec())[..]).unwrap();
        assert!(response.done && response.subtasks.is_empty());
    }

    #[test]
    fn empty_step_is_reported_as_a_guest_error() {
        let request = PlanRequest {
            step: 2,
            ..PlanRequest::default()
        };
        let response =
            PlanResponse::decode(&handle_plan::<Echo>(&request.encode_to_vec())[..]).unwrap();
        let error = response.error.unwrap();
        assert!(error.message.contains("no subtasks") && !error.retryable);
    }

    #[test]
    fn run_errors_and_undecodable_requests() {
        let request = RunRequest {
            payload: b"fail".to_vec(),
            ..RunRequest::default()
        };
        let response =
            RunResponse::decode(&handle_run::<Echo>(&request.encode_to_vec())[..]).unwrap();
        assert_eq!(
            response.error,
            Some(GuestError {
                message: "asked to fail".into(),
                retryable: true
            })
        );

        let response = RunResponse::decode(&handle_run::<Echo>(&[0xff, 0xff])[..]).unwrap();
        assert!(response
            .error
            .unwrap()
            .message
            .starts_with("decoding run request"));

        // An empty request is a valid message with every field at its default.
        let response = RunResponse::decode(&handle_run::<Echo>(&[])[..]).unwrap();
        assert_eq!(response, RunResponse::default());
    }

    #[test]
    fn default_finish_concatenates_and_default_revert_succeeds() {
        let request = FinishRequest {
            outputs: vec![b"ab".to_vec(), b"c".to_vec()],
            ..FinishRequest::default()
        };
        let response =
            FinishResponse::decode(&handle_finish::<Echo>(&request.encode_to_vec())[..]).unwrap();
        assert_eq!(response.result, b"abc");
        assert!(handle_revert::<Echo>(&RevertRequest::default().encode_to_vec()).is_empty());
    }
}
