//! Setup and teardown commands (`ip`, `mount`, `kill`) run from the sandbox.
//!
//! It must never let a command hang a test: [`run_with_deadline`] kills one past its limit.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one setup or teardown command (`ip`, `mount`) may run.
pub(crate) const COMMAND_LIMIT: Duration = Duration::from_secs(20);

/// Runs `cmd` to completion, killing it past `limit`. Setup and teardown commands must never
/// hang a test. Its output is read on threads of their own, so that a child writing more than
/// a pipe holds is not mistaken for a hung one.
pub(crate) fn run_with_deadline(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
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
pub(crate) fn run_checked(cmd: &mut Command) {
    let out =
        run_with_deadline(cmd, COMMAND_LIMIT).unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
