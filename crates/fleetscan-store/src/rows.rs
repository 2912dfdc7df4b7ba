//! Conversions between stored rows and domain types, in both directions, with checks.
//!
//! Rows are read as plain tuples (decoded the same way on both backends) and converted here;
//! an enumeration string that fleetscan-core does not parse, a digest of the wrong length or a
//! number out of range is a [`StoreError::Corrupt`], never a default.

use fleetscan_core::{
    AccessKind, AccessRecord, Action, DecidedBy, ScannerIdentity, Sha256, Verdict, VerdictKind,
};

use crate::{HostRecord, StoreError};

/// sha256, scanner, engine, engine_version, ruleset_version, result, threat_name, detail,
/// scanned_at_unix_ms, scan_micros.
pub(crate) type VerdictRow = (
    Vec<u8>,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    i64,
);

/// id, at_unix_ms, tenant, node, path, kind, action, reason, sha256, threat_name, pid, uid, exe,
/// decided_by, context.
pub(crate) type AccessRow = (
    i64,
    i64,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<Vec<u8>>,
    Option<String>,
    i64,
    i64,
    String,
    String,
    String,
);

/// tenant, node, cluster, agent_version, first_seen_unix_ms, last_seen_unix_ms, allowed_count,
/// denied_count.
pub(crate) type HostRow = (String, String, String, String, i64, i64, i64, i64);

pub(crate) fn verdict(row: VerdictRow) -> Result<Verdict, StoreError> {
    let (sha, scanner, engine, engine_version, ruleset_version, result, threat_name, detail) =
        (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7);
    Ok(Verdict {
        sha256: sha256("verdicts", &sha)?,
        scanner: ScannerIdentity {
            scanner,
            engine,
            engine_version,
            ruleset_version,
        },
        kind: VerdictKind::parse(&result)
            .ok_or_else(|| StoreError::corrupt("verdicts", "result", result))?,
        threat_name,
        detail,
        scanned_at_unix_ms: row.8,
        scan_micros: to_u64("verdicts", "scan_micros", row.9)?,
    })
}

pub(crate) fn access(row: AccessRow) -> Result<(i64, AccessRecord), StoreError> {
    const T: &str = "accesses";
    let (id, at_unix_ms, tenant, node, path, kind, action, reason) =
        (row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7);
    let (sha, threat_name, pid, uid, exe, decided_by, context) =
        (row.8, row.9, row.10, row.11, row.12, row.13, row.14);
    let record = AccessRecord {
        at_unix_ms,
        tenant,
        node,
        path,
        kind: AccessKind::parse(&kind).ok_or_else(|| StoreError::corrupt(T, "kind", kind))?,
        action: Action::parse(&action).ok_or_else(|| StoreError::corrupt(T, "action", action))?,
        reason,
        sha256: sha.map(|s| sha256(T, &s)).transpose()?,
        threat_name,
        pid: to_u32(T, "pid", pid)?,
        uid: to_u32(T, "uid", uid)?,
        exe,
        decided_by: DecidedBy::parse(&decided_by)
            .ok_or_else(|| StoreError::corrupt(T, "decided_by", decided_by))?,
        context: serde_json::from_str(&context)
            .map_err(|_| StoreError::corrupt(T, "context", context))?,
    };
    Ok((id, record))
}

pub(crate) fn host(row: HostRow) -> Result<HostRecord, StoreError> {
    Ok(HostRecord {
        tenant: row.0,
        node: row.1,
        cluster: row.2,
        agent_version: row.3,
        first_seen_unix_ms: row.4,
        last_seen_unix_ms: row.5,
        allowed_count: to_u64("hosts", "allowed_count", row.6)?,
        denied_count: to_u64("hosts", "denied_count", row.7)?,
    })
}

