//! [`ClamdScanner`]: a [`Scanner`] that hands each content to clamd with `INSTREAM`, and how
//! clamd's answers map to verdicts.
//!
//! The scanner never touches the filesystem (content goes over the socket, so clamd needs no
//! access to the worker's files) and never answers clean unless clamd said `OK`.

use std::time::Duration;

use fleetscan_core::{ScannerIdentity, VerdictKind};
use fleetscan_worker::{ScanOutcome, Scanner};
use tracing::{debug, info, warn};

use crate::client::{self, ClamdAddr, ClamdError, Limits};
use crate::protocol::{self, ClamdVersion, ScanReply};

/// The engine name in the scanner identity.
pub const ENGINE: &str = "clamav";

/// The rule-set version when clamd reports no database version (local signature files only,
/// no `daily.cvd`/`.cld`/`.cud`) and no [`ClamdOptions::ruleset_label`] is set.
pub const UNVERSIONED_RULESET: &str = "unversioned";

/// Threat names clamd's engine gives content it stopped scanning at a limit (with clamd's
/// `AlertExceedsMax yes`): the content was not fully scanned, which says nothing about it.
const LIMITS_EXCEEDED_PREFIX: &str = "Heuristics.Limits.Exceeded";

/// Threat names of clamd's heuristic detections (phishing, broken executables, encrypted
/// archives, ...) as opposed to signature matches.
const HEURISTICS_PREFIX: &str = "Heuristics.";

/// How a [`ClamdScanner`] talks to clamd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClamdOptions {
    /// How long a connect to clamd may take. A unix-socket connect is immediate unless
    /// clamd stopped accepting, so this is short.
    pub connect_timeout: Duration,
    /// How long one scan may take in all: connect, streaming, clamd's work and its reply.
    /// Keep it at most the broker's job deadline: a scan that outlives it is wasted (the
    /// broker has given the job to another worker) yet holds one of this worker's credits.
    pub scan_timeout: Duration,
    /// How often [`crate::run_worker`] asks clamd for its version, to notice a database
    /// reload and register again with the new versions. Zero: never.
    pub version_check_interval: Duration,
    /// A label for signatures clamd's `VERSION` does not cover (local `.ndb`/`.hdb`/... files),
    /// e.g. a digest or date the operator changes with them. It becomes the rule-set version
    /// when clamd reports none, and is appended as `+label` to the one it reports.
    pub ruleset_label: Option<String>,
}

impl Default for ClamdOptions {
    /// connect_timeout 2 s, scan_timeout 10 s (the broker's default job deadline),
    /// version_check_interval 10 s, no ruleset_label.
    fn default() -> Self {
        ClamdOptions {
            connect_timeout: Duration::from_secs(2),
            scan_timeout: Duration::from_secs(10),
            version_check_interval: Duration::from_secs(10),
            ruleset_label: None,
        }
    }
}

/// A [`Scanner`] backed by a running clamd.
///
/// Its identity is read once, by [`ClamdScanner::connect`], and never changes afterwards,
/// as the [`Scanner`] contract asks: the verdicts of one `ClamdScanner` are labelled with the
/// versions clamd had when it was made. clamd's database only moves forward (a reload loads
/// newer signatures), so a verdict is never labelled newer than the database that made it.
/// To tell the broker about a reload, make a new `ClamdScanner` and register again:
/// [`crate::run_worker`] does that when [`ClamdScanner::query_version`] reports a change.
pub struct ClamdScanner {
    addr: ClamdAddr,
    options: ClamdOptions,
    version: ClamdVersion,
    identity: ScannerIdentity,
}

impl ClamdScanner {
    /// Connects with the default [`ClamdOptions`]. See [`ClamdScanner::connect_with`].
    pub fn connect(addr: ClamdAddr, scanner_name: &str) -> Result<Self, ClamdError> {
        Self::connect_with(addr, scanner_name, ClamdOptions::default())
    }

