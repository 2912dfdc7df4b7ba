//! The defaults `fleetscan` gives each component: the component's own `Default`
//! (`BrokerConfig::default()`, `AgentConfig::default()`, `WorkerConfig::default()`), which the
//! sections convert to their keys. linkerd2-proxy's `app/src/env.rs` is the model: one block
//! of defaults, read once into each component's configuration.
//!
//! Where a component's own default still differs from what `fleetscan` users have always had,
//! the users' value is kept below, marked *pending*, until the component adopts it (issue 12);
//! `pending_overrides_still_differ` fails once it has, so that the override is deleted then.
//! Must never: hold any other default for a field a component has; a default that should
//! change changes in its component.
//!
//! The constants here are the CLI's own: keys no component has.

use std::path::Path;

use fleetscan_agent::AgentConfig;
use fleetscan_broker::BrokerConfig;
use fleetscan_worker::WorkerConfig;

/// The broker's default gRPC address, used by every client subcommand too.
pub const DEFAULT_BROKER_ADDR: &str = "127.0.0.1:7700";

/// Where `fleetscan broker` and `fleetscan up` keep their state (the SQLite store).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/fleetscan";

/// clamd's socket on Debian, for `fleetscan worker --engine clamav`.
pub const DEFAULT_CLAMD_SOCKET: &str = "/var/run/clamav/clamd.ctl";

/// The SQLite store of a data directory.
pub fn sqlite_store_in(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("fleetscan.db").display())
}

/// The broker's defaults.
pub fn broker() -> BrokerConfig {
    BrokerConfig {
        // Pending in fleetscan-broker: "broker-<pid>" there.
        broker_id: format!("{}-{}", hostname(), std::process::id()),
        // Pending in fleetscan-broker: "sqlite://fleetscan.db" (the working directory) there.
        store_url: sqlite_store_in(Path::new(DEFAULT_DATA_DIR)),
        ..BrokerConfig::default()
    }
}

/// The agent's defaults.
pub fn agent() -> AgentConfig {
    AgentConfig {
        // Pending in fleetscan-agent: 100_000 there.
        cache_capacity: 1_000_000,
        ..AgentConfig::default()
    }
}

/// The worker's defaults.
pub fn worker() -> WorkerConfig {
    WorkerConfig {
        // Pending in fleetscan-worker: "" there (which the broker reads as "default").
        pool: "default".to_owned(),
        // Pending in fleetscan-worker: the machine's available parallelism there.
        credits: 4,
        // Pending in fleetscan-worker: 256 MiB there.
        max_file_size: 0,
        ..WorkerConfig::default()
    }
}

/// The kernel's host name ("localhost" should it be empty).
fn hostname() -> String {
    let name = gethostname::gethostname().to_string_lossy().into_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentSection, BrokerSection, Config, PolicySection, WorkerSection};

    /// Every field a section shares with its component has the component's default: the
    /// section's default, read into the component's configuration, is the component's default
    /// whole (so a field added to both is covered without a change here).
    #[test]
    fn every_section_default_is_its_components() {
        assert_eq!(BrokerSection::default().to_broker_config(), broker());
        let b = broker();
        assert_eq!(
            PolicySection::default().to_policy(b.policy.version),
            b.policy
        );
        assert_eq!(AgentSection::default().to_agent_config().unwrap(), agent());
        assert_eq!(WorkerSection::default().to_worker_config(), worker());
    }

    /// What `fleetscan config` printed before the sections took their defaults from the
    /// components: users' defaults must not move.
    const PRINTED_DEFAULTS: &str = r#"[broker]
listen = "127.0.0.1:7700"
store = ""
data_dir = "/var/lib/fleetscan"
broker_id = ""
scan_deadline_ms = 30000
job_deadline_ms = 10000
max_tries = 3
write_queue = 100000
verdict_cache_capacity = 1000000
claim_ttl_ms = 5000
policy_version = 1
namespace_label = "fleetscan.io/tenant"
shared_pools = []

[broker.policy]
fail_mode = "open"
decision_deadline_ms = 5000
max_file_size = 67108864
oversize_action = "allow"
audit_only = false

[broker.tenants]

[agent]
brokers = ["http://127.0.0.1:7700"]
protect = []
node = ""
cluster = "default"
fail_mode = "open"
decision_deadline_ms = 5000
max_file_size = 67108864
ignore_marks = true
cache_capacity = 1000000
pods = "none"
pod_retention_s = 300

[worker]
brokers = ["http://127.0.0.1:7700"]
engine = "reference"
clamd = "/var/run/clamav/clamd.ctl"
name = ""
pool = "default"
tenants = []
credits = 4
max_file_size = 0
"#;

    #[test]
    fn users_get_the_defaults_they_always_had() {
        let printed = toml::to_string_pretty(&Config::default()).unwrap();
        assert_eq!(printed, PRINTED_DEFAULTS);
        // And what the empty keys stand for.
        let host = hostname();
        let pid = std::process::id();
        let b = BrokerSection::default().to_broker_config();
        assert_eq!(b.store_url, "sqlite:///var/lib/fleetscan/fleetscan.db");
        assert_eq!(b.broker_id, format!("{host}-{pid}"));
        let a = AgentSection::default().to_agent_config().unwrap();
        assert_eq!(a.node, host);
        let w = WorkerSection::default().to_worker_config();
        assert_eq!(w.worker_name, format!("{host}-{pid}"));
    }

    /// Clients find a broker that runs on its defaults.
    #[test]
    fn agents_and_workers_default_to_the_brokers_address() {
        let url = format!("http://{DEFAULT_BROKER_ADDR}");
        assert_eq!(agent().brokers, vec![url.clone()]);
        assert_eq!(worker().brokers, vec![url]);
    }

    /// Each pending override above still differs from its component's default. Once a
    /// component adopts the users' value this fails: delete the override (and its line here).
    #[test]
    fn pending_overrides_still_differ() {
        let pending = "the component has it now: delete the pending override in config/defaults.rs";
        let (b, ours) = (BrokerConfig::default(), broker());
        assert_ne!(b.broker_id, ours.broker_id, "broker_id: {pending}");
        assert_ne!(b.store_url, ours.store_url, "store_url: {pending}");
        let (a, ours) = (AgentConfig::default(), agent());
        assert_ne!(
            a.cache_capacity, ours.cache_capacity,
            "cache_capacity: {pending}"
        );
        let (w, ours) = (WorkerConfig::default(), worker());
        assert_ne!(w.pool, ours.pool, "pool: {pending}");
        assert_ne!(
            w.max_file_size, ours.max_file_size,
            "max_file_size: {pending}"
        );
        // `credits` is the machine's parallelism there: equal to ours on a 4-core machine.
        if std::thread::available_parallelism().map_or(1, |n| n.get()) != 4 {
            assert_ne!(w.credits, ours.credits, "credits: {pending}");
        }
    }
}
