//! Verdicts of tenants' own scanners (`tenant_verdicts`), on both backends: every body runs on
//! a fresh SQLite file and on a fresh database of this test process's Postgres cluster (a
//! private `initdb`/`pg_ctl` cluster, or the server named by DATABASE_URL).
//!
//! Postgres is required: without root and the Postgres binaries (or DATABASE_URL) the Postgres
//! half fails with a message saying so; it is never skipped.

use fleetscan_core::{ScannerIdentity, Sha256, Verdict, VerdictKind};

#[macro_use]
mod common;

use common::{Fixture, postgres_fixture, sqlite_fixture};

both_backends!(
    a_tenant_verdict_is_found_only_for_its_tenant,
    a_tenant_verdict_is_idempotent_and_replaces,
    tenant_verdicts_are_listed_per_tenant_newest_first,
    an_empty_tenant_is_refused,
);

fn identity(ruleset: &str) -> ScannerIdentity {
    ScannerIdentity {
        scanner: "private-yara".into(),
        engine: "yara-x".into(),
        engine_version: "1".into(),
        ruleset_version: ruleset.into(),
    }
}

fn verdict(content: &[u8], ruleset: &str, kind: VerdictKind, at: i64) -> Verdict {
    Verdict {
        sha256: Sha256::of(content),
        scanner: identity(ruleset),
        kind,
        threat_name: kind.blocks().then(|| "Acme-Secret-Rule".to_owned()),
        detail: None,
        scanned_at_unix_ms: at,
        scan_micros: 7,
    }
}

async fn a_tenant_verdict_is_found_only_for_its_tenant(f: Fixture) {
    let v = verdict(b"x", "r1", VerdictKind::Malicious, 10);
    f.store.put_tenant_verdict("acme", &v).await.unwrap();
    assert_eq!(
        f.store
            .find_tenant_verdict("acme", &v.sha256, &v.scanner)
            .await
            .unwrap(),
        Some(v.clone())
    );
    // Same content, same identity: another tenant does not see it, nor does the fleet.
    assert_eq!(
        f.store
            .find_tenant_verdict("globex", &v.sha256, &v.scanner)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        f.store.find_verdict(&v.sha256, &v.scanner).await.unwrap(),
        None
    );
    assert!(f.store.verdicts_for(&v.sha256).await.unwrap().is_empty());
    // Nor another rule-set version of the tenant's own scanner.
    assert_eq!(
        f.store
            .find_tenant_verdict("acme", &v.sha256, &identity("r2"))
            .await
            .unwrap(),
        None
    );
    // A fleet verdict of the same identity does not leak into the tenant's table either.
    let fleet = verdict(b"y", "r1", VerdictKind::Clean, 11);
    f.store.put_verdict(&fleet).await.unwrap();
    assert_eq!(
        f.store
            .find_tenant_verdict("acme", &fleet.sha256, &fleet.scanner)
            .await
            .unwrap(),
        None
    );
}

async fn a_tenant_verdict_is_idempotent_and_replaces(f: Fixture) {
    let first = verdict(b"x", "r1", VerdictKind::Clean, 10);
    f.store.put_tenant_verdict("acme", &first).await.unwrap();
    f.store.put_tenant_verdict("acme", &first).await.unwrap();
    let second = verdict(b"x", "r1", VerdictKind::Malicious, 20);
    f.store.put_tenant_verdict("acme", &second).await.unwrap();
    assert_eq!(
        f.store
            .find_tenant_verdict("acme", &first.sha256, &first.scanner)
            .await
            .unwrap(),
        Some(second.clone())
    );
    assert_eq!(
        f.store
            .tenant_verdicts_for("acme", &first.sha256)
            .await
            .unwrap(),
        vec![second]
    );
}

async fn tenant_verdicts_are_listed_per_tenant_newest_first(f: Fixture) {
    let old = verdict(b"x", "r1", VerdictKind::Clean, 10);
    let new = verdict(b"x", "r2", VerdictKind::Malicious, 20);
    let other = verdict(b"x", "r3", VerdictKind::Clean, 30);
    f.store.put_tenant_verdict("acme", &old).await.unwrap();
    f.store.put_tenant_verdict("acme", &new).await.unwrap();
    f.store.put_tenant_verdict("globex", &other).await.unwrap();
    assert_eq!(
        f.store
            .tenant_verdicts_for("acme", &old.sha256)
            .await
            .unwrap(),
        vec![new, old]
    );
    assert_eq!(
        f.store
            .tenant_verdicts_for("globex", &other.sha256)
            .await
            .unwrap(),
        vec![other]
    );
}

async fn an_empty_tenant_is_refused(f: Fixture) {
    let v = verdict(b"x", "r1", VerdictKind::Clean, 10);
    assert!(f.store.put_tenant_verdict("", &v).await.is_err());
}
