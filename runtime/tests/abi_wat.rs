//! A complete guest module written by hand in WAT from `docs/guest-abi.md`
//! alone (and the messages of `proto/proto/guest.proto`), run by the sandbox
//! and by the local runner: proof that the documented ABI is enough to write
//! a guest without the SDK.
//!
//! The task: step 0 makes one subtask per input byte, whose payload is that
//! byte; `run` returns its payload with ASCII letters uppercased and logs one
//! line; step 1 checks that `previous_outputs` are those uppercased bytes in
//! ordinal order and answers `done`. There is no `stoker_finish`, so the task's
//! result is the outputs concatenated: the input, uppercased.

use std::sync::{Arc, Mutex};

use stoker::exec::local::{Event, LocalOptions, LocalRunner, RetryPolicy};
use stoker::sandbox::{CallEnv, ErrorKind, Plan, Sandbox, SandboxConfig, TaskModule};
use stoker_proto::guest::{FinishRequest, GuestError, PlanRequest, RunRequest, RunResponse};
use stoker_proto::Message;

/// The guest. Protobuf is decoded and encoded by hand: every key is a varint
/// `(field << 3) | wire_type`, unknown fields of wire types 0, 1, 2 and 5 are
/// skipped, and a malformed request traps (`unreachable`).
const GUEST_WAT: &str = r#"
(module
  (import "stoker" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)

  ;; Constant strings live below the heap.
  (data (i32.const 16) "upper ")                                   ;; 6 bytes
  (data (i32.const 32) "previous_outputs do not match the input")  ;; 39 bytes

  ;; Bump allocator state.
  (global $heap (mut i32) (i32.const 1024))
  ;; Decoder state: the next byte to read, the end of the message, and the
  ;; length of the last length-delimited value read.
  (global $pos (mut i32) (i32.const 0))
  (global $end (mut i32) (i32.const 0))
  (global $blen (mut i32) (i32.const 0))
  ;; Encoder state: the next byte to write.
  (global $out (mut i32) (i32.const 0))

  ;; The ABI version marker: any signature, never called.
  (func (export "stoker_abi_v1"))

  ;; A bump allocator that grows memory when needed; 0 when out of memory.
  (func $alloc (export "stoker_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local $new i64)
    (local $have i64)
    (local.set $p (global.get $heap))
    (local.set $new (i64.add (i64.extend_i32_u (local.get $p))
                             (i64.extend_i32_u (local.get $len))))
    (if (i64.gt_u (local.get $new) (i64.const 0xffffffff))
      (then (return (i32.const 0))))
    (local.set $have (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
    (if (i64.gt_u (local.get $new) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow
                (i32.wrap_i64
                  (i64.shr_u
                    (i64.add (i64.sub (local.get $new) (local.get $have)) (i64.const 0xffff))
                    (i64.const 16))))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (i32.wrap_i64 (local.get $new)))
    (local.get $p))

  ;; ---- decoding ----

  (func $start_decode (param $p i32) (param $len i32)
    (global.set $pos (local.get $p))
    (global.set $end (i32.add (local.get $p) (local.get $len))))

  ;; Reads a varint of up to 10 bytes.
  (func $varint (result i64)
    (local $r i64)
    (local $shift i64)
    (local $b i32)
    (loop $more
      (if (i32.ge_u (global.get $pos) (global.get $end)) (then unreachable))
      (if (i64.ge_u (local.get $shift) (i64.const 64)) (then unreachable))
      (local.set $b (i32.load8_u (global.get $pos)))
      (global.set $pos (i32.add (global.get $pos) (i32.const 1)))
      (local.set $r
        (i64.or (local.get $r)
                (i64.shl (i64.extend_i32_u (i32.and (local.get $b) (i32.const 0x7f)))
                         (local.get $shift))))
      (local.set $shift (i64.add (local.get $shift) (i64.const 7)))
      (br_if $more (i32.and (local.get $b) (i32.const 0x80))))
    (local.get $r))

  ;; Moves past n bytes that must be inside the message.
  (func $advance (param $n i32)
    (if (i32.gt_u (local.get $n) (i32.sub (global.get $end) (global.get $pos)))
      (then unreachable))
    (global.set $pos (i32.add (global.get $pos) (local.get $n))))

  ;; Reads a length-delimited value: returns its pointer, sets $blen.
  (func $bytes (result i32)
    (local $l i64)
    (local $p i32)
    (local.set $l (call $varint))
    (if (i64.gt_u (local.get $l)
                  (i64.extend_i32_u (i32.sub (global.get $end) (global.get $pos))))
      (then unreachable))
    (local.set $p (global.get $pos))
    (global.set $blen (i32.wrap_i64 (local.get $l)))
    (global.set $pos (i32.add (local.get $p) (global.get $blen)))
    (local.get $p))

  ;; Skips the value of a field this guest does not know.
  (func $skip (param $wire i32)
    (block $done
      (if (i32.eq (local.get $wire) (i32.const 0))
        (then (drop (call $varint)) (br $done)))
      (if (i32.eq (local.get $wire) (i32.const 2))
        (then (drop (call $bytes)) (br $done)))
      (if (i32.eq (local.get $wire) (i32.const 1))
        (then (call $advance (i32.const 8)) (br $done)))
      (if (i32.eq (local.get $wire) (i32.const 5))
        (then (call $advance (i32.const 4)) (br $done)))
      unreachable))

  ;; ---- encoding ----

  ;; Allocates cap bytes for a response and starts writing there.
  (func $begin (param $cap i32) (result i32)
    (local $p i32)
    (local.set $p (call $alloc (local.get $cap)))
    (if (i32.and (i32.eqz (local.get $p)) (i32.ne (local.get $cap) (i32.const 0)))
      (then unreachable))
    (global.set $out (local.get $p))
    (local.get $p))

  (func $put (param $b i32)
    (i32.store8 (global.get $out) (local.get $b))
    (global.set $out (i32.add (global.get $out) (i32.const 1))))

  (func $put_varint (param $v i32)
    (loop $more
      (if (i32.ge_u (local.get $v) (i32.const 0x80))
        (then
          (call $put (i32.or (i32.and (local.get $v) (i32.const 0x7f)) (i32.const 0x80)))
          (local.set $v (i32.shr_u (local.get $v) (i32.const 7)))
          (br $more))))
    (call $put (local.get $v)))

  (func $put_bytes (param $src i32) (param $n i32)
    (memory.copy (global.get $out) (local.get $src) (local.get $n))
    (global.set $out (i32.add (global.get $out) (local.get $n))))

  ;; The response written since `start`, as (ptr << 32) | len.
  (func $response (param $start i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $start)) (i64.const 32))
            (i64.extend_i32_u (i32.sub (global.get $out) (local.get $start)))))

  (func $upper (param $c i32) (result i32)
    (if (result i32)
        (i32.and (i32.ge_u (local.get $c) (i32.const 0x61))
                 (i32.le_u (local.get $c) (i32.const 0x7a)))
      (then (i32.sub (local.get $c) (i32.const 0x20)))
      (else (local.get $c))))

  ;; ---- entry points ----

  ;; PlanRequest { step=1 varint, input=2 bytes, previous_outputs=3 repeated
  ;; bytes, ... } -> PlanResponse { done=1, subtasks=2, error=3 }.
  (func (export "stoker_plan") (param $p i32) (param $len i32) (result i64)
    (local $key i32)
    (local $step i32)
    (local $in i32)
    (local $inlen i32)
    (local $prev i32)
    (local $nprev i32)
    (local $q i32)
    (local $i i32)
    (local $ok i32)
    (local $start i32)
    (call $start_decode (local.get $p) (local.get $len))
    ;; previous_outputs are recorded as (ptr, len) pairs, contiguous on the
    ;; heap since nothing else allocates while decoding.
    (local.set $prev (global.get $heap))
    (block $decoded
      (loop $fields
        (br_if $decoded (i32.ge_u (global.get $pos) (global.get $end)))
        (local.set $key (i32.wrap_i64 (call $varint)))
        (block $next
          (if (i32.eq (local.get $key) (i32.const 0x08)) ;; step, varint
            (then (local.set $step (i32.wrap_i64 (call $varint))) (br $next)))
          (if (i32.eq (local.get $key) (i32.const 0x12)) ;; input, bytes
            (then
              (local.set $in (call $bytes))
              (local.set $inlen (global.get $blen))
              (br $next)))
          (if (i32.eq (local.get $key) (i32.const 0x1a)) ;; previous_outputs
            (then
              (local.set $q (call $alloc (i32.const 8)))
              (if (i32.eqz (local.get $q)) (then unreachable))
              (i32.store (local.get $q) (call $bytes))
              (i32.store offset=4 (local.get $q) (global.get $blen))
              (local.set $nprev (i32.add (local.get $nprev) (i32.const 1)))
              (br $next)))
          (call $skip (i32.and (local.get $key) (i32.const 7))))
        (br $fields)))

    ;; Step 0: one subtask per input byte: key 0x12, length 1, the byte.
    (if (i32.eqz (local.get $step))
      (then
        (local.set $start (call $begin (i32.mul (local.get $inlen) (i32.const 3))))
        (block $done
          (loop $each
            (br_if $done (i32.ge_u (local.get $i) (local.get $inlen)))
            (call $put (i32.const 0x12))
            (call $put (i32.const 1))
            (call $put (i32.load8_u (i32.add (local.get $in) (local.get $i))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $each)))
        (return (call $response (local.get $start)))))

    ;; Step 1 and later: previous_outputs must be the input uppercased, one
    ;; byte per output, in ordinal order.
    (local.set $ok (i32.eq (local.get $nprev) (local.get $inlen)))
    (block $checked
      (loop $each
        (br_if $checked (i32.eqz (local.get $ok)))
        (br_if $checked (i32.ge_u (local.get $i) (local.get $nprev)))
        (local.set $q (i32.add (local.get $prev) (i32.shl (local.get $i) (i32.const 3))))
        (if (i32.ne (i32.load offset=4 (local.get $q)) (i32.const 1))
          (then (local.set $ok (i32.const 0)))
          (else
            (if (i32.ne (i32.load8_u (i32.load (local.get $q)))
                        (call $upper (i32.load8_u (i32.add (local.get $in) (local.get $i)))))
              (then (local.set $ok (i32.const 0))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each)))
    (if (local.get $ok)
      (then
        ;; done = true
        (local.set $start (call $begin (i32.const 2)))
        (call $put (i32.const 0x08))
        (call $put (i32.const 1))
        (return (call $response (local.get $start)))))
    ;; error = GuestError { message = "...", retryable = false (omitted) }
    (local.set $start (call $begin (i32.const 43)))
    (call $put (i32.const 0x1a))
    (call $put (i32.const 41))
    (call $put (i32.const 0x0a))
    (call $put (i32.const 39))
    (call $put_bytes (i32.const 32) (i32.const 39))
    (call $response (local.get $start)))

  ;; RunRequest { payload=3 bytes, ... } -> RunResponse { output=1 bytes }.
  (func (export "stoker_run") (param $p i32) (param $len i32) (result i64)
    (local $key i32)
    (local $pl i32)
    (local $pllen i32)
    (local $msg i32)
    (local $i i32)
    (local $c i32)
    (local $start i32)
    (call $start_decode (local.get $p) (local.get $len))
    (block $decoded
      (loop $fields
        (br_if $decoded (i32.ge_u (global.get $pos) (global.get $end)))
        (local.set $key (i32.wrap_i64 (call $varint)))
        (if (i32.eq (local.get $key) (i32.const 0x1a)) ;; payload, bytes
          (then
            (local.set $pl (call $bytes))
            (local.set $pllen (global.get $blen)))
          (else (call $skip (i32.and (local.get $key) (i32.const 7)))))
        (br $fields)))

    ;; log(info, "upper <payload>"), non-ASCII bytes shown as '?' so that the
    ;; message is always UTF-8.
    (local.set $msg (call $begin (i32.add (local.get $pllen) (i32.const 6))))
    (call $put_bytes (i32.const 16) (i32.const 6))
    (block $copied
      (loop $each
        (br_if $copied (i32.ge_u (local.get $i) (local.get $pllen)))
        (local.set $c (i32.load8_u (i32.add (local.get $pl) (local.get $i))))
        (if (i32.ge_u (local.get $c) (i32.const 0x80)) (then (local.set $c (i32.const 0x3f))))
        (call $put (local.get $c))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each)))
    (call $log (i32.const 2) (local.get $msg) (i32.add (local.get $pllen) (i32.const 6)))

    ;; output: key 0x0a, varint length, the payload uppercased.
    (local.set $start (call $begin (i32.add (local.get $pllen) (i32.const 6))))
    (call $put (i32.const 0x0a))
    (call $put_varint (local.get $pllen))
    (local.set $i (i32.const 0))
    (block $done
      (loop $each
        (br_if $done (i32.ge_u (local.get $i) (local.get $pllen)))
        (call $put (call $upper (i32.load8_u (i32.add (local.get $pl) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each)))
    (call $response (local.get $start)))
)
"#;

const MISMATCH: &str = "previous_outputs do not match the input";

fn guest_wasm() -> Vec<u8> {
    wat::parse_str(GUEST_WAT).expect("the WAT guest compiles")
}

fn sandbox() -> Arc<Sandbox> {
    Arc::new(Sandbox::new(SandboxConfig::default()).expect("sandbox"))
}

async fn load(sandbox: &Sandbox) -> Arc<TaskModule> {
    sandbox
        .load(&guest_wasm())
        .await
        .expect("the WAT guest passes ABI validation")
}

fn options() -> LocalOptions {
    LocalOptions {
        slots: 2,
        limits: Default::default(),
        retry: RetryPolicy::default(),
        task_id: "t1".into(),
    }
}

/// A step-0 plan request with every field set, as the host would send it.
fn plan_request(step: u32, input: &[u8], previous_outputs: Vec<Vec<u8>>) -> PlanRequest {
    PlanRequest {
        step,
        input: input.to_vec(),
        previous_outputs,
        node_count: 3,
        task_id: "task-\u{e9}t\u{e9}-42".into(),
        concurrency: 7,
    }
}

fn run_request(payload: &[u8]) -> RunRequest {
    RunRequest {
        step: 0,
        ordinal: 5,
        payload: payload.to_vec(),
        checkpoint: b"an old checkpoint".to_vec(),
        attempt: 2,
        task_id: "t1".into(),
    }
}

#[test]
fn the_wire_examples_of_the_doc_are_right() {
    let hi = RunResponse {
        output: b"hi".to_vec(),
        error: None,
    };
    assert_eq!(hi.encode_to_vec(), [0x0a, 0x02, 0x68, 0x69]);
    let no = RunResponse {
        output: Vec::new(),
        error: Some(GuestError {
            message: "no".into(),
            retryable: true,
        }),
    };
    assert_eq!(
        no.encode_to_vec(),
        [0x12, 0x06, 0x0a, 0x02, 0x6e, 0x6f, 0x10, 0x01]
    );
}

#[tokio::test]
async fn plan_step_0_makes_one_subtask_per_input_byte() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    let report = sandbox
        .plan(
            &module,
            &CallEnv::default(),
            &plan_request(0, b"abc", Vec::new()),
        )
        .await;
    let plan = report.result.expect("step 0 plans");
    assert_eq!(
        plan,
        Plan::Step {
            subtasks: vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()],
            non_idempotent: false,
        }
    );
    assert_eq!(report.log, "", "plan does not log");
}

#[tokio::test]
async fn plan_step_0_decodes_multi_byte_lengths() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    // 300 bytes: the input's length is a 2-byte varint.
    let input: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    let report = sandbox
        .plan(
            &module,
            &CallEnv::default(),
            &plan_request(0, &input, Vec::new()),
        )
        .await;
    let Plan::Step { subtasks, .. } = report.result.expect("step 0 plans") else {
        panic!("step 0 is not done");
    };
    assert_eq!(subtasks.len(), 300);
    let expected: Vec<Vec<u8>> = input.iter().map(|b| vec![*b]).collect();
    assert_eq!(subtasks, expected);
}

#[tokio::test]
async fn plan_step_0_with_empty_input_is_an_abi_error() {
    // No subtasks and not done: the doc says the host rejects it as `abi`.
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    let report = sandbox
        .plan(
            &module,
            &CallEnv::default(),
            &plan_request(0, b"", Vec::new()),
        )
        .await;
    let err = report.result.expect_err("an empty step 0 is refused");
    assert_eq!(err.kind, ErrorKind::Abi, "{err}");
}

#[tokio::test]
async fn plan_step_1_is_done_when_previous_outputs_match() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    let report = sandbox
        .plan(
            &module,
            &CallEnv::default(),
            &plan_request(1, b"ab", vec![b"A".to_vec(), b"B".to_vec()]),
        )
        .await;
    assert_eq!(report.result.expect("step 1 plans"), Plan::Done);
}

#[tokio::test]
async fn plan_step_1_reports_a_guest_error_on_wrong_previous_outputs() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    for previous in [
        vec![b"A".to_vec()],                // too few
        vec![b"B".to_vec(), b"A".to_vec()], // out of order
        vec![b"A".to_vec(), b"BB".to_vec()],
    ] {
        let report = sandbox
            .plan(
                &module,
                &CallEnv::default(),
                &plan_request(1, b"ab", previous.clone()),
            )
            .await;
        let err = report.result.expect_err("mismatch is a guest error");
        assert_eq!(err.kind, ErrorKind::GuestError, "{previous:?}: {err}");
        assert_eq!(err.message, MISMATCH);
        assert!(!err.retryable);
    }
}

#[tokio::test]
async fn run_uppercases_its_payload_and_logs_one_line() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    let report = sandbox
        .run(&module, &CallEnv::default(), &run_request(b"a"))
        .await;
    assert_eq!(report.result.expect("run succeeds"), b"A");
    let lines: Vec<&str> = report.log.lines().collect();
    assert_eq!(lines.len(), 1, "log: {:?}", report.log);
    assert!(lines[0].contains("upper a"), "log: {:?}", report.log);
    // Level 2 is documented as info.
    assert!(lines[0].contains("info"), "log: {:?}", report.log);
}

