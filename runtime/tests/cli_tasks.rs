//! The client commands (`module`, `task`, `node`) as a user runs them when
//! something is wrong: no node at the endpoint, a missing module file, bad
//! arguments. Each must fail with one actionable line on stderr, nothing on
//! stdout and a non-zero exit code. (The end-to-end runs against a cluster
//! live elsewhere.)

use std::path::Path;
use std::process::{Command, Output};

use stoker::api::local_cluster::free_port;

/// Runs the binary with `env` set and the user's own STOKER_* unset.
fn stoker_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stoker"));
    cmd.args(args)
        .env_remove("STOKER_ENDPOINT")
        .env_remove("STOKER_TOKEN")
        .env("STOKER_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("stoker runs")
}

fn stoker(args: &[&str]) -> Output {
    stoker_env(args, &[])
}

/// 127.0.0.1 on a port nothing listens on.
fn closed_endpoint() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// Asserts a failure with exactly one `error:` line containing every one of
/// `needles`, nothing on stdout, and returns the line.
fn fails_with(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure; stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout must stay empty: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "{line:?} should mention {n:?}");
    }
    line.to_string()
}

#[test]
fn every_client_command_explains_an_unreachable_endpoint() {
    let ep = closed_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(&input, b"{}").unwrap();
    let wasm = dir.path().join("m.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
    let input = input.to_str().unwrap();
    let wasm = wasm.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["task", "show", "7"],
        vec!["task", "show", "7", "-o", "json"],
        vec!["task", "list", "--all"],
        vec!["task", "wait", "7", "--timeout-secs", "5"],
        vec!["task", "cancel", "7"],
        vec!["task", "pause", "7"],
        vec!["task", "resume", "7"],
        vec!["task", "resolve", "7"],
        vec!["task", "modify", "7", "--priority", "3"],
        vec!["task", "submit", "--module", "wc", "--input", input],
        vec![
            "task", "submit", "--module", "wc", "--input", input, "-o", "json",
        ],
        vec!["module", "list", "-o", "json"],
        vec!["module", "upload", wasm, "--name", "m"],
        vec!["node", "list"],
    ];
    for args in commands {
        let mut full = args.clone();
        full.extend(["--endpoint", ep.as_str(), "--token", "t0k"]);
        let out = stoker(&full);
        let line = fails_with(&out, &["cannot reach", &ep]);
        assert!(line.contains("--endpoint"), "{args:?}: {line}");
    }
}

#[test]
fn the_endpoint_comes_from_stoker_endpoint() {
    let ep = closed_endpoint();
    let out = stoker_env(&["node", "list", "-o", "json"], &[("STOKER_ENDPOINT", &ep)]);
    fails_with(&out, &["cannot reach", &ep]);
    let out = stoker_env(
        &["task", "wait", "1"],
        &[("STOKER_ENDPOINT", &ep), ("STOKER_TOKEN", "secret")],
    );
    // A connection failure is an error, not a timeout (2).
    fails_with(&out, &["cannot reach", &ep]);
}

#[test]
fn uploading_a_missing_module_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-module.wasm");
    let out = stoker(&[
        "module",
        "upload",
        missing.to_str().unwrap(),
        "--name",
        "wc",
        "--endpoint",
        &closed_endpoint(),
    ]);
    // The file is checked before the network: the error is about the file.
    let line = fails_with(&out, &["no-such-module.wasm"]);
    assert!(!line.contains("cannot reach"), "{line}");
}

#[test]
fn submitting_a_missing_input_names_the_file() {
    let out = stoker(&[
        "task",
        "submit",
        "--module",
        "wc",
        "--input",
        Path::new("/definitely/not/here.txt").to_str().unwrap(),
        "--endpoint",
        &closed_endpoint(),
    ]);
    fails_with(&out, &["input file", "/definitely/not/here.txt"]);
}

#[test]
fn bad_arguments_fail_before_connecting() {
    let ep = closed_endpoint();
    let out = stoker(&["task", "modify", "7", "--endpoint", &ep]);
    fails_with(&out, &["nothing to modify", "--concurrency"]);
    let out = stoker(&[
        "task",
        "submit",
        "--module",
        "wc",
        "--input",
        "/definitely/not/here.txt",
        "--selector",
        "zone",
        "--endpoint",
        &ep,
    ]);
    fails_with(&out, &["bad --selector", "zone"]);
    let out = stoker(&[
        "task",
        "submit",
        "--module",
        "wc",
        "--input",
        "/definitely/not/here.txt",
        "--priority",
        "0",
        "--endpoint",
        &ep,
    ]);
    fails_with(&out, &["--priority"]);
    let out = stoker(&["node", "list", "--endpoint", "not an address"]);
    fails_with(&out, &["bad --endpoint", "not an address"]);
    // Unknown states are refused by the parser (clap's usage error, code 2).
    let out = stoker(&["task", "list", "--state", "done"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown task state"));
}
