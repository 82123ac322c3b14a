//! `stoker module upload|list`: task modules (.wasm) in the cluster.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use futures::Stream;
use indicatif::ProgressBar;
use stoker::meta::records::MAX_MODULE_BYTES;
use stoker_proto::api::{ListModulesRequest, UploadModuleRequest};

use super::client::{self, Conn};
use super::{bar_style, Output};

/// Bytes per upload message.
pub(super) const CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, clap::Subcommand)]
pub(super) enum ModuleCommand {
    /// Upload a module; prints its hash (its identity).
    ///
    /// Example: stoker module upload target/wasm32-wasip1/release/wordcount.wasm --name wordcount --tag v1
    Upload {
        /// The module file (.wasm built with the guest SDK).
        file: PathBuf,
        /// The name tasks may submit it by (the newest upload of a name wins).
        #[arg(long)]
        name: String,
        /// A version label narrowing the name.
        #[arg(long, default_value = "")]
        tag: String,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the uploaded modules.
    ///
    /// Example: stoker module list -o json
    List {
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a module no unfinished task uses (by hash or name).
    ///
    /// Example: stoker module delete wordcount --tag v1
    Delete {
        /// A hash, or a name (its newest upload).
        module: String,
        /// A version label narrowing the name.
        #[arg(long, default_value = "")]
        tag: String,
        #[command(flatten)]
        conn: Conn,
    },
}

pub(super) async fn run(cmd: ModuleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModuleCommand::Upload {
            file,
            name,
            tag,
            conn,
            output,
        } => upload(&file, name, tag, &conn, output).await?,
        ModuleCommand::List { conn, output } => list(&conn, output).await?,
        ModuleCommand::Delete { module, tag, conn } => {
            let c = conn.connect()?;
            let subject = format!("module {module}");
            let hash = c
                .api
                .clone()
                .delete_module(stoker_proto::api::DeleteModuleRequest { module, tag })
                .await
                .map_err(|s| c.error(&subject, &s))?
                .into_inner()
                .hash;
            println!("deleted module {hash}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The messages of one upload: 1 MiB each, the first naming the module.
/// An empty file is one message without data.
pub(super) fn upload_messages(
    bytes: Vec<u8>,
    name: String,
    tag: String,
) -> impl Iterator<Item = UploadModuleRequest> + Send + 'static {
    let chunks = bytes.len().div_ceil(CHUNK_BYTES).max(1);
    (0..chunks).map(move |i| {
        let start = (i * CHUNK_BYTES).min(bytes.len());
        let end = ((i + 1) * CHUNK_BYTES).min(bytes.len());
        let (name, tag) = if i == 0 {
            (name.clone(), tag.clone())
        } else {
            (String::new(), String::new())
        };
        UploadModuleRequest {
            name,
            tag,
            data: bytes[start..end].to_vec(),
        }
    })
}

/// The upload's progress: a bar of bytes where `task wait` would draw its
/// bars (see [`Output::bars`]), a hidden one that only counts otherwise.
fn upload_bar(output: Output, size: usize) -> ProgressBar {
    if !output.bars() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(size as u64);
    pb.set_style(bar_style(
        "upload [{bar:30}] {binary_bytes}/{binary_total_bytes}  {elapsed}  {msg}",
    ));
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// The upload messages as a stream that advances `pb` by each message's
/// bytes as the transport takes it.
fn counted(
    messages: impl Iterator<Item = UploadModuleRequest> + Send + 'static,
    pb: ProgressBar,
) -> impl Stream<Item = UploadModuleRequest> + Send + 'static {
    futures::stream::iter(messages.inspect(move |m| {
        pb.inc(m.data.len() as u64);
        if pb.length().is_some_and(|len| pb.position() >= len) {
            pb.set_message("validating");
        }
    }))
}

fn read_module(file: &Path) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::metadata(file)
        .with_context(|| format!("cannot read module file {}", file.display()))?;
    if !meta.is_file() {
        anyhow::bail!("module file {} is not a regular file", file.display());
    }
    if meta.len() > MAX_MODULE_BYTES as u64 {
        anyhow::bail!(
            "module file {} is {} bytes; modules may be at most {} MiB",
            file.display(),
            meta.len(),
            MAX_MODULE_BYTES >> 20
        );
    }
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read module file {}", file.display()))?;
    if bytes.is_empty() {
        anyhow::bail!("module file {} is empty", file.display());
    }
    Ok(bytes)
}

async fn upload(
    file: &Path,
    name: String,
    tag: String,
    conn: &Conn,
    output: Output,
) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        anyhow::bail!("--name must not be empty");
    }
    // The file first: a typo in its name should not wait for the network.
    let bytes = read_module(file)?;
    let size = bytes.len();
    let c = conn.connect()?;
    let pb = upload_bar(output, size);
    let stream = counted(upload_messages(bytes, name, tag), pb.clone());
    let resp = c.api.clone().upload_module(stream).await;
    let resp = match resp {
        Ok(r) => {
            // As `task wait` does: a line in place of the bar (a bar left
            // behind ends without a newline).
            if !pb.is_hidden() {
                let line = format!(
                    "uploaded {} in {:.1?}",
                    indicatif::BinaryBytes(pb.position()),
                    pb.elapsed()
                );
                pb.finish_and_clear();
                eprintln!("{line}");
            }
            r.into_inner()
        }
        Err(s) => {
            // The error is the one line left on stderr.
            pb.finish_and_clear();
            return Err(c.error(&file.display().to_string(), &s));
        }
    };
    let module = resp.module.unwrap_or_default();
    match output {
        Output::Json => {
            let mut v = client::module_json(&module);
            v["created"] = resp.created.into();
            println!("{v}");
        }
        Output::Text => {
            if !resp.created {
                eprintln!("these {size} bytes were already uploaded");
            }
            println!("{}", module.hash);
        }
    }
    Ok(())
}

async fn list(conn: &Conn, output: Output) -> anyhow::Result<()> {
    let c = conn.connect()?;
    let resp = client::retry(|| {
        let mut api = c.api.clone();
        async move { api.list_modules(ListModulesRequest::default()).await }
    })
    .await
    .map_err(|s| c.error("", &s))?
    .into_inner();
    match output {
        Output::Json => {
            let all: Vec<_> = resp.modules.iter().map(client::module_json).collect();
            println!("{}", serde_json::Value::Array(all));
        }
        Output::Text => {
            let rows: Vec<Vec<String>> = resp
                .modules
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        if m.tag.is_empty() {
                            "-".into()
                        } else {
                            m.tag.clone()
                        },
                        m.size.to_string(),
                        client::fmt_time_ms(m.upload_time_ms),
                        m.hash.clone(),
                    ]
                })
                .collect();
            println!(
                "{}",
                client::table(&["NAME", "TAG", "SIZE", "UPLOADED", "HASH"], &rows)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_1_mib_messages_and_the_first_names_the_module() {
        let bytes: Vec<u8> = (0..(2 * CHUNK_BYTES + 10)).map(|i| i as u8).collect();
        let msgs: Vec<_> = upload_messages(bytes.clone(), "wc".into(), "v1".into()).collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!((msgs[0].name.as_str(), msgs[0].tag.as_str()), ("wc", "v1"));
        assert!(msgs[1..]
            .iter()
            .all(|m| m.name.is_empty() && m.tag.is_empty()));
        assert_eq!(msgs[0].data.len(), CHUNK_BYTES);
        assert_eq!(msgs[2].data.len(), 10);
        let joined: Vec<u8> = msgs.into_iter().flat_map(|m| m.data).collect();
        assert_eq!(joined, bytes);

        let exact: Vec<_> =
            upload_messages(vec![1; CHUNK_BYTES], "a".into(), String::new()).collect();
        assert_eq!(exact.len(), 1);
    }

    #[tokio::test]
    async fn the_bar_counts_every_byte_the_transport_takes() {
        use futures::StreamExt as _;
        let size = 2 * CHUNK_BYTES + 10;
        let pb = ProgressBar::hidden();
        pb.set_length(size as u64);
        let stream = counted(
            upload_messages(vec![7; size], "m".into(), String::new()),
            pb.clone(),
        );
        futures::pin_mut!(stream);
        let first = stream.next().await.unwrap();
        assert_eq!(pb.position(), first.data.len() as u64);
        assert!(pb.message().is_empty(), "{}", pb.message());
        let rest: Vec<_> = stream.collect().await;
        assert_eq!(rest.len(), 2);
        assert_eq!(pb.position(), size as u64);
        assert_eq!(pb.message(), "validating");
        // `-o json` never draws one.
        assert!(upload_bar(Output::Json, size).is_hidden());
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.wasm");
        let e = format!("{:#}", read_module(&missing).unwrap_err());
        assert!(e.contains("nope.wasm"), "{e}");
        let empty = dir.path().join("empty.wasm");
        std::fs::write(&empty, b"").unwrap();
        let e = format!("{:#}", read_module(&empty).unwrap_err());
        assert!(e.contains("empty.wasm") && e.contains("empty"), "{e}");
        let e = format!("{:#}", read_module(dir.path()).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
