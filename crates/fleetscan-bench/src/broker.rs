//! `fleetscan bench broker`: decisions per second of a real broker process for agents asking
//! about content that is already judged — the fleet's steady state, where every host opens
//! files some other host opened first.
//!
//! The broker is the `fleetscan` binary itself, started as a separate process by the sandbox,
//! so that its CPU time can be read from `/proc/PID/stat` apart from the client's. Before the
//! measurement a worker with a null scanner (in this process) attaches and `ScanService`
//! judges a set of distinct small contents; then synthetic agents open `AgentService.Session`
//! streams over loopback, one connection each, and keep a fixed number of access requests for
//! those contents outstanding. Requests are built once and only cloned with a new request id;
//! each session is one task on a multi-thread runtime, so the client stays cheap; its CPU time
//! is printed too, to show it was not the bottleneck.
//!
//! It never fakes a result: a decision that is not an allow of a judged content counts as an
//! error, and the broker's own decision counter is printed beside the client's count.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use fleetscan_core::Sha256;
use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1::agent_service_client::AgentServiceClient;
use fleetscan_proto::v1::scan_service_client::ScanServiceClient;
use fleetscan_proto::v1::{self, agent_message, broker_message};
use fleetscan_testkit::Sandbox;
use fleetscan_worker::{Scanner, WorkerConfig};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::jobs::NullScanner;
use crate::{fmt_dur, results_table};

#[derive(Args)]
pub(crate) struct BrokerArgs {
    /// Synthetic agents in the load row: one connection and one Session stream each.
    #[arg(long, default_value_t = 16)]
    sessions: usize,
    /// Requests each session keeps outstanding in the load row.
    #[arg(long, default_value_t = 64)]
    outstanding: usize,
    /// Distinct contents judged before the measurement, and asked about during it.
    #[arg(long, default_value_t = 1000)]
    contents: usize,
    /// Seconds of each row before the measured window (connections warm, caches hot).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Seconds measured per row.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Threads of the client's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// The `fleetscan` binary to run as the broker; default: this one. Another build's binary
    /// compares two brokers with the same client.
    #[arg(long)]
    broker_bin: Option<std::path::PathBuf>,
}

/// What one configuration of synthetic agents measured.
struct Row {
    name: String,
    decisions: u64,
    broker_decisions: u64,
    errors: u64,
    wall: Duration,
    broker_cpu: Duration,
    client_cpu: Duration,
    /// CPU time of the whole machine (every process) over the window.
    machine_cpu: Duration,
    p50: Duration,
    p99: Duration,
}

/// What one synthetic agent measured in the window.
#[derive(Default)]
struct SessionResult {
    decisions: u64,
    errors: u64,
    /// Nanoseconds from send to decision, of decisions received in the window.
    latencies: Vec<u32>,
    first_error: Option<String>,
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

pub(crate) fn broker(a: &BrokerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.sessions >= 1, "--sessions must be at least 1");
    anyhow::ensure!(a.outstanding >= 1, "--outstanding must be at least 1");
    anyhow::ensure!(a.contents >= 1, "--contents must be at least 1");
    let exe = match &a.broker_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe().context("locating the fleetscan binary")?,
    };
    let mut sandbox = Sandbox::new(exe);
    sandbox.set_log_filter("info");
    let broker = sandbox.broker(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads.max(1))
        .enable_all()
        .build()?;
    let result = rt.block_on(run(a, broker.proc.pid, &broker.url));
    drop(rt);
    drop(sandbox);
    result
}

