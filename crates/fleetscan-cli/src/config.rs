//! Configuration of every component: typed sections with written-down defaults, loaded from an
//! optional TOML file, then overridden by `FLEETSCAN_<SECTION>_<KEY>` environment variables,
//! then by command-line flags. `fleetscan config` prints the effective result.
//!
//! Loading takes the environment as a parameter so tests never mutate the process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fleetscan_core::tenancy::{DEFAULT_NAMESPACE_LABEL, TenancyConfig, TenantConfig};
use fleetscan_core::{Action, FailMode, Policy};
use serde::{Deserialize, Serialize};

/// The broker's default gRPC address, used by every client subcommand too.
pub const DEFAULT_BROKER_ADDR: &str = "127.0.0.1:7700";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerSection,
    pub agent: AgentSection,
    pub worker: WorkerSection,
}

/// The policy every new access is decided by (the default tenant's).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// `open` (allow) or `closed` (deny) when no verdict comes in time.
    pub fail_mode: FailMode,
    /// How long an access may wait for a decision; at most 5000.
    pub decision_deadline_ms: u64,
    /// Larger content is not scanned; `oversize_action` decides it.
    pub max_file_size: u64,
    pub oversize_action: Action,
    /// Record what would be denied, but allow it.
    pub audit_only: bool,
}

impl Default for PolicySection {
    fn default() -> Self {
        let p = Policy::default();
        PolicySection {
            fail_mode: p.fail_mode,
            decision_deadline_ms: millis(p.decision_deadline),
            max_file_size: p.max_file_size,
            oversize_action: p.oversize_action,
            audit_only: p.audit_only,
        }
    }
}

impl PolicySection {
    pub fn to_policy(&self) -> Policy {
        Policy {
            version: 1,
            fail_mode: self.fail_mode,
            decision_deadline: Duration::from_millis(self.decision_deadline_ms),
            max_file_size: self.max_file_size,
            oversize_action: self.oversize_action,
            audit_only: self.audit_only,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// gRPC address (agents, workers, admin and scan clients).
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://…`; empty means `sqlite://<data_dir>/fleetscan.db`.
    pub store: String,
    pub data_dir: PathBuf,
    /// Names this replica in logs and to peers; empty means `<hostname>-<pid>`.
    pub broker_id: String,
    pub policy: PolicySection,
    /// Deadline of one voluntary scan (ScanService).
    pub scan_deadline_ms: u64,
    /// Deadline of one worker's try at a job.
    pub job_deadline_ms: u64,
    pub max_tries: u32,
    /// Records (verdicts, denials) waiting to be written, at most; more are dropped and counted.
    pub write_queue: usize,
    pub verdict_cache_capacity: usize,
    /// How long a replica's claim on scanning new content holds without renewal (Postgres):
    /// the longest other replicas wait for a claimer that died before scanning it themselves.
    pub claim_ttl_ms: u64,
    /// Version of the policies (`policy` and every tenant's): raise it on every change, so
    /// that agents take the new set and ignore older ones.
    pub policy_version: u64,
    /// The namespace label that names a namespace's tenant (agents read it).
    pub namespace_label: String,
    /// Pools of the fleet that tenants may opt into (`shared_pools` of a tenant).
    pub shared_pools: Vec<String>,
    /// Tenants by name: `namespaces` (theirs whatever their labels say), `pools` (their own),
    /// `shared_pools` (opted into), `policy` (over `[broker.policy]`: fail_mode,
    /// decision_deadline_ms, max_file_size, oversize_action, audit_only, exec_only,
    /// exclusions = { paths, images, namespaces }, pools = the required ones) and
    /// `namespace_policies.<namespace>` (the same, over the tenant's). Without tenants every
    /// access is the fleet operator's (`default`), decided by `policy` and the `default` pool.
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            listen: DEFAULT_BROKER_ADDR.parse().expect("valid default address"),
            store: String::new(),
            data_dir: PathBuf::from("/var/lib/fleetscan"),
            broker_id: String::new(),
            policy: PolicySection::default(),
            scan_deadline_ms: 30_000,
            job_deadline_ms: 10_000,
            max_tries: 3,
            write_queue: 100_000,
            verdict_cache_capacity: 1_000_000,
            claim_ttl_ms: 5_000,
            policy_version: 1,
            namespace_label: DEFAULT_NAMESPACE_LABEL.into(),
            shared_pools: Vec::new(),
            tenants: BTreeMap::new(),
        }
    }
}

