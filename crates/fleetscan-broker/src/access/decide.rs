//! Policy glue: how what the engine found out about a content ([`Resolution`]) becomes a
//! decision for one access or scan.
//!
//! Pure code over `fleetscan-core` types: no I/O, no protocol types. Whether a decision may be
//! cached by the agent, for how long, and whether it must be recorded are decided here so that
//! every service answers the same way.

use fleetscan_core::{Action, Policy};

use crate::engine::Resolution;

/// How long an agent may keep a decision that rests on a conclusive verdict: 0, no time limit.
/// Such a decision is right until the file changes (the agent keys it by dev, inode, ctime and
/// size) or the rules change (the verdict generation moves and agents flush), so the agent may
/// hand clean files to the kernel as ignore marks, which cannot expire.
pub const VERDICT_TTL_SECONDS: u32 = 0;

/// How long an agent may keep an oversize decision: short, since the policy may change.
pub const OVERSIZE_TTL_SECONDS: u32 = 600;

/// A decision for one access, before it is put on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub action: Action,
    pub reason: String,
    pub cacheable: bool,
    pub ttl_seconds: u32,
    /// Whether the access must be recorded: every denial, and what audit-only mode would deny.
    pub record: bool,
    /// Whether the fail mode decided (no conclusive verdict).
    pub fail_mode: bool,
    pub oversize: bool,
    pub threat_name: Option<String>,
}

/// Decides one access from a resolution under the policy.
pub fn decide(policy: &Policy, resolution: &Resolution) -> Decided {
    let outcome_of = |p: &Policy| match resolution {
        Resolution::Verdict(v) => p.decide(std::slice::from_ref(&**v)),
        Resolution::Oversize(size) => p.oversize(*size),
        Resolution::Failed(why) => p.on_failure(why),
    };
    let outcome = outcome_of(policy);
    let record = outcome.action == Action::Deny
        || (policy.audit_only && {
            let strict = Policy {
                audit_only: false,
                ..policy.clone()
            };
            outcome_of(&strict).action == Action::Deny
        });
    let (fail_mode, oversize, threat_name, ttl) = match resolution {
        Resolution::Verdict(v) => (
            !v.kind.is_conclusive(),
            false,
            v.threat_name.clone(),
            VERDICT_TTL_SECONDS,
        ),
        Resolution::Oversize(_) => (false, true, None, OVERSIZE_TTL_SECONDS),
        Resolution::Failed(_) => (true, false, None, 0),
    };
    Decided {
        action: outcome.action,
        reason: outcome.reason,
        cacheable: outcome.cacheable,
        ttl_seconds: if outcome.cacheable { ttl } else { 0 },
        record,
        fail_mode,
        oversize,
        threat_name,
    }
}

/// Decides one access from the resolutions of every pool its policy requires, with
/// [`Policy::decide`]'s rule: any blocking verdict denies; otherwise an oversize content is
/// decided as such; otherwise any pool without a conclusive verdict (failure, error,
/// unsupported) leaves it to the fail mode; only when every pool found it clean is it allowed.
/// No required pool at all is a failure: nothing can say the content is clean.
pub fn decide_all(policy: &Policy, resolutions: &[Resolution]) -> Decided {
    let first = |f: &dyn Fn(&Resolution) -> bool| resolutions.iter().find(|r| f(r));
    let blocking = first(&|r| matches!(r, Resolution::Verdict(v) if v.kind.blocks()));
    let oversize = first(&|r| matches!(r, Resolution::Oversize(_)));
    let inconclusive = first(&|r| match r {
        Resolution::Verdict(v) => !v.kind.is_conclusive(),
        Resolution::Failed(_) => true,
        Resolution::Oversize(_) => false,
    });
    match blocking
        .or(oversize)
        .or(inconclusive)
        .or(resolutions.first())
    {
        Some(r) => decide(policy, r),
        None => fail(policy, "no scanner pool is required by the policy"),
    }
}

/// An access the policy does not scan (exec-only, exclusions): allowed, not recorded, and not
/// cacheable, since the same file may be scanned for another namespace or tenant.
pub fn skipped(why: String) -> Decided {
    Decided {
        action: Action::Allow,
        reason: why,
        cacheable: false,
        ttl_seconds: 0,
        record: false,
        fail_mode: false,
        oversize: false,
        threat_name: None,
    }
}

