//! `fleetscan`: one binary, one subcommand per component. Thin on purpose: parse arguments,
//! load the configuration, call the library's `run`. No decision logic lives here.

mod admin;
mod config;
mod table;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fleetscan_core::{Action, FailMode};
use tokio::sync::watch;

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "fleetscan",
    version,
    about = "On-access malware scanning for fleets of Linux hosts"
)]
struct Cli {
    /// TOML configuration file (sections [broker], [agent], [worker]); see `fleetscan config`.
    #[arg(long, global = true, env = "FLEETSCAN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the central broker (gRPC: agents, workers, admin, scan API).
    Broker(BrokerArgs),
    /// Run the host agent: intercept opens and execs under the protected paths.
    Agent(AgentArgs),
    /// Run a scanner worker: the reference engine (YARA rules and a SHA-256 block list) or
    /// ClamAV through a running clamd.
    Worker(WorkerArgs),
    /// Broker, worker and agent in one process on this host, on an embedded SQLite store.
    Up(UpArgs),
    /// List recorded accesses (every denial), newest first.
    Events(EventsArgs),
    /// Show every verdict recorded for a SHA-256.
    Verdict(VerdictArgs),
    /// List the hosts the broker knows.
    Hosts(ClientArgs),
    /// List the workers attached to the broker.
    Workers(ClientArgs),
    /// Show the broker's counters.
    Stats(ClientArgs),
    /// Print the effective configuration (defaults, file, environment) as TOML.
    Config,
    /// Check a scanner worker against the worker protocol: the kit plays the broker, starts
    /// the worker and prints one line per check; exits non-zero when a check fails.
    Conformance(ConformanceArgs),
    /// Benchmarks that print a table; see `fleetscan bench --help`.
    Bench(fleetscan_bench::BenchArgs),
}

#[derive(Args, Default)]
struct PolicyArgs {
    /// `open` allows, `closed` denies, when no verdict comes in time.
    #[arg(long)]
    fail_mode: Option<FailMode>,
    /// How long an access may wait for a decision (at most 5000).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Content larger than this many bytes is not scanned.
    #[arg(long)]
    max_file_size: Option<u64>,
    /// Deny files larger than --max-file-size instead of allowing them unscanned.
    #[arg(long)]
    deny_oversize: bool,
    /// Record what would be denied, but allow it.
    #[arg(long)]
    audit_only: bool,
}

#[derive(Args)]
struct BrokerArgs {
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// `sqlite://PATH` or `postgres://USER@HOST/DB`.
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Args)]
struct AgentArgs {
    /// Broker URL; repeat for fail-over.
    #[arg(long = "broker")]
    brokers: Vec<String>,
    /// A directory to protect; repeat for several.
    #[arg(long, required = true)]
    protect: Vec<PathBuf>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    fail_mode: Option<FailMode>,
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Keep judging every open in user space (no kernel ignore marks for clean files).
    #[arg(long)]
    no_ignore_marks: bool,
}

#[derive(Args)]
struct WorkerArgs {
    /// Broker URL; repeat to serve several replicas at once.
    #[arg(long = "broker")]
    brokers: Vec<String>,
    /// `reference` (YARA + block list) or `clamav` (a running clamd).
    #[arg(long, value_enum)]
    engine: Option<config::Engine>,
    /// clamd's socket for `--engine clamav`: a unix socket path or `tcp:HOST:PORT`.
    #[arg(long)]
    clamd: Option<String>,
    /// Directory of extra YARA rules.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// SHA-256 block list file.
    #[arg(long)]
    blocklist: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    pool: Option<String>,
    #[arg(long)]
    credits: Option<u32>,
}

#[derive(Args)]
struct UpArgs {
    /// A directory to protect; repeat for several.
    #[arg(long, required = true)]
    protect: Vec<PathBuf>,
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    rules: Option<PathBuf>,
    #[arg(long)]
    blocklist: Option<PathBuf>,
    #[arg(long)]
    no_ignore_marks: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Args)]
struct ClientArgs {
    /// The broker's URL.
    #[arg(long, default_value_t = format!("http://{}", config::DEFAULT_BROKER_ADDR))]
    broker: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EventsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    node: Option<String>,
    /// `allow` or `deny`.
    #[arg(long)]
    action: Option<String>,
    #[arg(long)]
    sha256: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// The tenant whose accesses to list (default: the fleet operator's).
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args)]
struct ConformanceArgs {
    /// Run through `sh -c`; `{broker}` becomes the kit's URL (also in FLEETSCAN_WORKER_BROKER).
    #[arg(long)]
    worker_command: String,
    /// Only these checks (repeatable): register, clean-file, eicar, chunked-large-file, cancel,
    /// credits, heartbeat, hash-mismatch, broker-restart.
    #[arg(long)]
    only: Vec<String>,
    /// Time limit of each check.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    check_timeout: std::time::Duration,
    /// How long a worker may stay silent before the heartbeat check fails (at most 15 s).
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    heartbeat_wait: std::time::Duration,
}

