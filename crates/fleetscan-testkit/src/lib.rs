//! A sandbox for end-to-end tests and benchmarks: it starts the real `fleetscan` binary as
//! brokers, workers and agents, mounts filesystems of its own for them to protect, and tears
//! everything down again.
//!
//! Safety: an agent that stops answering permission events freezes whoever opens a file on its
//! filesystems. Every sandbox therefore has a watchdog thread that kills all its processes when
//! the sandbox outlives its hard limit (the kernel allows every pending event when an agent's
//! fanotify fd closes), and the sandbox only ever marks filesystems it mounted itself.
//!
//! Fleet tests add [`Host`]s (see [`host`]): network and mount namespaces of the sandbox's own,
//! on a bridge of its own. The links and namespaces it creates are deleted on drop and by the
//! watchdog. Should the test process die without either (SIGKILL), a guard process that notices
//! the end of its stdin kills the sandbox's processes (each known by pid *and* start time, so a
//! reused pid is never hit) and deletes the links and namespaces. The sandbox never touches a
//! process, link or namespace it did not create.

pub mod container;
pub mod host;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetscan_proto::v1;
use fleetscan_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

pub use host::{Host, HostCall};

/// The standard 68-byte EICAR anti-virus test file.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// How long any sandbox may live before its watchdog kills every process it started.
pub const HARD_LIMIT: Duration = Duration::from_secs(240);

/// Panics with a clear message unless the process runs as root (fanotify permission events and
/// mounts need it).
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test needs root: fanotify permission events and tmpfs mounts need CAP_SYS_ADMIN \
         (run the suite as root, as CI does)"
    );
}

/// One process the sandbox started.
#[derive(Clone, Debug)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
}

/// A broker process and where it listens.
#[derive(Clone, Debug)]
pub struct BrokerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub url: String,
}

struct Running {
    proc: Proc,
    child: Child,
}

/// A network resource the sandbox created and must delete.
#[derive(Clone, Debug)]
enum Teardown {
    Netns(String),
    Link(String),
}

#[derive(Default)]
struct Shared {
    running: Vec<Running>,
    /// In creation order; deleted in reverse.
    teardown: Vec<Teardown>,
    finished: bool,
}

impl Shared {
    /// Kills every process (agents first: their groups close and release any opener at once),
    /// then deletes the links and namespaces. Used by Drop and by the watchdog.
    fn kill_and_tear_down(&mut self) {
        self.running
            .sort_by_key(|r| !r.proc.name.starts_with("agent"));
        for r in &mut self.running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        self.running.clear();
        for t in self.teardown.drain(..).rev() {
            let mut cmd = Command::new("ip");
            match &t {
                Teardown::Netns(name) => cmd.args(["netns", "delete", name]),
                Teardown::Link(name) => cmd.args(["link", "delete", name]),
            };
            // Failure is normal here: deleting a namespace removes the veth end inside it, and
            // with it its peer.
            let _ = run_with_deadline(&mut cmd, COMMAND_LIMIT);
        }
    }
}

pub struct Sandbox {
    bin: PathBuf,
    dir: tempfile::TempDir,
    shared: Arc<Mutex<Shared>>,
    mounts: Vec<PathBuf>,
    counter: usize,
    /// The bridge and hosts, once the first host is asked for.
    net: Option<host::Net>,
    /// The guard that kills the processes and deletes the network resources if this process
    /// dies without Drop or the watchdog (SIGKILL): it reads one per line and acts at end of
    /// file.
    guard: Option<(Child, ChildStdin)>,
    /// `FLEETSCAN_LOG` of the processes it starts.
    log_filter: String,
}

/// How long one setup or teardown command (`ip`, `mount`) may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(20);

/// The guard's script: collect `pid PID STARTTIME`, `netns NAME` and `link NAME` lines until
/// end of file; then kill each process that is still the one started (same start time in
/// `/proc/PID/stat`), and delete the namespaces and links, newest first. It ignores the
/// terminal's signals, so that a Ctrl-C (sent to the whole process group) cannot stop it before
/// it has cleaned up.
const GUARD_SCRIPT: &str = r#"
trap '' INT TERM HUP QUIT
todo=''
while IFS=' ' read -r kind name start; do
    todo="$kind $name $start