async fn run(a: &BrokerArgs, pid: u32, url: &str) -> anyhow::Result<()> {
    let (stop, stop_rx) = watch::channel(false);
    let scanner: Arc<dyn Scanner> = Arc::new(NullScanner);
    let worker = tokio::spawn(fleetscan_worker::run(
        WorkerConfig {
            brokers: vec![url.to_owned()],
            worker_name: "bench-null".to_owned(),
            credits: 64,
            ..Default::default()
        },
        scanner,
        async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    fleetscan_testkit::wait_for_worker(url, Some("bench-null")).await;

    eprintln!("judging {} contents ...", a.contents);
    let requests = judge(url, a.contents).await?;
    let requests = Arc::new(requests);

    let latency = drive(
        url,
        pid,
        "latency: 1 session, 1 outstanding".to_owned(),
        &requests,
        1,
        1,
        a,
    )
    .await?;
    let load = drive(
        url,
        pid,
        format!(
            "load: {} sessions x {} outstanding",
            a.sessions, a.outstanding
        ),
        &requests,
        a.sessions,
        a.outstanding,
        a,
    )
    .await?;
    let stats = fleetscan_testkit::stats(url).await;
    stop.send_replace(true);
    match tokio::time::timeout(Duration::from_secs(20), worker).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("worker ended with an error: {e}"),
        Ok(Err(e)) => eprintln!("worker task failed: {e}"),
        Err(_) => eprintln!("worker did not stop within 20 s"),
    }

    println!(
        "fleetscan bench broker: `fleetscan broker` (pid {pid}, its own process) on loopback; \
         synthetic agents ask about {} contents judged beforehand (null scanner); {} s warm-up \
         and {} s measured per row; client: one connection and one Session per agent, \
         {} runtime threads; CPU from /proc/PID/stat (utime+stime) over the measured window",
        a.contents, a.warmup, a.seconds, a.client_threads
    );
    let table = [&latency, &load]
        .iter()
        .map(|r| {
            let secs = r.wall.as_secs_f64();
            let broker_secs = r.broker_cpu.as_secs_f64();
            let others = r.machine_cpu.saturating_sub(r.broker_cpu + r.client_cpu);
            vec![
                r.name.to_string(),
                format!("{:.0}", r.decisions as f64 / secs),
                format!(
                    "{:.0}",
                    if broker_secs > 0.0 {
                        r.decisions as f64 / broker_secs
                    } else {
                        f64::NAN
                    }
                ),
                fmt_dur(r.p50),
                fmt_dur(r.p99),
                format!("{:.2}c", broker_secs / secs),
                format!("{:.2}c", r.client_cpu.as_secs_f64() / secs),
                format!("{:.2}c", others.as_secs_f64() / secs),
                r.errors.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        results_table(
            &[
                "row",
                "decisions/s",
                "per broker s",
                "p50",
                "p99",
                "broker CPU",
                "client CPU",
                "others CPU",
                "errors",
            ],
            table
        )
    );
    println!(
        "per broker s: decisions per CPU-second of the broker process; CPU columns in cores \
         (CPU-seconds per second) over the window; others: every other process on the machine \
         (a busy machine lowers decisions/s, not decisions per broker second)"
    );
    for r in [&latency, &load] {
        println!(
            "{}: {} decisions counted by the agents, {} by the broker in the same window",
            r.name, r.decisions, r.broker_decisions
        );
    }
    println!(
        "broker totals: {} decisions, {} from its memory cache, {} scans, {} fail-mode",
        stats.decisions, stats.cache_hits, stats.scans_started, stats.fail_mode_decisions
    );
    println!("goal: >= 50000 decisions/s on this 2-core machine (load row)");
    Ok(())
}

/// Has the broker judge `n` distinct small contents through `ScanService`; returns one
/// prebuilt access request per content.
async fn judge(url: &str, n: usize) -> anyhow::Result<Vec<v1::AgentMessage>> {
    let mut scan = ScanServiceClient::new(connect(url).await?);
    let mut requests = Vec::with_capacity(n);
    for i in 0..n {
        let data = format!("fleetscan bench broker content {i:08}\n").into_bytes();
        let sha256 = Sha256::of(&data);
        let size = data.len() as u64;
        let response = scan
            .scan_bytes(v1::ScanBytesRequest {
                data: data.into(),
                name: String::new(),
            })
            .await
            .context("ScanBytes")?
            .into_inner();
        if !response.known || response.action != v1::Action::Allow as i32 {
            bail!(
                "content {i} was not judged clean (known {}, action {}): {}",
                response.known,
                response.action,
                response.reason
            );
        }
        requests.push(v1::AgentMessage {
            msg: Some(agent_message::Msg::Access(v1::AccessRequest {
                request_id: 0,
                file: Some(v1::FileIdentity {
                    dev: 42,
                    ino: i as u64 + 1,
                    ..Default::default()
                }),
                sha256: sha256.to_hex(),
                size,
                subject: Some(v1::Subject {
                    pid: 4242,
                    ns_pid: 4242,
                    uid: 1000,
                    exe: "/usr/bin/bench".to_owned(),
                    ..Default::default()
                }),
                path: format!("/srv/app/lib/f{i:05}.so"),
                host_path: String::new(),
                kind: v1::AccessKind::Open as i32,
                deadline_ms: 2000,
            })),
        });
    }
    Ok(requests)
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Runs `sessions` synthetic agents, each keeping `outstanding` requests in flight; measures
/// the window after the warm-up.
#[allow(clippy::too_many_arguments)]
async fn drive(
    url: &str,
    pid: u32,
    name: String,
    requests: &Arc<Vec<v1::AgentMessage>>,
    sessions: usize,
    outstanding: usize,
    a: &BrokerArgs,
) -> anyhow::Result<Row> {
    let phase = Arc::new(AtomicU8::new(WARMING));
    let mut tasks = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let channel = connect(url).await?;
        let requests = requests.clone();
        let phase = phase.clone();
        tasks.push(tokio::spawn(async move {
            agent(channel, s, requests, outstanding, phase).await
        }));
    }
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let broker_before = fleetscan_testkit::stats(url).await.decisions;
    let cpu_before = (cpu_time(pid)?, cpu_time_self()?, machine_cpu_time()?);
    let start = Instant::now();
    phase.store(MEASURING, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.seconds.max(1))).await;
    phase.store(STOPPING, Ordering::Relaxed);
    let wall = start.elapsed();
    let cpu_after = (cpu_time(pid)?, cpu_time_self()?, machine_cpu_time()?);
    let broker_after = fleetscan_testkit::stats(url).await.decisions;

    let mut total = SessionResult::default();
    for t in tasks {
        let r = t.await.context("an agent task panicked")??;
        total.decisions += r.decisions;
        total.errors += r.errors;
        total.latencies.extend(r.latencies);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    if let Some(e) = &total.first_error {
        eprintln!("{name}: {} error(s), the first: {e}", total.errors);
    }
    total.latencies.sort_unstable();
    let pct = |q: f64| {
        let l = &total.latencies;
        Duration::from_nanos(
            l.get(((l.len().max(1) as f64 - 1.0) * q).round() as usize)
                .copied()
                .map_or(0, u64::from),
        )
    };
    Ok(Row {
        name,
        decisions: total.decisions,
        broker_decisions: broker_after - broker_before,
        errors: total.errors,
        wall,
        broker_cpu: cpu_after.0.saturating_sub(cpu_before.0),
        client_cpu: cpu_after.1.saturating_sub(cpu_before.1),
        machine_cpu: cpu_after.2.saturating_sub(cpu_before.2),
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

/// One synthetic agent: hello, then `outstanding` requests in flight until the phase says stop.
/// Request ids carry their slot (`id % outstanding`), whose send time gives the latency.
async fn agent(
    channel: Channel,
    index: usize,
    requests: Arc<Vec<v1::AgentMessage>>,
    outstanding: usize,
    phase: Arc<AtomicU8>,
) -> anyhow::Result<SessionResult> {
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // Room for every outstanding request and the hello: sending never waits.
    let (tx, rx) = mpsc::channel(outstanding + 1);
    tx.try_send(v1::AgentMessage {
        msg: Some(agent_message::Msg::Hello(v1::AgentHello {
            node: format!("bench-agent-{index}"),
            cluster: "bench".to_owned(),
            agent_version: "bench".to_owned(),
            ..Default::default()
        })),
    })?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .context("AgentService.Session")?
        .into_inner();
    match inbound.message().await? {
        Some(v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(_)),
        }) => {}
        other => bail!("the session did not start with SessionAccepted: {other:?}"),
    }
    let mut result = SessionResult::default();
    let mut sent_at = vec![Instant::now(); outstanding];
    // Each agent walks the contents from its own offset, so that sessions hit different shards.
    let mut next_content = index * 7919 % requests.len();
    let mut next_id = 0u64;
    let outstanding_u64 = outstanding as u64;
    let mut send = |slot: usize, sent_at: &mut [Instant]| -> anyhow::Result<()> {
        let mut message = requests[next_content].clone();
        next_content = (next_content + 1) % requests.len();
        if let Some(agent_message::Msg::Access(r)) = &mut message.msg {
            r.request_id = next_id * outstanding_u64 + slot as u64;
        }
        next_id += 1;
        sent_at[slot] = Instant::now();
        tx.try_send(message)
            .map_err(|_| anyhow::anyhow!("request queue full"))
    };
    for slot in 0..outstanding {
        send(slot, &mut sent_at)?;
    }
    loop {
        let Some(message) = inbound.message().await? else {
            bail!("the broker ended the session");
        };
        let decision = match message.msg {
            Some(broker_message::Msg::Decision(d)) => d,
            // Heartbeats, flushes: not decisions.
            _ => continue,
        };
        let slot = (decision.request_id % outstanding_u64) as usize;
        let elapsed = sent_at[slot].elapsed();
        let state = phase.load(Ordering::Relaxed);
        if state == STOPPING {
            break;
        }
        if state == MEASURING {
            let allowed = decision.action == v1::Action::Allow as i32
                && decision.cacheable
                && decision
                    .verdicts
                    .first()
                    .is_some_and(|v| v.result == v1::VerdictResult::Clean as i32);
            if allowed {
                result.decisions += 1;
                result
                    .latencies
                    .push(u32::try_from(elapsed.as_nanos()).unwrap_or(u32::MAX));
            } else {
                result.errors += 1;
                result
                    .first_error
                    .get_or_insert_with(|| format!("unexpected decision: {decision:?}"));
            }
        }
        send(slot, &mut sent_at)?;
    }
    Ok(result)
}

/// User plus system CPU time of a process so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    cpu_time_of(&Path::new("/proc").join(pid.to_string()).join("stat"))
}

fn cpu_time_self() -> anyhow::Result<Duration> {
    cpu_time_of(Path::new("/proc/self/stat"))
}

fn cpu_time_of(path: &Path) -> anyhow::Result<Duration> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ticks = cpu_ticks(&text).with_context(|| format!("malformed {}", path.display()))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// utime + stime, in clock ticks, from the text of a `/proc/PID/stat` file.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name comes field 3 (state); utime is field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy CPU time of the whole machine so far (every CPU, every state but idle and iowait),
/// from the first line of `/proc/stat`.
fn machine_cpu_time() -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let ticks = busy_ticks(&text).context("malformed /proc/stat")?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// user + nice + system + irq + softirq + steal, in clock ticks, from `/proc/stat`'s text.
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    (fields.len() >= 4).then(|| at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// The kernel's clock ticks per second for `/proc` times (`getconf CLK_TCK`, nearly always 100).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_count_fields_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as `/proc` shows such a process.
        let line = "1234 (fleet scan) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 \
                    4 0 100 1000 200 18446744073709551615";
        assert_eq!(cpu_ticks(line), Some(325));
        assert_eq!(cpu_ticks("1234 (short) S 1 2"), None);
        assert_eq!(cpu_ticks("no parenthesis at all"), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 0 0\ncpu0 50 1 15 2500 20 3 3 4 0 0\n";
        assert_eq!(busy_ticks(stat), Some(100 + 2 + 30 + 6 + 7 + 8));
        assert_eq!(busy_ticks("cpu0 1 2 3 4\n"), None);
        assert_eq!(busy_ticks("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        let spent = cpu_time_self().expect("reading /proc/self/stat");
        assert!(spent < Duration::from_secs(24 * 3600), "{spent:?}");
    }
}
