//! What the client commands (`module`, `task`, `node`) share: connecting to
//! the public `Stoker` API with the bearer token, turning a failed call into
//! one actionable line, retrying transient failures, and rendering records.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use stoker::api::meta::{channel, MAX_API_MESSAGE};
use stoker::model::SubtaskState;
use stoker_proto::api::stoker_client::StokerClient;
use stoker_proto::api::{GetTaskResponse, StepInfo};
use stoker_proto::meta::{ModuleRecord, TaskRecord};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::Endpoint;

/// The generated client with the `authorization` interceptor.
pub(super) type Api = StokerClient<InterceptedService<Channel, Auth>>;

/// Where a client command connects and who it is.
#[derive(Debug, Clone, clap::Args)]
pub(super) struct Conn {
    #[command(flatten)]
    pub(super) endpoint: Endpoint,
}

impl Conn {
    /// A lazily connected client: nothing is dialled until the first call.
    pub(super) fn connect(&self) -> anyhow::Result<Client> {
        self.endpoint.install_tls()?;
        Client::new(
            &self.endpoint.endpoint,
            Duration::from_secs(self.endpoint.timeout_secs),
            self.endpoint.token.as_deref(),
        )
    }
}

/// Adds `authorization: Bearer <token>` to every request when a token is
/// given.
#[derive(Debug, Clone, Default)]
pub(super) struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    pub(super) fn new(token: Option<&str>) -> anyhow::Result<Self> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Auth(None)),
            Some(t) => format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map(|v| Auth(Some(v)))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--token (or STOKER_TOKEN) holds characters not allowed in a header"
                    )
                }),
        }
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connected API client and what its errors should mention.
#[derive(Clone)]
pub(super) struct Client {
    pub(super) api: Api,
    endpoint: String,
    timeout: Duration,
}

impl Client {
    pub(super) fn new(
        endpoint: &str,
        timeout: Duration,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let auth = Auth::new(token)?;
        let ch = channel(endpoint, timeout).with_context(|| {
            format!("bad --endpoint {endpoint:?} (expected host:port, e.g. 127.0.0.1:7400)")
        })?;
        let api = StokerClient::with_interceptor(ch, auth)
            .max_decoding_message_size(MAX_API_MESSAGE)
            .max_encoding_message_size(MAX_API_MESSAGE);
        Ok(Client {
            api,
            endpoint: endpoint.to_string(),
            timeout,
        })
    }

    /// One line for a failed call; `subject` (e.g. `task 7`) prefixes the
    /// server's message unless it already names it.
    pub(super) fn error(&self, subject: &str, status: &Status) -> anyhow::Error {
        anyhow::anyhow!(describe_status(
            &self.endpoint,
            self.timeout,
            subject,
            status
        ))
    }
}

/// Whether a failed call may simply be tried again (no leader right now,
/// node restarting, connection refused).
pub(super) fn is_transient(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

/// Attempts of [`retry`], the first one included.
pub(super) const RETRY_ATTEMPTS: u32 = 5;

/// Runs `call` until it succeeds, fails for good, or [`RETRY_ATTEMPTS`]
/// transient failures (backing off from 100 ms). Only for idempotent calls,
/// or calls made idempotent by a request id.
pub(super) async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(s) if is_transient(&s) && attempt < RETRY_ATTEMPTS => {
                tracing::debug!(attempt, error = %s.message(), "transient failure, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// 16 random bytes that make a retried submit a no-op.
pub(super) fn request_id() -> Vec<u8> {
    stoker::meta::RequestId::random().0.to_vec()
}

/// The one line shown for a failed call.
fn describe_status(endpoint: &str, timeout: Duration, subject: &str, s: &Status) -> String {
    let msg = s.message().trim();
    let detail = error_chain(s);
    let transport = matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Internal)
        && (s.source_is_transport() || looks_like_transport(msg));
    if transport {
        return format!(
            "cannot reach a stoker node at {endpoint} ({}); is it running? \
             Point --endpoint or STOKER_ENDPOINT at any node of the cluster",
            if detail.is_empty() { msg } else { &detail }
        );
    }
    if s.code() == Code::DeadlineExceeded || msg.eq_ignore_ascii_case("timeout expired") {
        return format!(
            "no answer from {endpoint} within {} s; the cluster may be busy or without a leader \
             (raise --timeout-secs to wait longer)",
            timeout.as_secs()
        );
    }
    let msg = if msg.is_empty() {
        format!("{:?}", s.code())
    } else {
        msg.to_string()
    };
    let msg = match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            format!("{msg} (check --token or STOKER_TOKEN)")
        }
        _ => msg,
    };
    if subject.is_empty() || names(&msg, subject) {
        msg
    } else {
        format!("{subject}: {msg}")
    }
}