$todo"
done
printf '%s' "$todo" | while IFS=' ' read -r kind name start; do
    [ "$kind" = pid ] || continue
    stat=$(cat "/proc/$name/stat" 2>/dev/null) || continue
    set -- ${stat##*) }
    [ "${20}" = "$start" ] && kill -KILL "$name"
done >/dev/null 2>&1
printf '%s' "$todo" | while IFS=' ' read -r kind name start; do
    case "$kind" in
        netns) timeout 10 ip netns delete "$name" ;;
        link) timeout 10 ip link delete "$name" ;;
    esac
done >/dev/null 2>&1
"#;

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, in clock ticks since boot):
/// with the pid, it names one process for good.
fn start_time(pid: u32) -> Option<String> {
    start_time_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn start_time_in(stat: &str) -> Option<String> {
    // The command name (field 2) may hold spaces and parentheses; the fields after it do not.
    let rest = &stat[stat.rfind(") ")? + 2..];
    rest.split(' ').nth(19).map(str::to_owned)
}

impl Sandbox {
    /// A sandbox that starts `bin` (the `fleetscan` binary). Needs root.
    pub fn new(bin: impl Into<PathBuf>) -> Sandbox {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("fleetscan-sandbox-")
            .tempdir()
            .expect("creating the sandbox directory");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let watched = Arc::clone(&shared);
        std::thread::spawn(move || watchdog(&watched));
        Sandbox {
            bin: bin.into(),
            dir,
            shared,
            mounts: Vec::new(),
            counter: 0,
            net: None,
            guard: None,
            // Tests read the logs when they fail: every decision is logged.
            log_filter: "info,fleetscan=debug".to_owned(),
        }
    }

    /// Records a network resource for deletion: by Drop, by the watchdog, and by the guard
    /// process should this process die without either.
    fn tear_down_later(&mut self, t: Teardown) {
        let line = match &t {
            Teardown::Netns(name) => format!("netns {name}"),
            Teardown::Link(name) => format!("link {name}"),
        };
        self.tell_guard(&line);
        self.shared.lock().unwrap().teardown.push(t);
    }

    /// Hands the guard (started on first use) one line: a process to kill or a resource to
    /// delete should this process die without Drop or the watchdog.
    fn tell_guard(&mut self, line: &str) {
        if self.guard.is_none() {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(GUARD_SCRIPT)
                .arg("fleetscan-sandbox-guard")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting the sandbox guard (sh): {e}"));
            let stdin = child.stdin.take().expect("piped stdin");
            self.guard = Some((child, stdin));
        }
        if let Some((_, stdin)) = &mut self.guard {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .expect("telling the guard about a process or resource");
        }
    }

    /// Sets `FLEETSCAN_LOG` for the processes started from now on (benchmarks use "info", so
    /// that a log line per decision is not part of what they measure).
    pub fn set_log_filter(&mut self, filter: &str) {
        self.log_filter = filter.to_owned();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn next(&mut self, what: &str) -> String {
        self.counter += 1;
        format!("{what}-{}", self.counter)
    }

    /// Mounts a fresh tmpfs under the sandbox and returns its path.
    pub fn tmpfs(&mut self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("creating a mount point");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2g,mode=0755", "tmpfs"])
                .arg(&path),
        );
        self.mounts.push(path.clone());
        path
    }

    /// Bind-mounts `source` at a new path under the sandbox and returns it.
    pub fn bind_mount(&mut self, source: &Path, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("creating a mount point");
        run_ok(Command::new("mount").arg("--bind").arg(source).arg(&path));
        self.mounts.push(path.clone());
        path
    }

    /// Starts `fleetscan <args>`, logs its stderr to `<dir>/<name>.log`, and waits (60 s at
    /// most) for a line of its standard output that contains `ready_marker`; returns that line.
    pub fn spawn(&mut self, name: &str, args: &[String], ready_marker: &str) -> (Proc, String) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).stdin(Stdio::null());
        self.spawn_command(name, cmd, ready_marker)
    }

    /// Like [`Sandbox::spawn`], for any command (its stdin is left as the caller set it).
    fn spawn_command(
        &mut self,
        name: &str,
        mut cmd: Command,
        ready_marker: &str,
    ) -> (Proc, String) {
        let log_path = self.dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("creating a log file");
        let mut child = cmd
            .env("FLEETSCAN_LOG", &self.log_filter)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let proc = Proc {
            name: name.to_owned(),
            pid: child.id(),
        };
        // Not reaped yet, so the pid is still this child's, dead or alive.
        if let Some(start) = start_time(proc.pid) {
            self.tell_guard(&format!("pid {} {start}", proc.pid));
        }
        self.shared.lock().unwrap().running.push(Running {
            proc: proc.clone(),
            child,
        });
        let (tx, rx) = mpsc::channel();
        let marker = ready_marker.to_owned();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains(&marker) {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => (proc, line),
            Err(_) => panic!(
                "{name} did not become ready (no `{ready_marker}` on stdout); its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    }

    /// Starts a broker on a free loopback port (or `addr`) with a SQLite store of its own,
    /// unless `args` name another.
    pub fn broker_on(&mut self, addr: &str, args: &[&str]) -> BrokerProc {
        let name = self.next("broker");
        let data = self.dir.path().join(&name);
        let mut full = vec![
            "broker".to_owned(),
            "--listen".to_owned(),
            addr.to_owned(),
            "--data-dir".to_owned(),
            data.display().to_string(),
        ];
        full.extend(args.iter().map(|s| (*s).to_owned()));
        let (proc, line) = self.spawn(&name, &full, "listening on");
        let addr: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in `{line}`"));
        BrokerProc {
            proc,
            addr,
            url: format!("http://{addr}"),
        }
    }

    pub fn broker(&mut self, args: &[&str]) -> BrokerProc {
        self.broker_on("127.0.0.1:0", args)
    }

    /// Starts a reference worker attached to `broker_url`, and waits until the broker lists it
    /// with credit.
    pub fn worker(&mut self, broker_url: &str, args: &[&str]) -> Proc {
        self.worker_on(&[broker_url], args)
    }

    /// Starts one worker serving every broker in `broker_urls` at once, and waits until each
    /// of them lists it.
    pub fn worker_on(&mut self, broker_urls: &[&str], args: &[&str]) -> Proc {
        let name = self.next("worker");
        let mut full = vec!["worker".to_owned()];
        for url in broker_urls {
            full.extend(["--broker".to_owned(), (*url).to_owned()]);
        }
        full.extend(["--name".to_owned(), name.clone()]);
        full.extend(args.iter().map(|s| (*s).to_owned()));
        let (proc, _) = self.spawn(&name, &full, "attaching to");
        for url in broker_urls {
            block_on(wait_for_worker(url, Some(&name)));
        }
        proc
    }

    /// Starts an agent named `node` protecting `protect`, connected to `brokers`, and waits
    /// until its marks are in place.
    pub fn agent(
        &mut self,
        node: &str,
        brokers: &[&str],
        protect: &[&Path],
        args: &[&str],
    ) -> Proc {
        let mut full = vec!["agent".to_owned(), "--node".to_owned(), node.to_owned()];
        for b in brokers {
            full.push("--broker".to_owned());
            full.push((*b).to_owned());
        }
        for p in protect {
            full.push("--protect".to_owned());
            full.push(p.display().to_string());
        }
        full.extend(args.iter().map(|s| (*s).to_owned()));
        let name = format!("agent-{node}-{}", self.counter);
        self.counter += 1;
        self.spawn(&name, &full, "agent ready").0
    }

    /// Kills a process with SIGKILL and reaps it.
    pub fn kill(&mut self, proc: &Proc) {
        let mut shared = self.shared.lock().unwrap();
        if let Some(i) = shared.running.iter().position(|r| r.proc.pid == proc.pid) {
            let mut r = shared.running.remove(i);
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }

    /// Asks a process to stop with SIGTERM and waits for it (10 s at most, then SIGKILL).
    /// Returns whether it exited successfully on its own.
    pub fn stop(&mut self, proc: &Proc) -> bool {
        let mut shared = self.shared.lock().unwrap();
        let Some(i) = shared.running.iter().position(|r| r.proc.pid == proc.pid) else {
            return false;
        };
        let mut r = shared.running.remove(i);
        drop(shared);
        let _ = Command::new("kill")
            .args(["-TERM", &r.proc.pid.to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = r.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = r.child.kill();
        let _ = r.child.wait();
        false
    }

    /// Sends `signal` (a name such as `STOP`, `CONT`, `TERM`) to a process of the sandbox.
    pub fn signal(&self, proc: &Proc, signal: &str) {
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(proc.pid.to_string()),
        );
    }

    /// The log (stderr) of a process, for assertions and failure messages.
    pub fn log(&self, proc: &Proc) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", proc.name)))
            .unwrap_or_default()
    }

    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("===== {} (last lines) =====", p.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.finished = true;
        shared.kill_and_tear_down();
        drop(shared);
        for m in self.mounts.iter().rev() {
            let _ = run_with_deadline(Command::new("umount").arg("-l").arg(m), COMMAND_LIMIT);
        }
        if let Some((mut child, stdin)) = self.guard.take() {
            // End of file: the guard deletes what is left (nothing, normally) and exits.
            drop(stdin);
            let start = Instant::now();
            while start.elapsed() < COMMAND_LIMIT {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn watchdog(shared: &Mutex<Shared>) {
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.finished {
            return;
        }
        if start.elapsed() > HARD_LIMIT {
            eprintln!(
                "sandbox watchdog: hard limit of {HARD_LIMIT:?} reached, killing everything and \
                 deleting the sandbox's namespaces and links"
            );
            s.kill_and_tear_down();
            std::process::abort();
        }
    }
}

/// Runs `cmd` to completion, killing it past `limit`. Setup and teardown commands must never
/// hang a test. Its output is read on threads of their own, so that a child writing more than
/// a pipe holds is not mistaken for a hung one.
fn run_with_deadline(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {limit:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Runs `cmd` with a deadline and panics unless it succeeds.
fn run_checked(cmd: &mut Command) {
    let out =
        run_with_deadline(cmd, COMMAND_LIMIT).unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` to completion from synchronous code: on the current tokio runtime when there is one
/// (a multi-threaded one: the caller's thread blocks), else on a new current-thread runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => tokio::task::block_in_place(|| h.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f),
    }
}

/// An admin client for the broker at `url`.
pub async fn admin(url: &str) -> AdminServiceClient<Channel> {
    let start = Instant::now();
    loop {
        match AdminServiceClient::connect(url.to_owned()).await {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("cannot connect to the broker at {url}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the broker at `url` lists a worker with credit: the one named `name`, or any.
pub async fn wait_for_worker(url: &str, name: Option<&str>) {
    let client = admin(url).await;
    let what = format!("worker {} to attach", name.unwrap_or("(any)"));
    eventually(Duration::from_secs(30), &what, || {
        let mut client = client.clone();
        let name = name.map(str::to_owned);
        async move {
            let workers = client
                .list_workers(v1::ListWorkersRequest {})
                .await
                .ok()?
                .into_inner()
                .workers;
            workers
                .iter()
                .any(|w| name.as_ref().is_none_or(|n| &w.worker_name == n) && w.credits > 0)
                .then_some(())
        }
    })
    .await;
}

/// Waits until the broker at `url` lists `node` as connected.
pub async fn wait_for_host(url: &str, node: &str) {
    let client = admin(url).await;
    eventually(
        Duration::from_secs(30),
        &format!("host {node} to connect"),
        || {
            let mut client = client.clone();
            async move {
                let hosts = client
                    .list_hosts(v1::ListHostsRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .hosts;
                hosts
                    .iter()
                    .any(|h| h.node == node && h.connected)
                    .then_some(())
            }
        },
    )
    .await;
}

/// The broker's counters.
pub async fn stats(url: &str) -> v1::Stats {
    admin(url)
        .await
        .get_stats(v1::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

/// Every recorded access of `tenant` at the broker at `url`, newest first (up to 1000).
pub async fn events_of(url: &str, tenant: &str) -> Vec<v1::AccessEvent> {
    list_events(url, Some(tenant)).await
}

/// Every recorded access of the broker at `url`, newest first (up to 1000).
pub async fn events(url: &str) -> Vec<v1::AccessEvent> {
    list_events(url, None).await
}

/// Waits up to 10 s until the broker at `url` has recorded an access of `tenant` to `path`, and
/// returns the newest such record.
pub async fn wait_for_event(url: &str, tenant: &str, path: &str) -> v1::AccessEvent {
    eventually(
        Duration::from_secs(10),
        &format!("{tenant}'s access to {path} to be recorded"),
        || async move {
            events_of(url, tenant)
                .await
                .into_iter()
                .find(|e| e.path == path)
        },
    )
    .await
}

/// Up to 1000 recorded accesses, newest first: `tenant`'s (named in the tenant header the
/// broker reads, [`fleetscan_proto::TENANT_HEADER`]), else the fleet operator's.
async fn list_events(url: &str, tenant: Option<&str>) -> Vec<v1::AccessEvent> {
    let mut request = tonic::Request::new(v1::ListEventsRequest {
        limit: 1000,
        ..Default::default()
    });
    if let Some(tenant) = tenant {
        request.metadata_mut().insert(
            fleetscan_proto::TENANT_HEADER,
            tenant.parse().expect("a tenant name is a header value"),
        );
    }
    admin(url)
        .await
        .list_events(request)
        .await
        .expect("ListEvents")
        .into_inner()
        .events
}

/// The outcome of opening a file from this process: how long `open` took, and its error.
#[derive(Debug)]
pub struct OpenOutcome {
    pub elapsed: Duration,
    pub result: std::io::Result<Vec<u8>>,
}

impl OpenOutcome {
    pub fn denied(&self) -> bool {
        matches!(&self.result, Err(e) if matches!(e.raw_os_error(), Some(1 | 13)))
    }
}

/// Opens and reads `path` on a blocking thread, timing the open.
pub async fn open_file(path: impl Into<PathBuf>) -> OpenOutcome {
    let path = path.into();
    tokio::task::spawn_blocking(move || open_timed(&path))
        .await
        .expect("open task")
}

/// Opens and reads `path` from the calling thread, timing the open.
pub fn open_timed(path: &Path) -> OpenOutcome {
    use std::io::Read;
    let start = Instant::now();
    let result = std::fs::File::open(path).and_then(|mut f| {
        let elapsed = start.elapsed();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok((elapsed, buf))
    });
    match result {
        Ok((elapsed, buf)) => OpenOutcome {
            elapsed,
            result: Ok(buf),
        },
        Err(e) => OpenOutcome {
            elapsed: start.elapsed(),
            result: Err(e),
        },
    }
}

/// The workers attached to the broker at `url`.
pub async fn workers(url: &str) -> Vec<v1::Worker> {
    admin(url)
        .await
        .list_workers(v1::ListWorkersRequest {})
        .await
        .expect("ListWorkers")
        .into_inner()
        .workers
}

/// The scans the workers attached to the broker at `url` have finished (their `jobs_done`).
pub async fn jobs_done(url: &str) -> u64 {
    workers(url).await.iter().map(|w| w.jobs_done).sum()
}

/// The scans the workers serving `tenant` at the broker at `url` have finished.
pub async fn jobs_done_of(url: &str, tenant: &str) -> u64 {
    workers(url)
        .await
        .iter()
        .filter(|w| w.tenants.iter().any(|t| t == tenant))
        .map(|w| w.jobs_done)
        .sum()
}

/// The hosts the broker at `url` knows.
pub async fn hosts(url: &str) -> Vec<v1::Host> {
    admin(url)
        .await
        .list_hosts(v1::ListHostsRequest {})
        .await
        .expect("ListHosts")
        .into_inner()
        .hosts
}

/// Whether the broker at `url` lists `node` as connected now.
pub async fn is_connected(url: &str, node: &str) -> bool {
    hosts(url)
        .await
        .iter()
        .any(|h| h.node == node && h.connected)
}

/// Runs `sql`, a query returning one integer (such as `SELECT count(*) FROM verdicts`), on the
/// Postgres database at `url`: counts read from the store itself, not through the broker.
pub async fn pg_count(url: &str, sql: &str) -> i64 {
    use sqlx::Connection as _;
    let limit = Duration::from_secs(20);
    let work = async {
        let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
        conn.close().await?;
        Ok::<_, sqlx::Error>(n)
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => panic!("`{sql}` on postgres failed: {e}"),
        Err(_) => panic!("`{sql}` on postgres took more than {limit:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_start_time_is_read_past_its_command_name() {
        let ours = start_time(std::process::id()).expect("our own start time");
        assert!(ours.parse::<u64>().is_ok(), "{ours}");
        assert_eq!(start_time(u32::MAX), None);
        // A command name with spaces and parentheses does not shift the fields.
        let stat = "42 (a) (b c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        assert_eq!(start_time_in(stat).as_deref(), Some("987654"));
    }
}
