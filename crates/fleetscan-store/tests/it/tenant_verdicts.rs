//! Verdicts of tenants' own scanners (`tenant_verdicts`), on both backends: every body runs on
//! a fresh SQLite file and on a fresh database of this test process's Postgres cluster (a
//! private `initdb`/`pg_ctl` cluster, or the server named by DATABASE_URL).
//!
//! Postgres is required: without root and the Postgres binaries (or DATABASE_URL) the Postgres
//! half fails with a message saying so; it is never skipped.

use fleetscan_core::{ScannerIdentity, Sha256, Verdict, VerdictKind};

use crate::common::{Fixture, postgres_fixture, sqlite_fixture};

both_backends!(
    a_tenant_verdict_is_found_only_for_its_tenant,
    a_tenant_verdict_is_idempotent_and_replaces,
    tenant_verdicts_are_put_in_batches_within_their_tenant,
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
        Some(second)
    );
}

async fn tenant_verdicts_are_put_in_batches_within_their_tenant(f: Fixture) {
    // The write-behind queue's batch: two identities, one key twice (the later wins).
    let r1 = verdict(b"x", "r1", VerdictKind::Clean, 10);
    let r2 = verdict(b"x", "r2", VerdictKind::Clean, 20);
    let r2_later = verdict(b"x", "r2", VerdictKind::Malicious, 30);
    f.store
        .put_tenant_verdicts("acme", &[&r1, &r2, &r2_later])
        .await
        .unwrap();
    let find = |tenant: &'static str, v: &Verdict| {
        let store = f.store.clone();
        let (sha256, scanner) = (v.sha256, v.scanner.clone());
        async move {
            store
                .find_tenant_verdict(tenant, &sha256, &scanner)
                .await
                .unwrap()
        }
    };
    assert_eq!(find("acme", &r1).await, Some(r1.clone()));
    assert_eq!(find("acme", &r2).await, Some(r2_later.clone()));
    // Neither another tenant's nor the fleet's.
    assert_eq!(find("globex", &r1).await, None);
    assert_eq!(
        f.store.find_verdict(&r1.sha256, &r1.scanner).await.unwrap(),
        None
    );
    // Another tenant's batch of the same keys stays its own.
    f.store.put_tenant_verdicts("globex", &[&r1]).await.unwrap();
    assert_eq!(find("globex", &r1).await, Some(r1));
    assert_eq!(find("acme", &r2).await, Some(r2_later));
    // An empty batch writes nothing and needs no statement.
    f.store
        .put_tenant_verdicts::<&Verdict>("acme", &[])
        .await
        .unwrap();
}

async fn an_empty_tenant_is_refused(f: Fixture) {
    let v = verdict(b"x", "r1", VerdictKind::Clean, 10);
    assert!(f.store.put_tenant_verdict("", &v).await.is_err());
}
