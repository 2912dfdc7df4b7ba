//! `fleetscan bench jobs`: the throughput of the worker protocol through the real broker.
//!
//! One process runs a broker (SQLite store in a temporary directory), K workers with a scanner
//! that answers "clean" at once, and C clients calling `ScanService.ScanBytes`. Every request
//! carries content never sent before (a client id and a counter are written into its first
//! bytes), so each one is a full scan: broker single-flight, job queue, chunked transfer to a
//! worker, digest check, answer, and a verdict written behind into SQLite. The scanner costs
//! nothing, so the numbers are the protocol's ceiling on this machine.
//!
//! It never fakes a result: a failed or denied call is counted and shown, not retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fleetscan_broker::{Broker, BrokerConfig};
use fleetscan_core::ScannerIdentity;
use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1;
use fleetscan_proto::v1::scan_service_client::ScanServiceClient;
use fleetscan_worker::{ScanOutcome, Scanner, WorkerConfig};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::fmt_dur;

#[derive(Args)]
pub(crate) struct JobsArgs {
    /// Seconds each row runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients (one connection each) for the small-file row.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent clients for the large-file row (each holds a whole content in memory).
    #[arg(long, default_value_t = 8)]
    large_concurrency: usize,
    /// Workers attached to the broker.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Credits (concurrent jobs) each worker grants.
    #[arg(long, default_value_t = 64)]
    credits: u32,
    /// The broker's store; default: a fresh SQLite file in a temporary directory. E.g.
    /// `sqlite::memory:` to see what the disk costs.
    #[arg(long)]
    store_url: Option<String>,
    /// Size of a small content, in bytes.
    #[arg(long, default_value_t = 1024)]
    small_size: usize,
    /// Size of a large content, in bytes (must stay under the 4 MiB message limit).
    #[arg(long, default_value_t = 3 * 1024 * 1024)]
    large_size: usize,
}

/// A scanner that finds everything clean at once; its identity is fixed so that verdicts are
/// comparable between runs.
pub(crate) struct NullScanner;

impl Scanner for NullScanner {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "bench-null".to_owned(),
            engine: "null".to_owned(),
            engine_version: "1".to_owned(),
            ruleset_version: "1".to_owned(),
        }
    }

    fn scan(&self, _content: &[u8]) -> ScanOutcome {
        ScanOutcome::clean()
    }
}

struct Row {
    name: String,
    jobs: usize,
    bytes: u64,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    failed: usize,
}

/// What one client measured.
#[derive(Default)]
struct ClientResult {
    latencies: Vec<Duration>,
    bytes: u64,
    failed: usize,
    first_error: Option<String>,
}