/// Whether `msg` mentions `subject` as a whole word (so `task 7` does not
/// match `task 70`).
fn names(msg: &str, subject: &str) -> bool {
    msg.match_indices(subject).any(|(i, _)| {
        msg[i + subject.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_ascii_alphanumeric())
    })
}

fn looks_like_transport(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "transport error",
        "tcp connect",
        "connection refused",
        "connection reset",
        "dns error",
        "error trying to connect",
        "broken pipe",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The innermost causes of a status, e.g. `Connection refused (os error 111)`.
fn error_chain(s: &Status) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    parts.last().cloned().unwrap_or_default()
}

trait SourceIsTransport {
    fn source_is_transport(&self) -> bool;
}

impl SourceIsTransport for Status {
    fn source_is_transport(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// A task result for scripts: JSON when it parses, else a UTF-8 string, else
/// hex; null when empty.
pub(super) fn result_json(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return v;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => Value::String(hex::encode(bytes)),
    }
}

/// A task result for people: the bytes as UTF-8 when they are, else hex.
pub(super) fn result_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => hex::encode(bytes),
    }
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// Subtask counts of one step, state → count.
pub(super) fn counts_of(step: &StepInfo) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in &step.counts {
        *m.entry(c.state.clone()).or_insert(0) += u64::from(c.count);
    }
    m
}

/// (finished, total) subtasks of one step.
pub(super) fn progress_of(step: &StepInfo) -> (u64, u64) {
    step.counts.iter().fold((0, 0), |(done, total), c| {
        let finished = c
            .state
            .parse::<SubtaskState>()
            .is_ok_and(SubtaskState::is_finished);
        let n = u64::from(c.count);
        (done + if finished { n } else { 0 }, total + n)
    })
}

/// The object of `task show -o json` (and of `task wait -o json`).
pub(super) fn task_json(resp: &GetTaskResponse) -> Value {
    let t = resp.task.clone().unwrap_or_default();
    let mut all: BTreeMap<String, u64> = BTreeMap::new();
    let mut steps = Vec::new();
    for s in &resp.steps {
        let counts = counts_of(s);
        for (state, n) in &counts {
            *all.entry(state.clone()).or_insert(0) += n;
        }
        steps.push(json!({ "step": s.step, "counts": counts }));
    }
    let mut v = json!({
        "id": t.id,
        "state": t.state,
        "step": t.step,
        "subtasks": all,
        "steps": steps,
        "result": result_json(&t.result),
        "error": non_empty(&t.error),
        "fuel_used": t.fuel_used,
        "module": t.module_hash,
        "priority": t.priority,
        "concurrency": t.concurrency,
        "max_nodes": t.max_nodes,
        "create_time_ms": t.create_time_ms,
        "finish_time_ms": (t.finish_time_ms != 0).then_some(t.finish_time_ms),
        "tenant": t.tenant,
        "key": t.key,
    });
    // `task show --subtasks`: every subtask with its node and fuel.
    if !resp.subtasks.is_empty() {
        v["subtask_list"] = resp
            .subtasks
            .iter()
            .map(|s| {
                json!({
                    "step": s.step,
                    "ordinal": s.ordinal,
                    "state": s.state,
                    "node": s.node,
                    "attempt": s.attempt,
                    "retries": s.retries,
                    "fuel_used": s.fuel_used,
                    "error": non_empty(&s.error),
                })
            })
            .collect();
    }
    v
}