#[derive(Args)]
struct VerdictArgs {
    sha256: String,
    #[command(flatten)]
    client: ClientArgs,
}

impl PolicyArgs {
    fn apply(&self, p: &mut config::PolicySection) {
        if let Some(m) = self.fail_mode {
            p.fail_mode = m;
        }
        if let Some(d) = self.deadline_ms {
            p.decision_deadline_ms = d;
        }
        if let Some(s) = self.max_file_size {
            p.max_file_size = s;
        }
        if self.deny_oversize {
            p.oversize_action = Action::Deny;
        }
        if self.audit_only {
            p.audit_only = true;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    let mut config = config::load(cli.config.as_deref(), &config::process_env())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Config => {
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Broker(args) => {
            apply_broker_args(&mut config, &args);
            runtime.block_on(run_broker(config))
        }
        Command::Agent(args) => {
            apply_agent_args(&mut config, &args);
            runtime.block_on(run_agent(config))
        }
        Command::Worker(args) => {
            apply_worker_args(&mut config, &args);
            runtime.block_on(run_worker(config))
        }
        Command::Up(args) => {
            apply_up_args(&mut config, &args);
            runtime.block_on(run_up(config))
        }
        Command::Events(args) => runtime.block_on(admin::events(
            &args.client.broker,
            args.client.json,
            args.node,
            args.action.as_deref(),
            args.sha256,
            args.limit,
            args.tenant.as_deref(),
        )),
        Command::Verdict(args) => runtime.block_on(admin::verdict(
            &args.client.broker,
            args.client.json,
            &args.sha256,
        )),
        Command::Hosts(args) => runtime.block_on(admin::hosts(&args.broker, args.json)),
        Command::Workers(args) => runtime.block_on(admin::workers(&args.broker, args.json)),
        Command::Stats(args) => runtime.block_on(admin::stats(&args.broker, args.json)),
        Command::Conformance(args) => runtime.block_on(conformance(args)),
        Command::Bench(args) => {
            drop(runtime);
            fleetscan_bench::run(args)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEETSCAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn apply_broker_args(config: &mut Config, args: &BrokerArgs) {
    let b = &mut config.broker;
    if let Some(l) = args.listen {
        b.listen = l;
    }
    if let Some(s) = &args.store {
        b.store = s.clone();
    }
    if let Some(d) = &args.data_dir {
        b.data_dir = d.clone();
    }
    args.policy.apply(&mut b.policy);
}

fn apply_agent_args(config: &mut Config, args: &AgentArgs) {
    let a = &mut config.agent;
    if !args.brokers.is_empty() {
        a.brokers = args.brokers.clone();
    }
    a.protect = args.protect.clone();
    if let Some(n) = &args.node {
        a.node = n.clone();
    }
    if let Some(m) = args.fail_mode {
        a.fail_mode = m;
    }
    if let Some(d) = args.deadline_ms {
        a.decision_deadline_ms = d;
    }
    if args.no_ignore_marks {
        a.ignore_marks = false;
    }
}

fn apply_worker_args(config: &mut Config, args: &WorkerArgs) {
    let w = &mut config.worker;
    if !args.brokers.is_empty() {
        w.brokers = args.brokers.clone();
    }
    if let Some(e) = args.engine {
        w.engine = e;
    }
    if let Some(c) = &args.clamd {
        w.clamd = c.clone();
    }
    if args.rules.is_some() {
        w.rules_dir = args.rules.clone();
    }
    if args.blocklist.is_some() {
        w.blocklist = args.blocklist.clone();
    }
    if let Some(n) = &args.name {
        w.name = n.clone();
    }
    if let Some(p) = &args.pool {
        w.pool = p.clone();
    }
    if let Some(c) = args.credits {
        w.credits = c;
    }
}

fn apply_up_args(config: &mut Config, args: &UpArgs) {
    apply_broker_args(
        config,
        &BrokerArgs {
            listen: args.listen,
            store: args.store.clone(),
            data_dir: args.data_dir.clone(),
            policy: PolicyArgs::default(),
        },
    );
    args.policy.apply(&mut config.broker.policy);
    // One host, one process: the agent follows the broker's policy from the start.
    let p = &config.broker.policy;
    config.agent.fail_mode = p.fail_mode;
    config.agent.decision_deadline_ms = p.decision_deadline_ms;
    config.agent.max_file_size = p.max_file_size;
    config.agent.protect = args.protect.clone();
    if args.no_ignore_marks {
        config.agent.ignore_marks = false;
    }
    if args.rules.is_some() {
        config.worker.rules_dir = args.rules.clone();
    }
    if args.blocklist.is_some() {
        config.worker.blocklist = args.blocklist.clone();
    }
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM), and tells every component.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn bind_broker(
    config: &Config,
) -> anyhow::Result<(tokio::net::TcpListener, fleetscan_broker::Broker)> {
    let b = &config.broker;
    if b.store.is_empty() {
        std::fs::create_dir_all(&b.data_dir)
            .with_context(|| format!("creating data directory {}", b.data_dir.display()))?;
    }
    let broker = fleetscan_broker::Broker::new(b.to_broker_config())
        .await
        .context("starting the broker")?;
    let listener = tokio::net::TcpListener::bind(b.listen)
        .await
        .with_context(|| format!("binding {}", b.listen))?;
    Ok((listener, broker))
}

async fn run_broker(config: Config) -> anyhow::Result<()> {
    let (listener, broker) = bind_broker(&config).await?;
    let addr = listener.local_addr()?;
    println!("fleetscan broker listening on {addr}");
    let stop = shutdown_signal();
    broker.serve(listener, stopped(stop)).await?;
    Ok(())
}

fn reference_scanner(config: &Config) -> anyhow::Result<Arc<dyn fleetscan_worker::Scanner>> {
    let w = &config.worker;
    fleetscan_yara::reference_scanner(w.rules_dir.as_deref(), w.blocklist.as_deref())
        .context("loading the reference scanner")
}

async fn run_worker(config: Config) -> anyhow::Result<()> {
    let w = &config.worker;
    let worker_config = w.to_worker_config();
    let stop = shutdown_signal();
    match w.engine {
        config::Engine::Reference => {
            let scanner = reference_scanner(&config)?;
            let id = scanner.identity();
            println!(
                "fleetscan worker {} ({} {} rules {}) attaching to {}",
                worker_config.worker_name,
                id.engine,
                id.engine_version,
                id.ruleset_version,
                w.brokers.join(", ")
            );
            fleetscan_worker::run(worker_config, scanner, stopped(stop)).await?;
        }
        config::Engine::Clamav => {
            let addr: fleetscan_clamav::ClamdAddr = w
                .clamd
                .parse()
                .with_context(|| format!("--clamd {}", w.clamd))?;
            println!(
                "fleetscan worker {} (clamav via {addr}) attaching to {}",
                worker_config.worker_name,
                w.brokers.join(", ")
            );
            let options = fleetscan_clamav::ClamdOptions {
                ruleset_label: w.clamd_ruleset_label.clone(),
                ..Default::default()
            };
            fleetscan_clamav::run_worker(worker_config, addr, "clamav", options, stopped(stop))
                .await?;
        }
    }
    Ok(())
}

async fn run_agent(config: Config) -> anyhow::Result<()> {
    check_protect(&config.agent.protect)?;
    let agent = fleetscan_agent::Agent::start(config.agent.to_agent_config()?)
        .context("starting the agent (it needs root, or CAP_SYS_ADMIN, for fanotify)")?;
    println!(
        "fleetscan agent ready, protecting {:?}",
        config.agent.protect
    );
    let stop = shutdown_signal();
    agent.run(stopped(stop)).await?;
    Ok(())
}

async fn run_up(mut config: Config) -> anyhow::Result<()> {
    check_protect(&config.agent.protect)?;
    let scanner = reference_scanner(&config)?;
    let (listener, broker) = bind_broker(&config).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    config.worker.brokers = vec![url.clone()];
    config.agent.brokers = vec![url];
    println!(
        "fleetscan broker listening on {addr} (store {})",
        config.broker.store_url()
    );

    let stop = shutdown_signal();
    let (broker_stop_tx, broker_stop_rx) = watch::channel(false);
    let broker_task = tokio::spawn(broker.serve(listener, stopped(broker_stop_rx)));
    let worker_task = tokio::spawn(fleetscan_worker::run(
        config.worker.to_worker_config(),
        scanner,
        stopped(stop.clone()),
    ));
    let agent = fleetscan_agent::Agent::start(config.agent.to_agent_config()?)
        .context("starting the agent (it needs root, or CAP_SYS_ADMIN, for fanotify)")?;
    println!(
        "fleetscan agent ready, protecting {:?}",
        config.agent.protect
    );
    let agent_result = agent.run(stopped(stop)).await;
    // The agent has released the kernel; stop the rest in order.
    let worker_result = worker_task.await;
    let _ = broker_stop_tx.send(true);
    let broker_result = broker_task.await;
    agent_result?;
    worker_result.context("worker task")??;
    broker_result.context("broker task")??;
    Ok(())
}

async fn conformance(args: ConformanceArgs) -> anyhow::Result<()> {
    let results = fleetscan_conformance::run(fleetscan_conformance::ConformanceConfig {
        worker_command: args.worker_command,
        check_timeout: args.check_timeout,
        only: args.only,
        heartbeat_wait: args.heartbeat_wait,
        ..fleetscan_conformance::ConformanceConfig::default()
    })
    .await?;
    fleetscan_conformance::print_report(&results, &mut std::io::stdout().lock())?;
    if results.iter().any(|r| !r.passed) {
        bail!("the worker does not conform to the protocol");
    }
    Ok(())
}

fn check_protect(paths: &[PathBuf]) -> anyhow::Result<()> {
    if paths.is_empty() {
        bail!("nothing to protect: give at least one --protect PATH");
    }
    for p in paths {
        if !p.is_dir() {
            bail!("--protect {}: not a directory", p.display());
        }
    }
    Ok(())
}
