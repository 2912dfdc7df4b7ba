//! Several scanners presented to the broker as one: one registration, one verdict per content.
//!
//! The verdict is conservative: a content is clean only when no part blocks it and no part
//! failed on it. A composite never hides an error of one part behind another part's "clean".

use std::sync::Arc;

use fleetscan_core::{ScannerIdentity, VerdictKind};

use crate::{ScanOutcome, Scanner};

/// Several [`Scanner`]s as one: the parts scan in order, and the first blocking verdict
/// (malicious or suspicious) wins without asking the later parts.
///
/// When no part blocks: the first error if any part failed; otherwise clean if any part
/// handled the content; otherwise (every part unsupported, or no parts) unsupported.
pub struct Composite {
    scanner_name: String,
    parts: Vec<Arc<dyn Scanner>>,
}

impl Composite {
    pub fn new(scanner_name: &str, parts: Vec<Arc<dyn Scanner>>) -> Self {
        Composite {
            scanner_name: scanner_name.to_owned(),
            parts,
        }
    }
}

impl Scanner for Composite {
    /// scanner = the composite's name; engine, engine_version and ruleset_version are the
    /// parts' own, in order, joined by '+'.
    fn identity(&self) -> ScannerIdentity {
        let ids: Vec<ScannerIdentity> = self.parts.iter().map(|p| p.identity()).collect();
        let join = |field: fn(&ScannerIdentity) -> &str| {
            ids.iter().map(field).collect::<Vec<_>>().join("+")
        };
        ScannerIdentity {
            scanner: self.scanner_name.clone(),
            engine: join(|i| &i.engine),
            engine_version: join(|i| &i.engine_version),
            ruleset_version: join(|i| &i.ruleset_version),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        let mut first_error: Option<ScanOutcome> = None;
        let mut any_clean = false;
        for part in &self.parts {
            let outcome = part.scan(content);
            match outcome.kind {
                kind if kind.blocks() => return outcome,
                VerdictKind::Error => {
                    first_error.get_or_insert(outcome);
                }
                VerdictKind::Clean => any_clean = true,
                _ => {}
            }
        }
        if let Some(error) = first_error {
            return error;
        }
        if any_clean {
            ScanOutcome::clean()
        } else {
            ScanOutcome {
                kind: VerdictKind::Unsupported,
                threat_name: None,
                detail: Some("no part of the composite handles this content".to_owned()),
                retryable: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A part with a fixed identity and answer that counts its scans.
    struct Fixed {
        engine: &'static str,
        version: &'static str,
        ruleset: &'static str,
        outcome: ScanOutcome,
        calls: AtomicUsize,
    }

    impl Fixed {
        fn new(engine: &'static str, outcome: ScanOutcome) -> Arc<Fixed> {
            Arc::new(Fixed {
                engine,
                version: "1.0",
                ruleset: "r1",
                outcome,
                calls: AtomicUsize::new(0),
            })
        }
    }

    impl Scanner for Fixed {
        fn identity(&self) -> ScannerIdentity {
            ScannerIdentity {
                scanner: format!("{}-scanner", self.engine),
                engine: self.engine.to_owned(),
                engine_version: self.version.to_owned(),
                ruleset_version: self.ruleset.to_owned(),
            }
        }

        fn scan(&self, _content: &[u8]) -> ScanOutcome {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.outcome.clone()
        }
    }

    fn suspicious(name: &str) -> ScanOutcome {
        ScanOutcome {
            kind: VerdictKind::Suspicious,
            threat_name: Some(name.to_owned()),
            detail: None,
            retryable: false,
        }
    }

    fn unsupported() -> ScanOutcome {
        ScanOutcome {
            kind: VerdictKind::Unsupported,
            threat_name: None,
            detail: None,
            retryable: false,
        }
    }

    #[test]
    fn identity_joins_the_parts_in_order() {
        let a = Arc::new(Fixed {
            engine: "yara-x",
            version: "1.5.0",
            ruleset: "aaaa",
            outcome: ScanOutcome::clean(),
            calls: AtomicUsize::new(0),
        });
        let b = Arc::new(Fixed {
            engine: "sha256-list",
            version: "0.1.0",
            ruleset: "bbbb",
            outcome: ScanOutcome::clean(),
            calls: AtomicUsize::new(0),
        });
        let c = Composite::new("reference", vec![a, b]);
        assert_eq!(
            c.identity(),
            ScannerIdentity {
                scanner: "reference".to_owned(),
                engine: "yara-x+sha256-list".to_owned(),
                engine_version: "1.5.0+0.1.0".to_owned(),
                ruleset_version: "aaaa+bbbb".to_owned(),
            }
        );
    }

    #[test]
    fn first_blocking_verdict_wins_and_later_parts_are_not_asked() {
        let clean = Fixed::new("a", ScanOutcome::clean());
        let first = Fixed::new("b", suspicious("Heur.One"));
        let second = Fixed::new("c", ScanOutcome::malicious("Known.Two"));
        let c = Composite::new(
            "x",
            vec![
                clean.clone(),
                first.clone(),
                second.clone() as Arc<dyn Scanner>,
            ],
        );
        assert_eq!(c.scan(b"data"), suspicious("Heur.One"));
        assert_eq!(clean.calls.load(Ordering::SeqCst), 1);
        assert_eq!(first.calls.load(Ordering::SeqCst), 1);
        assert_eq!(second.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_block_after_an_error_still_wins() {
        let c = Composite::new(
            "x",
            vec![
                Fixed::new("a", ScanOutcome::error("engine broke", true)) as Arc<dyn Scanner>,
                Fixed::new("b", ScanOutcome::malicious("Known")),
            ],
        );
        assert_eq!(c.scan(b"data"), ScanOutcome::malicious("Known"));
    }

    #[test]
    fn an_error_is_never_hidden_behind_clean() {
        let c = Composite::new(
            "x",
            vec![
                Fixed::new("a", ScanOutcome::clean()) as Arc<dyn Scanner>,
                Fixed::new("b", ScanOutcome::error("timeout", true)),
                Fixed::new("c", ScanOutcome::error("other", false)),
            ],
        );
        assert_eq!(c.scan(b"data"), ScanOutcome::error("timeout", true));
    }

    #[test]
    fn clean_when_any_part_handles_it_unsupported_when_none_does() {
        let mixed = Composite::new(
            "x",
            vec![
                Fixed::new("a", unsupported()) as Arc<dyn Scanner>,
                Fixed::new("b", ScanOutcome::clean()),
            ],
        );
        assert_eq!(mixed.scan(b"data"), ScanOutcome::clean());
        let none = Composite::new(
            "x",
            vec![Fixed::new("a", unsupported()) as Arc<dyn Scanner>],
        );
        assert_eq!(none.scan(b"data").kind, VerdictKind::Unsupported);
        assert_eq!(
            Composite::new("x", vec![]).scan(b"").kind,
            VerdictKind::Unsupported
        );
    }
}
