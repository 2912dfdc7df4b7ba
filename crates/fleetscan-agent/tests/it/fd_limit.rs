//! Descriptor exhaustion. Alone on the machine: it lowers the process's descriptor limit, which
//! every test of the binary shares (and puts it back after).
//!
//! Every access waiting for a decision holds the event's descriptor and its pidfd. When the
//! kernel cannot install one during `read(2)` it denies the access itself, whatever the
//! tenant's fail mode: the agent raises its soft `RLIMIT_NOFILE` to the hard limit at start so
//! that a burst of new files does not turn into silent denials.

use std::process::Command;
use std::time::Duration;

use fleetscan_core::FailMode;

use crate::support::*;

/// Sets this process's soft limit on open descriptors (the hard one stays) with `prlimit`.
fn set_soft_nofile(soft: u64) {
    let pid = std::process::id().to_string();
    let st = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={soft}:")])
        .status()
        .expect("prlimit (util-linux) is installed");
    assert!(st.success());
}

fn soft_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a descriptor limit");
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Puts the soft limit back when the test ends, however it ends.
struct Restore(u64);

impl Drop for Restore {
    fn drop(&mut self) {
        set_soft_nofile(self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_waiting_accesses_is_not_denied_by_descriptor_exhaustion() {
    let env = env_alone();
    let _restore = Restore(soft_nofile());
    // A low soft limit (the hard one stays), as under many service managers' default of 1,024,
    // scaled down to the burst below: 64, or a little above what this process holds open now
    // (so that the broker and the agent can start), far below the 200 the burst needs.
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    set_soft_nofile(64.max(open + 48));
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Open, 5000));
    let agent = run(config(
        &env,
        vec![broker.url()],
        FailMode::Open,
        Duration::from_millis(1500),
    ));
    wait_for("broker session", Duration::from_secs(5), || {
        agent.stats.snapshot().sessions >= 1
    })
    .await;
    let file = env.protected.join("burst.txt");
    std::fs::write(&file, b"burst").unwrap();
    // 100 openers at once, all waiting for the hung broker: 200 descriptors in the agent.
    let script = format!(
        "for i in $(seq 100); do (cat {f} >/dev/null 2>&1 || echo denied) & done; wait",
        f = file.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh").args(["-c", &script]).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let denied = stdout.matches("denied").count();
    assert_eq!(
        denied,
        0,
        "fail-open, yet {denied} of 100 opens were denied: {:?}",
        agent.stats.snapshot()
    );
    agent.stop().await;
}
