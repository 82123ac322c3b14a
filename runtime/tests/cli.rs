//! `stoker run-local` as a user runs it: the real binary, its JSON output and
//! exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn stoker(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stoker"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("stoker runs")
}

fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn run_local_prints_one_json_object() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("in.json"),
        r#"{"start": 0, "end": 1000, "chunks": 4}"#,
    )
    .unwrap();
    let out = stoker(
        dir.path(),
        &[
            "run-local",
            "--module",
            stoker_test_artifacts::PRIMES,
            "--input",
            "in.json",
            "--slots",
            "2",
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert_eq!(v["state"], "succeed");
    assert_eq!(v["result"], serde_json::json!({"count": 168}));
    assert_eq!(v["error"], serde_json::Value::Null);
    assert_eq!(v["subtasks"], 4);
    assert!(v["fuel_used"].as_u64().unwrap() > 0);
    assert!(v["elapsed_ms"].is_u64());
}

#[test]
fn run_local_failure_exits_non_zero_with_a_classified_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "ok\nloop\nok").unwrap();
    let out = stoker(
        dir.path(),
        &[
            "run-local",
            "--module",
            stoker_test_artifacts::MISBEHAVE,
            "--input",
            "in.txt",
            "--fuel-per-subtask",
            "50000000",
            "-o",
            "json",
        ],
    );
    assert!(!out.status.success());
    let v = json_of(&out);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["error"]["kind"], "fuel_exhausted");
    assert_eq!(v["result"], serde_json::Value::Null);
}

#[test]
fn run_local_text_output_shows_progress_and_result() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "a b a c a b").unwrap();
    let out = stoker(
        dir.path(),
        &[
            "run-local",
            "--module",
            stoker_test_artifacts::WORDCOUNT,
            "--input",
            "in.txt",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step 0:"), "{stderr}");
    assert!(stderr.contains("task succeed"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), r#"[["a",3],["b",2],["c",1]]"#);
}

#[test]
fn missing_input_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = stoker(
        dir.path(),
        &[
            "run-local",
            "--module",
            stoker_test_artifacts::PRIMES,
            "--input",
            "nope.json",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read input file nope.json"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[test]
fn missing_module_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "x").unwrap();
    let out = stoker(
        dir.path(),
        &["run-local", "--module", "nope.wasm", "--input", "in.txt"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read module file nope.wasm"));
}
