//! External sort of newline-separated records through the blob store: sort
//! runs in parallel, then one k-way merge.
//!
//! # Input and result
//!
//! The input is either
//!
//! - a JSON object naming a blob of the tenant:
//!   `{"input_key": "data/names.txt", "output_key": "data/sorted.txt", "chunks": 8}`,
//!   where `output_key` (default `tasks/<task_id>/sorted`) and `chunks`
//!   (default `node_count * concurrency * 2`) are optional; or
//! - anything else: the input bytes themselves are the records (*inline*).
//!
//! A record is the bytes up to a `\n`; a last record without its `\n`
//! counts too. Records are sorted by their bytes (so UTF-8 text sorts by
//! code point) and written to the output blob, each followed by `\n`.
//!
//! Result, JSON: `{"output_key": "tasks/t1/sorted", "records": 3}`.
//!
//! # Steps
//!
//! - step 0 (runs): the input is cut into byte ranges; a subtask sorts the
//!   records that *start* in its range and writes them to
//!   `tasks/<task_id>/run-<ordinal>`; output `{"key": ..., "records": n}`.
//!   In blob mode each subtask reads the whole input blob (the ABI has no
//!   ranged read) and keeps its part, so the plan itself touches no blob;
//!   inline, the plan puts the part's records in the payload.
//! - step 1 (merge): one subtask merges the runs with a binary heap into the
//!   output blob, then deletes the runs. It is marked non-idempotent: after
//!   deleting the runs it cannot run again.
//! - step 2: done; `finish` returns the merge's output.
//!
//! `revert` deletes a custom `output_key`; the framework deletes everything
//! under `tasks/<task_id>/`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};
use stoker_guest::{blob, Error, FinishCtx, Plan, PlanCtx, ResultExt, RevertCtx, RunCtx, TaskType};

/// The task type.
pub struct Sort;

stoker_guest::export!(Sort);

/// Tags the first byte of a step-0 payload.
const TAG_BLOB: u8 = b'B';
const TAG_INLINE: u8 = b'I';
/// At most this many runs, however large the cluster or the request.
const MAX_PARTS: u64 = 4096;

/// The input in blob mode.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlobInput {
    /// The blob holding the records.
    pub input_key: String,
    /// Where to write the sorted records; `tasks/<task_id>/sorted` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_key: Option<String>,
    /// How many runs to sort in parallel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
}

/// The task's result, also the merge subtask's output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sorted {
    /// The blob holding the sorted records.
    pub output_key: String,
    /// How many records it holds.
    pub records: u64,
}

/// A sorted run, the output of a step-0 subtask.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Run {
    key: String,
    records: u64,
}

/// The payload of a blob-mode step-0 subtask: part `part` of `parts` of the
/// input blob. The plan does not need the blob's size (and so no blob access
/// at plan time): the subtask, which reads the blob anyway, cuts its part.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct BlobPart {
    key: String,
    part: u64,
    parts: u64,
}

/// The payload of the merge subtask.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Merge {
    runs: Vec<String>,
    output_key: String,
}

/// How the task reads its records.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input<'a> {
    Blob(BlobInput),
    Inline(&'a [u8]),
}

impl<'a> Input<'a> {
    /// A JSON object with an `input_key` is blob mode (and must then be
    /// valid); anything else is inline records.
    fn parse(input: &'a [u8]) -> Result<Self, Error> {
        let is_config = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(input)
            .is_ok_and(|object| object.contains_key("input_key"));
        if !is_config {
            return Ok(Self::Inline(input));
        }
        let config: BlobInput =
            serde_json::from_slice(input).map_err(|e| Error::fatal(format!("bad input: {e}")))?;
        if config.chunks == Some(0) {
            return Err(Error::fatal("bad input: chunks must be at least 1"));
        }
        Ok(Self::Blob(config))
    }

    fn output_key(&self, task_id: &str) -> String {
        match self {
            Self::Blob(BlobInput {
                output_key: Some(key),
                ..
            }) => key.clone(),
            _ => blob::task_key(task_id, "sorted"),
        }
    }
}

