//! A test guest that misbehaves on request, for the host's tests of fuel,
//! memory, stack, traps, guest errors, retries, checkpoints, blob key
//! checks and log limits.
//!
//! # Plan
//!
//! Step 0 has one subtask per line of the input (a trailing `\n` does not
//! add an empty line); step 1 is done; the result is the outputs
//! concatenated (the SDK's default `finish`). An input whose first line is
//! `plan:<behaviour>` makes *plan* of step 0 behave so instead (for example
//! `plan:panic:boom`, `plan:loop`, `plan:fail-retryable`); a behaviour that
//! succeeds there just plans the remaining lines.
//!
//! # Behaviours (the payload of a subtask)
//!
//! | payload | behaviour |
//! | --- | --- |
//! | `ok`, anything starting with `ok` (`ok-7`), empty | output the payload itself |
//! | `echo:<text>` | output `<text>` |
//! | `loop` | spin forever (fuel or deadline stops it) |
//! | `oom` | allocate 1 MiB chunks forever (memory limit) |
//! | `recurse` | recurse without bound (stack overflow) |
//! | `panic:<msg>` | panic with `<msg>` |
//! | `trap` | execute `unreachable` |
//! | `big:<n>` | output `n` bytes (`x` repeated) |
//! | `open` | open `/etc/passwd`: output `opened`, or its error as a fatal guest error |
//! | `fail-retryable` / `fail-fatal` | return a guest error of that kind |
//! | `flaky:<n>` | retryable error while the attempt is below `n`, then output `ok at attempt <k>` |
//! | `log:<n>` | print `n` lines to stdout, output `logged <n>` |
//! | `blob` | put/get/delete round trip, and escaping keys must be denied: output `blob ok` or a fatal error naming what went wrong |
//! | `checkpoint` | without a checkpoint: save `checkpoint from attempt <k>` and fail retryable; with one: output it |
//! | `exit:<code>` | call `std::process::exit(code)` (WASI `proc_exit`) |
//! | `spin:<n>` | burn `n` million loop iterations, output `spun <n>` (a subtask that takes a while) |
//! | `remember:<text>` | output `<what an earlier run left in a static>\|<nonzero bytes in 2 MiB of fresh zeroed heap>`, then leave `<text>` in the static and dirty that heap: every run is a fresh instance, so this is always `\|0` |
//!
//! # Revert
//!
//! The revert hook writes the blob `reverted/<task id>` holding the reason,
//! so that tests can see it ran (it is outside `tasks/<id>/`, which the
//! host deletes after reverting).
//! Anything else is a fatal guest error `unknown behaviour`.

use std::hint::black_box;

use stoker_guest::{blob, Error, Plan, PlanCtx, RevertCtx, RunCtx, TaskType};

/// The task type.
pub struct Misbehave;

stoker_guest::export!(Misbehave);

