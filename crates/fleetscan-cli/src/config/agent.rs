//! `[agent]`: the agent's configuration under the keys users write. Every default is
//! `AgentConfig::default()`'s (see [`super::defaults`]); `node = ""` stands for the agent's own
//! default, the host name.

use std::path::PathBuf;
use std::time::Duration;

use fleetscan_agent::AgentConfig;
use fleetscan_agent::pods::PodSource;
use fleetscan_core::FailMode;
use serde::{Deserialize, Serialize};

use super::millis;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Broker URLs, tried in order; the agent moves to the next when one fails.
    pub brokers: Vec<String>,
    /// Directories whose files are scanned on open and exec. Their whole filesystems are
    /// marked, so other mounts of the same files are covered too.
    pub protect: Vec<PathBuf>,
    /// This host's name in the fleet; empty means the kernel's hostname.
    pub node: String,
    pub cluster: String,
    /// Until the broker's policy arrives, and while no broker is reachable.
    pub fail_mode: FailMode,
    /// Local cap on every decision's wait; the broker's policy may only shorten it.
    pub decision_deadline_ms: u64,
    /// Until the broker's policy arrives.
    pub max_file_size: u64,
    /// Let the kernel skip events for files already judged clean.
    pub ignore_marks: bool,
    pub cache_capacity: usize,
    /// Pod metadata: `none`, `kubernetes` (watch this node's pods through the API server, with
    /// the in-cluster service account or the kubeconfig) or `file:PATH` (a JSON list in
    /// Kubernetes' format, e.g. `kubectl get pods,namespaces -o json`, re-read on change).
    pub pods: String,
    /// Seconds a pod that went away still resolves, for late events.
    pub pod_retention_s: u64,
}

impl Default for AgentSection {
    fn default() -> Self {
        let a = AgentConfig::default();
        AgentSection {
            brokers: a.brokers,
            protect: a.protect,
            // Derived when the agent starts: see `to_agent_config`.
            node: String::new(),
            cluster: a.cluster,
            fail_mode: a.fail_mode,
            decision_deadline_ms: millis(a.decision_deadline),
            max_file_size: a.max_file_size,
            ignore_marks: a.ignore_marks,
            cache_capacity: a.cache_capacity,
            pods: pods_key(&a.pods),
            pod_retention_s: a.pod_retention.as_secs(),
        }
    }
}

impl AgentSection {
    pub fn to_agent_config(&self) -> anyhow::Result<AgentConfig> {
        let pods = self
            .pods
            .parse()
            .map_err(|e: String| anyhow::anyhow!("[agent] pods: {e}"))?;
        Ok(AgentConfig {
            brokers: self.brokers.clone(),
            protect: self.protect.clone(),
            node: if self.node.is_empty() {
                AgentConfig::default().node
            } else {
                self.node.clone()
            },
            cluster: self.cluster.clone(),
            fail_mode: self.fail_mode,
            decision_deadline: Duration::from_millis(self.decision_deadline_ms),
            max_file_size: self.max_file_size,
            ignore_marks: self.ignore_marks,
            cache_capacity: self.cache_capacity,
            pods,
            pod_retention: Duration::from_secs(self.pod_retention_s),
        })
    }
}

/// A pod source as the `pods` key writes it (what `PodSource`'s `FromStr` reads back).
fn pods_key(source: &PodSource) -> String {
    match source {
        PodSource::None => "none".to_owned(),
        PodSource::Kubernetes { .. } => "kubernetes".to_owned(),
        PodSource::File(path) => format!("file:{}", path.display()),
    }
}
