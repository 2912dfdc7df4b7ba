//! Benchmarks anyone can rerun; each prints a table. Ratios are measured side by side in one
//! run, because this kind of machine is shared and noisy.
//!
//! `fleetscan bench opens` opens every file of a generated corpus on a tmpfs of its own, with no
//! agent, then with `fleetscan up` protecting it (cold, warm), then a copy of the corpus on a
//! second tmpfs protected by a second agent against the same broker (fleet-warm: a second host
//! whose content was judged on the first), and prints opens per second and the p50/p99 latency
//! of `open(2)` for each pass. It needs root (fanotify, mounts).
//!
//! `fleetscan bench jobs` drives `ScanService.ScanBytes` through an in-process broker and
//! workers with a null scanner, then hands contents to the broker's engine directly (broker ->
//! worker -> broker alone), small and large, and prints jobs/s, MiB/s and latency (see
//! [`jobs`]).
//!
//! `fleetscan bench broker` drives a real broker process with synthetic agent sessions asking
//! about already-judged content, and prints decisions/s, decisions per broker CPU-second and
//! latency (see [`broker`]).

mod broker;
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
    /// Opens per second through the agent: no agent, cold, warm, fleet-warm, restarted,
    /// user-space cache.
    Opens(OpensArgs),
    /// Scan jobs per second through an in-process broker and workers (null scanner).
    Jobs(jobs::JobsArgs),
    /// Decisions per second of a broker process for synthetic agents asking about known content.
    Broker(broker::BrokerArgs),
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
    /// Passes of each repeatable row (no agent, warm, fleet-warm, user-space cache); the table
    /// shows the median rate.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.bench {
        Bench::Opens(a) => opens(&a),
        Bench::Jobs(a) => jobs::jobs(&a),
        Bench::Broker(a) => broker::broker(&a),
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

/// One timed pass over a corpus.
struct Pass {
    wall: Duration,
    /// Latency of every `open(2)`, sorted.
    lat: Vec<Duration>,
    failed: usize,
}