/// The subtask payloads of an input: its lines, without the empty line a
/// trailing `\n` would add.
pub fn lines(input: &[u8]) -> Vec<Vec<u8>> {
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    input.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

/// Runs `behaviour` and returns the output it asks for.
///
/// # Errors
/// The guest errors the behaviours ask for.
pub fn behave(behaviour: &str, ctx: &RunCtx) -> Result<Vec<u8>, Error> {
    let (name, arg) = behaviour.split_once(':').unwrap_or((behaviour, ""));
    let number = || {
        arg.parse::<u64>()
            .map_err(|e| Error::fatal(format!("{name}: bad number {arg:?}: {e}")))
    };
    match name {
        _ if behaviour.is_empty() || behaviour.starts_with("ok") => {
            Ok(behaviour.as_bytes().to_vec())
        }
        "echo" => Ok(arg.as_bytes().to_vec()),
        "loop" => spin(),
        "oom" => exhaust_memory(),
        "recurse" => Ok(recurse(0).to_string().into_bytes()),
        "panic" => panic!("{arg}"),
        "trap" => trap(),
        "big" => Ok(vec![b'x'; usize::try_from(number()?)?]),
        "open" => match std::fs::File::open("/etc/passwd") {
            Ok(_) => Ok(b"opened".to_vec()),
            Err(error) => Err(Error::fatal(format!("open /etc/passwd: {error}"))),
        },
        "spin" => {
            let millions = number()?;
            let mut x = 0u64;
            for i in 0..millions.saturating_mul(1_000_000) {
                x = black_box(x.wrapping_add(i));
            }
            black_box(x);
            Ok(format!("spun {millions}").into_bytes())
        }
        "fail-retryable" => Err(Error::retryable("failing as asked (retryable)")),
        "fail-fatal" => Err(Error::fatal("failing as asked (fatal)")),
        "flaky" => {
            if u64::from(ctx.attempt) < number()? {
                Err(Error::retryable(format!(
                    "flaky: attempt {} fails",
                    ctx.attempt
                )))
            } else {
                Ok(format!("ok at attempt {}", ctx.attempt).into_bytes())
            }
        }
        "log" => {
            let n = number()?;
            for i in 0..n {
                println!("log line {i} of {n}");
            }
            Ok(format!("logged {n}").into_bytes())
        }
        "blob" => blob_checks(&ctx.task_id),
        "checkpoint" => {
            if ctx.checkpoint.is_empty() {
                stoker_guest::checkpoint(
                    format!("checkpoint from attempt {}", ctx.attempt).as_bytes(),
                )?;
                Err(Error::retryable("checkpoint saved, failing to be retried"))
            } else {
                Ok(ctx.checkpoint.clone())
            }
        }
        "exit" => std::process::exit(arg.parse().unwrap_or(1)),
        "remember" => Ok(remember(arg)),
        _ => Err(Error::fatal(format!("unknown behaviour {behaviour:?}"))),
    }
}

/// What an earlier run in the same instance left: a static, and heap the
/// allocator takes fresh from `memory.grow` (which it trusts to be zero, so
/// `vec![0; n]` does not clear it). Then leaves `text` and dirty heap for
/// the next run to find, if instances were ever reused unreset.
fn remember(text: &str) -> Vec<u8> {
    static LEFT: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
    let mut left = LEFT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = std::mem::replace(&mut *left, text.as_bytes().to_vec());
    let mut heap = black_box(vec![0u8; 2 << 20]);
    let dirty = heap.iter().filter(|b| **b != 0).count();
    heap.fill(0xab);
    std::mem::forget(black_box(heap));
    let mut out = before;
    out.extend_from_slice(format!("|{dirty}").as_bytes());
    out
}

/// Never returns; `black_box` keeps the loop from being optimised away.
fn spin() -> ! {
    let mut i = 0u64;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

/// Allocates (and touches) 1 MiB at a time until memory runs out; the
/// allocation failure aborts, which traps.
fn exhaust_memory() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        chunks.push(vec![1u8; 1 << 20]);
        black_box(&chunks);
    }
}

/// Where [`recurse`] would stop; read with a volatile load so the compiler
/// cannot see that it never does.
static RECURSION_LIMIT: u64 = u64::MAX;

/// Recurses without bound. The result is used after the call in a way that
/// is neither a tail call nor an accumulator LLVM could turn into a loop, and
/// the frame keeps nothing in linear memory (no `black_box`, which spills to
/// Rust's shadow stack), so it is the wasm stack that runs out.
fn recurse(depth: u64) -> u64 {
    // SAFETY: a read of an immutable static through a valid reference.
    let limit = unsafe { std::ptr::read_volatile(&RECURSION_LIMIT) };
    if depth == limit {
        return 0;
    }
    depth.wrapping_sub(recurse(depth + 1)).rotate_left(1)
}

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}

/// A put/get/delete round trip, and keys that try to leave the tenant,
/// which must come back `DENIED`.
fn blob_checks(task_id: &str) -> Result<Vec<u8>, Error> {
    // Outside a task (a host test calling `run` directly) there is no task id.
    let key = if task_id.is_empty() {
        "misbehave/round-trip".to_owned()
    } else {
        blob::task_key(task_id, "misbehave-blob")
    };
    let fail = |what: String| Err(Error::fatal(format!("blob: {what}")));
    blob::put(&key, b"round trip")?;
    match blob::get(&key)? {
        Some(value) if value == b"round trip" => {}
        other => return fail(format!("get after put returned {other:?}")),
    }
    blob::delete(&key)?;
    if let Some(value) = blob::get(&key)? {
        return fail(format!("get after delete returned {value:?}"));
    }
    let long = "k".repeat(1025);
    for bad in [
        "../x",
        "/abs",
        "a/../../x",
        "a//b",
        "./a",
        "a\\b",
        "",
        "a\0b",
        &long,
    ] {
        let results = [
            blob::put(bad, b"escape").err(),
            blob::get(bad).err(),
            blob::delete(bad).err(),
        ];
        for result in results {
            match result {
                Some(error) if error.kind() == blob::BlobErrorKind::Denied => {}
                other => return fail(format!("key {bad:?} was not denied: {other:?}")),
            }
        }
    }
    Ok(b"blob ok".to_vec())
}