    /// Asks clamd for its `VERSION`, which proves it is there and speaks the protocol, and
    /// makes the identity: scanner = `scanner_name`, engine = "clamav", engine_version = the
    /// ClamAV version, ruleset_version = the database version (see [`ClamdOptions`]).
    pub fn connect_with(
        addr: ClamdAddr,
        scanner_name: &str,
        options: ClamdOptions,
    ) -> Result<Self, ClamdError> {
        let version = query_version(&addr, &options)?;
        let identity = identity_of(scanner_name, &version, options.ruleset_label.as_deref());
        if version.database_version.is_none() && options.ruleset_label.is_none() {
            warn!(
                clamd = %addr,
                "clamd reports no database version (local signatures only): verdicts are \
                 labelled `{UNVERSIONED_RULESET}` and are reused after the signatures change; \
                 set a ruleset label that changes with them"
            );
        }
        info!(
            clamd = %addr,
            engine_version = %identity.engine_version,
            ruleset_version = %identity.ruleset_version,
            "clamd connected"
        );
        Ok(ClamdScanner {
            addr,
            options,
            version,
            identity,
        })
    }

    pub fn addr(&self) -> &ClamdAddr {
        &self.addr
    }

    pub fn options(&self) -> &ClamdOptions {
        &self.options
    }

    /// The version clamd reported at connect, which the identity is made of.
    pub fn version(&self) -> &ClamdVersion {
        &self.version
    }

    /// Asks clamd for its version now. Costs one connection and a short reply.
    pub fn query_version(&self) -> Result<ClamdVersion, ClamdError> {
        query_version(&self.addr, &self.options)
    }

    /// Whether clamd's version now differs from the one this scanner's identity carries:
    /// `Some(new)` when it does. A scanner whose versions changed should be replaced and its
    /// worker registered again.
    pub fn changed_version(&self) -> Result<Option<ClamdVersion>, ClamdError> {
        let now = self.query_version()?;
        let same = identity_of(
            &self.identity.scanner,
            &now,
            self.options.ruleset_label.as_deref(),
        ) == self.identity;
        Ok((!same).then_some(now))
    }

    /// Streams `content` to clamd and returns its reply as is.
    pub fn scan_reply(&self, content: &[u8]) -> Result<ScanReply, ClamdError> {
        let reply = client::instream(&self.addr, self.limits(), content)?;
        Ok(ScanReply::parse(&reply)?)
    }

    fn limits(&self) -> Limits {
        limits(&self.options)
    }
}

impl Scanner for ClamdScanner {
    fn identity(&self) -> ScannerIdentity {
        self.identity.clone()
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        match self.scan_reply(content) {
            Ok(reply) => {
                debug!(clamd = %self.addr, size = content.len(), reply = ?reply, "clamd answered");
                outcome_of(reply)
            }
            Err(err) => {
                warn!(clamd = %self.addr, size = content.len(), error = %err, "clamd scan failed");
                ScanOutcome::error(err.to_string(), err.is_retryable())
            }
        }
    }
}

fn limits(options: &ClamdOptions) -> Limits {
    Limits {
        connect: options.connect_timeout,
        total: options.scan_timeout,
    }
}

fn query_version(addr: &ClamdAddr, options: &ClamdOptions) -> Result<ClamdVersion, ClamdError> {
    let limits = Limits {
        connect: options.connect_timeout,
        // A version is a short reply from memory: it needs no scan-sized budget.
        total: options.scan_timeout.min(options.connect_timeout * 2),
    };
    let reply = client::command(addr, limits, protocol::VERSION)?;
    Ok(ClamdVersion::parse(&reply)?)
}

/// The identity of a scanner over clamd at `version`.
pub(crate) fn identity_of(
    scanner_name: &str,
    version: &ClamdVersion,
    label: Option<&str>,
) -> ScannerIdentity {
    let label = label.map(str::trim).filter(|l| !l.is_empty());
    let ruleset_version = match (version.database_version, label) {
        (Some(db), None) => db.to_string(),
        (Some(db), Some(label)) => format!("{db}+{label}"),
        (None, Some(label)) => label.to_owned(),
        (None, None) => UNVERSIONED_RULESET.to_owned(),
    };
    ScannerIdentity {
        scanner: scanner_name.to_owned(),
        engine: ENGINE.to_owned(),
        engine_version: version.engine_version.clone(),
        ruleset_version,
    }
}

