//! Configuration of every component: typed sections, loaded from an optional TOML file, then
//! overridden by `FLEETSCAN_<SECTION>_<KEY>` environment variables, then by command-line flags.
//! `fleetscan config` prints the effective result.
//!
//! A section's defaults are its component's own (`BrokerConfig::default()`, ...), converted to
//! the section's keys (durations as `_ms`): a default is written once, where its component
//! lives, and never here ([`defaults`] says how, and its tests hold the two together). A
//! section only adds keys its component does not have (the broker's address, its data
//! directory, the worker's engine).
//!
//! Loading takes the environment as a parameter so tests never mutate the process environment.

mod agent;
mod broker;
pub mod defaults;
mod worker;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub use agent::AgentSection;
pub use broker::{BrokerSection, PolicySection};
pub use defaults::DEFAULT_BROKER_ADDR;
pub use worker::{Engine, WorkerSection};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerSection,
    pub agent: AgentSection,
    pub worker: WorkerSection,
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

/// A duration as a `_ms` key holds it.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
    use std::path::PathBuf;

    use fleetscan_core::FailMode;

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
