//! The worker's side of `WorkerService.Attach`: connect, register, grant credits, take jobs,
//! answer them, reconnect when the broker goes, drain on shutdown. One session per broker,
//! each in its own task; they share the scan slots (`slots.rs`) and nothing else.
//!
//! This is the only module that speaks protocol types. It must never block the async threads
//! on a scan or a digest (both run on blocking threads), never hold more jobs than it granted
//! credits for, and never buffer more bytes of a job than the job declared or than
//! `max_file_size` allows.
//!
//! - `run`: [`run`], one task per broker, each reconnecting with backoff;
//! - `attach`: connecting and registering;
//! - `stream`: one attached stream, its event loop, credits and drain;
//! - `jobs`: a job's way through a stream, from its first message to its answer;
//! - `timing`: the protocol's timeouts.

use fleetscan_core::ScannerIdentity;
use fleetscan_proto::v1;

use crate::slots::ScanSlots;
use crate::{WorkerConfig, WorkerError};

mod attach;
mod jobs;
mod run;
mod stream;
#[cfg(test)]
mod tests;
mod timing;

pub use run::run;

/// What every session of one `run` shares, over all brokers.
struct RunContext {
    config: WorkerConfig,
    identity: ScannerIdentity,
    register: v1::Register,
    slots: std::sync::Arc<ScanSlots>,
    timing: timing::Timing,
}

/// How a session ended.
enum End {
    /// Shutdown was asked and the drain is over: `run` returns.
    Shutdown,
    /// Retrying cannot help.
    Fatal(WorkerError),
    /// The broker went or broke the protocol: reconnect.
    Lost { registered: bool, reason: String },
}

fn lost(registered: bool, reason: impl Into<String>) -> End {
    End::Lost {
        registered,
        reason: reason.into(),
    }
}
