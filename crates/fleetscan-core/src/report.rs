//! What an agent reports of an access it decided itself (no broker decision): the answer, why
//! the agent gave it, and what was accessed by whom. The broker records it.
//!
//! A plain value: made by the agent after it answered the kernel, converted to the protocol's
//! `AccessReport` at its session edge.

use crate::{AccessKind, Action, Sha256, Subject};

/// Why an agent decided an access itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LocalReason {
    /// A cached decision for the same file identity.
    Cached,
    /// No decision in time (or no room to wait for one); the fail mode decided.
    Deadline,
    /// The file is larger than the policy's maximum.
    Oversize,
    /// The file could not be read.
    Unreadable,
    /// No broker session, or it was lost; the fail mode decided.
    NoBroker,
    /// The broker's decision could not be read (no action); the fail mode decided.
    MalformedDecision,
}

/// An access an agent decided itself; see the module header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReport {
    pub at_unix_ms: i64,
    pub action: Action,
    pub reason: LocalReason,
    /// The content's digest, when it was hashed.
    pub sha256: Option<Sha256>,
    pub subject: Subject,
    /// As the opening process sees it.
    pub path: String,
    /// As the host sees it, where it differs from `path`; empty otherwise.
    pub host_path: String,
    pub kind: AccessKind,
    /// The threat behind a denial, else why the agent decided as it did.
    pub threat_name: String,
}
