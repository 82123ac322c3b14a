//! Counts the primes in a range by trial division: a deliberately CPU-bound
//! task type for exercising fuel, slots and the resource manager.
//!
//! # Input and result
//!
//! Input, JSON: `{"start": A, "end": B, "chunks": N}` (unsigned integers);
//! counts the primes `p` with `A <= p < B`. `chunks` is optional (default
//! `node_count * concurrency * 2`) and must be at least 1.
//!
//! Result, JSON: `{"count": C}`.
//!
//! # Steps
//!
//! - step 0: one subtask per chunk of the range (at most `N`, fewer when the
//!   range is shorter); payload `{"start": a, "end": b}`, output the count
//!   as decimal text;
//! - step 1: done; `finish` adds the counts.
//!
//! Malformed input fails the task with a non-retryable error.
//!
//! [`count_primes`] is the kernel, public so that a native benchmark runs
//! exactly the code the guest runs.

use serde::{Deserialize, Serialize};
use stoker_guest::{Error, FinishCtx, Plan, PlanCtx, ResultExt, RunCtx, TaskType};

/// The task type.
pub struct Primes;

stoker_guest::export!(Primes);

/// The task's input.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// First number of the range.
    pub start: u64,
    /// One past the last number of the range.
    pub end: u64,
    /// How many subtasks to split the range into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
}

/// One subtask's half-open range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    /// First number.
    pub start: u64,
    /// One past the last number.
    pub end: u64,
}

/// The task's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct Output {
    /// How many primes the range holds.
    pub count: u64,
}

/// Whether `n` is prime, by trial division with odd divisors up to its
/// square root.
#[allow(
    clippy::manual_is_multiple_of,
    reason = "the kernel is a plain remainder loop, the same instructions natively and in wasm"
)]
pub fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    // Below 2^32 the same trial division runs on 32-bit integers: a 64-bit
    // division costs several times a 32-bit one, and native code gets this
    // for free (LLVM bypasses slow 64-bit division at run time) while
    // Cranelift does not.
    if let Ok(n) = u32::try_from(n) {
        let mut i = 3u32;
        while u64::from(i) * u64::from(i) <= u64::from(n) {
            if n % i == 0 {
                return false;
            }
            i += 2;
        }
        return true;
    }
    let mut i = 3u64;
    // `saturating_mul` keeps the loop correct near `u64::MAX`, where `i * i`
    // would wrap.
    while i.saturating_mul(i) <= n {
        if n % i == 0 {
            return false;
        }
        i += 2;
    }
    true
}

/// The number of primes in `[start, end)`.
pub fn count_primes(start: u64, end: u64) -> u64 {
    (start..end).map(|n| u64::from(is_prime(n))).sum()
}

/// Splits `[start, end)` into at most `chunks` non-empty ranges of nearly
/// equal length that cover it in order; one empty range when it is empty.
pub fn split(start: u64, end: u64, chunks: u64) -> Vec<Range> {
    let len = end.saturating_sub(start);
    let chunks = chunks.clamp(1, len.max(1));
    (0..chunks)
        .map(|i| {
            // u128: `len * i` may not fit in u64.
            let at = |i: u64| start + (u128::from(len) * u128::from(i) / u128::from(chunks)) as u64;
            Range {
                start: at(i),
                end: at(i + 1),
            }
        })
        .collect()
}

fn parse_input(input: &[u8]) -> Result<Input, Error> {
    let input: Input = serde_json::from_slice(input).map_err(|e| {
        Error::fatal(format!(
            "bad input, expected {{\"start\": A, \"end\": B, \"chunks\": N}}: {e}"
        ))
    })?;
    if input.start > input.end {
        return Err(Error::fatal(format!(
            "bad input: start {} is after end {}",
            input.start, input.end
        )));
    }
    if input.chunks == Some(0) {
        return Err(Error::fatal("bad input: chunks must be at least 1"));
    }
    Ok(input)
}