#[tokio::test]
async fn run_handles_long_and_non_ascii_payloads() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    // 200 bytes: the output's length is a 2-byte varint.
    let mut payload = b"hello, w0rld! ".repeat(14);
    payload.extend_from_slice("\u{e9}\u{e9}\u{e9}".as_bytes());
    assert_eq!(payload.len(), 202);
    let report = sandbox
        .run(&module, &CallEnv::default(), &run_request(&payload))
        .await;
    let mut expected = b"HELLO, W0RLD! ".repeat(14);
    expected.extend_from_slice("\u{e9}\u{e9}\u{e9}".as_bytes());
    assert_eq!(report.result.expect("run succeeds"), expected);
    let line = format!("upper {}{}", "hello, w0rld! ".repeat(14), "??????");
    assert!(report.log.contains(&line), "log: {:?}", report.log);
}

#[tokio::test]
async fn run_with_empty_payload_outputs_nothing() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    let report = sandbox
        .run(&module, &CallEnv::default(), &run_request(b""))
        .await;
    assert_eq!(report.result.expect("run succeeds"), b"");
    assert!(report.log.contains("upper "), "log: {:?}", report.log);
}

#[tokio::test]
async fn finish_without_export_concatenates_outputs() {
    let sandbox = sandbox();
    let module = load(&sandbox).await;
    let report = sandbox
        .finish(
            &module,
            &CallEnv::default(),
            &FinishRequest {
                input: b"abc".to_vec(),
                outputs: vec![b"A".to_vec(), b"B".to_vec(), b"C".to_vec()],
                task_id: "t1".into(),
            },
        )
        .await;
    assert_eq!(report.result.expect("finish succeeds"), b"ABC");
}