/// What a clamd reply means for the broker.
///
/// - `OK`: clean.
/// - `<name> FOUND`: malicious, with clamd's name as is (`.UNOFFICIAL` included: it tells an
///   operator the hit came from a local signature, not a Cisco-Talos one); suspicious when
///   the name is one of clamd's heuristics (`Heuristics.*`); unsupported when it is
///   `Heuristics.Limits.Exceeded.*` (clamd stopped at a scan limit: nothing is known).
/// - `INSTREAM size limit exceeded`: unsupported, not retryable: the content is larger than
///   clamd's `StreamMaxLength`, and every clamd of the pool is configured alike.
/// - any other `... ERROR`: an error clamd hit (memory, temporary files): retryable.
pub(crate) fn outcome_of(reply: ScanReply) -> ScanOutcome {
    match reply {
        ScanReply::Clean => ScanOutcome::clean(),
        ScanReply::Found(name) if name.starts_with(LIMITS_EXCEEDED_PREFIX) => ScanOutcome {
            kind: VerdictKind::Unsupported,
            threat_name: None,
            detail: Some(format!("clamd stopped at a scan limit: {name}")),
            retryable: false,
        },
        ScanReply::Found(name) if name.starts_with(HEURISTICS_PREFIX) => ScanOutcome {
            kind: VerdictKind::Suspicious,
            threat_name: Some(name),
            detail: None,
            retryable: false,
        },
        ScanReply::Found(name) => ScanOutcome::malicious(name),
        ScanReply::SizeLimitExceeded => ScanOutcome {
            kind: VerdictKind::Unsupported,
            threat_name: None,
            detail: Some(
                "content larger than clamd's StreamMaxLength (INSTREAM size limit exceeded)"
                    .to_owned(),
            ),
            retryable: false,
        },
        ScanReply::Error(message) => ScanOutcome::error(format!("clamd: {message}"), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(db: Option<u32>) -> ClamdVersion {
        ClamdVersion {
            engine_version: "1.4.6".into(),
            database_version: db,
            database_date: db.map(|_| "Sun Nov 29 05:04:54 2026".into()),
        }
    }

    #[test]
    fn identity_from_the_version_and_label() {
        let id = identity_of("clamav", &version(Some(27123)), None);
        assert_eq!(
            id,
            ScannerIdentity {
                scanner: "clamav".into(),
                engine: "clamav".into(),
                engine_version: "1.4.6".into(),
                ruleset_version: "27123".into(),
            }
        );
        assert_eq!(
            identity_of("x", &version(Some(27123)), Some("local-7")).ruleset_version,
            "27123+local-7"
        );
        assert_eq!(
            identity_of("x", &version(None), Some("local-7")).ruleset_version,
            "local-7"
        );
        assert_eq!(
            identity_of("x", &version(None), None).ruleset_version,
            UNVERSIONED_RULESET
        );
        assert_eq!(
            identity_of("x", &version(None), Some("  ")).ruleset_version,
            UNVERSIONED_RULESET,
            "a blank label is no label"
        );
    }

    #[test]
    fn replies_map_to_outcomes() {
        assert_eq!(outcome_of(ScanReply::Clean), ScanOutcome::clean());
        assert_eq!(
            outcome_of(ScanReply::Found("EICAR-Test-Sig.UNOFFICIAL".into())),
            ScanOutcome::malicious("EICAR-Test-Sig.UNOFFICIAL")
        );
        let heuristic = outcome_of(ScanReply::Found("Heuristics.Encrypted.Zip".into()));
        assert_eq!(heuristic.kind, VerdictKind::Suspicious);
        assert_eq!(
            heuristic.threat_name.as_deref(),
            Some("Heuristics.Encrypted.Zip")
        );
        let limits = outcome_of(ScanReply::Found(
            "Heuristics.Limits.Exceeded.MaxFileSize".into(),
        ));
        assert_eq!(limits.kind, VerdictKind::Unsupported);
        assert!(!limits.kind.blocks());
        assert!(limits.detail.unwrap().contains("MaxFileSize"));
        let big = outcome_of(ScanReply::SizeLimitExceeded);
        assert_eq!(big.kind, VerdictKind::Unsupported);
        assert!(!big.retryable);
        assert!(big.detail.unwrap().contains("StreamMaxLength"));
        assert_eq!(
            outcome_of(ScanReply::Error("Can't allocate memory".into())),
            ScanOutcome::error("clamd: Can't allocate memory", true)
        );
    }
}
