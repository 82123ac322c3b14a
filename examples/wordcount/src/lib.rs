//! The 20 most frequent words of a text: a two-step map/merge task type.
//!
//! # Input and result
//!
//! Input: UTF-8 text (anything else fails the task, not retryable). A word
//! is a maximal run of alphanumeric characters ([`char::is_alphanumeric`]),
//! lowercased.
//!
//! Result, JSON: the 20 most frequent words as `[word, count]` pairs, by
//! count descending then word ascending, e.g. `[["the",12],["a",7]]`; `[]`
//! for a text without words.
//!
//! # Steps
//!
//! - step 0 (count): the text is cut into about `node_count * concurrency *
//!   2` chunks, never inside a word; each subtask counts the words of its
//!   chunk and outputs them hash-partitioned into `P` sections, `P =
//!   node_count * concurrency` capped to 1..=8;
//! - step 1 (merge): one subtask per partition sums the counts of its words
//!   (every word lives in exactly one partition) and outputs its top 20;
//! - step 2: done; `finish` merges the partitions' top 20s into the result.
//!
//! Payloads and outputs are internal: a step-0 payload is the partition
//! count (`u32`, little-endian) followed by the chunk; counts travel as
//! `word\tcount\n` lines, sorted by word, in `u32`-length-prefixed sections.

use std::collections::HashMap;

use stoker_guest::{Error, FinishCtx, Plan, PlanCtx, ResultExt, RunCtx, TaskType};

/// How many words the result lists.
pub const TOP: usize = 20;
/// At most this many chunks, however large the cluster.
const MAX_CHUNKS: usize = 1024;
/// At most this many merge partitions.
const MAX_PARTITIONS: u32 = 8;

/// The task type.
pub struct WordCount;

stoker_guest::export!(WordCount);

/// Word counts.
pub type Counts = HashMap<String, u64>;

/// The words of `text`, lowercased, in order.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
}

/// Counts the words of `text`.
pub fn count_words(text: &str) -> Counts {
    let mut counts = Counts::new();
    for word in words(text) {
        *counts.entry(word).or_insert(0) += 1;
    }
    counts
}

/// The `n` most frequent words, by count descending then word ascending.
pub fn top(counts: Counts, n: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = counts.into_iter().collect();
    all.sort_unstable_by(|(wa, ca), (wb, cb)| cb.cmp(ca).then_with(|| wa.cmp(wb)));
    all.truncate(n);
    all
}

/// Cuts `text` into about `n` non-empty chunks of similar size, each cut
/// placed where it does not split a word (nor a character). At least one
/// chunk, empty when `text` is.
pub fn split_chunks(text: &str, n: usize) -> Vec<&str> {
    let n = n.max(1);
    let mut chunks = Vec::with_capacity(n);
    let mut from = 0;
    for i in 1..=n {
        let target = (text.len() * i / n).max(from);
        let cut = next_cut(text, target);
        if cut > from {
            chunks.push(&text[from..cut]);
            from = cut;
        }
    }
    if chunks.is_empty() {
        chunks.push(text);
    }
    chunks
}

/// The first position at or after `at` that is a character boundary and not
/// between two alphanumeric characters.
fn next_cut(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    let before = text[..at].chars().next_back();
    if !before.is_some_and(char::is_alphanumeric) {
        return at;
    }
    match text[at..].find(|c: char| !c.is_alphanumeric()) {
        Some(offset) => at + offset,
        None => text.len(),
    }
}

/// FNV-1a: a hash that is the same in every instance and on every platform.
fn partition_of(word: &str, partitions: u32) -> usize {
    let hash = word.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % u64::from(partitions.max(1))) as usize
}

/// `word\tcount\n` lines, sorted by word.
fn encode_counts<'a>(counts: impl IntoIterator<Item = (&'a String, &'a u64)>, out: &mut Vec<u8>) {
    let mut sorted: Vec<_> = counts.into_iter().collect();
    sorted.sort_unstable();
    for (word, count) in sorted {
        out.extend_from_slice(word.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(count.to_string().as_bytes());
        out.push(b'\n');
    }
}