#[tokio::test]
async fn the_doc_snippet_alone_is_missing_its_entry_points() {
    // The doc's WAT excerpt has the marker, memory and allocator but elides
    // stoker_plan and stoker_run: the host must name both.
    let snippet = r#"
(module
  (import "stoker" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "stoker_abi_v1"))
  (func $alloc (export "stoker_alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (local.get $p))
)
"#;
    let bytes = wat::parse_str(snippet).expect("the doc's snippet is valid WAT");
    let err = sandbox().load(&bytes).await.expect_err("no entry points");
    assert_eq!(err.kind, ErrorKind::InvalidModule, "{err}");
    assert!(err.message.contains("stoker_plan"), "{err}");
    assert!(err.message.contains("stoker_run"), "{err}");
}

async fn run_task(input: &[u8]) -> (stoker::exec::local::Summary, Vec<Event>) {
    let runner = LocalRunner::new(sandbox(), None);
    let events = Mutex::new(Vec::new());
    let summary = runner
        .run(&guest_wasm(), input.to_vec(), &options(), &|event| {
            events.lock().unwrap().push(event);
        })
        .await;
    (summary, events.into_inner().unwrap())
}

#[tokio::test]
async fn local_runner_runs_the_task_end_to_end() {
    let (summary, events) = run_task(b"abc").await;
    // Step 1's plan verifies previous_outputs itself (a mismatch would be a
    // guest_error), so a success with the wrong bytes points at what the host
    // passes to finish: the doc says "the last step's outputs".
    assert_eq!(
        summary.result.expect("the task succeeds"),
        b"ABC",
        "no stoker_finish: the result must be step 0's outputs concatenated"
    );
    assert_eq!(summary.steps, 1);
    assert_eq!(summary.subtasks, 3);
    assert_eq!(summary.attempts, 3);
    let planned: Vec<(u32, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepPlanned { step, subtasks } => Some((*step, *subtasks)),
            _ => None,
        })
        .collect();
    assert_eq!(planned, [(0, 3)]);
    let done = events
        .iter()
        .filter(|e| matches!(e, Event::SubtaskDone { step: 0, .. }))
        .count();
    assert_eq!(done, 3);
}

#[tokio::test]
async fn local_runner_keeps_ordinal_order_and_non_ascii_bytes() {
    let input = "h\u{e9}llo, w0rld".as_bytes();
    let (summary, _) = run_task(input).await;
    assert_eq!(
        summary.result.expect("the task succeeds"),
        "H\u{e9}LLO, W0RLD".as_bytes(),
        "no stoker_finish: the result must be step 0's outputs concatenated"
    );
    assert_eq!(summary.subtasks, input.len() as u64);
}