/// The records of `data`: the pieces between `\n`s, a trailing `\n` ending
/// the last record rather than starting an empty one.
pub fn records(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let empty = data.is_empty();
    let data = data.strip_suffix(b"\n").unwrap_or(data);
    data.split(|byte| *byte == b'\n').filter(move |_| !empty)
}

/// The first record start at or after `at`: positions 0 and `data.len()`,
/// and those right after a `\n`. Ranges cut at such positions own exactly
/// the records that start inside them.
pub fn align(data: &[u8], at: usize) -> usize {
    if at == 0 || at >= data.len() {
        return at.min(data.len());
    }
    if data[at - 1] == b'\n' {
        return at;
    }
    match data[at..].iter().position(|byte| *byte == b'\n') {
        Some(offset) => at + offset + 1,
        None => data.len(),
    }
}

/// Sorts `data`'s records and writes them one per line.
pub fn sort_records(data: &[u8]) -> (Vec<u8>, u64) {
    let mut records: Vec<&[u8]> = records(data).collect();
    records.sort_unstable();
    let mut out = Vec::with_capacity(data.len() + 1);
    for record in &records {
        out.extend_from_slice(record);
        out.push(b'\n');
    }
    (out, records.len() as u64)
}

/// Merges sorted runs (each one record per line) into one.
pub fn merge_runs(runs: &[Vec<u8>]) -> (Vec<u8>, u64) {
    let mut iters: Vec<_> = runs.iter().map(|run| records(run)).collect();
    let mut heap = BinaryHeap::with_capacity(iters.len());
    for (index, iter) in iters.iter_mut().enumerate() {
        if let Some(record) = iter.next() {
            heap.push(Reverse((record, index)));
        }
    }
    let mut out = Vec::with_capacity(runs.iter().map(Vec::len).sum());
    let mut count = 0u64;
    while let Some(Reverse((record, index))) = heap.pop() {
        out.extend_from_slice(record);
        out.push(b'\n');
        count += 1;
        if let Some(next) = iters[index].next() {
            heap.push(Reverse((next, index)));
        }
    }
    (out, count)
}

/// The records of part `part` of `parts` equal byte ranges of `data`: those
/// that start inside the range. The parts of `data` hold each record once.
pub fn part(data: &[u8], part: u64, parts: u64) -> &[u8] {
    let parts = u128::from(parts.max(1));
    let at = |i: u64| {
        let at = u128::from(i).min(parts) * data.len() as u128 / parts;
        align(data, at as usize)
    };
    &data[at(part)..at(part.saturating_add(1))]
}

/// How many parts step 0 cuts the input into.
fn parts(ctx: &PlanCtx, requested: Option<u64>) -> u64 {
    let default = || u64::from(ctx.node_count.max(1)) * u64::from(ctx.concurrency.max(1)) * 2;
    requested.unwrap_or_else(default).clamp(1, MAX_PARTS)
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + body.len());
    payload.push(tag);
    payload.extend_from_slice(body);
    payload
}

/// Step 0: one subtask per byte range.
fn plan_runs(ctx: &PlanCtx) -> Result<Plan, Error> {
    match Input::parse(&ctx.input)? {
        Input::Blob(config) => {
            let parts = parts(ctx, config.chunks);
            let payloads = (0..parts)
                .map(|part| {
                    let body = BlobPart {
                        key: config.input_key.clone(),
                        part,
                        parts,
                    };
                    serde_json::to_vec(&body).map(|body| tagged(TAG_BLOB, &body))
                })
                .collect::<Result<Vec<_>, _>>()
                .fatal()?;
            Ok(Plan::subtasks(payloads))
        }
        Input::Inline(data) => {
            // Tiny inputs are not worth more parts than bytes.
            let parts = parts(ctx, None).min(data.len().max(1) as u64);
            let payloads = (0..parts).map(|i| tagged(TAG_INLINE, part(data, i, parts)));
            Ok(Plan::subtasks(payloads))
        }
    }
}