impl TaskType for Misbehave {
    fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
        if ctx.step > 0 {
            return Ok(Plan::done());
        }
        let mut lines = lines(&ctx.input);
        if let Some(first) = lines.first() {
            if let Some(behaviour) = first.strip_prefix(b"plan:") {
                let behaviour = String::from_utf8_lossy(behaviour).into_owned();
                behave(&behaviour, &RunCtx::default())?;
                lines.remove(0);
                if lines.is_empty() {
                    lines.push(b"ok".to_vec());
                }
            }
        }
        Ok(Plan::subtasks(lines))
    }

    fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
        let behaviour = std::str::from_utf8(&ctx.payload)?;
        behave(behaviour, ctx)
    }

    fn revert(ctx: &RevertCtx) -> Result<(), Error> {
        blob::put(&format!("reverted/{}", ctx.task_id), ctx.reason.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use stoker_guest::testing::{self, LocalRun};

    use super::*;

    fn run_one(payload: &str) -> Result<Vec<u8>, Error> {
        Misbehave::run(&RunCtx {
            payload: payload.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn plan_splits_lines() {
        let ctx = PlanCtx {
            input: b"ok\nbig:3\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            Misbehave::plan(&ctx).unwrap(),
            Plan::subtasks(["ok", "big:3"])
        );
        let ctx = PlanCtx {
            input: Vec::new(),
            ..Default::default()
        };
        assert_eq!(Misbehave::plan(&ctx).unwrap(), Plan::subtasks([""]));
        let ctx = PlanCtx {
            input: b"plan:fail-fatal\nok".to_vec(),
            ..Default::default()
        };
        assert!(Misbehave::plan(&ctx).is_err());
        let ctx = PlanCtx {
            step: 1,
            ..Default::default()
        };
        assert!(Misbehave::plan(&ctx).unwrap().is_done());
    }

    #[test]
    fn well_behaved_payloads() {
        assert_eq!(run_one("ok").unwrap(), b"ok");
        assert_eq!(run_one("ok-07").unwrap(), b"ok-07");
        assert_eq!(run_one("echo:hi there").unwrap(), b"hi there");
        assert_eq!(run_one("big:5").unwrap(), b"xxxxx");
        assert_eq!(run_one("log:3").unwrap(), b"logged 3");
        assert_eq!(run_one("blob").unwrap(), b"blob ok");
        let no_task = RunCtx {
            payload: b"blob".to_vec(),
            task_id: String::new(),
            ..Default::default()
        };
        assert_eq!(Misbehave::run(&no_task).unwrap(), b"blob ok");
        assert!(run_one("fail-retryable").unwrap_err().is_retryable());
        assert!(!run_one("fail-fatal").unwrap_err().is_retryable());
        assert!(!run_one("nonsense").unwrap_err().is_retryable());
        assert!(!run_one("big:x").unwrap_err().is_retryable());
    }

    #[test]
    fn remember_reports_what_an_earlier_run_in_the_same_process_left() {
        // One process, one instance: the second run sees the first's text
        // (the host's test checks that sandboxed runs never do).
        let first = run_one("remember:left behind").unwrap();
        assert!(first.ends_with(b"|0"), "{first:?}");
        let second = run_one("remember:again").unwrap();
        assert!(second.starts_with(b"left behind|"), "{second:?}");
    }

    #[test]
    #[should_panic(expected = "boom")]
    fn panic_panics() {
        let _ = run_one("panic:boom");
    }

    #[test]
    fn flaky_and_checkpoint_through_retries() {
        let result = testing::run_task::<Misbehave>(b"flaky:3\ncheckpoint").unwrap();
        assert_eq!(result, b"ok at attempt 3checkpoint from attempt 1");
        let two = LocalRun {
            max_attempts: 2,
            ..Default::default()
        };
        assert!(two.run::<Misbehave>(b"flaky:3").unwrap_err().is_retryable());
    }
}