/// Adds the `word\tcount\n` lines of `data` to `counts`.
fn add_counts(data: &[u8], counts: &mut Counts) -> Result<(), Error> {
    let corrupt = || Error::fatal("corrupt word counts");
    for line in std::str::from_utf8(data)?.lines() {
        let (word, count) = line.split_once('\t').ok_or_else(corrupt)?;
        let count: u64 = count.parse().map_err(|_| corrupt())?;
        *counts.entry(word.to_owned()).or_insert(0) += count;
    }
    Ok(())
}

/// Splits a step-0 output into its `u32`-length-prefixed sections.
fn sections(mut data: &[u8]) -> Result<Vec<&[u8]>, Error> {
    let corrupt = || Error::fatal("corrupt count output");
    let mut sections = Vec::new();
    while !data.is_empty() {
        let (len, rest) = data.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(corrupt());
        }
        let (section, rest) = rest.split_at(len);
        sections.push(section);
        data = rest;
    }
    Ok(sections)
}

/// Step 0: one subtask per chunk.
fn plan_count(ctx: &PlanCtx) -> Result<Plan, Error> {
    let text = std::str::from_utf8(&ctx.input)
        .map_err(|e| Error::fatal(format!("input is not UTF-8 text: {e}")))?;
    let slots = ctx.node_count.max(1).saturating_mul(ctx.concurrency.max(1));
    let partitions = slots.min(MAX_PARTITIONS);
    let chunks = (slots as usize).saturating_mul(2).min(MAX_CHUNKS);
    let payloads = split_chunks(text, chunks).into_iter().map(|chunk| {
        let mut payload = Vec::with_capacity(4 + chunk.len());
        payload.extend_from_slice(&partitions.to_le_bytes());
        payload.extend_from_slice(chunk.as_bytes());
        payload
    });
    Ok(Plan::subtasks(payloads))
}

/// Step 1: one subtask per partition, carrying that partition's section of
/// every count output.
fn plan_merge(ctx: &PlanCtx) -> Result<Plan, Error> {
    let mut partitions: Vec<Vec<u8>> = Vec::new();
    for output in &ctx.previous_outputs {
        let sections = sections(output)?;
        if partitions.is_empty() {
            partitions.resize(sections.len(), Vec::new());
        }
        if sections.len() != partitions.len() {
            return Err(Error::fatal(
                "count outputs disagree on the partition count",
            ));
        }
        for (partition, section) in partitions.iter_mut().zip(sections) {
            partition.extend_from_slice(section);
        }
    }
    if partitions.is_empty() {
        partitions.push(Vec::new());
    }
    Ok(Plan::subtasks(partitions))
}

/// Step-0 subtask: the chunk's counts, partitioned.
fn run_count(payload: &[u8]) -> Result<Vec<u8>, Error> {
    let (partitions, chunk) = payload
        .split_first_chunk::<4>()
        .ok_or_else(|| Error::fatal("count payload too short"))?;
    let partitions = u32::from_le_bytes(*partitions).max(1);
    let chunk = std::str::from_utf8(chunk)?;
    let counts = count_words(chunk);
    let mut parts: Vec<Vec<(&String, &u64)>> = vec![Vec::new(); partitions as usize];
    for entry in &counts {
        parts[partition_of(entry.0, partitions)].push(entry);
    }
    let mut output = Vec::new();
    for part in parts {
        let mut section = Vec::new();
        encode_counts(part, &mut section);
        let len = u32::try_from(section.len()).fatal()?;
        output.extend_from_slice(&len.to_le_bytes());
        output.extend_from_slice(&section);
    }
    stoker_guest::progress(chunk.len() as u64, chunk.len() as u64);
    Ok(output)
}