/// One task of `task list -o json` (no step counts, no result).
pub(super) fn task_record_json(t: &TaskRecord) -> Value {
    json!({
        "id": t.id,
        "state": t.state,
        "step": t.step,
        "priority": t.priority,
        "concurrency": t.concurrency,
        "max_nodes": t.max_nodes,
        "module": t.module_hash,
        "key": t.key,
        "tenant": t.tenant,
        "error": non_empty(&t.error),
        "fuel_used": t.fuel_used,
        "create_time_ms": t.create_time_ms,
        "finish_time_ms": (t.finish_time_ms != 0).then_some(t.finish_time_ms),
    })
}

pub(super) fn module_json(m: &ModuleRecord) -> Value {
    json!({
        "hash": m.hash,
        "name": m.name,
        "tag": m.tag,
        "tenant": m.tenant,
        "size": m.size,
        "abi_version": m.abi_version,
        "upload_time_ms": m.upload_time_ms,
        "chunks": m.chunks,
    })
}

/// Milliseconds since the epoch as `2025-01-31 12:00:05Z`; `-` for 0.
pub(super) fn fmt_time_ms(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `k=v,k2=v2`, or `-` when empty.
pub(super) fn fmt_labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    if pairs.is_empty() {
        "-".into()
    } else {
        pairs.join(",")
    }
}