/// Decides by the fail mode, e.g. for a malformed request or an overloaded broker.
pub fn fail(policy: &Policy, why: impl Into<String>) -> Decided {
    decide(policy, &Resolution::Failed(why.into()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetscan_core::{FailMode, ScannerIdentity, Sha256, Verdict, VerdictKind};

    use super::*;

    fn verdict(kind: VerdictKind) -> Resolution {
        Resolution::Verdict(Arc::new(Verdict {
            sha256: Sha256::of(b"x"),
            scanner: ScannerIdentity {
                scanner: "reference".into(),
                ..Default::default()
            },
            kind,
            threat_name: kind.blocks().then(|| "EICAR-Test-File".to_owned()),
            detail: (kind == VerdictKind::Error).then(|| "engine crashed".to_owned()),
            scanned_at_unix_ms: 0,
            scan_micros: 0,
        }))
    }

    #[test]
    fn malicious_verdict_denies_cacheably_and_is_recorded() {
        let d = decide(&Policy::default(), &verdict(VerdictKind::Malicious));
        assert_eq!(d.action, Action::Deny);
        assert!(d.cacheable && d.record && !d.fail_mode);
        assert_eq!(d.ttl_seconds, VERDICT_TTL_SECONDS);
        assert_eq!(d.threat_name.as_deref(), Some("EICAR-Test-File"));
        assert!(d.reason.contains("EICAR-Test-File"));
    }

    #[test]
    fn clean_verdict_allows_without_a_record() {
        let d = decide(&Policy::default(), &verdict(VerdictKind::Clean));
        assert_eq!(
            (d.action, d.cacheable, d.record),
            (Action::Allow, true, false)
        );
        // No time limit: the agent may turn it into a kernel ignore mark (which cannot expire);
        // with a limit, warm opens would keep costing a round trip through user space.
        assert_eq!(d.ttl_seconds, 0);
    }

    #[test]
    fn error_verdict_and_failure_use_the_fail_mode_uncached() {
        let closed = Policy {
            fail_mode: FailMode::Closed,
            ..Policy::default()
        };
        for r in [
            verdict(VerdictKind::Error),
            verdict(VerdictKind::Unsupported),
            Resolution::Failed("no live scanner".into()),
        ] {
            let d = decide(&closed, &r);
            assert_eq!(d.action, Action::Deny, "{r:?}");
            assert!(!d.cacheable && d.fail_mode && d.record);
            assert_eq!(d.ttl_seconds, 0);
            let d = decide(&Policy::default(), &r);
            assert_eq!(d.action, Action::Allow);
            assert!(!d.record);
        }
        let d = fail(&closed, "no live scanner");
        assert!(d.reason.contains("no live scanner"), "{}", d.reason);
    }

    #[test]
    fn oversize_follows_the_policy_and_is_cacheable_briefly() {
        let deny = Policy {
            oversize_action: Action::Deny,
            max_file_size: 10,
            ..Policy::default()
        };
        let d = decide(&deny, &Resolution::Oversize(11));
        assert_eq!(d.action, Action::Deny);
        assert!(d.oversize && d.record && d.cacheable);
        assert_eq!(d.ttl_seconds, OVERSIZE_TTL_SECONDS);
    }

    #[test]
    fn several_pools_any_blocking_verdict_denies_all_clean_allows() {
        let p = Policy::default();
        let clean = verdict(VerdictKind::Clean);
        let bad = verdict(VerdictKind::Malicious);
        let error = verdict(VerdictKind::Error);
        let d = decide_all(&p, &[clean.clone(), clean.clone()]);
        assert_eq!((d.action, d.cacheable), (Action::Allow, true));
        // Any order: one malicious verdict denies, even beside an error or a failure.
        for rs in [
            vec![clean.clone(), bad.clone()],
            vec![bad.clone(), clean.clone()],
            vec![error.clone(), bad.clone()],
            vec![Resolution::Failed("no live scanner".into()), bad.clone()],
        ] {
            let d = decide_all(&p, &rs);
            assert_eq!(d.action, Action::Deny, "{rs:?}");
            assert!(d.record && d.cacheable);
        }
        // Clean from one pool, nothing from the other: the fail mode, never "clean".
        let closed = Policy {
            fail_mode: FailMode::Closed,
            ..Policy::default()
        };
        for rs in [
            vec![clean.clone(), Resolution::Failed("no live scanner".into())],
            vec![error, clean.clone()],
        ] {
            let d = decide_all(&closed, &rs);
            assert_eq!(d.action, Action::Deny, "{rs:?}");
            assert!(d.fail_mode && !d.cacheable);
        }
        let d = decide_all(&closed, &[]);
        assert_eq!(d.action, Action::Deny);
        assert!(d.fail_mode);
        // Audit-only: allowed, and recorded.
        let audit = Policy {
            audit_only: true,
            ..Policy::default()
        };
        let d = decide_all(&audit, &[clean, bad]);
        assert_eq!(d.action, Action::Allow);
        assert!(d.record);
    }

    #[test]
    fn skipped_accesses_are_allowed_unrecorded_and_uncached() {
        let d = skipped("exec-only: opens are not scanned".into());
        assert_eq!(d.action, Action::Allow);
        assert!(!d.cacheable && !d.record && !d.fail_mode);
    }

    #[test]
    fn audit_only_allows_but_records_what_it_would_deny() {
        let audit = Policy {
            audit_only: true,
            ..Policy::default()
        };
        let d = decide(&audit, &verdict(VerdictKind::Malicious));
        assert_eq!(d.action, Action::Allow);
        assert!(d.record, "audit mode must record what it would deny");
        let d = decide(&audit, &verdict(VerdictKind::Clean));
        assert!(!d.record);
    }
}
