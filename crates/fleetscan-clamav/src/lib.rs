//! A fleetscan scanner backed by ClamAV's `clamd`.
//!
//! [`ClamdScanner`] implements [`fleetscan_worker::Scanner`]: each content goes to clamd over
//! its unix socket (or TCP on loopback) with `zINSTREAM`, in length-prefixed chunks, and
//! clamd's one-line reply becomes the verdict. The identity is scanner = the configured name,
//! engine = "clamav", engine_version = the ClamAV version and ruleset_version = the database
//! version, all from clamd's `VERSION`. [`run_worker`] is the whole worker: the SDK's
//! [`fleetscan_worker::run`] with a `ClamdScanner`, registered again whenever clamd's versions
//! change (a database reload), so the broker stops reusing the older verdicts.
//!
//! This crate never reads the files it is asked about from disk (content goes over the
//! socket) and never answers clean unless clamd said `OK`: a lost connection, a timeout or a
//! reply it does not understand is an error verdict. It never downloads signatures (no
//! freshclam): clamd's database is the operator's.
//!
//! Feature `testing` adds [`testing::Clamd`], a throw-away clamd with a signature database the
//! test writes, for tests of this and other crates.

#![forbid(unsafe_code)]

mod client;
mod protocol;
mod scanner;
#[cfg(feature = "testing")]
pub mod testing;
mod worker;

pub use client::{ClamdAddr, ClamdError};
pub use protocol::{ClamdVersion, ParseError, ScanReply, UNOFFICIAL_SUFFIX};
pub use scanner::{ClamdOptions, ClamdScanner, ENGINE, UNVERSIONED_RULESET};
pub use worker::{ClamdWorkerError, run_worker};
