//! Verdicts: what one scanner, at one engine and rule-set version, said about one content.
//!
//! A verdict must never stand for another scanner identity than its own: two verdicts are
//! interchangeable only when scanner, engine, engine version and rule-set version are equal.

use serde::{Deserialize, Serialize};

use crate::Sha256;

/// What a scanner concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    Clean,
    Malicious,
    Suspicious,
    Error,
    Unsupported,
}

impl VerdictKind {
    /// Whether the content must be blocked on this verdict alone.
    pub fn blocks(self) -> bool {
        matches!(self, VerdictKind::Malicious | VerdictKind::Suspicious)
    }

    /// Whether the verdict says something lasting about the content, so it may be stored and
    /// reused. Errors and unsupported answers are not reused.
    pub fn is_conclusive(self) -> bool {
        matches!(
            self,
            VerdictKind::Clean | VerdictKind::Malicious | VerdictKind::Suspicious
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Clean => "clean",
            VerdictKind::Malicious => "malicious",
            VerdictKind::Suspicious => "suspicious",
            VerdictKind::Error => "error",
            VerdictKind::Unsupported => "unsupported",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "clean" => VerdictKind::Clean,
            "malicious" => VerdictKind::Malicious,
            "suspicious" => VerdictKind::Suspicious,
            "error" => VerdictKind::Error,
            "unsupported" => VerdictKind::Unsupported,
            _ => return None,
        })
    }
}

/// Which scanner made a verdict, at which versions. Two verdicts are interchangeable only when
/// their identities are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ScannerIdentity {
    pub scanner: String,
    pub engine: String,
    pub engine_version: String,
    pub ruleset_version: String,
}

/// One scanner's verdict on one content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub sha256: Sha256,
    pub scanner: ScannerIdentity,
    pub kind: VerdictKind,
    /// Set for malicious and suspicious verdicts.
    pub threat_name: Option<String>,
    pub detail: Option<String>,
    pub scanned_at_unix_ms: i64,
    pub scan_micros: u64,
}

/// The kind of access the kernel asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessKind {
    Open,
    Exec,
}

impl AccessKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessKind::Open => "open",
            AccessKind::Exec => "exec",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(AccessKind::Open),
            "exec" => Some(AccessKind::Exec),
            _ => None,
        }
    }
}
