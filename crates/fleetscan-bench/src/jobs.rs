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
use bytes::{Bytes, BytesMut};
use clap::Args;
use fleetscan_broker::engine::writer::LINGER;
use fleetscan_broker::{Broker, BrokerConfig};
use fleetscan_core::ScannerIdentity;
use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1;
use fleetscan_proto::v1::scan_service_client::ScanServiceClient;
use fleetscan_worker::{ScanOutcome, Scanner, WorkerConfig};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::{fmt_dur, results_table};

#[derive(Args)]
pub(crate) struct JobsArgs {
    /// Seconds each row runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent calls (each a client task that waits for its answer before the next call)
    /// for the small-file row.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the clients of a row share, round-robin (at most one per client).
    /// Calls on one connection are multiplexed, as a real application's channel does; their
    /// frames share writes.
    #[arg(long, default_value_t = 8)]
    connections: usize,
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
    /// CPU time of the whole process (clients, broker, workers, store) during the row.
    cpu: Option<Duration>,
    p50: Duration,
    p99: Duration,
    failed: usize,
    /// Part of `wall`: after the last call, until the broker had written the row's verdicts.
    drain: Duration,
    /// Records the broker's write-behind queue gave up on during the row.
    lost: u64,
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
    anyhow::ensure!(a.connections >= 1, "--connections must be at least 1");
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
    let engine = broker.engine();
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
    let small_files = format!("small files ({} B)", a.small_size);
    let large_files = format!("large files ({} KiB)", a.large_size / 1024);
    let small = settled(
        &engine,
        drive(
            &url,
            format!("{small_files}, {} clients", a.concurrency),
            a.small_size,
            a.concurrency,
            a.connections,
            seconds,
            0,
        ),
    )
    .await?;
    let large = settled(
        &engine,
        drive(
            &url,
            format!("{large_files}, {} clients", a.large_concurrency),
            a.large_size,
            a.large_concurrency,
            a.connections,
            seconds,
            1,
        ),
    )
    .await?;
    let fed = settled(
        &engine,
        drive_engine(
            &engine,
            format!("{small_files}, {} submitters in-process", a.concurrency),
            a.small_size,
            a.concurrency,
            seconds,
            2,
        ),
    )
    .await?;
    let fed_large = settled(
        &engine,
        drive_engine(
            &engine,
            format!(
                "{large_files}, {} submitters in-process",
                a.large_concurrency
            ),
            a.large_size,
            a.large_concurrency,
            seconds,
            3,
        ),
    )
    .await?;
    let stats = fleetscan_testkit::stats(&url).await;
    let lookups_skipped = engine
        .stats()
        .store_lookups_skipped
        .load(std::sync::atomic::Ordering::Relaxed);

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
         null scanner, unique content per call, clients on at most {} HTTP/2 connection(s), \
         one process on loopback; every verdict is written behind into the store {} ({} s per row)",
        a.workers,
        a.credits,
        a.connections,
        a.store_url.as_deref().unwrap_or("(SQLite file)"),
        seconds.as_secs()
    );
    let table = [&small, &large, &fed, &fed_large]
        .iter()
        .map(|r| {
            let secs = r.wall.as_secs_f64();
            let (per_job, cores) = match r.cpu {
                Some(cpu) if r.jobs > 0 => (
                    fmt_dur(cpu / u32::try_from(r.jobs).unwrap_or(u32::MAX)),
                    format!("{:.2}", cpu.as_secs_f64() / secs),
                ),
                _ => ("-".to_owned(), "-".to_owned()),
            };
            vec![
                r.name.to_string(),
                format!("{:.0}", r.jobs as f64 / secs),
                format!("{:.1}", r.bytes as f64 / secs / (1024.0 * 1024.0)),
                fmt_dur(r.p50),
                fmt_dur(r.p99),
                r.failed.to_string(),
                r.lost.to_string(),
                fmt_dur(r.drain),
                per_job,
                cores,
            ]
        })
        .collect();
    println!(
        "{}",
        results_table(
            &[
                "row", "jobs/s", "MiB/s", "p50", "p99", "failed", "lost", "drain", "CPU/job",
                "cores",
            ],
            table
        )
    );
    println!(
        "broker: {} scans started, {} deduplicated, {} store look-ups skipped (content it cannot \
         hold), {} verdicts stored, {} waiting to be written, {} lost, {} scan errors, {} refused \
         (queue full)",
        stats.scans_started,
        stats.scans_deduplicated,
        lookups_skipped,
        stats.verdicts_stored,
        stats.write_backlog,
        stats.records_lost,
        stats.scan_errors,
        stats.queue_rejected
    );
    println!(
        "a row ends when the broker has written its verdicts: jobs/s and CPU/job include the \
         drain (the wait after the last call until the write-behind queue was empty), lost \
         counts records the queue gave up on (it was full)"
    );
    println!(
        "CPU/job and cores: CPU time of the whole process (clients, broker, workers, store) per \
         job, and cores it kept busy; other load on the machine lowers jobs/s, not CPU/job"
    );
    println!(
        "the in-process rows hand each content to the broker's engine directly (what the scan \
         service does after decoding a call): broker -> worker -> broker alone, through the same \
         single-flight, store look-up, SHA-256 of the content, job queue, gRPC stream to the \
         workers (content in chunks), the worker's SHA-256 check and write-behind; only the \
         client's gRPC call is left out"
    );
    println!(
        "goals (the in-process rows): >= 20000 small jobs/s through broker -> worker -> broker, \
         >= 500 MiB/s of large content"
    );
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

