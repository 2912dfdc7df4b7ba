//! Conversions between protocol types and `fleetscan-core` domain types. Unknown enum values
//! (from a newer peer) map to documented fallbacks, never to a panic.

use fleetscan_core as core;

use crate::v1;

/// A protocol message that does not carry what the domain needs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{0}` is not a SHA-256 (64 hex digits)")]
    BadSha256(&'static str),
    #[error("field `{0}` has an unknown or unspecified value")]
    BadEnum(&'static str),
}

/// Parses a hex SHA-256 field.
pub fn sha256(field: &'static str, s: &str) -> Result<core::Sha256, ConvertError> {
    s.parse().map_err(|_| ConvertError::BadSha256(field))
}

/// A digest in canonical form (64 lower-case hex digits, what agents send), else `None` (then
/// [`sha256`] decides, and accepts upper case too). Cheap enough for every request.
#[inline]
pub fn canonical_sha256(hex: &str) -> Option<core::Sha256> {
    /// Each byte's value as a lower-case hex digit, or 0x10 (a bit no digit has) when it is none.
    const NIBBLE: [u8; 256] = {
        let mut t = [0x10u8; 256];
        let mut c = 0;
        while c < 10 {
            t[b'0' as usize + c] = c as u8;
            c += 1;
        }
        let mut c = 0;
        while c < 6 {
            t[b'a' as usize + c] = 10 + c as u8;
            c += 1;
        }
        t
    };
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    // No branch per digit: every pair is converted, and one check at the end says whether a
    // byte was not a digit.
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
        bad |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (bad & 0x10 == 0).then_some(core::Sha256(out))
}

pub fn verdict_kind_to_proto(kind: core::VerdictKind) -> v1::VerdictResult {
    match kind {
        core::VerdictKind::Clean => v1::VerdictResult::Clean,
        core::VerdictKind::Malicious => v1::VerdictResult::Malicious,
        core::VerdictKind::Suspicious => v1::VerdictResult::Suspicious,
        core::VerdictKind::Error => v1::VerdictResult::Error,
        core::VerdictKind::Unsupported => v1::VerdictResult::Unsupported,
    }
}

/// An unknown or unspecified result is an error verdict: never mistaken for clean.
pub fn verdict_kind_from_proto(raw: i32) -> core::VerdictKind {
    match v1::VerdictResult::try_from(raw) {
        Ok(v1::VerdictResult::Clean) => core::VerdictKind::Clean,
        Ok(v1::VerdictResult::Malicious) => core::VerdictKind::Malicious,
        Ok(v1::VerdictResult::Suspicious) => core::VerdictKind::Suspicious,
        Ok(v1::VerdictResult::Unsupported) => core::VerdictKind::Unsupported,
        Ok(v1::VerdictResult::Error | v1::VerdictResult::Unspecified) | Err(_) => {
            core::VerdictKind::Error
        }
    }
}

pub fn action_to_proto(action: core::Action) -> v1::Action {
    match action {
        core::Action::Allow => v1::Action::Allow,
        core::Action::Deny => v1::Action::Deny,
    }
}

/// `None` for unspecified or unknown values; the caller decides the fallback.
pub fn action_from_proto(raw: i32) -> Option<core::Action> {
    match v1::Action::try_from(raw) {
        Ok(v1::Action::Allow) => Some(core::Action::Allow),
        Ok(v1::Action::Deny) => Some(core::Action::Deny),
        _ => None,
    }
}

pub fn access_kind_to_proto(kind: core::AccessKind) -> v1::AccessKind {
    match kind {
        core::AccessKind::Open => v1::AccessKind::Open,
        core::AccessKind::Exec => v1::AccessKind::Exec,
    }
}

/// Unknown kinds are treated as plain opens.
pub fn access_kind_from_proto(raw: i32) -> core::AccessKind {
    access_kind_known(raw).unwrap_or(core::AccessKind::Open)
}

/// `None` for unspecified or unknown kinds; the caller decides the fallback (a policy that lets
/// plain opens through must treat them as execs).
pub fn access_kind_known(raw: i32) -> Option<core::AccessKind> {
    match v1::AccessKind::try_from(raw) {
        Ok(v1::AccessKind::Open) => Some(core::AccessKind::Open),
        Ok(v1::AccessKind::Exec) => Some(core::AccessKind::Exec),
        Ok(v1::AccessKind::Unspecified) | Err(_) => None,
    }
}

/// Who decided an access the agent reports, from its local reason. An unknown reason (a newer
/// agent) is the agent's cache, the commonest local decision.
pub fn local_reason_from_proto(raw: i32) -> core::DecidedBy {
    match v1::LocalReason::try_from(raw) {
        Ok(v1::LocalReason::Deadline) => core::DecidedBy::AgentDeadline,
        Ok(v1::LocalReason::Oversize) => core::DecidedBy::AgentOversize,
        Ok(v1::LocalReason::Unreadable) => core::DecidedBy::AgentUnreadable,
        Ok(v1::LocalReason::NoBroker) => core::DecidedBy::AgentNoBroker,
        Ok(v1::LocalReason::Cached | v1::LocalReason::Unspecified) | Err(_) => {
            core::DecidedBy::AgentCache
        }
    }
}

impl From<v1::Subject> for core::AccessContext {
    /// What a record keeps of an access's origin besides pid, uid, executable and the tenant the
    /// agent read (take those first); `host_path` is left empty, the access's own.
    fn from(s: v1::Subject) -> Self {
        core::AccessContext {
            ns_pid: s.ns_pid,
            cgroup: s.cgroup,
            container_id: s.container_id,
            pod_uid: s.pod_uid,
            namespace: s.k8s_namespace,
            image: s.image,
            host_path: String::new(),
        }
    }
}

pub fn fail_mode_to_proto(mode: core::FailMode) -> v1::FailMode {
    match mode {
        core::FailMode::Open => v1::FailMode::Open,
        core::FailMode::Closed => v1::FailMode::Closed,
    }
}

/// Unknown or unspecified fail modes are the default, fail-open.
pub fn fail_mode_from_proto(raw: i32) -> core::FailMode {
    match v1::FailMode::try_from(raw) {
        Ok(v1::FailMode::Closed) => core::FailMode::Closed,
        _ => core::FailMode::Open,
    }
}

impl From<&core::ScannerIdentity> for v1::ScannerIdentity {
    fn from(s: &core::ScannerIdentity) -> Self {
        v1::ScannerIdentity {
            scanner: s.scanner.clone(),
            engine: s.engine.clone(),
            engine_version: s.engine_version.clone(),
            ruleset_version: s.ruleset_version.clone(),
        }
    }
}

impl From<v1::ScannerIdentity> for core::ScannerIdentity {
    fn from(s: v1::ScannerIdentity) -> Self {
        core::ScannerIdentity {
            scanner: s.scanner,
            engine: s.engine,
            engine_version: s.engine_version,
            ruleset_version: s.ruleset_version,
        }
    }
}

impl From<&core::Verdict> for v1::Verdict {
    fn from(v: &core::Verdict) -> Self {
        verdict_to_proto(v, v.sha256.to_hex())
    }
}

/// The verdict on the wire, with its digest already in hex (e.g. the request's own, echoed).
/// Every field is named, so that a new field of the message cannot be forgotten here.
pub fn verdict_to_proto(v: &core::Verdict, sha256_hex: String) -> v1::Verdict {
    v1::Verdict {
        sha256: sha256_hex,
        scanner: Some((&v.scanner).into()),
        result: verdict_kind_to_proto(v.kind).into(),
        threat_name: v.threat_name.clone().unwrap_or_default(),
        detail: v.detail.clone().unwrap_or_default(),
        scanned_at_unix_ms: v.scanned_at_unix_ms,
        scan_micros: v.scan_micros,
    }
}

impl TryFrom<v1::Verdict> for core::Verdict {
    type Error = ConvertError;

    fn try_from(v: v1::Verdict) -> Result<Self, ConvertError> {
        Ok(core::Verdict {
            sha256: sha256("sha256", &v.sha256)?,
            scanner: v
                .scanner
                .ok_or(ConvertError::MissingField("scanner"))?
                .into(),
            kind: verdict_kind_from_proto(v.result),
            threat_name: non_empty(v.threat_name),
            detail: non_empty(v.detail),
            scanned_at_unix_ms: v.scanned_at_unix_ms,
            scan_micros: v.scan_micros,
        })
    }
}

impl From<&core::Policy> for v1::Policy {
    fn from(p: &core::Policy) -> Self {
        v1::Policy {
            version: p.version,
            fail_mode: fail_mode_to_proto(p.fail_mode).into(),
            decision_deadline_ms: u32::try_from(p.decision_deadline.as_millis())
                .unwrap_or(u32::MAX),
            max_file_size: p.max_file_size,
            oversize_action: action_to_proto(p.oversize_action).into(),
            audit_only: p.audit_only,
        }
    }
}

impl From<v1::Policy> for core::Policy {
    /// Out-of-range values are clamped by [`core::Policy::effective_deadline`] when used; an
    /// unknown oversize action allows, like the default.
    fn from(p: v1::Policy) -> Self {
        core::Policy {
            version: p.version,
            fail_mode: fail_mode_from_proto(p.fail_mode),
            decision_deadline: std::time::Duration::from_millis(u64::from(p.decision_deadline_ms)),
            max_file_size: p.max_file_size,
            oversize_action: action_from_proto(p.oversize_action).unwrap_or(core::Action::Allow),
            audit_only: p.audit_only,
        }
    }
}

impl From<&core::tenancy::Exclusions> for v1::Exclusions {
    fn from(e: &core::tenancy::Exclusions) -> Self {
        v1::Exclusions {
            paths: e.paths.clone(),
            images: e.images.clone(),
            namespaces: e.namespaces.clone(),
        }
    }
}

impl From<v1::Exclusions> for core::tenancy::Exclusions {
    fn from(e: v1::Exclusions) -> Self {
        core::tenancy::Exclusions {
            paths: e.paths,
            images: e.images,
            namespaces: e.namespaces,
        }
    }
}

impl From<&core::tenancy::TenantPolicy> for v1::TenantPolicy {
    fn from(p: &core::tenancy::TenantPolicy) -> Self {
        v1::TenantPolicy {
            tenant: p.tenant.clone(),
            namespace: p.namespace.clone().unwrap_or_default(),
            policy: Some((&p.policy).into()),
            exec_only: p.exec_only,
            exclusions: Some((&p.exclusions).into()),
            pools: p.pools.clone(),
        }
    }
}

impl From<v1::TenantPolicy> for core::tenancy::TenantPolicy {
    /// A missing policy is the default one (fail open): the set's version still rules out
    /// older sets.
    fn from(p: v1::TenantPolicy) -> Self {
        core::tenancy::TenantPolicy {
            tenant: p.tenant,
            namespace: non_empty(p.namespace),
            policy: p.policy.map(Into::into).unwrap_or_default(),
            exec_only: p.exec_only,
            exclusions: p.exclusions.map(Into::into).unwrap_or_default(),
            pools: p.pools,
        }
    }
}

impl From<&core::tenancy::PolicySet> for v1::PolicySet {
    fn from(s: &core::tenancy::PolicySet) -> Self {
        v1::PolicySet {
            version: s.version,
            default_tenant: s.default_tenant.clone(),
            namespace_label: s.namespace_label.clone(),
            namespace_tenants: s
                .namespace_tenants
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            policies: s.policies.iter().map(Into::into).collect(),
        }
    }
}

impl From<v1::PolicySet> for core::tenancy::PolicySet {
    /// An empty default tenant is the fleet operator's, [`core::DEFAULT_TENANT`].
    fn from(s: v1::PolicySet) -> Self {
        core::tenancy::PolicySet {
            version: s.version,
            default_tenant: non_empty(s.default_tenant)
                .unwrap_or_else(|| core::DEFAULT_TENANT.to_owned()),
            namespace_label: s.namespace_label,
            namespace_tenants: s.namespace_tenants.into_iter().collect(),
            policies: s.policies.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<core::Subject> for v1::Subject {
    fn from(s: core::Subject) -> Self {
        v1::Subject {
            pid: s.pid,
            ns_pid: s.ns_pid,
            uid: s.uid,
            exe: s.exe,
            cgroup: s.cgroup,
            container_id: s.container_id,
            pod_uid: s.pod_uid,
            k8s_namespace: s.namespace,
            tenant: s.tenant,
            image: s.image,
        }
    }
}

impl From<v1::Subject> for core::Subject {
    fn from(s: v1::Subject) -> Self {
        core::Subject {
            pid: s.pid,
            ns_pid: s.ns_pid,
            uid: s.uid,
            exe: s.exe,
            cgroup: s.cgroup,
            container_id: s.container_id,
            pod_uid: s.pod_uid,
            namespace: s.k8s_namespace,
            tenant: s.tenant,
            image: s.image,
        }
    }
}

/// A broker decision the agent could not read is reported as `UNSPECIFIED`, the one reason
/// the protocol has for it.
pub fn local_reason_to_proto(reason: core::LocalReason) -> v1::LocalReason {
    match reason {
        core::LocalReason::Cached => v1::LocalReason::Cached,
        core::LocalReason::Deadline => v1::LocalReason::Deadline,
        core::LocalReason::Oversize => v1::LocalReason::Oversize,
        core::LocalReason::Unreadable => v1::LocalReason::Unreadable,
        core::LocalReason::NoBroker => v1::LocalReason::NoBroker,
        core::LocalReason::MalformedDecision => v1::LocalReason::Unspecified,
    }
}

impl From<&core::LocalReport> for v1::AccessReport {
    /// Without counters (`allowed_count`, `dropped_reports`): the sender adds them to the
    /// report that carries them.
    fn from(r: &core::LocalReport) -> Self {
        v1::AccessReport {
            at_unix_ms: r.at_unix_ms,
            action: action_to_proto(r.action).into(),
            reason: local_reason_to_proto(r.reason).into(),
            sha256: r.sha256.map(|s| s.to_hex()).unwrap_or_default(),
            subject: Some(r.subject.clone().into()),
            path: r.path.clone(),
            kind: access_kind_to_proto(r.kind).into(),
            threat_name: r.threat_name.clone(),
            allowed_count: 0,
            dropped_reports: 0,
            host_path: r.host_path.clone(),
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_result_is_an_error_never_clean() {
        assert_eq!(verdict_kind_from_proto(99), core::VerdictKind::Error);
        assert_eq!(verdict_kind_from_proto(0), core::VerdictKind::Error);
        assert_eq!(verdict_kind_from_proto(1), core::VerdictKind::Clean);
    }

    #[test]
    fn canonical_digests_parse_like_the_general_parser() {
        for content in [&b""[..], b"x", b"fleetscan"] {
            let digest = core::Sha256::of(content);
            let hex = digest.to_hex();
            assert_eq!(canonical_sha256(&hex), Some(digest));
            // Upper case is valid but not canonical: the general parser takes it, and the
            // broker's decision then carries the digest re-formatted.
            assert_eq!(canonical_sha256(&hex.to_uppercase()), None);
            assert_eq!(sha256("sha256", &hex.to_uppercase()).ok(), Some(digest));
        }
        let hex = core::Sha256::of(b"x").to_hex();
        assert_eq!(canonical_sha256(&hex[..63]), None);
        assert_eq!(canonical_sha256(&format!("{hex}0")), None);
        assert_eq!(canonical_sha256(&format!("g{}", &hex[1..])), None);
        assert_eq!(canonical_sha256(&format!("é{}", &hex[2..])), None);
        // Any one byte that is not a lower-case hex digit, at any place, is refused; every
        // digit is taken.
        let mut bytes = hex.clone().into_bytes();
        for i in 0..64 {
            for c in 0u8..128 {
                let orig = bytes[i];
                bytes[i] = c;
                let text = std::str::from_utf8(&bytes).unwrap();
                let digit = c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
                assert_eq!(
                    canonical_sha256(text).is_some(),
                    digit,
                    "byte {c:#x} at {i}"
                );
                if digit {
                    assert_eq!(canonical_sha256(text), sha256("sha256", text).ok());
                }
                bytes[i] = orig;
            }
        }
    }

    #[test]
    fn local_reasons_map_to_who_decided() {
        assert_eq!(
            local_reason_from_proto(v1::LocalReason::Deadline as i32),
            core::DecidedBy::AgentDeadline
        );
        assert_eq!(
            local_reason_from_proto(v1::LocalReason::NoBroker as i32),
            core::DecidedBy::AgentNoBroker
        );
        assert_eq!(local_reason_from_proto(99), core::DecidedBy::AgentCache);
    }

    #[test]
    fn unknown_access_kinds_are_not_guessed() {
        assert_eq!(access_kind_known(1), Some(core::AccessKind::Open));
        assert_eq!(access_kind_known(2), Some(core::AccessKind::Exec));
        assert_eq!(access_kind_known(0), None);
        assert_eq!(access_kind_known(99), None);
        assert_eq!(access_kind_from_proto(99), core::AccessKind::Open);
    }

    #[test]
    fn verdict_round_trips() {
        let v = core::Verdict {
            sha256: core::Sha256::of(b"x"),
            scanner: core::ScannerIdentity {
                scanner: "reference".into(),
                engine: "yara-x".into(),
                engine_version: "1".into(),
                ruleset_version: "abc".into(),
            },
            kind: core::VerdictKind::Malicious,
            threat_name: Some("EICAR".into()),
            detail: None,
            scanned_at_unix_ms: 5,
            scan_micros: 7,
        };
        let back: core::Verdict = v1::Verdict::from(&v).try_into().unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn policy_round_trips() {
        let p = core::Policy {
            fail_mode: core::FailMode::Closed,
            audit_only: true,
            ..Default::default()
        };
        assert_eq!(core::Policy::from(v1::Policy::from(&p)), p);
    }

    #[test]
    fn policy_sets_round_trip() {
        use std::collections::BTreeMap;

        use fleetscan_core::tenancy::{Exclusions, PolicyPatch, TenancyConfig, TenantConfig};

        let mut config = TenancyConfig {
            version: 4,
            shared_pools: vec!["clamav".into()],
            ..TenancyConfig::default()
        };
        config.tenants.insert(
            "acme".into(),
            TenantConfig {
                namespaces: vec!["shop".into()],
                pools: vec!["yara".into()],
                shared_pools: vec!["clamav".into()],
                namespace_policies: BTreeMap::from([(
                    "shop".to_owned(),
                    PolicyPatch {
                        exec_only: Some(true),
                        exclusions: Some(Exclusions {
                            paths: vec!["/tmp".into()],
                            images: vec!["x/*".into()],
                            namespaces: vec!["kube-*".into()],
                        }),
                        ..PolicyPatch::default()
                    },
                )]),
                ..TenantConfig::default()
            },
        );
        let set = core::Tenancy::new(&core::Policy::default(), &config)
            .unwrap()
            .policy_set();
        let wire = v1::PolicySet::from(&set);
        assert_eq!(
            wire.namespace_tenants.get("shop").map(String::as_str),
            Some("acme")
        );
        assert_eq!(core::tenancy::PolicySet::from(wire), set);
    }
    #[test]
    fn subjects_round_trip() {
        let s = core::Subject {
            pid: 7,
            ns_pid: 1,
            uid: 1000,
            exe: "/bin/cat".into(),
            cgroup: "/kubepods/x".into(),
            container_id: "c".repeat(64),
            pod_uid: "p".into(),
            namespace: "shop".into(),
            tenant: "acme".into(),
            image: "nginx".into(),
        };
        let wire = v1::Subject::from(s.clone());
        assert_eq!(wire.k8s_namespace, "shop");
        assert_eq!(core::Subject::from(wire), s);
    }

    #[test]
    fn a_local_report_keeps_its_reason_and_digest() {
        let r = core::LocalReport {
            at_unix_ms: 5,
            action: core::Action::Deny,
            reason: core::LocalReason::Deadline,
            sha256: Some(core::Sha256::of(b"x")),
            subject: core::Subject {
                pid: 7,
                ..Default::default()
            },
            path: "/data/a".into(),
            host_path: "/var/lib/pod/data/a".into(),
            kind: core::AccessKind::Exec,
            threat_name: "no decision before the deadline".into(),
        };
        let wire = v1::AccessReport::from(&r);
        assert_eq!(wire.reason, i32::from(v1::LocalReason::Deadline));
        assert_eq!(wire.action, i32::from(v1::Action::Deny));
        assert_eq!(wire.kind, i32::from(v1::AccessKind::Exec));
        assert_eq!(wire.sha256, core::Sha256::of(b"x").to_hex());
        assert_eq!(wire.subject.map(|s| s.pid), Some(7));
        assert_eq!((wire.allowed_count, wire.dropped_reports), (0, 0));
        let unread = core::LocalReport {
            sha256: None,
            reason: core::LocalReason::MalformedDecision,
            ..r
        };
        let wire = v1::AccessReport::from(&unread);
        assert!(wire.sha256.is_empty());
        assert_eq!(wire.reason, i32::from(v1::LocalReason::Unspecified));
    }
}
