//! What an agent is told: [`AgentConfig`] (what it protects, where its brokers are, its
//! policy until a broker's arrives) and [`AgentTuning`] (internal limits).
//!
//! Plain values with their defaults; the CLI fills them from its configuration. Nothing here
//! reads a file or the environment except the host name, for the default node name.

use std::path::PathBuf;
use std::time::Duration;

use fleetscan_core::FailMode;

use crate::pods;

/// What the agent protects and where its brokers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Broker URLs ("http://127.0.0.1:7700"), tried in order, then round again.
    pub brokers: Vec<String>,
    /// Directories whose files are scanned. Their whole filesystems are marked; files outside
    /// these directories are allowed at once.
    pub protect: Vec<PathBuf>,
    pub node: String,
    pub cluster: String,
    /// Until the broker's policy arrives, and when no broker was ever reached.
    pub fail_mode: FailMode,
    /// Local cap on waiting for a decision; effective = min(this, the policy's), never above
    /// 5 s.
    pub decision_deadline: Duration,
    /// Until the broker's policy arrives.
    pub max_file_size: u64,
    /// Kernel ignore marks for clean files, so their next opens cost nothing.
    pub ignore_marks: bool,
    /// Entries of the local verdict cache.
    pub cache_capacity: usize,
    /// Where pod metadata (name, namespace, labels, images) comes from.
    pub pods: pods::PodSource,
    /// How long a pod that went away still resolves, for late events.
    pub pod_retention: Duration,
}

impl Default for AgentConfig {
    /// One local broker, nothing protected, fail-open, 5 s, 64 MiB, ignore marks on, 1,000,000
    /// cache entries; the node is the host name, the cluster "default".
    fn default() -> Self {
        AgentConfig {
            brokers: vec!["http://127.0.0.1:7700".into()],
            protect: Vec::new(),
            node: fleetscan_core::host_name(),
            cluster: "default".into(),
            fail_mode: FailMode::Open,
            decision_deadline: fleetscan_core::policy::MAX_DECISION_DEADLINE,
            max_file_size: 64 * 1024 * 1024,
            ignore_marks: true,
            cache_capacity: 1_000_000,
            pods: pods::PodSource::None,
            pod_retention: Duration::from_secs(300),
        }
    }
}

/// Internal limits, rarely changed; tests shrink them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTuning {
    /// Events parked at once; beyond it, the fail mode answers at once (and is counted).
    pub max_pending: usize,
    /// Threads that hash content.
    pub hash_threads: usize,
    /// Reports waiting for a broker; beyond it they are dropped and counted.
    pub report_queue: usize,
    /// Control messages queued towards the broker in one session.
    pub session_queue: usize,
    /// Content uploads at once.
    pub upload_concurrency: usize,
    pub heartbeat: Duration,
    /// For connecting and for the broker's `SessionAccepted`.
    pub connect_timeout: Duration,
    /// Kernel ignore marks kept at once (each holds a descriptor and a read lease); beyond it
    /// the oldest is removed.
    pub max_marks: usize,
}

impl Default for AgentTuning {
    fn default() -> Self {
        AgentTuning {
            max_pending: 4096,
            hash_threads: 2,
            report_queue: 10_000,
            session_queue: 1024,
            upload_concurrency: 4,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_marks: 16_384,
        }
    }
}
