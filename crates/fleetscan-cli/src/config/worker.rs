//! `[worker]`: the worker's configuration under the keys users write. Every default the worker
//! SDK has is `WorkerConfig::default()`'s (see [`super::defaults`]); the engine and its files
//! are the CLI's alone (the SDK runs whatever scanner it is given). `name = ""` stands for the
//! SDK's own default, `<hostname>-<pid>`.

use std::path::PathBuf;

use fleetscan_worker::WorkerConfig;
use serde::{Deserialize, Serialize};

use super::{defaults, one_or_many};

/// Which engine a `fleetscan worker` runs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// YARA rules (the shipped ones and `rules_dir`) and the SHA-256 `blocklist`.
    #[default]
    Reference,
    /// A running `clamd`, over its socket (`clamd`).
    Clamav,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    /// Broker URLs: the worker attaches to every one of them at once (each replica of a fleet
    /// gets its own credits; scans at once stay within `credits` in all). Also read as
    /// `broker = "URL"` (one), so `FLEETSCAN_WORKER_BROKER=URL` keeps working.
    #[serde(alias = "broker", deserialize_with = "one_or_many")]
    pub brokers: Vec<String>,
    pub engine: Engine,
    /// clamd's socket for the `clamav` engine: a unix socket path, or `tcp:HOST:PORT`.
    pub clamd: String,
    /// Appended to clamd's database version in the rule-set version, e.g. to tell apart
    /// local signature sets that clamd does not version.
    pub clamd_ruleset_label: Option<String>,
    /// Extra YARA rules (`*.yar`, `*.yara`), besides the shipped ones.
    pub rules_dir: Option<PathBuf>,
    /// SHA-256 block list: one hex digest a line, optionally followed by a threat name.
    pub blocklist: Option<PathBuf>,
    /// Instance name; empty means `<hostname>-<pid>`.
    pub name: String,
    pub pool: String,
    /// Tenants whose jobs the worker takes: one for a tenant's own pool, those that opted in
    /// (or none: all of them) for a shared pool; none means the fleet operator's.
    pub tenants: Vec<String>,
    /// Jobs held at once.
    pub credits: u32,
    pub max_file_size: u64,
}

impl Default for WorkerSection {
    fn default() -> Self {
        let w = WorkerConfig::default();
        WorkerSection {
            brokers: w.brokers,
            engine: Engine::default(),
            clamd: defaults::DEFAULT_CLAMD_SOCKET.to_owned(),
            clamd_ruleset_label: None,
            rules_dir: None,
            blocklist: None,
            // Derived when the worker starts: see `to_worker_config`.
            name: String::new(),
            pool: w.pool,
            tenants: w.tenants,
            credits: w.credits,
            max_file_size: w.max_file_size,
        }
    }
}

impl WorkerSection {
    pub fn to_worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            brokers: self.brokers.clone(),
            worker_name: if self.name.is_empty() {
                WorkerConfig::default().worker_name
            } else {
                self.name.clone()
            },
            pool: self.pool.clone(),
            tenants: self.tenants.clone(),
            credits: self.credits.max(1),
            max_file_size: self.max_file_size,
        }
    }
}
