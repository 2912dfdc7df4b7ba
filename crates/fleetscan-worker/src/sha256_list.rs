//! A scanner that blocks the contents listed by SHA-256: the simplest reference scanner, and
//! the way operators block a known file at once, before any signature exists.
//!
//! The list is parsed whole at load time; a bad line fails the load (naming its line), never
//! silently shrinks the list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleetscan_core::{ScannerIdentity, Sha256, Sha256Hasher};

use crate::{ScanOutcome, Scanner};

/// The threat name reported for a listed digest that has no name of its own.
pub const DEFAULT_THREAT_NAME: &str = "SHA256-Blocklist";

/// Why a list could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot read sha-256 list {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `origin` is the file's path, or "<text>" for [`Sha256List::parse`].
    #[error("{origin}: line {line}: {reason}")]
    BadLine {
        origin: String,
        line: usize,
        reason: String,
    },
}

/// Blocks every content whose SHA-256 is listed.
///
/// Format: one hex SHA-256 per line (either case), optionally followed by whitespace and a
/// threat name (the rest of the line, trimmed); lines whose first non-blank character is '#'
/// and blank lines are ignored. A digest listed twice keeps its first name.
#[derive(Clone, Debug)]
pub struct Sha256List {
    // Ordered, so the normalized form (and so the rule-set version) does not depend on the
    // order of the lines.
    entries: BTreeMap<Sha256, String>,
    ruleset_version: String,
}

impl Sha256List {
    pub fn load(path: &Path) -> Result<Self, ListError> {
        let text = std::fs::read_to_string(path).map_err(|source| ListError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_from(&text, &path.display().to_string())
    }

    pub fn parse(text: &str) -> Result<Self, ListError> {
        Self::parse_from(text, "<text>")
    }

    fn parse_from(text: &str, origin: &str) -> Result<Self, ListError> {
        let mut entries = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (digest, name) = match line.split_once(char::is_whitespace) {
                Some((digest, rest)) => (digest, rest.trim()),
                None => (line, ""),
            };
            let bad = |reason: String| ListError::BadLine {
                origin: origin.to_owned(),
                line: index + 1,
                reason,
            };
            let digest: Sha256 = digest.parse().map_err(|_| {
                bad(format!(
                    "expected a SHA-256 (64 hex digits), found {:?}",
                    truncate(digest, 80)
                ))
            })?;
            let name = if name.is_empty() {
                DEFAULT_THREAT_NAME.to_owned()
            } else {
                name.to_owned()
            };
            entries.entry(digest).or_insert(name);
        }
        let ruleset_version = normalized_digest(&entries);
        Ok(Sha256List {
            entries,
            ruleset_version,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The threat name of a listed digest.
    pub fn lookup(&self, digest: &Sha256) -> Option<&str> {
        self.entries.get(digest).map(String::as_str)
    }
}

/// Digest of the list in its normalized form ("hex<TAB>name\n" per entry, sorted by digest),
/// so reordering, comments, case and spacing do not change the version, but any change of
/// what is blocked, or of a name, does.
fn normalized_digest(entries: &BTreeMap<Sha256, String>) -> String {
    let mut hasher = Sha256Hasher::new();
    for (digest, name) in entries {
        hasher.update(digest.to_hex().as_bytes());
        hasher.update(b"\t");
        hasher.update(name.as_bytes());
        hasher.update(b"\n");
    }
    crate::short_digest(&hasher.finish())
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

impl Scanner for Sha256List {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "sha256-list".to_owned(),
            engine: "sha256-list".to_owned(),
            engine_version: env!("CARGO_PKG_VERSION").to_owned(),
            ruleset_version: self.ruleset_version.clone(),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        match self.lookup(&Sha256::of(content)) {
            Some(name) => ScanOutcome::malicious(name),
            None => ScanOutcome::clean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetscan_core::VerdictKind;

    use super::*;

    fn hex_of(data: &[u8]) -> String {
        Sha256::of(data).to_hex()
    }

    #[test]
    fn parses_digests_names_comments_and_blank_lines() {
        let text = format!(
            "# blocked builds\n\n{}  Trojan.Test one\n   \n  # indented comment\n{}\n{}\tSecond\n",
            hex_of(b"evil"),
            hex_of(b"nameless").to_uppercase(),
            hex_of(b"second"),
        );
        let list = Sha256List::parse(&text).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list.lookup(&Sha256::of(b"evil")), Some("Trojan.Test one"));
        assert_eq!(
            list.lookup(&Sha256::of(b"nameless")),
            Some(DEFAULT_THREAT_NAME)
        );
        assert_eq!(list.lookup(&Sha256::of(b"second")), Some("Second"));
        assert_eq!(list.lookup(&Sha256::of(b"other")), None);
    }

    #[test]
    fn scan_blocks_listed_content_only() {
        let list = Sha256List::parse(&format!("{} Evil", hex_of(b"evil"))).unwrap();
        assert_eq!(list.scan(b"evil"), ScanOutcome::malicious("Evil"));
        let clean = list.scan(b"good");
        assert_eq!(clean.kind, VerdictKind::Clean);
        assert_eq!(clean.threat_name, None);
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        let good = hex_of(b"x");
        for (text, line) in [
            (format!("{good}\nnot-a-digest name\n"), 2),
            (format!("# c\n\n\n{}\n", &good[..63]), 4),
            (format!("{good}0 name\n"), 1),
            (format!("{}zz\n", &good[..62]), 1),
        ] {
            match Sha256List::parse(&text) {
                Err(ListError::BadLine { line: got, .. }) => assert_eq!(got, line, "{text:?}"),
                other => panic!("expected a bad line error for {text:?}, got {other:?}"),
            }
        }
        let err = Sha256List::parse("nope").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn load_names_the_file_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block.txt");
        std::fs::write(&path, format!("{}\nbad\n", hex_of(b"a"))).unwrap();
        let err = Sha256List::load(&path).unwrap_err().to_string();
        assert!(err.contains("block.txt") && err.contains("line 2"), "{err}");
        let missing = Sha256List::load(&dir.path().join("missing.txt")).unwrap_err();
        assert!(matches!(missing, ListError::Read { .. }), "{missing:?}");
        std::fs::write(&path, format!("{} Name\n", hex_of(b"a"))).unwrap();
        assert_eq!(Sha256List::load(&path).unwrap().len(), 1);
    }

    #[test]
    fn ruleset_version_is_a_digest_of_the_normalized_list() {
        let (a, b) = (hex_of(b"a"), hex_of(b"b"));
        let one = Sha256List::parse(&format!("{a} A\n{b} B\n")).unwrap();
        let reordered = Sha256List::parse(&format!(
            "# comment\n{}\tB\n\n{a}   A  \n",
            b.to_uppercase()
        ))
        .unwrap();
        let renamed = Sha256List::parse(&format!("{a} A\n{b} C\n")).unwrap();
        let fewer = Sha256List::parse(&format!("{a} A\n")).unwrap();
        let v = one.identity().ruleset_version;
        assert_eq!(v.len(), 16);
        assert!(v.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(v, reordered.identity().ruleset_version);
        assert_ne!(v, renamed.identity().ruleset_version);
        assert_ne!(v, fewer.identity().ruleset_version);
        assert_eq!(one.identity().engine, "sha256-list");
    }

    #[test]
    fn empty_list_is_valid_and_blocks_nothing() {
        let list = Sha256List::parse("# nothing yet\n").unwrap();
        assert!(list.is_empty());
        assert_eq!(list.scan(b"anything").kind, VerdictKind::Clean);
    }
}