/// Runs `concurrency` clients for `duration` over at most `connections` connections, each
/// sending contents of `size` bytes, unique across the whole run (`row` keeps two rows apart).
#[allow(clippy::too_many_arguments)]
async fn drive(
    url: &str,
    name: String,
    size: usize,
    concurrency: usize,
    connections: usize,
    duration: Duration,
    row: u32,
) -> anyhow::Result<Row> {
    let mut channels = Vec::with_capacity(connections.min(concurrency));
    for _ in 0..connections.min(concurrency) {
        channels.push(client(url).await?);
    }
    run_clients(name, size, concurrency, duration, row, |id| {
        let client = channels[id % channels.len()].clone();
        move |data: Bytes| {
            // A clone shares the connection: calls of one client stay one after the other.
            let mut client = client.clone();
            async move {
                let resp = client
                    .scan_bytes(v1::ScanBytesRequest {
                        data,
                        name: String::new(),
                    })
                    .await
                    .map_err(|status| status.to_string())?;
                let resp = resp.get_ref();
                if resp.action == v1::Action::Allow as i32 {
                    Ok(())
                } else {
                    Err(format!("not allowed: {}", resp.reason))
                }
            }
        }
    })
    .await
}

/// Runs `concurrency` clients for `duration`; client `id` calls `new_call(id)` with content of
/// `size` bytes, unique across the whole run (`row` keeps two rows apart), and waits for its
/// answer before the next call. A call's `Err` is counted as failed, with its text.
async fn run_clients<F, Fut>(
    name: String,
    size: usize,
    concurrency: usize,
    duration: Duration,
    row: u32,
    mut new_call: impl FnMut(usize) -> F,
) -> anyhow::Result<Row>
where
    F: FnMut(Bytes) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    // Filler that does not compress to nothing, made once; each client copies it and stamps
    // each call's identity on the first 16 bytes.
    let mut base = vec![0u8; size];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in base.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let calls: Vec<F> = (0..concurrency).map(&mut new_call).collect();
    let cpu_before = process_cpu();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for (id, mut call) in calls.into_iter().enumerate() {
        // One buffer per client, stamped anew for each call: an application has its content
        // in memory already, so making it is not part of what is measured.
        let mut data = BytesMut::from(base.as_slice());
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult::default();
            let mut n: u64 = 0;
            let tag = (u64::from(row) << 32) | id as u64;
            while Instant::now() < deadline {
                data[..8].copy_from_slice(&tag.to_le_bytes());
                data[8..16].copy_from_slice(&n.to_le_bytes());
                n += 1;
                let sent = data.freeze();
                let t = Instant::now();
                let res = call(sent.clone()).await;
                r.latencies.push(t.elapsed());
                // The call is over, so its copy is gone: take the buffer back (or copy it,
                // should the transport or the broker still hold a reference).
                data = sent
                    .try_into_mut()
                    .unwrap_or_else(|sent| BytesMut::from(&sent[..]));
                match res {
                    Ok(()) => r.bytes += size as u64,
                    Err(e) => {
                        r.failed += 1;
                        r.first_error.get_or_insert(e);
                    }
                }
            }
            r
        }));
    }
    collect(name, tasks, start, cpu_before).await
}