impl BrokerSection {
    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            format!("sqlite://{}", self.data_dir.join("fleetscan.db").display())
        } else {
            self.store.clone()
        }
    }

    pub fn to_broker_config(&self) -> fleetscan_broker::BrokerConfig {
        let broker_id = if self.broker_id.is_empty() {
            format!("{}-{}", hostname(), std::process::id())
        } else {
            self.broker_id.clone()
        };
        fleetscan_broker::BrokerConfig {
            broker_id,
            store_url: self.store_url(),
            policy: Policy {
                version: self.policy_version,
                ..self.policy.to_policy()
            },
            tenancy: TenancyConfig {
                version: self.policy_version,
                namespace_label: self.namespace_label.clone(),
                shared_pools: self.shared_pools.clone(),
                tenants: self.tenants.clone(),
            },
            scan_deadline: Duration::from_millis(self.scan_deadline_ms),
            job_deadline: Duration::from_millis(self.job_deadline_ms),
            max_tries: self.max_tries,
            write_queue: self.write_queue,
            verdict_cache_capacity: self.verdict_cache_capacity,
            claim_ttl: Duration::from_millis(self.claim_ttl_ms),
        }
    }
}

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
        let p = Policy::default();
        AgentSection {
            brokers: vec![format!("http://{DEFAULT_BROKER_ADDR}")],
            protect: Vec::new(),
            node: String::new(),
            cluster: "default".into(),
            fail_mode: p.fail_mode,
            decision_deadline_ms: millis(p.decision_deadline),
            max_file_size: p.max_file_size,
            ignore_marks: true,
            cache_capacity: 1_000_000,
            pods: "none".into(),
            pod_retention_s: 300,
        }
    }
}

