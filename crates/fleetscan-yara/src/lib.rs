//! The YARA reference scanner of fleetscan, on yara-x, and the reference scanner the
//! `fleetscan worker` ships (YARA plus an optional SHA-256 block list).
//!
//! Rules are compiled once, at load time, where every bad rule file fails the load with its
//! name; scanning never compiles. This crate never talks to a broker: it only implements
//! [`fleetscan_worker::Scanner`]. It lives apart from the SDK because yara-x compiles slowly.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetscan_core::{ScannerIdentity, Sha256Hasher};
use fleetscan_worker::{Composite, ListError, ScanOutcome, Scanner, Sha256List};
use tracing::{debug, warn};

/// The rules shipped with fleetscan: (file name, source). File names take part in the rule-set
/// digest, like the names of rules from a directory.
const SHIPPED_RULES: &[(&str, &str)] = &[("eicar.yar", include_str!("../rules/eicar.yar"))];

/// The longest one scan may run. yara-x stops "promptly" after it, as its docs say, so this is
/// a bound on a runaway rule, not a deadline: the broker's job deadline is the real one.
const SCAN_TIMEOUT: Duration = Duration::from_secs(60);

/// The metadata key whose string value names the threat a rule detects.
const THREAT_NAME_META: &str = "threat_name";

/// Why rules could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum YaraError {
    #[error("cannot list rules directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read rule file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `message` is yara-x's report, which also names the file and points at the line.
    #[error("invalid rule file {file}: {message}")]
    Compile { file: String, message: String },
    #[error("invalid sha-256 block list: {0}")]
    Blocklist(#[from] ListError),
}

/// Scans content with compiled YARA rules. Thread-safe: the compiled rules are shared and each
/// scan makes its own `yara_x::Scanner` (which is not `Sync`); creating one is cheap next to
/// a scan, and keeps scans on different threads fully independent.
///
/// A matching rule makes the content malicious; the threat name is the rule's `threat_name`
/// metadata when it is a string, else the rule identifier. Private rules never name a threat.
pub struct YaraScanner {
    rules: yara_x::Rules,
    ruleset_version: String,
    rule_files: Vec<String>,
}

impl YaraScanner {
    /// The rules shipped with fleetscan (rules/*.yar embedded with include_str!; at least the
    /// EICAR test file rule, threat name "EICAR-Test-File") plus every *.yar / *.yara file in
    /// `dir` when given. ruleset_version = short hex digest of all rule sources.
    ///
    /// Files of `dir` are compiled in name order, all in the default namespace (so two rules
    /// of one name in two files are an error); `include` is refused, since an included file
    /// would change the rules without changing the digest.
    pub fn load(dir: Option<&Path>) -> Result<Self, YaraError> {
        let mut sources: Vec<(String, String)> = SHIPPED_RULES
            .iter()
            .map(|(name, src)| (format!("builtin:{name}"), (*src).to_owned()))
            .collect();
        if let Some(dir) = dir {
            sources.extend(read_rule_dir(dir)?);
        }

        let mut compiler = yara_x::Compiler::new();
        compiler.enable_includes(false);
        let mut digest = Sha256Hasher::new();
        for (origin, text) in &sources {
            // Length-prefixed, so no two different sets of files hash alike.
            for part in [origin.as_bytes(), text.as_bytes()] {
                digest.update(&(part.len() as u64).to_le_bytes());
                digest.update(part);
            }
            compiler
                .add_source(yara_x::SourceCode::from(text.as_str()).with_origin(origin.as_str()))
                .map_err(|e| YaraError::Compile {
                    file: origin.clone(),
                    message: e.to_string(),
                })?;
        }
        for warning in compiler.warnings() {
            warn!(warning = %warning, "yara rule warning");
        }
        let rules = compiler.build();
        let digest = digest.finish().to_hex();
        let scanner = YaraScanner {
            rules,
            ruleset_version: digest[..16].to_owned(),
            rule_files: sources.into_iter().map(|(origin, _)| origin).collect(),
        };
        debug!(
            files = scanner.rule_files.len(),
            rules = scanner.rules.iter().len(),
            ruleset_version = %scanner.ruleset_version,
            "yara rules loaded"
        );
        Ok(scanner)
    }

    /// The rule files compiled, shipped ones first ("builtin:NAME"), then the directory's.
    pub fn rule_files(&self) -> &[String] {
        &self.rule_files
    }
}

/// The *.yar / *.yara files of `dir` (not recursive), in name order, as (path, source).
fn read_rule_dir(dir: &Path) -> Result<Vec<(String, String)>, YaraError> {
    let read_dir_err = |source| YaraError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
        let path = entry.map_err(read_dir_err)?.path();
        let is_rule = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yar") || e.eq_ignore_ascii_case("yara"));
        if is_rule && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).map_err(|source| YaraError::ReadFile {
                path: path.clone(),
                source,
            })?;
            let text = String::from_utf8(bytes).map_err(|_| YaraError::Compile {
                file: path.display().to_string(),
                message: "not valid UTF-8".to_owned(),
            })?;
            Ok((path.display().to_string(), text))
        })
        .collect()
}

impl Scanner for YaraScanner {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "yara".to_owned(),
            engine: "yara-x".to_owned(),
            engine_version: yara_x::VERSION.to_owned(),
            ruleset_version: self.ruleset_version.clone(),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        let mut scanner = yara_x::Scanner::new(&self.rules);
        scanner.set_timeout(SCAN_TIMEOUT);
        match scanner.scan(content) {
            Ok(results) => match results.matching_rules().next() {
                Some(rule) => ScanOutcome::malicious(threat_name(&rule)),
                None => ScanOutcome::clean(),
            },
            // Another worker, or a later try on a less busy machine, may finish in time.
            Err(yara_x::ScanError::Timeout) => ScanOutcome::error("yara scan timed out", true),
            Err(e) => ScanOutcome::error(format!("yara scan failed: {e}"), false),
        }
    }
}

fn threat_name(rule: &yara_x::Rule<'_, '_>) -> String {
    rule.metadata()
        .find_map(|(key, value)| match value {
            yara_x::MetaValue::String(name) if key == THREAT_NAME_META && !name.is_empty() => {
                Some(name.to_owned())
            }
            _ => None,
        })
        .unwrap_or_else(|| rule.identifier().to_owned())
}

/// The reference scanner the `fleetscan worker` ships: Composite "reference" of YARA and,
/// when given, the SHA-256 block list.
pub fn reference_scanner(
    rules_dir: Option<&Path>,
    blocklist: Option<&Path>,
) -> Result<Arc<dyn Scanner>, YaraError> {
    let mut parts: Vec<Arc<dyn Scanner>> = vec![Arc::new(YaraScanner::load(rules_dir)?)];
    if let Some(path) = blocklist {
        parts.push(Arc::new(Sha256List::load(path)?));
    }
    Ok(Arc::new(Composite::new("reference", parts)))
}