pub(crate) fn jobs(a: &JobsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(a.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(
        a.large_concurrency >= 1,
        "--large-concurrency must be at least 1"
    );
    anyhow::ensure!(a.credits >= 1, "--credits must be at least 1");
    anyhow::ensure!(
        a.small_size >= 16 && a.large_size >= 16,
        "contents must be at least 16 bytes (they carry a unique counter)"
    );
    anyhow::ensure!(
        a.large_size + 64 * 1024 <= MAX_MESSAGE_SIZE,
        "--large-size must stay under the {MAX_MESSAGE_SIZE}-byte message limit"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(jobs_async(a))
}

async fn jobs_async(a: &JobsArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let db = dir.path().join("b.db");
    let broker = Broker::new(BrokerConfig {
        store_url: a
            .store_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", db.display())),
        ..Default::default()
    })
    .await
    .context("starting the broker")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let broker_task = tokio::spawn(broker.serve(listener, stopped(stop_rx.clone())));

    let scanner: Arc<dyn Scanner> = Arc::new(NullScanner);
    let mut worker_tasks = Vec::with_capacity(a.workers);
    for i in 0..a.workers {
        let config = WorkerConfig {
            brokers: vec![url.clone()],
            worker_name: format!("bench-worker-{i}"),
            credits: a.credits,
            max_file_size: 0,
            ..Default::default()
        };
        worker_tasks.push(tokio::spawn(fleetscan_worker::run(
            config,
            scanner.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    for i in 0..a.workers {
        fleetscan_testkit::wait_for_worker(&url, Some(&format!("bench-worker-{i}"))).await;
    }

    let seconds = Duration::from_secs(a.seconds.max(1));
    let small = drive(
        &url,
        format!(
            "small files ({} B), {} clients",
            a.small_size, a.concurrency
        ),
        a.small_size,
        a.concurrency,
        seconds,
        0,
    )
    .await?;
    let large = drive(
        &url,
        format!(
            "large files ({} KiB), {} clients",
            a.large_size / 1024,
            a.large_concurrency
        ),
        a.large_size,
        a.large_concurrency,
        seconds,
        1,
    )
    .await?;
    let stats = fleetscan_testkit::stats(&url).await;

    stop.send_replace(true);
    for w in worker_tasks {
        match tokio::time::timeout(Duration::from_secs(40), w).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("worker ended with an error: {e}"),
            Ok(Err(e)) => eprintln!("worker task failed: {e}"),
            Err(_) => eprintln!("worker did not stop within 40 s"),
        }
    }
    match tokio::time::timeout(Duration::from_secs(30), broker_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("broker ended with an error: {e}"),
        Ok(Err(e)) => eprintln!("broker task failed: {e}"),
        Err(_) => eprintln!("broker did not stop within 30 s"),
    }

    println!(
        "fleetscan bench jobs: ScanService.ScanBytes -> broker -> {} worker(s) x {} credits, \
         null scanner, unique content per call, one process on loopback; every verdict is \
         written behind into the store {} ({} s per row)",
        a.workers,
        a.credits,
        a.store_url.as_deref().unwrap_or("(SQLite file)"),
        seconds.as_secs()
    );
    println!(
        "{:<42} {:>10} {:>10} {:>11} {:>11} {:>7}",
        "row", "jobs/s", "MiB/s", "p50", "p99", "failed"
    );
    for r in [&small, &large] {
        let secs = r.wall.as_secs_f64();
        println!(
            "{:<42} {:>10.0} {:>10.1} {:>11} {:>11} {:>7}",
            r.name,
            r.jobs as f64 / secs,
            r.bytes as f64 / secs / (1024.0 * 1024.0),
            fmt_dur(r.p50),
            fmt_dur(r.p99),
            r.failed
        );
    }
    println!(
        "broker: {} scans started, {} deduplicated, {} verdicts stored, {} waiting to be written, \
         {} lost, {} scan errors, {} refused (queue full)",
        stats.scans_started,
        stats.scans_deduplicated,
        stats.verdicts_stored,
        stats.write_backlog,
        stats.records_lost,
        stats.scan_errors,
        stats.queue_rejected
    );
    println!("goals: >= 20000 small jobs/s, >= 500 MiB/s of large content");
    Ok(())
}

async fn client(url: &str) -> anyhow::Result<ScanServiceClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ScanServiceClient::new(channel)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
        .max_decoding_message_size(MAX_MESSAGE_SIZE))
}

/// Runs `concurrency` clients for `duration`, each sending contents of `size` bytes, unique
/// across the whole run (`row` keeps two rows apart).
async fn drive(
    url: &str,
    name: String,
    size: usize,
    concurrency: usize,
    duration: Duration,
    row: u32,
) -> anyhow::Result<Row> {
    // Filler that does not compress to nothing, made once; each call copies it and stamps its
    // own identity on the first 16 bytes.
    let mut base = vec![0u8; size];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in base.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let base = Arc::new(base);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(client(url).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for (id, mut c) in clients.into_iter().enumerate() {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult::default();
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                let mut data = base.as_ref().clone();
                let tag = (u64::from(row) << 32) | id as u64;
                data[..8].copy_from_slice(&tag.to_le_bytes());
                data[8..16].copy_from_slice(&n.to_le_bytes());
                n += 1;
                let t = Instant::now();
                let res = c
                    .scan_bytes(v1::ScanBytesRequest {
                        data,
                        name: String::new(),
                    })
                    .await;
                r.latencies.push(t.elapsed());
                match res {
                    Ok(resp) if resp.get_ref().action == v1::Action::Allow as i32 => {
                        r.bytes += size as u64;
                    }
                    Ok(resp) => {
                        r.failed += 1;
                        r.first_error.get_or_insert_with(|| {
                            format!("not allowed: {}", resp.get_ref().reason)
                        });
                    }
                    Err(status) => {
                        r.failed += 1;
                        r.first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            r
        }));
    }
    let mut lat = Vec::new();
    let mut bytes = 0;
    let mut failed = 0;
    let mut first_error = None;
    for t in tasks {
        let r = t.await.context("a client task panicked")?;
        lat.extend(r.latencies);
        bytes += r.bytes;
        failed += r.failed;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    // The last calls finish after the deadline; the wall time includes them.
    let wall = start.elapsed();
    if let Some(e) = first_error {
        eprintln!("{name}: {failed} call(s) failed, the first: {e}");
    }
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len().max(1) as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(Row {
        name,
        jobs: lat.len() - failed,
        bytes,
        wall,
        p50: pct(0.50),
        p99: pct(0.99),
        failed,
    })
}