/// Left-aligned columns; the last one is not padded.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push('\n');
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_proto::api::StateCount;

    fn sc(state: &str, count: u32) -> StateCount {
        StateCount {
            state: state.into(),
            count,
        }
    }

    fn response(result: &[u8], error: &str) -> GetTaskResponse {
        GetTaskResponse {
            task: Some(TaskRecord {
                id: 7,
                tenant: "default".into(),
                key: "k1".into(),
                module_hash: "ab".repeat(32),
                priority: 512,
                concurrency: 2,
                max_nodes: 3,
                step: 1,
                state: "running".into(),
                error: error.into(),
                result: result.to_vec(),
                fuel_used: 1234,
                create_time_ms: 1_700_000_000_000,
                ..TaskRecord::default()
            }),
            steps: vec![
                StepInfo {
                    step: 0,
                    counts: vec![sc("succeed", 4)],
                },
                StepInfo {
                    step: 1,
                    counts: vec![sc("running", 2), sc("pending", 1), sc("succeed", 1)],
                },
            ],
            subtasks: vec![],
        }
    }

    #[test]
    fn show_json_has_exactly_the_documented_fields() {
        let v = task_json(&response(br#"{"count": 168}"#, ""));
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "id",
            "state",
            "step",
            "subtasks",
            "steps",
            "result",
            "error",
            "fuel_used",
            "module",
            "priority",
            "concurrency",
            "max_nodes",
            "create_time_ms",
            "finish_time_ms",
            "tenant",
            "key",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(v["id"], 7);
        assert_eq!(v["state"], "running");
        assert_eq!(v["step"], 1);
        assert_eq!(
            v["subtasks"],
            json!({"succeed": 5, "running": 2, "pending": 1})
        );
        assert_eq!(
            v["steps"],
            json!([
                {"step": 0, "counts": {"succeed": 4}},
                {"step": 1, "counts": {"running": 2, "pending": 1, "succeed": 1}},
            ])
        );
        assert_eq!(v["result"], json!({"count": 168}));
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["fuel_used"], 1234);
        assert_eq!(v["module"], "ab".repeat(32));
        assert_eq!(v["priority"], 512);
        assert_eq!(v["concurrency"], 2);
        assert_eq!(v["max_nodes"], 3);
        assert_eq!(v["create_time_ms"], 1_700_000_000_000u64);
        assert_eq!(v["finish_time_ms"], Value::Null);
        assert_eq!(v["tenant"], "default");
        assert_eq!(v["key"], "k1");
    }

    #[test]
    fn show_json_error_and_missing_task() {
        let v = task_json(&response(b"", "subtask 1/0 trapped"));
        assert_eq!(v["error"], "subtask 1/0 trapped");
        assert_eq!(v["result"], Value::Null);
        let empty = task_json(&GetTaskResponse::default());
        assert_eq!(empty["subtasks"], json!({}));
        assert_eq!(empty["steps"], json!([]));
    }

    #[test]
    fn results_render_as_json_then_text_then_hex() {
        assert_eq!(result_json(b""), Value::Null);
        assert_eq!(result_json(b"[1, 2]"), json!([1, 2]));
        assert_eq!(result_json(b"42"), json!(42));
        assert_eq!(result_json(b"hello world"), json!("hello world"));
        assert_eq!(result_json(&[0xff, 0x00, 0x10]), json!("ff0010"));
        assert_eq!(result_text(b"hello\n"), "hello\n");
        assert_eq!(result_text(b"{\"a\":1}"), "{\"a\":1}");
        assert_eq!(result_text(&[0xde, 0xad, 0xbe, 0xef]), "deadbeef");
    }

    #[test]
    fn progress_counts_finished_subtasks() {
        let s = StepInfo {
            step: 2,
            counts: vec![
                sc("succeed", 3),
                sc("failed", 1),
                sc("canceled", 1),
                sc("running", 2),
                sc("pending", 4),
                sc("paused", 1),
            ],
        };
        assert_eq!(progress_of(&s), (5, 12));
    }

    #[test]
    fn status_lines_are_plain_and_name_the_subject() {
        let ep = "127.0.0.1:1";
        let t = Duration::from_secs(15);
        let s = Status::failed_precondition("illegal task transition paused -> pausing");
        assert_eq!(
            describe_status(ep, t, "task 7", &s),
            "task 7: illegal task transition paused -> pausing"
        );
        let s = Status::not_found("task 7 not found");
        assert_eq!(describe_status(ep, t, "task 7", &s), "task 7 not found");
        let s = Status::not_found("task 70 not found");
        assert_eq!(
            describe_status(ep, t, "task 7", &s),
            "task 7: task 70 not found"
        );
        let s = Status::unavailable("tcp connect error");
        let line = describe_status(ep, t, "task 7", &s);
        assert!(
            line.starts_with("cannot reach a stoker node at 127.0.0.1:1"),
            "{line}"
        );
        let s = Status::unavailable("no leader");
        assert_eq!(describe_status(ep, t, "", &s), "no leader");
        let s = Status::unauthenticated("bad token");
        assert!(describe_status(ep, t, "", &s).contains("STOKER_TOKEN"));
        let s = Status::deadline_exceeded("");
        assert!(describe_status(ep, t, "", &s).contains("--timeout-secs"));
    }

    #[test]
    fn auth_header_is_added_only_with_a_token() {
        let mut a = Auth::new(Some("s3cret")).unwrap();
        let req = a.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let mut none = Auth::new(Some("  ")).unwrap();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(Auth::new(Some("bad\ntoken")).is_err());
    }

    #[tokio::test]
    async fn retry_stops_on_success_or_a_permanent_error() {
        let mut calls = 0;
        let r: Result<u32, Status> = retry(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(Status::unavailable("no leader"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: Result<u32, Status> = retry(|| {
            calls += 1;
            async { Err(Status::invalid_argument("bad")) }
        })
        .await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(calls, 1);
    }

    #[test]
    fn request_ids_are_random() {
        let (a, b) = (request_id(), request_id());
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }

    #[test]
    fn times_and_tables() {
        assert_eq!(fmt_time_ms(0), "-");
        assert_eq!(fmt_time_ms(1_700_000_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(fmt_time_ms(951_782_400_000), "2000-02-29 00:00:00Z");
        let t = table(
            &["ID", "STATE", "KEY"],
            &[
                vec!["1".into(), "running".into(), "a".into()],
                vec!["12".into(), "paused".into(), "".into()],
            ],
        );
        assert_eq!(t, "ID  STATE    KEY\n1   running  a\n12  paused");
    }
}
