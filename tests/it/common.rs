//! Helpers shared by the end-to-end tests, and the gate that decides which of them may run
//! at the same time.

use std::path::Path;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use fleetscan_testkit::*;

/// A sandbox that starts this build's `fleetscan` binary.
pub fn sandbox() -> Sandbox {
    Sandbox::new(env!("CARGO_BIN_EXE_fleetscan"))
}

/// Lower-case hex SHA-256 of `data`, computed by `sha256sum` so the tests do not share code
/// with the system under test.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Writes `data` to `path` (creating or truncating it).
pub fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Runs the `fleetscan` binary with `args` and returns its standard output; panics on failure.
pub fn fleetscan(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetscan"))
        .args(args)
        .output()
        .expect("running fleetscan");
    assert!(
        out.status.success(),
        "fleetscan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tests of this binary run on parallel threads (as many as the machine has cores, two
/// here). Each takes its turn at this gate before it starts anything: most share it, but a test
/// that bounds how long something takes, that needs the next pid the kernel hands out, or that
/// starts a whole fleet, runs alone, so that no other test of this binary loads the machine or
/// forks beside it. Taken before the sandbox (whose watchdog's clock starts with it), held until
/// the test ends. `tokio`'s lock: fair (a waiting `alone` test is not starved by a stream of
/// shared ones), and not poisoned by a test that panics holding it.
static GATE: RwLock<()> = RwLock::const_new(());

/// A turn at the gate; the test holds it to its end (dropping it lets the next in).
pub struct Turn {
    _alone: Option<RwLockWriteGuard<'static, ()>>,
    _shared: Option<RwLockReadGuard<'static, ()>>,
}

/// Waits until no other test of this binary runs, and keeps it so.
pub async fn alone() -> Turn {
    Turn {
        _alone: Some(GATE.write().await),
        _shared: None,
    }
}

/// [`alone`], for a test that is not async.
pub fn alone_blocking() -> Turn {
    Turn {
        _alone: Some(GATE.blocking_write()),
        _shared: None,
    }
}

/// Waits until no test that must run alone runs (other shared tests may).
pub async fn shared() -> Turn {
    Turn {
        _alone: None,
        _shared: Some(GATE.read().await),
    }
}

/// [`shared`], for a test that is not async.
pub fn shared_blocking() -> Turn {
    Turn {
        _alone: None,
        _shared: Some(GATE.blocking_read()),
    }
}
