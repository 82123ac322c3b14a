//! The example task types, run end to end by the local runner, checked
//! against answers computed here independently.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use stoker::blob::BlobStore;
use stoker::exec::local::{Event, LocalOptions, LocalRunner, RetryPolicy, Summary};
use stoker::sandbox::{CallLimits, ErrorKind, Sandbox, SandboxConfig};

fn runner(blobs: Option<&BlobStore>) -> LocalRunner {
    let sandbox = Sandbox::new(SandboxConfig::default()).expect("sandbox");
    LocalRunner::new(Arc::new(sandbox), blobs.map(|b| b.tenant("test").unwrap()))
}

fn opts(slots: usize) -> LocalOptions {
    LocalOptions {
        slots,
        limits: CallLimits::default(),
        retry: RetryPolicy {
            max_attempts: 3,
            base: std::time::Duration::from_millis(5),
            max: std::time::Duration::from_millis(20),
        },
        task_id: "t-1".into(),
    }
}

async fn run(name: &str, input: &[u8], slots: usize, blobs: Option<&BlobStore>) -> Summary {
    runner(blobs)
        .run(
            &stoker_test_artifacts::read(name),
            input.to_vec(),
            &opts(slots),
            &|_| {},
        )
        .await
}

fn json(summary: &Summary) -> serde_json::Value {
    let bytes = summary
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("task failed: {e}"));
    serde_json::from_slice(bytes).expect("result is JSON")
}

#[tokio::test]
async fn wordcount_counts_the_top_20_words() {
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!(
            "The quick brown Fox {i} jumps over the lazy dog; the DOG sleeps. Ünïcode wörds count-{} too!\n",
            i % 7
        ));
    }
    let summary = run("wordcount", text.as_bytes(), 2, None).await;
    let got: Vec<(String, u64)> = serde_json::from_value(json(&summary)).unwrap();
    assert_eq!(got, stoker_test_artifacts::wordcount_top20(&text));
    assert!(summary.steps >= 2, "count then merge");
    assert!(summary.fuel_used > 0);
}

#[tokio::test]
async fn wordcount_of_empty_input_is_empty() {
    let summary = run("wordcount", b"", 2, None).await;
    assert_eq!(json(&summary), serde_json::json!([]));
}

#[tokio::test]
async fn primes_counts_primes_below_100000() {
    let input = br#"{"start": 0, "end": 100000, "chunks": 8}"#;
    let summary = run("primes", input, 2, None).await;
    assert_eq!(json(&summary), serde_json::json!({"count": 9592}));
    assert_eq!(summary.subtasks, 8);
}

#[tokio::test]
async fn primes_rejects_bad_input() {
    let summary = run("primes", b"{\"start\": \"zero\"}", 2, None).await;
    let err = summary.result.unwrap_err();
    assert_eq!(err.kind, ErrorKind::GuestError, "{err}");
    assert!(!err.retryable);
}

#[tokio::test]
async fn sort_sorts_records_through_the_blob_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::local(dir.path()).unwrap();
    // Pseudo-random records, deterministic.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut records: Vec<String> = (0..5000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("record-{:016x}", x)
        })
        .collect();
    let input = records.join("\n");
    let tenant = store.tenant("test").unwrap();
    tenant
        .put("inputs/records.txt", input.clone().into())
        .await
        .unwrap();
    let task = serde_json::json!({"input_key": "inputs/records.txt", "chunks": 6}).to_string();
    let summary = run("sort", task.as_bytes(), 2, Some(&store)).await;
    let result = json(&summary);
    assert_eq!(result["records"], 5000, "{result}");
    let key = result["output_key"].as_str().expect("output_key");
    let sorted = tenant.get(key).await.unwrap().expect("output blob exists");
    records.sort();
    let got: Vec<&str> = std::str::from_utf8(&sorted).unwrap().lines().collect();
    assert_eq!(got, records);
}

#[tokio::test]
async fn sixty_four_subtasks_on_two_slots_all_complete() {
    let input: Vec<String> = (0..64).map(|i| format!("ok-{i:02}")).collect();
    let done = AtomicUsize::new(0);
    let summary = runner(None)
        .run(
            &stoker_test_artifacts::read("misbehave"),
            input.join("\n").into_bytes(),
            &opts(2),
            &|event| {
                if let Event::SubtaskDone { .. } = event {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .await;
    assert_eq!(summary.result.unwrap(), input.concat().into_bytes());
    assert_eq!(summary.subtasks, 64);
    assert_eq!(done.load(Ordering::Relaxed), 64);
}

#[tokio::test]
async fn retryable_failures_are_retried_with_the_checkpoint() {
    // flaky:3 fails retryably on attempts 1 and 2, succeeds on 3.
    let summary = run("misbehave", b"flaky:3\ncheckpoint", 2, None).await;
    let out = summary.result.unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.is_empty());
    assert!(summary.attempts >= 5, "attempts: {}", summary.attempts);
}

#[tokio::test]
async fn a_subtask_failing_for_good_fails_the_task() {
    let summary = run("misbehave", b"ok\nfail-fatal\nok", 2, None).await;
    let err = summary.result.unwrap_err();
    assert_eq!(err.kind, ErrorKind::GuestError);
    assert!(err.message.contains("subtask 0/1"), "{err}");
}

#[tokio::test]
async fn every_guest_artifact_is_a_valid_module() {
    let sandbox = Sandbox::new(SandboxConfig::default()).unwrap();
    assert!(stoker_test_artifacts::ALL.len() >= 4);
    for (name, _) in stoker_test_artifacts::ALL {
        let bytes = stoker_test_artifacts::read(name);
        sandbox
            .load(&bytes)
            .await
            .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
    }
}
