//! Benchmarks anyone can rerun; each prints a table. Ratios are measured side by side in one
//! run, because this kind of machine is shared and noisy.
//!
//! `fleetscan bench opens` opens every file of a generated corpus on a tmpfs of its own, with no
//! agent and then with `fleetscan up` protecting it, and prints opens per second and the p50/p99
//! latency of `open(2)` for each pass. It needs root (fanotify, mounts).
//!
//! `fleetscan bench jobs` drives `ScanService.ScanBytes` through an in-process broker and
//! workers with a null scanner, and prints jobs/s, MiB/s and latency (see [`jobs`]).

mod jobs;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetscan_testkit::{Sandbox, wait_for_host, wait_for_worker};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Opens per second through the agent: no agent, cold, warm, restarted, user-space cache.
    Opens(OpensArgs),
    /// Scan jobs per second through an in-process broker and workers (null scanner).
    Jobs(jobs::JobsArgs),
}

#[derive(Args)]
struct OpensArgs {
    /// Files in the corpus.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Smallest file, in bytes.
    #[arg(long, default_value_t = 1024)]
    min_size: u64,
    /// Largest file, in bytes (sizes are log-uniform in between).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_size: u64,
    /// Seed of the corpus generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.bench {
        Bench::Opens(a) => opens(&a),
        Bench::Jobs(a) => jobs::jobs(&a),
    }
}

/// A small deterministic generator (xorshift64*), so a corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn make_corpus(dir: &Path, a: &OpensArgs) -> anyhow::Result<(Vec<PathBuf>, u64)> {
    let mut rng = Rng(a.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (lo, hi) = (
        (a.min_size.max(1)) as f64,
        (a.max_size.max(a.min_size)) as f64,
    );
    let mut paths = Vec::with_capacity(a.files);
    let mut total = 0u64;
    for i in 0..a.files {
        let size = (lo * (hi / lo).powf(rng.unit())) as usize;
        let mut data = vec![0u8; size];
        for chunk in data.chunks_mut(8) {
            let r = rng.next().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let sub = dir.join(format!("d{:02}", i % 64));
        std::fs::create_dir_all(&sub)?;
        let path = sub.join(format!("f{i:05}.bin"));
        std::fs::write(&path, &data).with_context(|| format!("writing {}", path.display()))?;
        total += size as u64;
        paths.push(path);
    }
    Ok((paths, total))
}

struct Pass {
    name: &'static str,
    opens_per_sec: f64,
    p50: Duration,
    p99: Duration,
    failed: usize,
}

/// Opens, reads whole and closes every file once; times each `open(2)` and the whole pass.
fn pass(name: &'static str, paths: &[PathBuf]) -> Pass {
    let mut lat = Vec::with_capacity(paths.len());
    let mut buf = Vec::with_capacity(2 * 1024 * 1024);
    let mut failed = 0;
    let start = Instant::now();
    for p in paths {
        let t = Instant::now();
        match std::fs::File::open(p) {
            Ok(mut f) => {
                lat.push(t.elapsed());
                buf.clear();
                if f.read_to_end(&mut buf).is_err() {
                    failed += 1;
                }
            }
            Err(_) => {
                lat.push(t.elapsed());
                failed += 1;
            }
        }
    }
    let wall = start.elapsed();
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    Pass {
        name,
        opens_per_sec: paths.len() as f64 / wall.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        failed,
    }
}

fn start_up(
    sandbox: &mut Sandbox,
    name: &str,
    data: &Path,
    state: &Path,
    extra: &[&str],
) -> anyhow::Result<(fleetscan_testkit::Proc, String)> {
    let mut args = vec![
        "up".to_owned(),
        "--protect".to_owned(),
        data.display().to_string(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--data-dir".to_owned(),
        state.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let (proc, line) = sandbox.spawn(name, &args, "listening on");
    let addr = line
        .split_whitespace()
        .find(|w| w.parse::<std::net::SocketAddr>().is_ok())
        .context("no address in the broker's ready line")?
        .to_owned();
    let url = format!("http://{addr}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned();
    rt.block_on(async {
        wait_for_host(&url, &node).await;
        wait_for_worker(&url, None).await;
    });
    Ok((proc, url))
}

fn scans(url: &str) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(fleetscan_testkit::stats(url)).scans_started)
}

fn opens(a: &OpensArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the fleetscan binary")?;
    let mut sandbox = Sandbox::new(exe);
    let data = sandbox.tmpfs("corpus");
    let state = sandbox.dir().join("state");
    eprintln!("generating {} files ...", a.files);
    let (paths, total) = make_corpus(&data, a)?;

    let mut rows = vec![pass("no agent", &paths)];

    let (up, url) = start_up(&mut sandbox, "up-1", &data, &state, &[])?;
    rows.push(pass("agent cold (every file scanned)", &paths));
    let scanned = scans(&url)?;
    rows.push(pass("agent warm (kernel ignore marks)", &paths));
    let rescanned = scans(&url)? - scanned;
    sandbox.stop(&up);

    let (up2, url2) = start_up(&mut sandbox, "up-2", &data, &state, &["--no-ignore-marks"])?;
    rows.push(pass("agent restarted (verdicts in store)", &paths));
    rows.push(pass("agent warm (user-space cache only)", &paths));
    let scanned2 = scans(&url2)?;
    sandbox.stop(&up2);
    // Once more with no agent, so that a drift of the machine during the run shows.
    rows.push(pass("no agent (again, after the agent stopped)", &paths));
    drop(sandbox);

    // Ratios are against the mean of the two passes without an agent.
    let base = (rows[0].opens_per_sec + rows[rows.len() - 1].opens_per_sec) / 2.0;
    println!(
        "fleetscan bench opens: {} files, {}–{} bytes (mean {} KiB), tmpfs; a pass opens, reads and closes every file",
        paths.len(),
        a.min_size,
        a.max_size,
        total / paths.len().max(1) as u64 / 1024
    );
    println!(
        "{:<42} {:>10} {:>8} {:>11} {:>11} {:>7}",
        "pass", "opens/s", "ratio", "p50 open", "p99 open", "denied"
    );
    for r in &rows {
        println!(
            "{:<42} {:>10.0} {:>7.2}x {:>11} {:>11} {:>7}",
            r.name,
            r.opens_per_sec,
            r.opens_per_sec / base,
            fmt_dur(r.p50),
            fmt_dur(r.p99),
            r.failed
        );
    }
    println!(
        "scans: {scanned} on the cold pass, {rescanned} on the warm pass, {scanned2} after the restart"
    );
    Ok(())
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}
