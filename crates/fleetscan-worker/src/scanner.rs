//! The scanner contract a vendor implements, and the outcome of one scan.
//!
//! A scanner never sees the network or the broker: it gets bytes and returns an outcome. It is
//! called on a blocking thread, so it may take long, but it must never panic on hostile input
//! (a panic is reported as an error verdict, and the content is not scanned).

use fleetscan_core::{ScannerIdentity, VerdictKind};

/// What one scan of one content concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanOutcome {
    pub kind: VerdictKind,
    /// Set for malicious and suspicious outcomes.
    pub threat_name: Option<String>,
    /// Free text, e.g. why a scan failed.
    pub detail: Option<String>,
    /// For errors: whether another try, perhaps on another worker, may succeed.
    pub retryable: bool,
}

impl ScanOutcome {
    pub fn clean() -> Self {
        ScanOutcome {
            kind: VerdictKind::Clean,
            threat_name: None,
            detail: None,
            retryable: false,
        }
    }

    pub fn malicious(name: impl Into<String>) -> Self {
        ScanOutcome {
            kind: VerdictKind::Malicious,
            threat_name: Some(name.into()),
            detail: None,
            retryable: false,
        }
    }

    pub fn error(detail: impl Into<String>, retryable: bool) -> Self {
        ScanOutcome {
            kind: VerdictKind::Error,
            threat_name: None,
            detail: Some(detail.into()),
            retryable,
        }
    }
}

/// What a scanner vendor implements. Called on a blocking thread; may take long.
///
/// `identity` must be stable for as long as the scanner's verdicts are: a verdict is reused
/// only for the same scanner at the same engine and rule-set version.
pub trait Scanner: Send + Sync + 'static {
    fn identity(&self) -> ScannerIdentity;
    fn scan(&self, content: &[u8]) -> ScanOutcome;
}