/// Gathers the clients' results into a row. The last calls finish after the deadline; the
/// wall time includes them.
async fn collect(
    name: String,
    tasks: Vec<tokio::task::JoinHandle<ClientResult>>,
    start: Instant,
    cpu_before: Option<Duration>,
) -> anyhow::Result<Row> {
    let mut lat = Vec::new();
    let (mut bytes, mut failed, mut first_error) = (0, 0, None);
    for t in tasks {
        let r = t.await.context("a client task panicked")?;
        lat.extend(r.latencies);
        bytes += r.bytes;
        failed += r.failed;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    let wall = start.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
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
        cpu,
        p50: pct(0.50),
        p99: pct(0.99),
        failed,
        drain: Duration::ZERO,
        lost: 0,
    })
}

/// The longest a row waits for the broker to write its verdicts.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

/// Runs one row, then charges it the write-behind drain it leaves behind (see [`settle`]).
async fn settled(
    engine: &fleetscan_broker::engine::Engine,
    row: impl Future<Output = anyhow::Result<Row>>,
) -> anyhow::Result<Row> {
    let lost = engine.records_lost();
    let row = row.await?;
    Ok(settle(engine, row, lost).await)
}

/// Waits until the broker has written every record of the row (its write-behind backlog is
/// empty) and charges the wait to the row, wall time and CPU: a row's rate is what the broker
/// sustains with its store, not what it takes in while writes pile up. Records lost since
/// `lost_before` are the row's.
async fn settle(engine: &fleetscan_broker::engine::Engine, mut row: Row, lost_before: u64) -> Row {
    let cpu_before = process_cpu();
    let start = Instant::now();
    // The writer takes a record off the queue a moment before it counts it in its batch: an
    // empty backlog counts only when it is still empty a linger later.
    let mut empty_since: Option<Instant> = None;
    while start.elapsed() < DRAIN_LIMIT {
        if engine.write_backlog() > 0 {
            empty_since = None;
        } else if empty_since.get_or_insert_with(Instant::now).elapsed() > LINGER {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if engine.write_backlog() > 0 {
        eprintln!(
            "{}: {} records still unwritten after {} s",
            row.name,
            engine.write_backlog(),
            DRAIN_LIMIT.as_secs()
        );
    }
    row.drain = start.elapsed();
    row.wall += row.drain;
    row.cpu = row
        .cpu
        .zip(process_cpu().zip(cpu_before))
        .map(|(cpu, (after, before))| cpu + after.saturating_sub(before));
    row.lost = engine.records_lost() - lost_before;
    row
}

/// CPU time (user and system) of this whole process so far, from `/proc/self/stat`; None where
/// that is not available.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields are counted after its last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Clock ticks; Linux reports them at USER_HZ = 100 on every architecture it runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Like [`drive`], but each of `concurrency` submitters hands its content straight to the
/// broker's engine (as `ScanService.ScanBytes` does once it has decoded a call), so the row
/// measures broker -> worker -> broker alone. Every content is new; the verdict must come from a
/// worker, and anything but "clean" counts as failed.
async fn drive_engine(
    engine: &Arc<fleetscan_broker::engine::Engine>,
    name: String,
    size: usize,
    concurrency: usize,
    duration: Duration,
    row: u32,
) -> anyhow::Result<Row> {
    use fleetscan_broker::engine::content::ContentSource;
    use fleetscan_broker::engine::{DEFAULT_POOL, Lookup, Pending, Resolution};

    let scan_deadline = engine.config().scan_deadline;
    run_clients(name, size, concurrency, duration, row, |_| {
        let engine = engine.clone();
        move |data: Bytes| {
            let (_, pending) = engine.resolve(Lookup {
                sha256: fleetscan_core::Sha256::of(&data),
                size: data.len() as u64,
                tenant: fleetscan_core::DEFAULT_TENANT.to_owned(),
                pool: DEFAULT_POOL,
                path_hint: String::new(),
                source: ContentSource::Memory(data),
            });
            async move {
                let resolution = match pending {
                    Pending::Ready(res) => Some(res),
                    Pending::Wait(w) => tokio::time::timeout(scan_deadline, w.wait())
                        .await
                        .ok()
                        .flatten(),
                };
                match resolution {
                    Some(Resolution::Verdict(v))
                        if v.kind == fleetscan_core::VerdictKind::Clean =>
                    {
                        Ok(())
                    }
                    Some(Resolution::Verdict(v)) => Err(format!("verdict {:?}", v.kind)),
                    Some(Resolution::Failed(why)) => Err(why),
                    Some(Resolution::Oversize(n)) => Err(format!("oversize {n}")),
                    None => Err("no resolution within the scan deadline".into()),
                }
            }
        }
    })
    .await
}
