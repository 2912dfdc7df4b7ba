//! The worker-protocol conformance kit: a scanner vendor checks a worker against
//! `WorkerService.Attach` (proto/fleetscan/v1/worker.proto) without a real broker.
//!
//! The kit plays the broker. It serves `WorkerService` itself on `127.0.0.1:0`, starts the
//! vendor's worker command through `sh -c` (with the kit's URL in place of `{broker}` and in
//! `FLEETSCAN_WORKER_BROKER`), and drives scripted checks against the worker that dials in.
//!
//! Every check gets a worker process and a kit server of its own: the worker is started for the
//! check and killed (its whole process group) after it, so one failing check never leaves a
//! wedged session behind for the next, and each check observes a first attach from scratch.
//!
//! The kit never speaks to a real broker, never touches a network other than loopback, and never
//! kills a process it did not start.

#![forbid(unsafe_code)]

mod checks;
mod content;
mod harness;
mod process;
mod report;
mod server;
mod session;

use std::time::Duration;

pub use content::EICAR_TEST_FILE;
pub use report::print_report;

/// The checks, in the order [`run`] runs them. Each is described in `checks`.
pub const CHECKS: [&str; 9] = [
    "register",
    "clean-file",
    "eicar",
    "chunked-large-file",
    "cancel",
    "credits",
    "heartbeat",
    "hash-mismatch",
    "broker-restart",
];

/// What to check and how long to wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConformanceConfig {
    /// Run through `sh -c`; `{broker}` is replaced by the kit's URL ("http://127.0.0.1:PORT"),
    /// which is also in the environment as `FLEETSCAN_WORKER_BROKER`.
    pub worker_command: String,
    /// Bounds each wait for the worker to act: attach, grant a credit, answer a job.
    /// Default 20 s.
    pub check_timeout: Duration,
    /// Check names (see [`CHECKS`]); empty means all.
    pub only: Vec<String>,
    /// The longest the `heartbeat` check lets the worker go without a heartbeat while the kit is
    /// silent. The protocol says at least every 10 s; default 12 s. At most 15 s, so that the
    /// check (two such gaps) never leaves a worker 30 s without hearing from the kit, which the
    /// protocol lets it take for a dead broker.
    pub heartbeat_wait: Duration,
    /// How long the kit watches for something that must NOT happen: a message before
    /// `Registered`, a result for a cancelled job, an answer to a job sent beyond the credits.
    /// Default 2 s; below 10 s (see [`MAX_QUIET_WAIT`]).
    pub quiet_wait: Duration,
    /// How long `broker-restart` gives the worker to re-register once the kit listens again.
    /// Default 10 s.
    pub reconnect_wait: Duration,
}

impl ConformanceConfig {
    /// The defaults (see each field) for this worker command.
    pub fn new(worker_command: impl Into<String>) -> Self {
        ConformanceConfig {
            worker_command: worker_command.into(),
            ..ConformanceConfig::default()
        }
    }
}

impl Default for ConformanceConfig {
    /// An empty worker command (which [`run`] refuses), check_timeout 20 s, all checks,
    /// heartbeat_wait 12 s, quiet_wait 2 s, reconnect_wait 10 s.
    fn default() -> Self {
        ConformanceConfig {
            worker_command: String::new(),
            check_timeout: Duration::from_secs(20),
            only: Vec::new(),
            heartbeat_wait: Duration::from_secs(12),
            quiet_wait: Duration::from_secs(2),
            reconnect_wait: Duration::from_secs(10),
        }
    }
}

/// The most `heartbeat_wait` may be: two gaps of it stay under the protocol's 30 s of silence.
pub const MAX_HEARTBEAT_WAIT: Duration = Duration::from_secs(15);

/// `quiet_wait` stays below this: `register` holds `Registered` back for that long, and the SDK
/// gives a broker 10 s to confirm before it tries again.
pub const MAX_QUIET_WAIT: Duration = Duration::from_secs(10);

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    pub name: &'static str,
    pub passed: bool,
    /// Why it failed, or what was observed when it passed.
    pub detail: String,
    /// From starting the worker to stopping it.
    pub elapsed: Duration,
}