/// Step 1: one subtask merging every run.
fn plan_merge(ctx: &PlanCtx) -> Result<Plan, Error> {
    let runs = ctx
        .previous_outputs
        .iter()
        .map(|output| serde_json::from_slice::<Run>(output).map(|run| run.key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::fatal(format!("corrupt run output: {e}")))?;
    let output_key = Input::parse(&ctx.input)?.output_key(&ctx.task_id);
    let payload = serde_json::to_vec(&Merge { runs, output_key }).fatal()?;
    Ok(Plan::subtasks([payload]).non_idempotent())
}

/// Step-0 subtask: sorts one range into a run blob.
fn run_sort(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
    let (tag, body) = ctx
        .payload
        .split_first()
        .ok_or_else(|| Error::fatal("empty payload"))?;
    let (sorted, records) = match *tag {
        TAG_INLINE => sort_records(body),
        TAG_BLOB => {
            let body: BlobPart = serde_json::from_slice(body).fatal()?;
            let data = blob::get(&body.key)?
                .ok_or_else(|| Error::fatal(format!("input blob {:?} not found", body.key)))?;
            sort_records(part(&data, body.part, body.parts))
        }
        other => return Err(Error::fatal(format!("unknown payload tag {other:#x}"))),
    };
    let key = blob::task_key(&ctx.task_id, &format!("run-{}", ctx.ordinal));
    blob::put(&key, &sorted)?;
    serde_json::to_vec(&Run { key, records }).fatal()
}

/// Step-1 subtask: merges the runs into the output blob.
fn run_merge(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
    let merge: Merge = serde_json::from_slice(&ctx.payload).fatal()?;
    let mut runs = Vec::with_capacity(merge.runs.len());
    for key in &merge.runs {
        let run = blob::get(key)?.ok_or_else(|| Error::fatal(format!("run {key:?} not found")))?;
        runs.push(run);
    }
    let (sorted, records) = merge_runs(&runs);
    blob::put(&merge.output_key, &sorted)?;
    for key in &merge.runs {
        blob::delete(key)?;
    }
    stoker_guest::progress(records, records);
    serde_json::to_vec(&Sorted {
        output_key: merge.output_key,
        records,
    })
    .fatal()
}

impl TaskType for Sort {
    fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
        match ctx.step {
            0 => plan_runs(ctx),
            1 => plan_merge(ctx),
            _ => Ok(Plan::done()),
        }
    }

    fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
        match ctx.step {
            0 => run_sort(ctx),
            1 => run_merge(ctx),
            step => Err(Error::fatal(format!("sort has no step {step}"))),
        }
    }

    fn finish(ctx: &FinishCtx) -> Result<Vec<u8>, Error> {
        match ctx.outputs.as_slice() {
            [output] => {
                let sorted: Sorted = serde_json::from_slice(output).fatal()?;
                serde_json::to_vec(&sorted).fatal()
            }
            outputs => Err(Error::fatal(format!(
                "expected one merge output, got {}",
                outputs.len()
            ))),
        }
    }

    fn revert(ctx: &RevertCtx) -> Result<(), Error> {
        if let Ok(Input::Blob(BlobInput {
            output_key: Some(key),
            ..
        })) = Input::parse(&ctx.input)
        {
            blob::delete(&key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use stoker_guest::testing::{self, LocalRun};

    use super::*;

    fn result(bytes: &[u8]) -> Sorted {
        serde_json::from_slice(bytes).unwrap()
    }

    /// Pseudo-random records of varying length, some duplicated, some empty.
    fn sample(n: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut out = Vec::new();
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 12) as usize;
            out.extend((0..len).map(|i| b'a' + ((state >> (i * 5)) % 26) as u8));
            out.push(b'\n');
        }
        out
    }

    fn expected(data: &[u8]) -> Vec<u8> {
        sort_records(data).0
    }

    #[test]
    fn records_and_alignment() {
        assert_eq!(records(b"").count(), 0);
        assert_eq!(records(b"\n").collect::<Vec<_>>(), [b""]);
        assert_eq!(records(b"a\nb").collect::<Vec<_>>(), [&b"a"[..], b"b"]);
        assert_eq!(
            records(b"a\n\nb\n").collect::<Vec<_>>(),
            [&b"a"[..], b"", b"b"]
        );
        let data = b"ab\ncd\nef";
        assert_eq!(
            [0, 1, 2, 3, 4, 6, 7, 8, 99].map(|at| align(data, at)),
            [0, 3, 3, 3, 6, 6, 8, 8, 8]
        );
    }

    #[test]
    fn aligned_ranges_partition_the_records() {
        let data = sample(500);
        for n in [1, 2, 7, 64, 5000] {
            let mut all = Vec::new();
            for i in 0..n {
                all.extend(records(part(&data, i, n)));
            }
            assert_eq!(all, records(&data).collect::<Vec<_>>(), "n = {n}");
        }
    }

    #[test]
    fn merge_of_sorted_runs() {
        let runs = vec![b"a\nc\ne\n".to_vec(), Vec::new(), b"b\nc\nd\n".to_vec()];
        assert_eq!(merge_runs(&runs), (b"a\nb\nc\nc\nd\ne\n".to_vec(), 6));
    }

    #[test]
    fn inline_task() {
        let data = sample(1000);
        let run = LocalRun {
            node_count: 3,
            concurrency: 2,
            task_id: "t1".into(),
            ..Default::default()
        };
        let sorted = result(&run.run::<Sort>(&data).unwrap());
        assert_eq!(
            sorted,
            Sorted {
                output_key: "tasks/t1/sorted".into(),
                records: 1000
            }
        );
        let blobs = testing::blobs();
        assert_eq!(blobs["tasks/t1/sorted"], expected(&data));
        assert_eq!(blobs.len(), 1, "runs are deleted: {:?}", blobs.keys());
    }

    #[test]
    fn blob_task_with_custom_output() {
        let data = sample(777);
        blob::put("in/records.txt", &data).unwrap();
        let input =
            br#"{"input_key": "in/records.txt", "output_key": "out/sorted.txt", "chunks": 5}"#;
        let sorted = result(&testing::run_task::<Sort>(input).unwrap());
        assert_eq!(
            sorted,
            Sorted {
                output_key: "out/sorted.txt".into(),
                records: 777
            }
        );
        assert_eq!(
            blob::get("out/sorted.txt").unwrap().unwrap(),
            expected(&data)
        );
        assert_eq!(testing::blobs().len(), 2);

        // More parts than bytes: most runs are empty.
        blob::put("in/tiny", b"b\na").unwrap();
        let input = br#"{"input_key": "in/tiny", "output_key": "out/tiny", "chunks": 50}"#;
        assert_eq!(
            result(&testing::run_task::<Sort>(input).unwrap()).records,
            2
        );
        assert_eq!(blob::get("out/tiny").unwrap().unwrap(), b"a\nb\n");
    }

    #[test]
    fn empty_and_unterminated_inputs() {
        let sorted = result(&testing::run_task::<Sort>(b"").unwrap());
        assert_eq!(sorted.records, 0);
        assert_eq!(blob::get(&sorted.output_key).unwrap().unwrap(), b"");

        let sorted = result(&testing::run_task::<Sort>(b"b\na").unwrap());
        assert_eq!(blob::get(&sorted.output_key).unwrap().unwrap(), b"a\nb\n");

        // JSON that is not a config is just a record.
        let sorted = result(&testing::run_task::<Sort>(br#"{"x": 1}"#).unwrap());
        assert_eq!(sorted.records, 1);
    }

    #[test]
    fn bad_configs_are_fatal() {
        let missing = testing::run_task::<Sort>(br#"{"input_key": "nope"}"#).unwrap_err();
        assert!(
            !missing.is_retryable() && missing.message().contains("not found"),
            "{missing}"
        );
        let typo = testing::run_task::<Sort>(br#"{"input_key": "a", "chunk": 3}"#).unwrap_err();
        assert!(typo.message().contains("bad input"), "{typo}");
        let denied = testing::run_task::<Sort>(br#"{"input_key": "../etc/passwd"}"#).unwrap_err();
        assert!(denied.message().contains("denied"), "{denied}");
    }

    #[test]
    fn revert_deletes_a_custom_output() {
        blob::put("out/partial", b"x").unwrap();
        let ctx = RevertCtx {
            input: br#"{"input_key": "a", "output_key": "out/partial"}"#.to_vec(),
            ..Default::default()
        };
        Sort::revert(&ctx).unwrap();
        assert_eq!(blob::get("out/partial").unwrap(), None);
    }
}
