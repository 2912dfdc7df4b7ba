//! The worker's configuration. Timing constants that operators need not tune live in
//! `session::timing`, each with the reason for its value.
//!
//! Its defaults must never need the network or a file: a missing host name only shortens the
//! worker's name.

/// How a worker attaches and how much work it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The gRPC addresses of the brokers served, e.g. `["http://127.0.0.1:7700"]`. The worker
    /// attaches to every one at once (one stream each, reconnecting on its own); the replicas
    /// of a fleet share its scan slots (`credits`). At least one; no address twice.
    pub brokers: Vec<String>,
    /// Instance name shown to operators, e.g. host name and pid.
    pub worker_name: String,
    /// The pool served, within its tenants; empty means "default".
    pub pool: String,
    /// Tenants whose jobs this worker takes; empty means the broker's default tenant.
    pub tenants: Vec<String>,
    /// Scans run at once, in total over all brokers; also the credits granted to each broker,
    /// so a worker of N brokers may hold up to N × `credits` jobs (receiving or waiting for a
    /// scan slot) while never scanning more than `credits` at once. At least 1.
    pub credits: u32,
    /// The largest content accepted, in bytes; 0 means no limit.
    pub max_file_size: u64,
}

impl Default for WorkerConfig {
    /// Defaults: brokers ["http://127.0.0.1:7700"], worker name "HOSTNAME-PID", pool
    /// "default", no tenants (the broker's default tenant), 4 credits, no size limit (the
    /// broker's policy bounds what it sends).
    fn default() -> Self {
        WorkerConfig {
            brokers: vec!["http://127.0.0.1:7700".to_owned()],
            worker_name: default_worker_name(),
            pool: "default".to_owned(),
            tenants: Vec::new(),
            credits: 4,
            max_file_size: 0,
        }
    }
}

fn default_worker_name() -> String {
    format!("{}-{}", fleetscan_core::host_name(), std::process::id())
}