impl AgentSection {
    pub fn to_agent_config(&self) -> anyhow::Result<fleetscan_agent::AgentConfig> {
        let pods = self
            .pods
            .parse()
            .map_err(|e: String| anyhow::anyhow!("[agent] pods: {e}"))?;
        Ok(fleetscan_agent::AgentConfig {
            brokers: self.brokers.clone(),
            protect: self.protect.clone(),
            node: if self.node.is_empty() {
                hostname()
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
        WorkerSection {
            brokers: vec![format!("http://{DEFAULT_BROKER_ADDR}")],
            engine: Engine::Reference,
            clamd: "/var/run/clamav/clamd.ctl".into(),
            clamd_ruleset_label: None,
            rules_dir: None,
            blocklist: None,
            name: String::new(),
            pool: "default".into(),
            tenants: Vec::new(),
            credits: 4,
            max_file_size: 0,
        }
    }
}

impl WorkerSection {
    pub fn to_worker_config(&self) -> fleetscan_worker::WorkerConfig {
        fleetscan_worker::WorkerConfig {
            brokers: self.brokers.clone(),
            worker_name: if self.name.is_empty() {
                format!("{}-{}", hostname(), std::process::id())
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

/// Loads the configuration: defaults, then the file (if any), then `FLEETSCAN_<SECTION>_<KEY>`
/// variables from `env` (values are TOML: `FLEETSCAN_AGENT_PROTECT='["/srv"]'`; a value that is
/// not valid TOML is taken as a string). Nested keys use a double underscore:
/// `FLEETSCAN_BROKER_POLICY__FAIL_MODE=closed`.
pub fn load(file: Option<&Path>, env: &BTreeMap<String, String>) -> anyhow::Result<Config> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => toml::Table::new(),
    };
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("FLEETSCAN_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        let section = section.to_ascii_lowercase();
        if !matches!(section.as_str(), "broker" | "agent" | "worker") {
            continue;
        }
        let path: Vec<String> = key
            .to_ascii_lowercase()
            .split("__")
            .map(str::to_owned)
            .collect();
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let mut node = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        for (i, part) in path.iter().enumerate() {
            let toml::Value::Table(t) = node else {
                bail!("environment variable {name}: `{section}` is not a table");
            };
            if i + 1 == path.len() {
                t.insert(part.clone(), parsed.clone());
                break;
            }
            node = t
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
    }
    let config: Config = toml::Value::Table(table)
        .try_into()
        .context("invalid configuration")?;
    Ok(config)
}

/// The environment variables that configure fleetscan.
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("FLEETSCAN_"))
        .collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The kernel's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A list of strings, or one string as a list of one.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_written_down_and_round_trip() {
        let c = load(None, &BTreeMap::new()).unwrap();
        assert_eq!(c, Config::default());
        let text = toml::to_string_pretty(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.broker.policy.decision_deadline_ms, 5000);
        assert_eq!(c.broker.policy.fail_mode, FailMode::Open);
    }

    #[test]
    fn the_pod_source_is_checked_when_the_agent_starts() {
        let c = load(None, &env(&[("FLEETSCAN_AGENT_PODS", "kubernetes")])).unwrap();
        assert!(matches!(
            c.agent.to_agent_config().unwrap().pods,
            fleetscan_agent::pods::PodSource::Kubernetes { .. }
        ));
        let c = load(
            None,
            &env(&[("FLEETSCAN_AGENT_PODS", "file:/etc/pods.json")]),
        )
        .unwrap();
        assert_eq!(
            c.agent.to_agent_config().unwrap().pods,
            fleetscan_agent::pods::PodSource::File("/etc/pods.json".into())
        );
        let c = load(None, &env(&[("FLEETSCAN_AGENT_PODS", "etcd")])).unwrap();
        let e = c.agent.to_agent_config().unwrap_err().to_string();
        assert!(e.contains("pods") && e.contains("etcd"), "{e}");
    }

    #[test]
    fn a_worker_takes_one_broker_or_a_list() {
        let one = load(
            None,
            &env(&[("FLEETSCAN_WORKER_BROKER", "http://10.0.0.1:7700")]),
        )
        .unwrap();
        assert_eq!(one.worker.brokers, vec!["http://10.0.0.1:7700".to_owned()]);
        let many = load(
            None,
            &env(&[(
                "FLEETSCAN_WORKER_BROKERS",
                r#"["http://10.0.0.1:7700", "http://10.0.0.2:7700"]"#,
            )]),
        )
        .unwrap();
        assert_eq!(
            many.worker.to_worker_config().brokers,
            vec![
                "http://10.0.0.1:7700".to_owned(),
                "http://10.0.0.2:7700".to_owned()
            ]
        );
    }

    #[test]
    fn file_then_environment_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetscan.toml");
        std::fs::write(
            &path,
            "[broker]\nstore = \"postgres://x/y\"\n[broker.policy]\nfail_mode = \"closed\"\n[agent]\nprotect = [\"/srv\"]\n",
        )
        .unwrap();
        let c = load(
            Some(&path),
            &env(&[
                ("FLEETSCAN_AGENT_DECISION_DEADLINE_MS", "250"),
                ("FLEETSCAN_WORKER_POOL", "fast"),
                ("FLEETSCAN_BROKER_POLICY__AUDIT_ONLY", "true"),
                ("UNRELATED", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.broker.store_url(), "postgres://x/y");
        assert_eq!(c.broker.policy.fail_mode, FailMode::Closed);
        assert!(c.broker.policy.audit_only);
        assert_eq!(c.agent.protect, vec![PathBuf::from("/srv")]);
        assert_eq!(c.agent.decision_deadline_ms, 250);
        assert_eq!(c.worker.pool, "fast");
    }

    #[test]
    fn tenants_pools_and_namespace_policies_load_from_the_broker_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetscan.toml");
        std::fs::write(
            &path,
            r#"
[broker]
policy_version = 3
shared_pools = ["clamav"]

[broker.policy]
fail_mode = "open"

[broker.tenants.acme]
namespaces = ["shop", "shop-dev"]
pools = ["yara"]
shared_pools = ["clamav"]
policy = { fail_mode = "closed", pools = ["yara", "clamav"] }

[broker.tenants.acme.namespace_policies.shop-dev]
audit_only = true

[broker.tenants.acme.namespace_policies.ci]
exec_only = true
exclusions = { paths = ["/cache"], images = ["registry.acme/ci-*"] }

[broker.tenants.globex]
namespaces = ["web"]
pools = ["yara"]
"#,
        )
        .unwrap();
        let c = load(Some(&path), &BTreeMap::new()).unwrap();
        let b = c.broker.to_broker_config();
        assert_eq!(b.policy.version, 3);
        let t = fleetscan_core::Tenancy::new(&b.policy, &b.tenancy).unwrap();
        assert_eq!(t.version(), 3);
        assert_eq!(t.tenant_of("shop", ""), "acme");
        let shop = t.resolve("acme", "shop");
        assert_eq!(shop.policy.fail_mode, FailMode::Closed);
        assert_eq!(shop.pools.len(), 2);
        assert!(t.resolve("acme", "shop-dev").policy.audit_only);
        assert!(t.resolve("acme", "ci").exec_only);
        assert_eq!(t.resolve("globex", "web").policy.fail_mode, FailMode::Open);
        // The effective configuration prints and reads back.
        let text = toml::to_string_pretty(&c).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
    }

    #[test]
    fn a_configuration_with_only_a_policy_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.toml");
        std::fs::write(
            &path,
            "[broker]\nstore = \"sqlite:///tmp/x.db\"\n[broker.policy]\nfail_mode = \"closed\"\n",
        )
        .unwrap();
        let b = load(Some(&path), &BTreeMap::new())
            .unwrap()
            .broker
            .to_broker_config();
        let t = fleetscan_core::Tenancy::new(&b.policy, &b.tenancy).unwrap();
        let p = t.resolve(fleetscan_core::DEFAULT_TENANT, "");
        assert_eq!(p.policy.fail_mode, FailMode::Closed);
        assert_eq!(p.pools, vec![fleetscan_core::PoolKey::fleet_default()]);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[agent]\nprotekt = [\"/srv\"]\n").unwrap();
        let err = load(Some(&path), &BTreeMap::new()).unwrap_err();
        assert!(format!("{err:#}").contains("protekt"), "{err:#}");
        let err = load(None, &env(&[("FLEETSCAN_AGENT_NOPE", "1")])).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }

    #[test]
    fn default_store_is_sqlite_under_the_data_dir() {
        let b = BrokerSection {
            data_dir: PathBuf::from("/tmp/x"),
            ..BrokerSection::default()
        };
        assert_eq!(b.store_url(), "sqlite:///tmp/x/fleetscan.db");
    }
}
