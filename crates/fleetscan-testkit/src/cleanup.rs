//! What ends a sandbox's processes and deletes its network resources, whatever happens to the
//! test: [`Owned::kill_and_tear_down`] (by Drop, and by the watchdog past
//! [`crate::HARD_LIMIT`]), and the [`Guard`] process, which does the same should the test
//! process die without either (SIGKILL).
//!
//! It must never touch a process, link or namespace the sandbox did not create: processes are
//! known by pid *and* start time, so a reused pid is never hit.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::command::{COMMAND_LIMIT, run_with_deadline};
use crate::{HARD_LIMIT, Proc};

/// A process the sandbox started and has not reaped.
pub(crate) struct Running {
    pub(crate) proc: Proc,
    pub(crate) child: Child,
}

/// A network resource the sandbox created and must delete.
#[derive(Clone, Debug)]
pub(crate) enum Teardown {
    Netns(String),
    Link(String),
}

/// What the sandbox and its watchdog share: what to end, and whether the sandbox is over.
#[derive(Default)]
pub(crate) struct Owned {
    pub(crate) running: Vec<Running>,
    /// In creation order; deleted in reverse.
    pub(crate) teardown: Vec<Teardown>,
    pub(crate) finished: bool,
}

impl Owned {
    /// Kills every process (agents first: their groups close and release any opener at once),
    /// then deletes the links and namespaces. Used by Drop and by the watchdog.
    pub(crate) fn kill_and_tear_down(&mut self) {
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

/// The guard process: started on first use, told one line per process to kill or resource to
/// delete, and acting at the end of its standard input (see [`GUARD_SCRIPT`]).
#[derive(Default)]
pub(crate) struct Guard(Option<(Child, ChildStdin)>);

impl Guard {
    /// Hands the guard (started on first use) one line: a process to kill or a resource to
    /// delete should this process die without Drop or the watchdog.
    pub(crate) fn tell(&mut self, line: &str) {
        if self.0.is_none() {
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
            self.0 = Some((child, stdin));
        }
        if let Some((_, stdin)) = &mut self.0 {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .expect("telling the guard about a process or resource");
        }
    }

    /// Ends the guard once the sandbox has cleaned up itself: it deletes what is left and
    /// exits; waited for [`COMMAND_LIMIT`] at most, then killed.
    pub(crate) fn finish(&mut self) {
        if let Some((mut child, stdin)) = self.0.take() {
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

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, in clock ticks since boot):
/// with the pid, it names one process for good.
pub(crate) fn start_time(pid: u32) -> Option<String> {
    start_time_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn start_time_in(stat: &str) -> Option<String> {
    // The command name (field 2) may hold spaces and parentheses; the fields after it do not.
    let rest = &stat[stat.rfind(") ")? + 2..];
    rest.split(' ').nth(19).map(str::to_owned)
}

/// Kills everything past [`HARD_LIMIT`] and aborts the test process, unless the sandbox
/// finished first.
pub(crate) fn watchdog(shared: &Mutex<Owned>) {
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
