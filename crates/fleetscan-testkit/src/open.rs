//! Opening a file as a process under test would: from this process, timing the `open(2)` an
//! agent holds until it decides.
//!
//! It must never open from an async thread: a held open would block the runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