impl TaskType for Primes {
    fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
        if ctx.step > 0 {
            return Ok(Plan::done());
        }
        let input = parse_input(&ctx.input)?;
        let default_chunks =
            u64::from(ctx.node_count.max(1)) * u64::from(ctx.concurrency.max(1)) * 2;
        let ranges = split(
            input.start,
            input.end,
            input.chunks.unwrap_or(default_chunks),
        );
        let payloads = ranges
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()
            .fatal()?;
        Ok(Plan::subtasks(payloads))
    }

    fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
        let range: Range = serde_json::from_slice(&ctx.payload)
            .map_err(|e| Error::fatal(format!("bad payload: {e}")))?;
        Ok(count_primes(range.start, range.end)
            .to_string()
            .into_bytes())
    }

    fn finish(ctx: &FinishCtx) -> Result<Vec<u8>, Error> {
        let mut count = 0u64;
        for output in &ctx.outputs {
            count += std::str::from_utf8(output)?.parse::<u64>()?;
        }
        serde_json::to_vec(&Output { count }).fatal()
    }
}

#[cfg(test)]
mod tests {
    use stoker_guest::testing::{self, LocalRun};

    use super::*;

    #[test]
    fn primes_below_small_bounds() {
        let below_30: Vec<u64> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(below_30, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert_eq!(count_primes(0, 100), 25);
        assert_eq!(count_primes(0, 10_000), 1229);
        assert_eq!(count_primes(100, 100), 0);
        assert!(is_prime(1_000_000_007));
        assert!(!is_prime(1_000_000_007 * 3));
        // 2^32 - 5, the largest 32-bit prime; and no overflow at the top.
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(u64::MAX));
    }

    #[test]
    fn primes_around_the_32_bit_boundary() {
        assert!(is_prime(4_294_967_291), "largest prime below 2^32");
        assert!(
            !is_prime(4_294_967_295),
            "2^32 - 1 = 3 * 5 * 17 * 257 * 65537"
        );
        assert!(!is_prime(4_294_967_297), "2^32 + 1 = 641 * 6700417");
        assert!(is_prime(4_294_967_311), "smallest prime above 2^32");
        assert!(!is_prime(65_521 * 65_537));
    }

    #[test]
    fn split_covers_the_range() {
        for (start, end, chunks) in [
            (0, 100, 7),
            (5, 6, 4),
            (10, 10, 3),
            (0, 3, 10),
            (0, u64::MAX, 3),
        ] {
            let ranges = split(start, end, chunks);
            assert!(!ranges.is_empty() && ranges.len() as u64 <= chunks.max(1));
            assert_eq!(ranges[0].start, start);
            assert_eq!(ranges.last().unwrap().end, end);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            if start < end {
                assert!(ranges.iter().all(|r| r.start < r.end));
            }
        }
    }

    #[test]
    fn whole_task() {
        let result =
            testing::run_task::<Primes>(br#"{"start": 0, "end": 100000, "chunks": 7}"#).unwrap();
        assert_eq!(result, br#"{"count":9592}"#);
        let wide = LocalRun {
            node_count: 3,
            concurrency: 2,
            ..Default::default()
        };
        assert_eq!(
            wide.run::<Primes>(br#"{"start": 10, "end": 20}"#).unwrap(),
            br#"{"count":4}"#
        );
        assert_eq!(
            testing::run_task::<Primes>(br#"{"start": 7, "end": 7}"#).unwrap(),
            br#"{"count":0}"#
        );
    }

    #[test]
    fn plan_uses_the_requested_chunks() {
        let ctx = PlanCtx {
            input: br#"{"start": 0, "end": 1000, "chunks": 4}"#.to_vec(),
            ..Default::default()
        };
        let plan = Primes::plan(&ctx).unwrap();
        assert_eq!(plan.payloads()[0], br#"{"start":0,"end":250}"#);
        assert_eq!(plan.payloads().len(), 4);
    }

    #[test]
    fn bad_input_is_fatal() {
        for input in [
            &b"not json"[..],
            br#"{"start": 5}"#,
            br#"{"start": 9, "end": 1}"#,
            br#"{"start": 0, "end": 1, "chunks": 0}"#,
            br#"{"start": -1, "end": 1}"#,
            br#"{"start": 0, "end": 1, "chunk": 2}"#,
        ] {
            let error = testing::run_task::<Primes>(input).unwrap_err();
            assert!(!error.is_retryable(), "{error}");
            assert!(error.message().contains("bad input"), "{error}");
        }
    }
}
