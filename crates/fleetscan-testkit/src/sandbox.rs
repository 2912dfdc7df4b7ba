//! The sandbox: processes of the real `fleetscan` binary (brokers, workers, agents) started
//! with their logs in the sandbox's directory, and the tmpfs and bind mounts they protect.
//!
//! It must never mark or mount outside its own directory, and never let a process it started
//! outlive it: Drop, the watchdog and the guard process (`cleanup`) each end them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cleanup::{Guard, Owned, Running, Teardown, start_time, watchdog};
use crate::command::{COMMAND_LIMIT, run_ok, run_with_deadline};
use crate::{block_on, host, require_root, wait_for_worker};

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

pub struct Sandbox {
    pub(crate) bin: PathBuf,
    dir: tempfile::TempDir,
    shared: Arc<Mutex<Owned>>,
    mounts: Vec<PathBuf>,
    pub(crate) counter: usize,
    /// The bridge and hosts, once the first host is asked for.
    pub(crate) net: Option<host::Net>,
    /// The guard that kills the processes and deletes the network resources if this process
    /// dies without Drop or the watchdog (SIGKILL): it reads one per line and acts at end of
    /// file.
    guard: Guard,
    /// `FLEETSCAN_LOG` of the processes it starts.
    log_filter: String,
}

impl Sandbox {
    /// A sandbox that starts `bin` (the `fleetscan` binary). Needs root.
    pub fn new(bin: impl Into<PathBuf>) -> Sandbox {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("fleetscan-sandbox-")
            .tempdir()
            .expect("creating the sandbox directory");
        let shared = Arc::new(Mutex::new(Owned::default()));
        let watched = Arc::clone(&shared);
        std::thread::spawn(move || watchdog(&watched));
        Sandbox {
            bin: bin.into(),
            dir,
            shared,
            mounts: Vec::new(),
            counter: 0,
            net: None,
            guard: Guard::default(),
            // Tests read the logs when they fail: every decision is logged.
            log_filter: std::env::var("FLEETSCAN_TEST_LOG")
                .unwrap_or_else(|_| "info,fleetscan=debug".to_owned()),
        }
    }

    /// Records a network resource for deletion: by Drop, by the watchdog, and by the guard
    /// process should this process die without either.
    pub(crate) fn tear_down_later(&mut self, t: Teardown) {
        let line = match &t {
            Teardown::Netns(name) => format!("netns {name}"),
            Teardown::Link(name) => format!("link {name}"),
        };
        self.guard.tell(&line);
        self.shared.lock().unwrap().teardown.push(t);
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
    pub(crate) fn spawn_command(
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
            self.guard.tell(&format!("pid {} {start}", proc.pid));
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
        self.guard.finish();
    }
}