/// Why the kit could not run at all. A worker that misbehaves is never an error: it fails
/// checks.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error("the worker command is empty")]
    EmptyCommand,
    #[error("unknown check {name:?}; the checks are: {}", CHECKS.join(", "))]
    UnknownCheck { name: String },
    #[error("invalid conformance config: {0}")]
    InvalidConfig(String),
    #[error("cannot listen on the loopback interface: {0}")]
    Listen(#[source] std::io::Error),
    #[error("cannot start the worker command through sh: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Runs the selected checks one after the other, each against a fresh worker process.
pub async fn run(config: ConformanceConfig) -> Result<Vec<CheckResult>, ConformanceError> {
    let selected = select(&config)?;
    let mut results = Vec::with_capacity(selected.len());
    for check in selected {
        results.push(checks::run_one(check, &config).await?);
    }
    Ok(results)
}

/// Validates the config and picks the checks to run, in [`CHECKS`] order.
fn select(config: &ConformanceConfig) -> Result<Vec<checks::Check>, ConformanceError> {
    if config.worker_command.trim().is_empty() {
        return Err(ConformanceError::EmptyCommand);
    }
    if config.check_timeout.is_zero() {
        return Err(ConformanceError::InvalidConfig(
            "check_timeout must be above zero".into(),
        ));
    }
    if config.heartbeat_wait.is_zero() || config.heartbeat_wait > MAX_HEARTBEAT_WAIT {
        return Err(ConformanceError::InvalidConfig(format!(
            "heartbeat_wait must be above zero and at most {} s",
            MAX_HEARTBEAT_WAIT.as_secs()
        )));
    }
    if config.quiet_wait.is_zero() || config.quiet_wait >= MAX_QUIET_WAIT {
        return Err(ConformanceError::InvalidConfig(format!(
            "quiet_wait must be above zero and below {} s",
            MAX_QUIET_WAIT.as_secs()
        )));
    }
    if config.reconnect_wait.is_zero() {
        return Err(ConformanceError::InvalidConfig(
            "reconnect_wait must be above zero".into(),
        ));
    }
    for name in &config.only {
        if !CHECKS.contains(&name.as_str()) {
            return Err(ConformanceError::UnknownCheck { name: name.clone() });
        }
    }
    Ok(checks::Check::ALL
        .into_iter()
        .filter(|c| config.only.is_empty() || config.only.iter().any(|n| n == c.name()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_has_a_name_in_order() {
        let names: Vec<_> = checks::Check::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, CHECKS);
    }

    #[test]
    fn only_selects_in_canonical_order_and_refuses_unknown_names() {
        let mut config = ConformanceConfig::new("true");
        config.only = vec!["heartbeat".into(), "register".into(), "heartbeat".into()];
        let names: Vec<_> = select(&config).unwrap().iter().map(|c| c.name()).collect();
        assert_eq!(names, ["register", "heartbeat"]);
        config.only = vec!["regsiter".into()];
        let err = select(&config).unwrap_err();
        assert!(
            matches!(err, ConformanceError::UnknownCheck { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("broker-restart"), "{err}");
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(matches!(
            select(&ConformanceConfig::new("  ")),
            Err(ConformanceError::EmptyCommand)
        ));
        let mut config = ConformanceConfig::new("true");
        config.heartbeat_wait = Duration::from_secs(16);
        assert!(matches!(
            select(&config),
            Err(ConformanceError::InvalidConfig(_))
        ));
        config.heartbeat_wait = Duration::from_secs(12);
        config.quiet_wait = Duration::from_secs(10);
        assert!(matches!(
            select(&config),
            Err(ConformanceError::InvalidConfig(_))
        ));
        config.quiet_wait = Duration::from_secs(2);
        config.check_timeout = Duration::ZERO;
        assert!(matches!(
            select(&config),
            Err(ConformanceError::InvalidConfig(_))
        ));
        assert_eq!(select(&ConformanceConfig::new("true")).unwrap().len(), 9);
    }
}
