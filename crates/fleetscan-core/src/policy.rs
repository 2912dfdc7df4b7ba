//! Policy: how verdicts and failures turn into allow or deny.
//!
//! Pure: it must never let a failure pass for a verdict (an error or a missing verdict is the
//! fail mode, never clean), and never deny under audit-only.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Verdict, VerdictKind};

/// Whether an access goes ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
}

/// What decides an access when no verdict can be had in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Allow: availability before protection.
    #[default]
    Open,
    /// Deny.
    Closed,
}

impl FailMode {
    pub fn action(self) -> Action {
        match self {
            FailMode::Open => Action::Allow,
            FailMode::Closed => Action::Deny,
        }
    }
}

impl std::str::FromStr for FailMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(FailMode::Open),
            "closed" => Ok(FailMode::Closed),
            other => Err(format!(
                "fail mode must be `open` or `closed`, not `{other}`"
            )),
        }
    }
}

/// The policy in force for an access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Monotonic version, bumped on every change.
    pub version: u64,
    pub fail_mode: FailMode,
    /// How long an access may wait for a decision, at most.
    #[serde(with = "duration_ms")]
    pub decision_deadline: Duration,
    /// Content larger than this is not scanned; `oversize_action` decides.
    pub max_file_size: u64,
    pub oversize_action: Action,
    /// Record what would be denied, but allow it.
    pub audit_only: bool,
}

/// The longest deadline an agent accepts: an access never waits longer than this.
pub const MAX_DECISION_DEADLINE: Duration = Duration::from_secs(5);

impl Default for Policy {
    fn default() -> Self {
        Policy {
            version: 1,
            fail_mode: FailMode::Open,
            decision_deadline: MAX_DECISION_DEADLINE,
            max_file_size: 64 * 1024 * 1024,
            oversize_action: Action::Allow,
            audit_only: false,
        }
    }
}

/// The outcome of combining verdicts under a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    pub reason: String,
    /// Whether the decision may be cached for the file (only conclusive ones are).
    pub cacheable: bool,
}

impl Policy {
    /// The deadline actually applied: the policy's, never above [`MAX_DECISION_DEADLINE`] and
    /// never zero.
    pub fn effective_deadline(&self) -> Duration {
        self.decision_deadline
            .clamp(Duration::from_millis(1), MAX_DECISION_DEADLINE)
    }

    /// Combines the verdicts of every required scanner: any blocking verdict denies; all clean
    /// allows; anything else (errors, unsupported, missing) is decided by the fail mode and is
    /// not cacheable. Audit-only turns a deny into an allow, with the reason kept.
    pub fn decide(&self, verdicts: &[Verdict]) -> Outcome {
        let mut outcome = if let Some(hit) = verdicts.iter().find(|v| v.kind.blocks()) {
            Outcome {
                action: Action::Deny,
                reason: format!(
                    "{}: {}",
                    hit.kind.as_str(),
                    hit.threat_name.as_deref().unwrap_or("unnamed threat")
                ),
                cacheable: true,
            }
        } else if !verdicts.is_empty() && verdicts.iter().all(|v| v.kind == VerdictKind::Clean) {
            Outcome {
                action: Action::Allow,
                reason: "clean".into(),
                cacheable: true,
            }
        } else {
            let why = verdicts
                .iter()
                .find(|v| !v.kind.is_conclusive())
                .map(|v| {
                    format!(
                        "{} from {}{}",
                        v.kind.as_str(),
                        v.scanner.scanner,
                        v.detail
                            .as_deref()
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "no verdict".into());
            Outcome {
                action: self.fail_mode.action(),
                reason: format!("fail-{}: {why}", fail_word(self.fail_mode)),
                cacheable: false,
            }
        };
        if self.audit_only && outcome.action == Action::Deny {
            outcome.action = Action::Allow;
            outcome.reason = format!("audit-only, would deny: {}", outcome.reason);
        }
        outcome
    }

    /// The outcome for content above `max_file_size`.
    pub fn oversize(&self, size: u64) -> Outcome {
        let action = if self.audit_only {
            Action::Allow
        } else {
            self.oversize_action
        };
        Outcome {
            action,
            reason: format!(
                "oversize: {size} bytes > max {} bytes, {} unscanned",
                self.max_file_size,
                self.oversize_action.as_str()
            ),
            cacheable: true,
        }
    }

    /// The outcome when no verdict can be had in time.
    pub fn on_failure(&self, why: &str) -> Outcome {
        let mut action = self.fail_mode.action();
        if self.audit_only {
            action = Action::Allow;
        }
        Outcome {
            action,
            reason: format!("fail-{}: {why}", fail_word(self.fail_mode)),
            cacheable: false,
        }
    }
}

fn fail_word(mode: FailMode) -> &'static str {
    match mode {
        FailMode::Open => "open",
        FailMode::Closed => "closed",
    }
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ScannerIdentity, Sha256};

    fn verdict(kind: VerdictKind, threat: Option<&str>) -> Verdict {
        Verdict {
            sha256: Sha256::of(b"x"),
            scanner: ScannerIdentity {
                scanner: "reference".into(),
                ..Default::default()
            },
            kind,
            threat_name: threat.map(Into::into),
            detail: None,
            scanned_at_unix_ms: 0,
            scan_micros: 0,
        }
    }

    #[test]
    fn any_malicious_denies_and_all_clean_allows() {
        let p = Policy::default();
        let clean = verdict(VerdictKind::Clean, None);
        let bad = verdict(VerdictKind::Malicious, Some("EICAR"));
        assert_eq!(p.decide(std::slice::from_ref(&clean)).action, Action::Allow);
        let o = p.decide(&[clean, bad]);
        assert_eq!(o.action, Action::Deny);
        assert!(o.reason.contains("EICAR"));
        assert!(o.cacheable);
    }

    #[test]
    fn no_conclusive_verdict_falls_to_fail_mode_uncached() {
        let mut p = Policy::default();
        let err = verdict(VerdictKind::Error, None);
        let o = p.decide(std::slice::from_ref(&err));
        assert_eq!((o.action, o.cacheable), (Action::Allow, false));
        p.fail_mode = FailMode::Closed;
        assert_eq!(p.decide(&[err]).action, Action::Deny);
        assert_eq!(p.decide(&[]).action, Action::Deny);
    }

    #[test]
    fn audit_only_never_denies() {
        let p = Policy {
            audit_only: true,
            fail_mode: FailMode::Closed,
            oversize_action: Action::Deny,
            ..Policy::default()
        };
        let o = p.decide(&[verdict(VerdictKind::Malicious, Some("X"))]);
        assert_eq!(o.action, Action::Allow);
        assert!(o.reason.starts_with("audit-only"));
        assert_eq!(p.on_failure("timeout").action, Action::Allow);
        assert_eq!(p.oversize(10).action, Action::Allow);
    }

    #[test]
    fn deadline_is_clamped() {
        let p = Policy {
            decision_deadline: Duration::from_secs(60),
            ..Policy::default()
        };
        assert_eq!(p.effective_deadline(), MAX_DECISION_DEADLINE);
        let p = Policy {
            decision_deadline: Duration::ZERO,
            ..Policy::default()
        };
        assert_eq!(p.effective_deadline(), Duration::from_millis(1));
    }
}