/// Step-1 subtask: the partition's top words.
fn run_merge(payload: &[u8]) -> Result<Vec<u8>, Error> {
    let mut counts = Counts::new();
    add_counts(payload, &mut counts)?;
    let top = top(counts, TOP);
    let mut output = Vec::new();
    encode_counts(top.iter().map(|(word, count)| (word, count)), &mut output);
    Ok(output)
}

impl TaskType for WordCount {
    fn plan(ctx: &PlanCtx) -> Result<Plan, Error> {
        match ctx.step {
            0 => plan_count(ctx),
            1 => plan_merge(ctx),
            _ => Ok(Plan::done()),
        }
    }

    fn run(ctx: &RunCtx) -> Result<Vec<u8>, Error> {
        match ctx.step {
            0 => run_count(&ctx.payload),
            1 => run_merge(&ctx.payload),
            step => Err(Error::fatal(format!("wordcount has no step {step}"))),
        }
    }

    fn finish(ctx: &FinishCtx) -> Result<Vec<u8>, Error> {
        let mut counts = Counts::new();
        for output in &ctx.outputs {
            add_counts(output, &mut counts)?;
        }
        serde_json::to_vec(&top(counts, TOP)).fatal()
    }
}

#[cfg(test)]
mod tests {
    use stoker_guest::testing::{self, LocalRun};

    use super::*;

    fn json(result: &[u8]) -> String {
        String::from_utf8(result.to_vec()).unwrap()
    }

    #[test]
    fn words_are_lowercased_alphanumeric_runs() {
        let words: Vec<String> = words("Hello, WORLD! it's 42nd-street; Ünïcode ok").collect();
        assert_eq!(
            words,
            [
                "hello",
                "world",
                "it",
                "s",
                "42nd",
                "street",
                "ünïcode",
                "ok"
            ]
        );
    }

    #[test]
    fn chunks_never_cut_words() {
        let text = "alpha beta gamma délta epsilon zeta eta theta iota kappa";
        for n in 1..=40 {
            let chunks = split_chunks(text, n);
            assert_eq!(chunks.concat(), text, "n = {n}");
            assert!(chunks.len() <= n);
            let words: Vec<String> = chunks.iter().flat_map(|c| words(c)).collect();
            assert_eq!(words, super::words(text).collect::<Vec<_>>(), "n = {n}");
        }
        assert_eq!(split_chunks("", 5), [""]);
        assert_eq!(split_chunks("oneword", 5), ["oneword"]);
    }

    #[test]
    fn top_orders_by_count_then_word() {
        let counts = count_words("b a c b a d b");
        assert_eq!(
            top(counts, 3),
            [
                ("b".to_owned(), 3),
                ("a".to_owned(), 2),
                ("c".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn whole_task_matches_a_direct_count() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("Word{} the THE a-b {}\n", i % 37, i % 5));
        }
        let expected = serde_json::to_string(&top(count_words(&text), TOP)).unwrap();
        for (node_count, concurrency) in [(1, 1), (3, 2), (20, 4)] {
            let run = LocalRun {
                node_count,
                concurrency,
                ..Default::default()
            };
            let result = run.run::<WordCount>(text.as_bytes()).unwrap();
            assert_eq!(json(&result), expected, "{node_count} x {concurrency}");
        }
        assert!(
            expected.starts_with(r#"[["the",4000],["a",2000],["b",2000],["0",400]"#),
            "{expected}"
        );
    }

    #[test]
    fn empty_and_wordless_input() {
        assert_eq!(json(&testing::run_task::<WordCount>(b"").unwrap()), "[]");
        let run = LocalRun {
            node_count: 4,
            ..Default::default()
        };
        assert_eq!(json(&run.run::<WordCount>(b" ,.; \n").unwrap()), "[]");
    }

    #[test]
    fn non_utf8_input_is_fatal() {
        let error = testing::run_task::<WordCount>(b"ok \xff\xfe").unwrap_err();
        assert!(!error.is_retryable());
        assert!(error.message().contains("not UTF-8"), "{error}");
    }
}
