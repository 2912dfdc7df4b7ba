//! What is kept of accesses: the counters and records of decided accesses (settled once the
//! decision is sent), the reports of accesses an agent decided itself, and each host's presence
//! and counters.
//!
//! Every record goes to the write-behind queue, never to the store directly; an allowed access
//! is only counted (per host, flushed on a period and when the session ends). A report's tenant
//! is the broker's attribution, never what the report claims. Must never: record before the
//! decision is sent, or lose a count silently.

use std::sync::atomic::Ordering;

use fleetscan_core::{
    AccessContext, AccessKind, AccessRecord, Action, DecidedBy, Sha256, now_unix_ms,
};
use tracing::warn;

use super::decide::Decided;
use super::{Access, Agent, Subject, Tally, access_tenant};
use crate::engine::stats::{add, bump};
use crate::engine::writer::{HostSeen, WriteOp};

/// An access the agent decided itself (from its cache, by its deadline, …), or only counts of
/// them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// When it was decided; 0 when the agent did not say (now, then).
    pub at_unix_ms: i64,
    /// `None` for a report that only carries counts.
    pub action: Option<Action>,
    pub decided_by: DecidedBy,
    pub sha256: Option<Sha256>,
    pub path: String,
    /// The path as the host sees it, where it differs.
    pub host_path: String,
    pub kind: AccessKind,
    pub threat_name: Option<String>,
    pub subject: Subject,
    /// Allowed accesses since the previous report that carried a count, never reported one by
    /// one.
    pub allowed_count: u64,
    /// Reports the agent had to drop while disconnected.
    pub dropped_reports: u64,
}

/// Why an agent decided an access itself, as its record says.
fn local_reason(decided_by: DecidedBy) -> &'static str {
    match decided_by {
        DecidedBy::AgentDeadline => "no decision before the deadline",
        DecidedBy::AgentOversize => "oversize",
        DecidedBy::AgentUnreadable => "unreadable",
        DecidedBy::AgentNoBroker => "no broker",
        DecidedBy::AgentCache | DecidedBy::Broker => "cached decision",
    }
}

impl Agent {
    /// Counts a decision that was sent (or could not be, the agent being gone) and records it
    /// when it must be; frees its place among the pending requests.
    pub fn settle(&self, tally: Tally) {
        let stats = self.engine.stats();
        bump(&stats.decisions);
        if tally.fail_mode {
            bump(&stats.fail_mode_decisions);
        }
        if tally.oversize {
            bump(&stats.oversize);
        }
        match tally.action {
            Action::Deny => {
                bump(&stats.denied);
                self.denied.fetch_add(1, Ordering::Relaxed);
            }
            Action::Allow => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(record) = tally.record {
            self.engine.write_behind(WriteOp::Access(record));
        }
    }

    /// The record of an access this broker decided, for `tenant`; takes the decision's threat
    /// name (the decision itself no longer needs it).
    pub(super) fn record(
        &self,
        access: Access,
        tenant: &str,
        sha256: Option<Sha256>,
        decided: &mut Decided,
    ) -> AccessRecord {
        // The path the access is known by, and the host path beside it when that differs.
        let (path, host_path) = if access.path.is_empty() {
            (access.host_path, String::new())
        } else {
            (access.path, access.host_path)
        };
        let Subject {
            pid,
            uid,
            exe,
            labelled_tenant: _,
            context,
        } = access.subject;
        AccessRecord {
            at_unix_ms: now_unix_ms(),
            tenant: tenant.to_owned(),
            node: self.node.clone(),
            path,
            kind: access.kind.unwrap_or(AccessKind::Open),
            action: decided.action,
            reason: decided.reason.clone(),
            sha256,
            threat_name: decided.threat_name.take(),
            pid,
            uid,
            exe,
            decided_by: DecidedBy::Broker,
            context: AccessContext {
                host_path,
                ..context
            },
        }
    }

    /// An access the agent decided itself: denials are recorded; allowed ones only counted. A
    /// report with action ALLOW counts itself; `allowed_count` counts accesses never reported
    /// one by one.
    pub fn report(&self, report: Report) {
        if report.dropped_reports > 0 {
            add(&self.engine.stats().dropped_reports, report.dropped_reports);
            warn!(node = %self.node, dropped = report.dropped_reports, "agent dropped access reports while disconnected");
        }
        self.allowed
            .fetch_add(report.allowed_count, Ordering::Relaxed);
        match report.action {
            Some(Action::Allow) => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
            }
            Some(Action::Deny) => {
                self.denied.fetch_add(1, Ordering::Relaxed);
                let why = local_reason(report.decided_by);
                let reason = match &report.threat_name {
                    Some(threat) => format!("{why}: {threat}"),
                    None => why.to_owned(),
                };
                let subject = report.subject;
                // The access's tenant, by the broker's rules (a tenant's agent reports for its
                // own tenant only), not what the report claims.
                let tenant = self.engine.with_tenancy(|tenancy| {
                    access_tenant(
                        tenancy,
                        &self.tenant,
                        &subject.context.namespace,
                        &subject.labelled_tenant,
                    )
                    .to_owned()
                });
                self.engine
                    .write_behind(WriteOp::Access(Box::new(AccessRecord {
                        at_unix_ms: if report.at_unix_ms > 0 {
                            report.at_unix_ms
                        } else {
                            now_unix_ms()
                        },
                        tenant,
                        node: self.node.clone(),
                        path: report.path,
                        kind: report.kind,
                        action: Action::Deny,
                        reason,
                        sha256: report.sha256,
                        threat_name: report.threat_name,
                        pid: subject.pid,
                        uid: subject.uid,
                        exe: subject.exe,
                        decided_by: report.decided_by,
                        context: AccessContext {
                            host_path: report.host_path,
                            ..subject.context
                        },
                    })));
            }
            None => {}
        }
    }

    /// The agent's host is connected now: its row is written (or refreshed).
    pub fn host_seen(&self) {
        self.engine.write_behind(WriteOp::HostSeen(HostSeen {
            tenant: self.tenant.clone(),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            agent_version: self.agent_version.clone(),
            at_unix_ms: now_unix_ms(),
        }));
    }

    /// Adds the accesses counted since the last flush to the host's counters.
    pub fn flush_counts(&self) {
        let allowed = self.allowed.swap(0, Ordering::Relaxed);
        let denied = self.denied.swap(0, Ordering::Relaxed);
        if allowed + denied > 0 {
            self.engine.write_behind(WriteOp::HostCounts {
                tenant: self.tenant.clone(),
                node: self.node.clone(),
                allowed,
                denied,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_reasons_say_who_decided_and_why() {
        assert_eq!(
            local_reason(DecidedBy::AgentDeadline),
            "no decision before the deadline"
        );
        assert_eq!(local_reason(DecidedBy::AgentNoBroker), "no broker");
        // What a newer agent's unknown reason is recorded as (see `convert`).
        assert_eq!(local_reason(DecidedBy::AgentCache), "cached decision");
    }
}
