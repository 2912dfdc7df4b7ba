//! The vendor's worker process: started through `sh -c` in a process group of its own, its
//! output kept (the last lines) to explain a failure, and killed as a whole group afterwards.
//!
//! A group of its own because `sh -c` may fork rather than exec, and a worker may start helpers
//! (a scanning daemon): killing the group is what makes sure nothing outlives the check. This
//! module must never signal anything but that group, which consists of processes the kit
//! started.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Lines of the worker's output kept for failure details.
const TAIL_LINES: usize = 8;
/// A line longer than this is cut in the tail: the detail is one report line.
const TAIL_LINE_CHARS: usize = 240;
/// How long to wait for the killed group's leader to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// The environment variable that carries the kit's URL to the worker.
pub(crate) const BROKER_ENV: &str = "FLEETSCAN_WORKER_BROKER";

/// The command line `sh -c` runs: `{broker}` replaced by the kit's URL.
pub(crate) fn command_line(template: &str, broker_url: &str) -> String {
    template.replace("{broker}", broker_url)
}

type Tail = Arc<Mutex<VecDeque<String>>>;

pub(crate) struct WorkerProcess {
    child: Child,
    /// The group the worker runs in (the id of `sh`, its leader); None once killed.
    group: Option<Pid>,
    exited: Option<String>,
    tail: Tail,
    readers: Vec<JoinHandle<()>>,
}

impl WorkerProcess {
    pub(crate) fn spawn(template: &str, broker_url: &str) -> std::io::Result<WorkerProcess> {
        let line = command_line(template, broker_url);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .env(BROKER_ENV, broker_url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // A backstop only: `kill` below signals the whole group.
            .kill_on_drop(true)
            .spawn()?;
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        debug!(command = %line, pid = ?child.id(), "worker started");
        let tail: Tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(keep_tail(out, "stdout", tail.clone())));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(keep_tail(err, "stderr", tail.clone())));
        }
        Ok(WorkerProcess {
            child,
            group,
            exited: None,
            tail,
            readers,
        })
    }

    /// Resolves when the worker's shell exits, with a description of how. Cancel safe.
    pub(crate) async fn exited(&mut self) -> String {
        if let Some(how) = &self.exited {
            return how.clone();
        }
        let how = match self.child.wait().await {
            Ok(status) => describe(status),
            Err(e) => format!("could not be waited for: {e}"),
        };
        self.exited = Some(how.clone());
        how
    }

    /// Whether the worker has exited, without waiting.
    pub(crate) fn has_exited(&mut self) -> Option<String> {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(describe(status));
        }
        self.exited.clone()
    }

    /// Waits (at most `limit`) until the output readers have reached the end of both pipes, so
    /// that the tail of an exited worker is complete: its exit can be seen before the last
    /// lines it wrote are read.
    pub(crate) async fn finish_output(&mut self, limit: std::time::Duration) {
        let readers = std::mem::take(&mut self.readers);
        let _ = tokio::time::timeout(limit, join_all(readers)).await;
    }

    /// The last lines the worker printed, joined into one line.
    pub(crate) fn output_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// Kills the worker's whole group and reaps its shell.
    pub(crate) async fn kill(mut self) {
        self.kill_group();
        if tokio::time::timeout(REAP_WAIT, self.child.wait())
            .await
            .is_err()
        {
            warn!("worker shell not reaped after SIGKILL");
        }
        for reader in &self.readers {
            // A helper that left the group may still hold the pipes; the tail is no longer needed.
            reader.abort();
        }
    }

    fn kill_group(&mut self) {
        let Some(group) = self.group.take() else {
            return;
        };
        // Signalled before the shell is reaped whenever the worker is still running, so the
        // group id cannot have been reused. If the shell already exited and was reaped, any
        // helper left in the group still pins the id; with none left, the kill finds nothing
        // (a reuse would need the pid space to wrap around in between).
        match kill_process_group(group, Signal::KILL) {
            Ok(()) => debug!(group = group.as_raw_nonzero().get(), "worker group killed"),
            Err(rustix::io::Errno::SRCH) => {}
            Err(e) => {
                warn!(group = group.as_raw_nonzero().get(), error = %e, "could not kill the worker group")
            }
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // A run abandoned midway (its future dropped) must not leave the worker running.
        self.kill_group();
        for reader in &self.readers {
            reader.abort();
        }
    }
}

fn describe(status: ExitStatus) -> String {
    status.to_string()
}

async fn keep_tail(stream: impl AsyncRead + Unpin, name: &'static str, tail: Tail) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        debug!(stream = name, line = %line, "worker output");
        let mut cut: String = line.chars().take(TAIL_LINE_CHARS).collect();
        if cut.len() < line.len() {
            cut.push('…');
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(cut);
    }
}

async fn join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_placeholder_is_replaced_everywhere() {
        assert_eq!(
            command_line("w --broker {broker} --x={broker}", "http://127.0.0.1:9"),
            "w --broker http://127.0.0.1:9 --x=http://127.0.0.1:9"
        );
        assert_eq!(command_line("w", "http://a"), "w");
    }

    #[tokio::test]
    async fn output_exit_status_and_environment_are_seen() {
        let mut p =
            WorkerProcess::spawn("echo \"$FLEETSCAN_WORKER_BROKER\" {broker}; exit 3", "u1")
                .unwrap();
        let how = tokio::time::timeout(Duration::from_secs(10), p.exited())
            .await
            .unwrap();
        assert!(how.contains('3'), "{how}");
        assert_eq!(p.has_exited().as_deref(), Some(how.as_str()));
        // The readers may still be draining the pipe after the exit.
        for _ in 0..100 {
            if !p.output_tail().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(p.output_tail(), "u1 u1");
        p.kill().await;
    }

    /// Processes of the group that are alive (zombies excepted: an orphan is reaped by
    /// whatever the machine's init is, perhaps never in a container).
    fn live_members(group: i32) -> Vec<i32> {
        let mut live = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // After the command name in parentheses: state, ppid, pgrp, ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() > 2 && fields[2] == group.to_string() && fields[0] != "Z" {
                live.push(pid);
            }
        }
        live
    }

    #[tokio::test]
    async fn kill_ends_the_whole_group() {
        // The shell forks a background sleeper and a foreground one: both must die.
        let mut p = WorkerProcess::spawn("sleep 300 & sleep 300", "u").unwrap();
        assert!(p.has_exited().is_none());
        let group = p.group.unwrap().as_raw_nonzero().get();
        for _ in 0..100 {
            if live_members(group).len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(live_members(group).len() >= 2, "the sleepers never started");
        p.kill().await;
        let mut left = live_members(group);
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = live_members(group);
        }
        assert!(
            left.is_empty(),
            "still alive in the worker's group: {left:?}"
        );
    }
}
