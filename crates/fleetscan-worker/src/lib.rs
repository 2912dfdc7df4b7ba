//! The fleetscan worker SDK: what a scanner vendor links to serve a broker's scan jobs.
//!
//! A vendor implements [`Scanner`] (an identity and a blocking `scan` of one content) and calls
//! [`run`], which attaches to every broker of [`WorkerConfig::brokers`] over
//! `WorkerService.Attach` (one stream each), registers, grants credits, reassembles and
//! verifies each job's content, scans it on a blocking thread and answers. Scans of all
//! brokers share `credits` slots. Each stream reconnects with backoff on its own when its
//! broker goes, and every one drains its in-flight scans on shutdown.
//!
//! Also here: [`Sha256List`], a scanner that blocks the contents listed by digest, and
//! [`Composite`], several scanners presented to the broker as one.
//!
//! This crate never decides an access and never stores a verdict: it only answers jobs. It
//! speaks protocol types only in `session`, the gRPC edge; `slots` runs the scans.

#![forbid(unsafe_code)]

mod assembly;
mod composite;
mod config;
mod error;
mod scanner;
mod session;
mod sha256_list;
mod slots;

pub use composite::Composite;
pub use config::WorkerConfig;
pub use error::WorkerError;
pub use scanner::{ScanOutcome, Scanner};
pub use session::run;
pub use sha256_list::{ListError, Sha256List};

/// Shortens a digest to the hex prefix used in version labels: long enough that two rule sets
/// never collide by chance, short enough to read in a log line.
pub(crate) fn short_digest(digest: &fleetscan_core::Sha256) -> String {
    digest.to_hex()[..16].to_owned()
}
