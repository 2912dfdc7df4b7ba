//! `fleetscan-conformance-sample-worker`: a worker for the conformance kit's own tests, and the
//! smallest example of a vendor worker built on the SDK.
//!
//! ```text
//! fleetscan-conformance-sample-worker [--broker URL] [--credits N] [--max-file-size BYTES] [--mode MODE]
//! ```
//! The broker URL defaults to `FLEETSCAN_WORKER_BROKER`. Modes:
//! - `sdk` (default): `fleetscan_worker::run` with a scanner that finds the EICAR test string.
//! - `miss-eicar`: the same, with a scanner that finds nothing (fails the `eicar` check).
//! - `naive`: a hand-written client with the mistakes the kit exists to catch: no heartbeats,
//!   credits granted once and never again, no SHA-256 check, an answer to a cancelled job, no
//!   reconnect. It must never serve a real broker.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fleetscan_conformance::EICAR_TEST_FILE;
use fleetscan_core::ScannerIdentity;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_client::WorkerServiceClient;
use fleetscan_proto::{MAX_MESSAGE_SIZE, convert, v1};
use fleetscan_worker::{ScanOutcome, Scanner, WorkerConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sdk,
    MissEicar,
    Naive,
}

struct Args {
    broker: String,
    credits: u32,
    max_file_size: u64,
    mode: Mode,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut broker = std::env::var("FLEETSCAN_WORKER_BROKER").ok();
    let mut credits = 2;
    let mut max_file_size = 0;
    let mut mode = Mode::Sdk;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--broker" => broker = Some(value()?),
            "--credits" => credits = value()?.parse().context("--credits")?,
            "--max-file-size" => max_file_size = value()?.parse().context("--max-file-size")?,
            "--mode" => {
                mode = match value()?.as_str() {
                    "sdk" => Mode::Sdk,
                    "miss-eicar" => Mode::MissEicar,
                    "naive" => Mode::Naive,
                    other => bail!("unknown mode {other:?} (sdk, miss-eicar, naive)"),
                }
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let broker = broker.context("no --broker and no FLEETSCAN_WORKER_BROKER")?;
    Ok(Args {
        broker,
        credits,
        max_file_size,
        mode,
    })
}

/// Finds the EICAR test string anywhere in the content. Told to miss it, it searches as hard
/// for a string one byte off: a scanner whose signatures lack EICAR, not one that skips work.
struct SampleScanner {
    miss_eicar: bool,
}

impl Scanner for SampleScanner {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "sample".into(),
            engine: "eicar-substring".into(),
            engine_version: env!("CARGO_PKG_VERSION").into(),
            ruleset_version: if self.miss_eicar { "none" } else { "eicar-1" }.into(),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        let mut signature = EICAR_TEST_FILE.to_vec();
        if self.miss_eicar {
            signature[0] ^= 0x20;
        }
        if content.windows(signature.len()).any(|w| w == signature) {
            ScanOutcome::malicious("EICAR-Test-File")
        } else {
            ScanOutcome::clean()
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match args.mode {
            Mode::Sdk | Mode::MissEicar => {
                let config = WorkerConfig {
                    brokers: vec![args.broker],
                    worker_name: format!("sample-{}", std::process::id()),
                    credits: args.credits,
                    max_file_size: args.max_file_size,
                    ..WorkerConfig::default()
                };
                let scanner = Arc::new(SampleScanner {
                    miss_eicar: args.mode == Mode::MissEicar,
                });
                fleetscan_worker::run(config, scanner, shutdown()).await?;
                Ok(())
            }
            Mode::Naive => naive(args.broker, args.credits).await,
        }
    })
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The naive client (see the module header for its mistakes, all deliberate).
async fn naive(broker: String, credits: u32) -> anyhow::Result<()> {
    let mut client = WorkerServiceClient::connect(broker)
        .await?
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let (tx, rx) = mpsc::channel(64);
    let scanner = SampleScanner { miss_eicar: false };
    let send = |msg| {
        let tx = tx.clone();
        async move {
            tx.send(v1::WorkerMessage { msg: Some(msg) })
                .await
                .context("stream closed")
        }
    };
    send(Message::Register(v1::Register {
        worker_name: format!("naive-{}", std::process::id()),
        scanner: Some(v1::ScannerIdentity::from(&scanner.identity())),
        ..Default::default()
    }))
    .await?;
    let mut inbound = client.attach(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(v1::WorkerCommand {
            msg: Some(Command::Registered(_)),
        }) => {}
        other => bail!("expected Registered, got {other:?}"),
    }
    send(Message::Credit(v1::Credit { credits })).await?;
    let mut jobs: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    while let Some(cmd) = inbound.message().await? {
        match cmd.msg {
            Some(Command::Job(job)) => {
                jobs.insert(job.job_id, Vec::new());
            }
            Some(Command::Chunk(chunk)) => {
                let Some(content) = jobs.get_mut(&chunk.job_id) else {
                    continue;
                };
                content.extend_from_slice(&chunk.data);
                if chunk.last {
                    let content = jobs.remove(&chunk.job_id).unwrap_or_default();
                    let started = Instant::now();
                    let outcome = scanner.scan(&content);
                    let scan_micros = started.elapsed().as_micros().max(1) as u64;
                    send(result(chunk.job_id, &outcome, scan_micros)).await?;
                }
            }
            Some(Command::Cancel(cancel)) => {
                jobs.remove(&cancel.job_id);
                let outcome = ScanOutcome::error("cancelled", true);
                send(result(cancel.job_id, &outcome, 0)).await?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn result(job_id: u64, outcome: &ScanOutcome, scan_micros: u64) -> Message {
    Message::Result(v1::ScanResult {
        job_id,
        result: convert::verdict_kind_to_proto(outcome.kind) as i32,
        threat_name: outcome.threat_name.clone().unwrap_or_default(),
        detail: outcome.detail.clone().unwrap_or_default(),
        retryable: outcome.retryable,
        scan_micros,
        ..Default::default()
    })
}