/// The columns of a batch of accesses as arrays, for Postgres' UNNEST insert.
pub(crate) struct AccessColumns<'a> {
    pub at_unix_ms: Vec<i64>,
    pub tenant: Vec<&'a str>,
    pub node: Vec<&'a str>,
    pub path: Vec<&'a str>,
    pub kind: Vec<&'static str>,
    pub action: Vec<&'static str>,
    pub reason: Vec<&'a str>,
    pub sha256: Vec<Option<&'a [u8]>>,
    pub threat_name: Vec<Option<&'a str>>,
    pub pid: Vec<i64>,
    pub uid: Vec<i64>,
    pub exe: Vec<&'a str>,
    pub decided_by: Vec<&'static str>,
    pub context: Vec<String>,
}

impl<'a> AccessColumns<'a> {
    pub(crate) fn new(records: &'a [AccessRecord]) -> Self {
        AccessColumns {
            at_unix_ms: records.iter().map(|r| r.at_unix_ms).collect(),
            tenant: records.iter().map(|r| r.tenant.as_str()).collect(),
            node: records.iter().map(|r| r.node.as_str()).collect(),
            path: records.iter().map(|r| r.path.as_str()).collect(),
            kind: records.iter().map(|r| r.kind.as_str()).collect(),
            action: records.iter().map(|r| r.action.as_str()).collect(),
            reason: records.iter().map(|r| r.reason.as_str()).collect(),
            sha256: records
                .iter()
                .map(|r| r.sha256.as_ref().map(|s| &s.0[..]))
                .collect(),
            threat_name: records.iter().map(|r| r.threat_name.as_deref()).collect(),
            pid: records.iter().map(|r| i64::from(r.pid)).collect(),
            uid: records.iter().map(|r| i64::from(r.uid)).collect(),
            exe: records.iter().map(|r| r.exe.as_str()).collect(),
            decided_by: records.iter().map(|r| r.decided_by.as_str()).collect(),
            context: records.iter().map(|r| context_json(&r.context)).collect(),
        }
    }
}

/// The `context` column of an access: its JSON object.
pub(crate) fn context_json(c: &fleetscan_core::AccessContext) -> String {
    serde_json::to_string(c).expect("a struct of strings and numbers serializes")
}

/// An unsigned value for a signed 64-bit column; values above `i64::MAX` are refused.
pub(crate) fn to_i64(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

pub(crate) fn to_u64(
    table: &'static str,
    column: &'static str,
    value: i64,
) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(table, column, value.to_string()))
}

fn to_u32(table: &'static str, column: &'static str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::corrupt(table, column, value.to_string()))
}

pub(crate) fn sha256(table: &'static str, bytes: &[u8]) -> Result<Sha256, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Sha256)
        .map_err(|_| StoreError::corrupt(table, "sha256", format!("{} bytes", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict_row(result: &str) -> VerdictRow {
        let sha = Sha256::of(b"x").0.to_vec();
        let s = || "s".to_owned();
        (sha, s(), s(), s(), s(), result.to_owned(), None, None, 1, 2)
    }

    #[test]
    fn unknown_enumerations_are_errors_not_defaults() {
        assert_eq!(
            verdict(verdict_row("malicious")).unwrap().kind,
            VerdictKind::Malicious
        );
        let err = verdict(verdict_row("evil")).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Corrupt {
                    column: "result",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_unavailable());
    }

    #[test]
    fn bad_digests_and_numbers_are_errors() {
        let mut row = verdict_row("clean");
        row.0.pop();
        assert!(matches!(
            verdict(row).unwrap_err(),
            StoreError::Corrupt {
                column: "sha256",
                ..
            }
        ));
        let mut row = verdict_row("clean");
        row.9 = -1;
        assert!(verdict(row).is_err());
        assert!(to_u32("t", "pid", i64::from(u32::MAX) + 1).is_err());
        assert_eq!(to_u32("t", "pid", i64::from(u32::MAX)).unwrap(), u32::MAX);
        assert!(matches!(
            to_i64("n", u64::MAX).unwrap_err(),
            StoreError::OutOfRange {
                value: u64::MAX,
                ..
            }
        ));
        assert_eq!(
            to_i64("n", u64::try_from(i64::MAX).unwrap()).unwrap(),
            i64::MAX
        );
    }
}
