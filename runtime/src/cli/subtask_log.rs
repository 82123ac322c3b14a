//! `stoker task log ID STEP ORDINAL`: one subtask run's log.

use std::process::ExitCode;

use serde_json::json;
use stoker_proto::api::GetSubtaskLogRequest;

use super::client::{self, Conn};
use super::Output;

#[derive(Debug, clap::Args)]
pub(super) struct LogArgs {
    /// The task id.
    id: u64,
    /// The step of the subtask.
    step: u32,
    /// The subtask's ordinal in its step.
    ordinal: u32,
    /// The run (default: the latest attempt).
    #[arg(long, default_value_t = 0)]
    attempt: u32,
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Output,
}

pub(super) async fn run(args: LogArgs) -> anyhow::Result<ExitCode> {
    let c = args.conn.connect()?;
    let subject = format!("task {}", args.id);
    let req = GetSubtaskLogRequest {
        task_id: args.id,
        step: args.step,
        ordinal: args.ordinal,
        attempt: args.attempt,
    };
    let resp = client::retry(|| {
        let mut api = c.api.clone();
        async move { api.get_subtask_log(req).await }
    })
    .await
    .map_err(|s| c.error(&subject, &s))?
    .into_inner();
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "task": args.id,
                "step": args.step,
                "ordinal": args.ordinal,
                "attempt": resp.attempt,
                "log": resp.log,
            })
        ),
        Output::Text => print!("{}", resp.log),
    }
    Ok(ExitCode::SUCCESS)
}
