//! Domain types of fleetscan and the pure logic over them: content digests, verdicts,
//! decisions, policy. No I/O lives here, and no protocol type: the gRPC edge converts.

pub mod backoff;
pub mod digest;
pub mod event;
pub mod policy;
pub mod report;
pub mod subject;
pub mod tenancy;
pub mod verdict;

pub use backoff::Backoff;
pub use digest::{ParseSha256Error, Sha256, Sha256Hasher};
pub use event::{AccessContext, AccessRecord, DEFAULT_TENANT, DecidedBy};
pub use policy::{Action, FailMode, Policy};
pub use report::{LocalReason, LocalReport};
pub use subject::Subject;
pub use tenancy::{EffectivePolicy, PoolKey, Tenancy, TenancyConfig};
pub use verdict::{AccessKind, ScannerIdentity, Verdict, VerdictKind};

/// This machine's host name as the kernel has it, or "localhost" should it be empty or
/// unreadable: the default name of an agent's node, a broker and a worker. Names are for
/// operators; a missing one must never stop a component.
pub fn host_name() -> String {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

/// Milliseconds since the Unix epoch, the one timestamp representation of the domain.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
