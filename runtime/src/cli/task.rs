//! `stoker task submit|wait|show|list|cancel|pause|resume|resolve|modify`.

use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::ProgressBar;
use serde_json::json;
use stoker::model::{parse_labels, TaskState, PRIORITY_RANGE};
use stoker_proto::api::control_task_request::Action;
use stoker_proto::api::{
    ControlTaskRequest, GetTaskRequest, GetTaskResponse, ListTasksRequest, ModifyTaskRequest,
    SubmitTaskRequest,
};
use stoker_proto::meta::TaskModification;

use super::client::{self, Client, Conn};
use super::{bar_style, Output};

#[derive(Debug, clap::Subcommand)]
pub(super) enum TaskCommand {
    /// Submit a task; prints its id.
    ///
    /// Example: ID=$(stoker task submit --module wordcount --input book.txt)
    Submit(SubmitArgs),
    /// Follow a task until it ends; prints its result. Exit code 0 when it
    /// succeeded, 1 when it failed or was reverted, 2 on timeout.
    ///
    /// Example: stoker task wait $ID --timeout-secs 600
    Wait(WaitArgs),
    /// A task's state, subtask counts per step, fuel used and result
    /// (`--subtasks`: every subtask with its node, attempt and fuel).
    ///
    /// Example: stoker task show 7 --subtasks -o json
    Show {
        id: u64,
        /// Also list every subtask (state, node, attempt, fuel used, error).
        #[arg(long)]
        subtasks: bool,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// List unfinished tasks (`--all`: finished ones too).
    ///
    /// Example: stoker task list --state running --state paused
    List {
        /// Include finished tasks.
        #[arg(long)]
        all: bool,
        /// Only tasks in this state (repeatable), e.g. running, paused,
        /// awaiting-resolution.
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<String>,
        /// At most this many tasks [default: the server's].
        #[arg(long)]
        limit: Option<u32>,
        /// Only tasks with an id above this (the next page after the last
        /// id shown).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only this tenant's tasks (the admin; a tenant sees only its own).
        #[arg(long, default_value = "")]
        tenant: String,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Cancel a task: its subtasks stop and the task is reverted.
    Cancel(ControlArgs),
    /// Pause a task; `task resume` continues it.
    Pause(ControlArgs),
    /// Resume a paused task.
    Resume(ControlArgs),
    /// Retry the failed subtasks of a task awaiting resolution
    /// (`--manual-recovery`).
    Resolve(ControlArgs),
    /// Change a task's concurrency, node limit or priority.
    ///
    /// Example: stoker task modify 7 --concurrency 4
    Modify(ModifyArgs),
    /// Print one subtask run's log (its stdout, stderr and log lines).
    ///
    /// Example: stoker task log 7 0 3 --attempt 2
    Log(super::subtask_log::LogArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct SubmitArgs {
    /// The module: a hash, or a name (its newest upload).
    #[arg(long)]
    module: String,
    /// With a module name: the upload with this tag.
    #[arg(long, default_value = "")]
    tag: String,
    /// A file with the task's input (`-` reads stdin).
    #[arg(long)]
    input: PathBuf,
    /// A label of the task for people and scripts.
    #[arg(long, default_value = "")]
    key: String,
    /// 1..=1024, lower runs first [default: 512].
    #[arg(long)]
    priority: Option<u32>,
    /// Slots per node the task may use [default: 1].
    #[arg(long)]
    concurrency: Option<u32>,
    /// Nodes the task may run on at once [default: no limit].
    #[arg(long)]
    max_nodes: Option<u32>,
    /// Only nodes of this scope run it (e.g. background).
    #[arg(long, default_value = "")]
    scope: String,
    /// Only nodes with these labels run it: k=v,k2=v2.
    #[arg(long)]
    selector: Option<String>,
    /// Runs per subtask for retryable failures [default: 3].
    #[arg(long)]
    max_attempts: Option<u32>,
    /// When a subtask fails for good, wait for `task resolve` or `task
    /// cancel` instead of reverting.
    #[arg(long)]
    manual_recovery: bool,
    /// Fuel each subtask may burn [default: the node's].
    #[arg(long)]
    fuel_limit: Option<u64>,
    /// Largest linear memory of a subtask, in bytes [default: the node's].
    #[arg(long)]
    memory_limit: Option<u64>,
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

/// `task wait` takes `--timeout-secs` for the whole wait, so its endpoint
/// flags are these rather than [`super::Endpoint`]'s.
#[derive(Debug, clap::Args)]
pub(super) struct WaitArgs {
    id: u64,
    /// Give up after this many seconds (exit code 2) [default: wait forever].
    #[arg(long)]
    timeout_secs: Option<f64>,
    /// A node's gRPC address (any node of the cluster).
    #[arg(long, env = "STOKER_ENDPOINT", default_value = "127.0.0.1:7400")]
    endpoint: String,
    /// Timeout of each poll, in seconds.
    #[arg(long, default_value_t = 15)]
    request_timeout_secs: u64,
    /// API token, sent as `authorization: Bearer <token>` on every request.
    #[arg(long, env = "STOKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub(super) struct ControlArgs {
    id: u64,
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub(super) struct ModifyArgs {
    id: u64,
    /// Slots per node.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Nodes at once (0 = no limit).
    #[arg(long)]
    max_nodes: Option<u32>,
    /// 1..=1024, lower runs first.
    #[arg(long)]
    priority: Option<u32>,
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

fn parse_state(s: &str) -> Result<String, String> {
    s.parse::<TaskState>()
        .map(|st| st.as_str().to_string())
        .map_err(|e| {
            let all: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
            format!("{e}; one of {}", all.join(", "))
        })
}

pub(super) async fn run(cmd: TaskCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCommand::Submit(args) => submit(args).await,
        TaskCommand::Wait(args) => wait(args).await,
        TaskCommand::Show {
            id,
            subtasks,
            conn,
            output,
        } => show(id, subtasks, &conn, output).await,
        TaskCommand::List {
            all,
            states,
            limit,
            after,
            tenant,
            conn,
            output,
        } => {
            let page = Page {
                limit,
                after,
                tenant,
            };
            list(all, states, page, &conn, output).await
        }
        TaskCommand::Cancel(a) => control(a, Action::Cancel).await,
        TaskCommand::Pause(a) => control(a, Action::Pause).await,
        TaskCommand::Resume(a) => control(a, Action::Resume).await,
        TaskCommand::Resolve(a) => control(a, Action::Resolve).await,
        TaskCommand::Modify(a) => modify(a).await,
        TaskCommand::Log(a) => super::subtask_log::run(a).await,
    }
}

fn check_priority(p: u32) -> anyhow::Result<()> {
    if !PRIORITY_RANGE.contains(&p) {
        anyhow::bail!(
            "--priority must be in {}..={} (lower runs first), not {p}",
            PRIORITY_RANGE.start(),
            PRIORITY_RANGE.end()
        );
    }
    Ok(())
}

/// The request of `task submit`, checked; `request_id` is left empty.
fn submit_request(args: &SubmitArgs, input: Vec<u8>) -> anyhow::Result<SubmitTaskRequest> {
    if args.module.trim().is_empty() {
        anyhow::bail!("--module must name a module (a hash or a name)");
    }
    if let Some(p) = args.priority {
        check_priority(p)?;
    }
    if args.concurrency == Some(0) {
        anyhow::bail!("--concurrency must be at least 1");
    }
    if args.max_attempts == Some(0) {
        anyhow::bail!("--max-attempts must be at least 1");
    }
    if args.fuel_limit == Some(0) {
        anyhow::bail!("--fuel-limit must be positive");
    }
    if args.memory_limit == Some(0) {
        anyhow::bail!("--memory-limit must be positive");
    }
    let selector = match &args.selector {
        Some(s) => parse_labels(s).map_err(|e| anyhow::anyhow!("bad --selector: {e}"))?,
        None => Default::default(),
    };
    Ok(SubmitTaskRequest {
        module: args.module.trim().to_string(),
        module_tag: args.tag.clone(),
        input,
        key: args.key.clone(),
        priority: args.priority.unwrap_or(0),
        concurrency: args.concurrency.unwrap_or(0),
        max_nodes: args.max_nodes.unwrap_or(0),
        scope: args.scope.clone(),
        selector: selector.into_iter().collect(),
        fuel_limit: args.fuel_limit.unwrap_or(0),
        memory_limit: args.memory_limit.unwrap_or(0),
        max_attempts: args.max_attempts.unwrap_or(0),
        manual_recovery: args.manual_recovery,
        request_id: Vec::new(),
    })
}

fn read_input(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read the input from stdin")?;
        return Ok(buf);
    }
    std::fs::read(path).with_context(|| format!("cannot read input file {}", path.display()))
}

async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    // Check the arguments before reading a possibly large input.
    submit_request(&args, Vec::new())?;
    let input = read_input(&args.input)?;
    let mut req = submit_request(&args, input)?;
    req.request_id = client::request_id();
    let c = args.conn.connect()?;
    let resp = client::retry(|| {
        let mut api = c.api.clone();
        let req = req.clone();
        async move { api.submit_task(req).await }
    })
    .await
    .map_err(|s| c.error("", &s))?
    .into_inner();
    match args.output {
        Output::Json => println!("{}", json!({ "id": resp.id })),
        Output::Text => println!("{}", resp.id),
    }
    Ok(ExitCode::SUCCESS)
}

async fn get_task(c: &Client, id: u64) -> Result<GetTaskResponse, tonic::Status> {
    get_task_with(c, id, false).await
}

async fn get_task_with(
    c: &Client,
    id: u64,
    with_subtasks: bool,
) -> Result<GetTaskResponse, tonic::Status> {
    let mut api = c.api.clone();
    api.get_task(GetTaskRequest { id, with_subtasks })
        .await
        .map(tonic::Response::into_inner)
}

fn state_of(resp: &GetTaskResponse) -> Option<TaskState> {
    resp.task.as_ref().and_then(|t| t.state.parse().ok())
}

async fn show(id: u64, subtasks: bool, conn: &Conn, output: Output) -> anyhow::Result<ExitCode> {
    let c = conn.connect()?;
    let resp = client::retry(|| get_task_with(&c, id, subtasks))
        .await
        .map_err(|s| c.error(&format!("task {id}"), &s))?;
    match output {
        Output::Json => println!("{}", client::task_json(&resp)),
        Output::Text => print!("{}", show_text(&resp)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The summary of `task show` for people.
fn show_text(resp: &GetTaskResponse) -> String {
    use std::fmt::Write as _;
    let t = resp.task.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "task {}: {} (step {})", t.id, t.state, t.step);
    if !t.key.is_empty() {
        let _ = writeln!(out, "  key:         {}", t.key);
    }
    if !t.tenant.is_empty() {
        let _ = writeln!(out, "  tenant:      {}", t.tenant);
    }
    let _ = writeln!(out, "  module:      {}", t.module_hash);
    let _ = writeln!(
        out,
        "  priority:    {}  concurrency: {}  max nodes: {}",
        t.priority,
        t.concurrency,
        if t.max_nodes == 0 {
            "no limit".to_string()
        } else {
            t.max_nodes.to_string()
        }
    );
    let _ = writeln!(
        out,
        "  created:     {}",
        client::fmt_time_ms(t.create_time_ms)
    );
    if t.finish_time_ms != 0 {
        let _ = writeln!(
            out,
            "  finished:    {}",
            client::fmt_time_ms(t.finish_time_ms)
        );
    }
    let _ = writeln!(out, "  fuel used:   {}", t.fuel_used);
    for s in &resp.steps {
        let (done, total) = client::progress_of(s);
        let counts: Vec<String> = client::counts_of(s)
            .iter()
            .map(|(state, n)| format!("{state} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  step {}:      {done}/{total} subtasks done ({})",
            s.step,
            counts.join(", ")
        );
    }
    if !t.error.is_empty() {
        let _ = writeln!(out, "  error:       {}", t.error);
    }
    if !resp.subtasks.is_empty() {
        let rows: Vec<Vec<String>> = resp
            .subtasks
            .iter()
            .map(|s| {
                vec![
                    s.step.to_string(),
                    s.ordinal.to_string(),
                    s.state.clone(),
                    if s.node == 0 {
                        "-".into()
                    } else {
                        s.node.to_string()
                    },
                    s.attempt.to_string(),
                    s.fuel_used.to_string(),
                    if s.error.is_empty() {
                        "-".into()
                    } else {
                        s.error.clone()
                    },
                ]
            })
            .collect();
        let table = client::table(
            &["STEP", "#", "STATE", "NODE", "ATTEMPT", "FUEL", "ERROR"],
            &rows,
        );
        for line in table.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !t.result.is_empty() {
        let text = client::result_text(&t.result);
        let text = text.trim_end();
        if text.contains('\n') {
            let _ = writeln!(out, "  result:\n{text}");
        } else {
            let _ = writeln!(out, "  result:      {text}");
        }
    }
    out
}

/// Which part of the task list to show.
struct Page {
    limit: Option<u32>,
    after: u64,
    tenant: String,
}

async fn list(
    all: bool,
    states: Vec<String>,
    page: Page,
    conn: &Conn,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let c = conn.connect()?;
    // Asking for a finished state implies finished tasks.
    let include_finished = all
        || states
            .iter()
            .any(|s| s.parse::<TaskState>().is_ok_and(TaskState::is_finished));
    let req = ListTasksRequest {
        states,
        include_finished,
        limit: page.limit.unwrap_or(0),
        tenant: page.tenant,
        after_id: page.after,
    };
    let resp = client::retry(|| {
        let mut api = c.api.clone();
        let req = req.clone();
        async move { api.list_tasks(req).await }
    })
    .await
    .map_err(|s| c.error("", &s))?
    .into_inner();
    match output {
        Output::Json => {
            let all: Vec<_> = resp.tasks.iter().map(client::task_record_json).collect();
            println!("{}", serde_json::Value::Array(all));
        }
        Output::Text => {
            let rows: Vec<Vec<String>> = resp
                .tasks
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.state.clone(),
                        t.step.to_string(),
                        t.priority.to_string(),
                        t.module_hash.chars().take(12).collect(),
                        t.key.clone(),
                    ]
                })
                .collect();
            println!(
                "{}",
                client::table(&["ID", "STATE", "STEP", "PRIORITY", "MODULE", "KEY"], &rows)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_state(id: u64, state: &str, output: Output) {
    match output {
        Output::Json => println!("{}", json!({ "id": id, "state": state })),
        Output::Text => println!("{state}"),
    }
}

async fn control(args: ControlArgs, action: Action) -> anyhow::Result<ExitCode> {
    let c = args.conn.connect()?;
    let resp = c
        .api
        .clone()
        .control_task(ControlTaskRequest {
            id: args.id,
            action: action as i32,
        })
        .await
        .map_err(|s| c.error(&format!("task {}", args.id), &s))?
        .into_inner();
    print_state(args.id, &resp.state, args.output);
    Ok(ExitCode::SUCCESS)
}

/// The changes `task modify` asks for: at least one, each in range.
fn modification(args: &ModifyArgs) -> anyhow::Result<TaskModification> {
    if args.concurrency.is_none() && args.max_nodes.is_none() && args.priority.is_none() {
        anyhow::bail!(
            "nothing to modify: give at least one of --concurrency, --max-nodes, --priority"
        );
    }
    if args.concurrency == Some(0) {
        anyhow::bail!("--concurrency must be at least 1");
    }
    if let Some(p) = args.priority {
        check_priority(p)?;
    }
    Ok(TaskModification {
        concurrency: args.concurrency,
        max_nodes: args.max_nodes,
        priority: args.priority,
    })
}

async fn modify(args: ModifyArgs) -> anyhow::Result<ExitCode> {
    let m = modification(&args)?;
    let c = args.conn.connect()?;
    let resp = c
        .api
        .clone()
        .modify_task(ModifyTaskRequest {
            id: args.id,
            modification: Some(m),
        })
        .await
        .map_err(|s| c.error(&format!("task {}", args.id), &s))?
        .into_inner();
    print_state(args.id, &resp.state, args.output);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// task wait
// ---------------------------------------------------------------------------

/// Time between two polls of `GetTask`.
const POLL: Duration = Duration::from_millis(150);
/// How long `task wait` rides out a cluster it cannot reach (leader
/// election, node restart) once it has seen the task.
const OUTAGE_GRACE: Duration = Duration::from_secs(30);

/// Exit code of a timed-out `task wait`.
const EXIT_TIMEOUT: u8 = 2;

async fn wait(args: WaitArgs) -> anyhow::Result<ExitCode> {
    let limit = match args.timeout_secs {
        None => None,
        Some(s) => Some(
            Duration::try_from_secs_f64(s)
                .ok()
                .context("--timeout-secs must be a non-negative number of seconds")?,
        ),
    };
    let start = Instant::now();
    let deadline = limit.map(|l| start + l);
    let c = Client::new(
        &args.endpoint,
        Duration::from_secs(args.request_timeout_secs.max(1)),
        args.token.as_deref(),
    )?;
    let subject = format!("task {}", args.id);
    let mut display = WaitDisplay::new(args.output);
    let mut last: Option<GetTaskResponse> = None;
    let mut failing_since: Option<Instant> = None;
    let finished = loop {
        match get_task(&c, args.id).await {
            Ok(resp) => {
                failing_since = None;
                display.update(&resp);
                let done = state_of(&resp).is_some_and(TaskState::is_finished);
                last = Some(resp);
                if done {
                    break true;
                }
            }
            Err(s) if client::is_transient(&s) && last.is_some() => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > OUTAGE_GRACE {
                    display.finish();
                    return Err(c.error(&subject, &s));
                }
                display.note(&format!("{subject}: {} (retrying)", s.message()));
            }
            Err(s) => {
                display.finish();
                return Err(c.error(&subject, &s));
            }
        }
        let pause = match deadline {
            Some(d) if Instant::now() >= d => break false,
            Some(d) => POLL.min(d - Instant::now()),
            None => POLL,
        };
        tokio::time::sleep(pause).await;
    };
    display.finish();
    let resp = last.unwrap_or_default();
    if !finished {
        if args.output == Output::Json {
            println!("{}", client::task_json(&resp));
        }
        eprintln!(
            "timed out after {:.1} s waiting for {subject} ({})",
            start.elapsed().as_secs_f64(),
            status_line(&resp)
        );
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    }
    let t = resp.task.clone().unwrap_or_default();
    let ok = state_of(&resp) == Some(TaskState::Succeed);
    match args.output {
        Output::Json => println!("{}", client::task_json(&resp)),
        Output::Text => {
            if ok {
                if !t.result.is_empty() {
                    let text = client::result_text(&t.result);
                    if text.ends_with('\n') {
                        print!("{text}");
                    } else {
                        println!("{text}");
                    }
                }
            } else if t.error.is_empty() {
                eprintln!("{subject} {}", t.state);
            } else {
                eprintln!("{subject} {}: {}", t.state, t.error);
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `running, step 1: 3/8 subtasks` for the current step.
fn status_line(resp: &GetTaskResponse) -> String {
    let t = resp.task.clone().unwrap_or_default();
    match resp.steps.iter().find(|s| s.step == t.step) {
        Some(s) => {
            let (done, total) = client::progress_of(s);
            format!("{}, step {}: {done}/{total} subtasks", t.state, t.step)
        }
        None => format!("{}, step {}", t.state, t.step),
    }
}

/// Progress of `task wait`: a bar per step on a terminal, a line per change
/// otherwise; nothing with `-o json` (stdout stays one JSON object).
struct WaitDisplay {
    output: Output,
    terminal: bool,
    bar: Option<(u32, ProgressBar)>,
    last_line: String,
}

impl WaitDisplay {
    fn new(output: Output) -> Self {
        WaitDisplay {
            output,
            terminal: std::io::stderr().is_terminal(),
            bar: None,
            last_line: String::new(),
        }
    }

    fn update(&mut self, resp: &GetTaskResponse) {
        if self.output == Output::Json {
            return;
        }
        let t = resp.task.clone().unwrap_or_default();
        if !self.terminal {
            let line = format!("task {}: {}", t.id, status_line(resp));
            if line != self.last_line {
                eprintln!("{line}");
                self.last_line = line;
            }
            return;
        }
        let (done, total) = resp
            .steps
            .iter()
            .find(|s| s.step == t.step)
            .map_or((0, 0), client::progress_of);
        if self.bar.as_ref().is_none_or(|(step, _)| *step != t.step) {
            self.finish();
            let pb = ProgressBar::new(total);
            pb.set_style(bar_style(
                "step {prefix} [{bar:40}] {pos}/{len} subtasks  {msg}  {elapsed}",
            ));
            pb.set_prefix(t.step.to_string());
            pb.set_message(t.state.clone());
            pb.set_position(done);
            pb.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some((t.step, pb));
        }
        if let Some((_, pb)) = &self.bar {
            pb.set_length(total);
            pb.set_position(done);
            pb.set_message(t.state.clone());
        }
    }

    /// A line beside the progress (e.g. a transient error).
    fn note(&mut self, line: &str) {
        if self.output == Output::Json {
            return;
        }
        match &self.bar {
            Some((_, pb)) => pb.println(line),
            None => {
                if line != self.last_line {
                    eprintln!("{line}");
                    self.last_line = line.to_string();
                }
            }
        }
    }

    /// Replaces the bar with a line of what the last poll saw (a bar left
    /// behind would be filled up, and end without a newline).
    fn finish(&mut self) {
        if let Some((step, pb)) = self.bar.take() {
            let line = format!(
                "step {step}: {}/{} subtasks  {}",
                pb.position(),
                pb.length().unwrap_or(0),
                pb.message()
            );
            pb.finish_and_clear();
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: TaskCommand,
    }

    fn parse(args: &[&str]) -> Result<TaskCommand, clap::Error> {
        let mut all = vec!["stoker"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.cmd)
    }

    fn submit_args(extra: &[&str]) -> SubmitArgs {
        let mut args = vec!["submit", "--module", "wc", "--input", "in.txt"];
        args.extend_from_slice(extra);
        match parse(&args).unwrap() {
            TaskCommand::Submit(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn modify_args(extra: &[&str]) -> ModifyArgs {
        let mut args = vec!["modify", "7"];
        args.extend_from_slice(extra);
        match parse(&args).unwrap() {
            TaskCommand::Modify(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn submit_builds_the_request() {
        let a = submit_args(&[
            "--tag",
            "v2",
            "--key",
            "job-1",
            "--priority",
            "10",
            "--concurrency",
            "2",
            "--max-nodes",
            "3",
            "--scope",
            "background",
            "--selector",
            "zone=a, disk=ssd",
            "--max-attempts",
            "5",
            "--manual-recovery",
            "--fuel-limit",
            "1000",
            "--memory-limit",
            "65536",
        ]);
        let r = submit_request(&a, b"hi".to_vec()).unwrap();
        assert_eq!(r.module, "wc");
        assert_eq!(r.module_tag, "v2");
        assert_eq!(r.input, b"hi");
        assert_eq!(r.key, "job-1");
        assert_eq!(
            (r.priority, r.concurrency, r.max_nodes, r.max_attempts),
            (10, 2, 3, 5)
        );
        assert_eq!(r.scope, "background");
        assert_eq!(r.selector.len(), 2);
        assert_eq!(r.selector["zone"], "a");
        assert_eq!(r.selector["disk"], "ssd");
        assert!(r.manual_recovery);
        assert_eq!((r.fuel_limit, r.memory_limit), (1000, 65536));

        let d = submit_request(&submit_args(&[]), Vec::new()).unwrap();
        assert_eq!(
            (d.priority, d.concurrency, d.max_nodes, d.max_attempts),
            (0, 0, 0, 0)
        );
        assert!(d.selector.is_empty() && !d.manual_recovery);
    }

    #[test]
    fn submit_rejects_bad_arguments() {
        let e = submit_request(&submit_args(&["--selector", "zone"]), Vec::new()).unwrap_err();
        assert!(e.to_string().starts_with("bad --selector"), "{e}");
        let e = submit_request(&submit_args(&["--selector", "=a"]), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("empty key"), "{e}");
        let e = submit_request(&submit_args(&["--priority", "0"]), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("1..=1024"), "{e}");
        let e = submit_request(&submit_args(&["--priority", "1025"]), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("--priority"), "{e}");
        let e = submit_request(&submit_args(&["--concurrency", "0"]), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("--concurrency"), "{e}");
        let e = submit_request(&submit_args(&["--max-attempts", "0"]), Vec::new()).unwrap_err();
        assert!(e.to_string().contains("--max-attempts"), "{e}");
        assert!(
            parse(&["submit", "--input", "x"]).is_err(),
            "--module is required"
        );
    }

    #[test]
    fn modify_needs_something_to_change() {
        let e = modification(&modify_args(&[])).unwrap_err();
        assert!(e.to_string().starts_with("nothing to modify"), "{e}");
        let m = modification(&modify_args(&["--priority", "3"])).unwrap();
        assert_eq!(
            m,
            TaskModification {
                concurrency: None,
                max_nodes: None,
                priority: Some(3)
            }
        );
        let m = modification(&modify_args(&["--concurrency", "4", "--max-nodes", "0"])).unwrap();
        assert_eq!((m.concurrency, m.max_nodes), (Some(4), Some(0)));
        assert!(modification(&modify_args(&["--concurrency", "0"])).is_err());
        assert!(modification(&modify_args(&["--priority", "2000"])).is_err());
    }

    #[test]
    fn list_states_are_checked() {
        match parse(&[
            "list",
            "--state",
            "running",
            "--state",
            "awaiting-resolution",
        ])
        .unwrap()
        {
            TaskCommand::List { states, all, .. } => {
                assert_eq!(states, ["running", "awaiting-resolution"]);
                assert!(!all);
            }
            other => panic!("{other:?}"),
        }
        let e = parse(&["list", "--state", "done"]).unwrap_err().to_string();
        assert!(
            e.contains("unknown task state") && e.contains("succeed"),
            "{e}"
        );
    }

    #[test]
    fn wait_has_its_own_timeout() {
        match parse(&["wait", "7", "--timeout-secs", "2.5", "-o", "json"]).unwrap() {
            TaskCommand::Wait(w) => {
                assert_eq!(w.id, 7);
                assert_eq!(w.timeout_secs, Some(2.5));
                assert_eq!(w.output, Output::Json);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn show_text_summarises_the_task() {
        use stoker_proto::api::{StateCount, StepInfo};
        use stoker_proto::meta::TaskRecord;
        let resp = GetTaskResponse {
            task: Some(TaskRecord {
                id: 9,
                state: "succeed".into(),
                step: 1,
                key: "k".into(),
                result: b"{\"count\": 168}".to_vec(),
                finish_time_ms: 1_700_000_000_000,
                ..TaskRecord::default()
            }),
            steps: vec![StepInfo {
                step: 1,
                counts: vec![StateCount {
                    state: "succeed".into(),
                    count: 4,
                }],
            }],
            subtasks: vec![],
        };
        let text = show_text(&resp);
        assert!(text.starts_with("task 9: succeed (step 1)\n"), "{text}");
        assert!(
            text.contains("step 1:      4/4 subtasks done (succeed 4)"),
            "{text}"
        );
        assert!(text.contains("result:      {\"count\": 168}"), "{text}");
        assert!(text.contains("finished:    2023-11-14 22:13:20Z"), "{text}");
        assert_eq!(status_line(&resp), "succeed, step 1: 4/4 subtasks");
    }
}