/// Opens, reads whole and closes every file once; times each `open(2)` and the whole pass.
/// With `hash`, also the SHA-256 of every file's content after reading it: the work no
/// fleet-warm open can avoid (the agent must hash the content to ask for its verdict).
fn pass(paths: &[PathBuf], hash: bool) -> Pass {
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
                if hash {
                    std::hint::black_box(fleetscan_core::Sha256::of(&buf));
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
    Pass { wall, lat, failed }
}

/// One line of the table: one or more passes of the same kind.
struct Row {
    name: &'static str,
    passes: Vec<Pass>,
}

impl Row {
    fn new(name: &'static str, passes: Vec<Pass>) -> Row {
        Row { name, passes }
    }

    /// The median rate of the row's passes: one slow pass (another process took the core)
    /// does not move it.
    fn opens_per_sec(&self) -> f64 {
        median(
            self.passes
                .iter()
                .map(|p| p.lat.len() as f64 / p.wall.as_secs_f64()),
        )
    }

    /// A percentile of `open(2)` latency over every open of every pass of the row.
    fn percentile(&self, q: f64) -> Duration {
        let mut all: Vec<Duration> = self
            .passes
            .iter()
            .flat_map(|p| p.lat.iter().copied())
            .collect();
        all.sort_unstable();
        all.get(((all.len().max(1) as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }

    fn failed(&self) -> usize {
        self.passes.iter().map(|p| p.failed).sum()
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// `rounds` passes over `paths`, each as [`pass`].
fn passes(rounds: usize, paths: &[PathBuf], hash: bool) -> Vec<Pass> {
    (0..rounds).map(|_| pass(paths, hash)).collect()
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
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned();
    block_on(async {
        wait_for_host(&url, &node).await;
        wait_for_worker(&url, None).await;
    })?;
    Ok((proc, url))
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

fn stats(url: &str) -> anyhow::Result<fleetscan_proto::v1::Stats> {
    block_on(fleetscan_testkit::stats(url))
}

fn opens(a: &OpensArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.files >= 1, "--files must be at least 1");
    let rounds = a.rounds.max(1);
    let exe = std::env::current_exe().context("locating the fleetscan binary")?;
    let mut sandbox = Sandbox::new(exe);
    sandbox.set_log_filter("info");
    let data = sandbox.tmpfs("host-1");
    let data2 = sandbox.tmpfs("host-2");
    let state = sandbox.dir().join("state");
    eprintln!("generating {} files ...", a.files);
    let (paths, total) = make_corpus(&data, a)?;
    // Host 2 gets the same files (same seed, same content) written the same way: a plain copy
    // lays its pages out differently and reads measurably faster, which would skew the
    // comparisons between the two filesystems.
    let (paths2, _) = make_corpus(&data2, a)?;

    // Host 1's corpus and host 2's copy alternate with no agent at all: the control that shows
    // how far apart the two filesystems are when nothing protects either.
    let (mut first, mut first_copy) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        first.push(pass(&paths, false));
        first_copy.push(pass(&paths2, false));
    }
    let mut rows = vec![
        Row::new("no agent", first),
        Row::new("no agent (host 2's copy, control)", first_copy),
    ];

    let (up, url) = start_up(&mut sandbox, "up-1", &data, &state, &[])?;
    rows.push(Row::new(
        "agent cold (host 1, every file scanned)",
        vec![pass(&paths, false)],
    ));
    let cold = rows.len() - 1;
    let scanned = stats(&url)?.scans_started;
    // Warm passes alternate with passes over host 2's copy, which no agent protects yet: a
    // baseline taken at the same moments, so that the load of a shared machine hits both alike.
    let (mut warm_passes, mut beside) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        beside.push(pass(&paths2, false));
        warm_passes.push(pass(&paths, false));
    }
    rows.push(Row::new(
        "agent warm (host 1 again, kernel ignore marks)",
        warm_passes,
    ));
    let warm = rows.len() - 1;
    rows.push(Row::new(
        "no agent (host 2's copy, alternating with warm)",
        beside,
    ));
    let beside = rows.len() - 1;
    let rescanned = stats(&url)?.scans_started - scanned;

    // Host 2: its own filesystem with the same files, its own agent with an empty
    // cache, the broker that judged host 1's files. Every open is hashed by the agent and
    // answered from the broker's memory cache. A fresh agent per round, so each round is
    // "fleet-warm" again (a stopped agent's ignore marks and cache die with it).
    let before = stats(&url)?;
    let mut fleet = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let node = format!("bench-host-2-{r}");
        let agent = sandbox.agent(&node, &[url.as_str()], &[data2.as_path()], &[]);
        block_on(wait_for_host(&url, &node))?;
        fleet.push(pass(&paths2, false));
        sandbox.stop(&agent);
    }
    let after = stats(&url)?;
    rows.push(Row::new(
        "fleet-warm (host 2, fresh agent, judged on host 1)",
        fleet,
    ));
    let fleet_warm = rows.len() - 1;
    rows.push(Row::new(
        "floor: no agent, + SHA-256 of each file by the opener",
        passes(rounds, &paths2, true),
    ));
    let floor = rows.len() - 1;
    sandbox.stop(&up);

    let (up2, url2) = start_up(&mut sandbox, "up-2", &data, &state, &["--no-ignore-marks"])?;
    rows.push(Row::new(
        "agent restarted (verdicts in store)",
        vec![pass(&paths, false)],
    ));
    rows.push(Row::new(
        "agent warm (user-space cache only)",
        passes(rounds, &paths, false),
    ));
    let scanned2 = stats(&url2)?.scans_started;
    sandbox.stop(&up2);
    // Once more with no agent, so that a drift of the machine during the run shows.
    rows.push(Row::new(
        "no agent (again, after the agents stopped)",
        passes(rounds, &paths, false),
    ));
    drop(sandbox);

    // Ratios are against the median of every pass without an agent (first and last rows).
    let base = median(
        [&rows[0], &rows[rows.len() - 1]]
            .iter()
            .flat_map(|r| r.passes.iter())
            .map(|p| p.lat.len() as f64 / p.wall.as_secs_f64()),
    );
    println!(
        "fleetscan bench opens: {} files, {}–{} bytes (mean {} KiB), tmpfs; a pass opens, reads \
         and closes every file; rows of {rounds} passes show the median rate and the latency \
         percentiles of all their opens",
        paths.len(),
        a.min_size,
        a.max_size,
        total / paths.len() as u64 / 1024
    );
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.name.to_owned(),
                r.passes.len().to_string(),
                format!("{:.0}", r.opens_per_sec()),
                format!("{:.2}x", r.opens_per_sec() / base),
                fmt_dur(r.percentile(0.50)),
                fmt_dur(r.percentile(0.99)),
                r.failed().to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        results_table(
            &[
                "pass", "passes", "opens/s", "ratio", "p50 open", "p99 open", "denied"
            ],
            table
        )
    );
    let fleet_decisions = after.decisions - before.decisions;
    println!(
        "scans: {scanned} on the cold pass, {rescanned} on the warm passes, {} on the fleet-warm \
         passes ({fleet_decisions} broker decisions, {} from its memory cache), {scanned2} after \
         the restart",
        after.scans_started - before.scans_started,
        after.cache_hits - before.cache_hits,
    );
    // The two filesystems differ a little even with no agent (the control rows): the
    // alternating comparison is corrected by that difference.
    let alternating = rows[warm].opens_per_sec() / rows[beside].opens_per_sec();
    let control = rows[0].opens_per_sec() / rows[1].opens_per_sec();
    println!(
        "warm ÷ no agent = {:.2}x; ÷ the alternating no-agent passes = {alternating:.2}x, \
         corrected by the control ({control:.2}x) = {:.2}x (goal ≥ 0.95x); fleet-warm ÷ cold = \
         {:.1}x (goal ≥ 20x); the floor (no agent, the opener hashing each file: the least a \
         fleet-warm open can cost) ÷ cold = {:.1}x",
        rows[warm].opens_per_sec() / base,
        alternating / control,
        rows[fleet_warm].opens_per_sec() / rows[cold].opens_per_sec(),
        rows[floor].opens_per_sec() / rows[cold].opens_per_sec()
    );
    Ok(())
}

/// A results table: the first column names the row, the others are numbers, aligned right;
/// `comfy-table` sizes the columns, with no borders and no wrapping.
fn results_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_header(header.to_vec())
        .add_rows(rows);
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if i > 0 {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t.trim_fmt()
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_results_table_names_rows_on_the_left_and_numbers_on_the_right() {
        let text = results_table(
            &["row", "jobs/s"],
            vec![
                vec!["small".into(), "12345".into()],
                vec!["a longer row".into(), "7".into()],
            ],
        );
        assert_eq!(
            text,
            "row           jobs/s\nsmall          12345\na longer row       7"
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }

    #[test]
    fn a_corpus_is_the_same_for_the_same_seed_and_sized_within_bounds() {
        let args = OpensArgs {
            files: 20,
            min_size: 100,
            max_size: 5000,
            seed: 7,
            rounds: 1,
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pa, total) = make_corpus(a.path(), &args).unwrap();
        let (pb, _) = make_corpus(b.path(), &args).unwrap();
        assert_eq!(pa.len(), 20);
        let mut sum = 0;
        for (x, y) in pa.iter().zip(&pb) {
            let (dx, dy) = (std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
            assert_eq!(dx, dy);
            assert!((100..=5000).contains(&dx.len()), "{}", dx.len());
            sum += dx.len() as u64;
        }
        assert_eq!(sum, total);
        for (x, y) in pa.iter().zip(&pb) {
            assert_eq!(
                x.strip_prefix(a.path()).unwrap(),
                y.strip_prefix(b.path()).unwrap(),
                "host 2's files have host 1's relative paths"
            );
        }
    }
}
