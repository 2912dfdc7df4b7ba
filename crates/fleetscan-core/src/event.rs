//! Access records: what was opened or executed, by whom, and what was decided.
//!
//! Plain data for the store and the admin API; it must never decide anything itself.

use serde::{Deserialize, Serialize};

use crate::{AccessKind, Action, Sha256};

/// The tenant of everything until tenants are configured: the fleet operator's.
pub const DEFAULT_TENANT: &str = "default";

/// Who decided an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// The broker, from verdicts or its policy.
    Broker,
    /// The agent, from a cached decision for the same file identity.
    AgentCache,
    /// The agent, because no decision came before the deadline.
    AgentDeadline,
    /// The agent, because the file is larger than the policy's maximum.
    AgentOversize,
    /// The agent, because it could not read the file.
    AgentUnreadable,
    /// The agent, because it had no broker.
    AgentNoBroker,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Broker => "broker",
            DecidedBy::AgentCache => "cached",
            DecidedBy::AgentDeadline => "deadline",
            DecidedBy::AgentOversize => "oversize",
            DecidedBy::AgentUnreadable => "unreadable",
            DecidedBy::AgentNoBroker => "no-broker",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "broker" => DecidedBy::Broker,
            "cached" => DecidedBy::AgentCache,
            "deadline" => DecidedBy::AgentDeadline,
            "oversize" => DecidedBy::AgentOversize,
            "unreadable" => DecidedBy::AgentUnreadable,
            "no-broker" => DecidedBy::AgentNoBroker,
            _ => return None,
        })
    }
}

/// Where an access came from, beyond the host's pid, uid and executable: the process's own pid
/// namespace, its cgroup and what it names (container, pod), the pod's namespace and the
/// container's image, and the path as the host sees it. Empty strings (and an `ns_pid` of 0)
/// mean unknown or not in a container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AccessContext {
    #[serde(skip_serializing_if = "is_zero")]
    pub ns_pid: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cgroup: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// Where it differs from the path the process saw.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host_path: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// One recorded access. Every denial is recorded; allowed accesses are only counted per host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    pub at_unix_ms: i64,
    pub tenant: String,
    pub node: String,
    pub path: String,
    pub kind: AccessKind,
    pub action: Action,
    pub reason: String,
    pub sha256: Option<Sha256>,
    pub threat_name: Option<String>,
    pub pid: u32,
    pub uid: u32,
    pub exe: String,
    pub decided_by: DecidedBy,
    pub context: AccessContext,
}
