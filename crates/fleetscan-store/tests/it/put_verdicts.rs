//! `Store::put_verdicts`, the write-behind queue's batch of verdicts, on both backends: every
//! body runs on a fresh SQLite file and on a fresh database of this test process's Postgres
//! cluster (a private `initdb`/`pg_ctl` cluster, or the server named by DATABASE_URL).
//!
//! Postgres is required: without root and the Postgres binaries (or DATABASE_URL) the Postgres
//! half fails with a message saying so; it is never skipped.

use std::sync::Arc;

use fleetscan_core::{ScannerIdentity, Sha256, Verdict, VerdictKind};
use fleetscan_store::StoreError;

use crate::common::{Fixture, postgres_fixture, sqlite_fixture};

both_backends!(
    a_large_batch_is_stored_whole,
    a_batch_replaces_stored_verdicts_and_its_last_duplicate_wins,
    an_empty_batch_does_nothing,
    a_batch_with_a_value_out_of_range_writes_nothing,
    stored_contents_are_paged_in_digest_order_once_each,
);

fn identity(ruleset: &str) -> ScannerIdentity {
    ScannerIdentity {
        scanner: "reference".into(),
        engine: "yara".into(),
        engine_version: "1.2.3".into(),
        ruleset_version: ruleset.into(),
    }
}

fn verdict(i: usize, ruleset: &str, kind: VerdictKind, at: i64) -> Verdict {
    Verdict {
        sha256: Sha256::of(format!("content {i}").as_bytes()),
        scanner: identity(ruleset),
        kind,
        threat_name: kind.blocks().then(|| format!("threat-{i}")),
        // Absent on some rows, so that NULLs travel in the batch too.
        detail: (!i.is_multiple_of(3)).then(|| format!("scanned at {at}")),
        scanned_at_unix_ms: at,
        scan_micros: u64::try_from(i).unwrap(),
    }
}

/// More rows than one SQLite statement carries, of two identities, shared as the writer holds
/// them (`Arc`): every one is found by its exact key, equal to what was put.
async fn a_large_batch_is_stored_whole(f: Fixture) {
    let batch: Vec<Arc<Verdict>> = (0..1203usize)
        .map(|i| {
            let kind = if i.is_multiple_of(7) {
                VerdictKind::Malicious
            } else {
                VerdictKind::Clean
            };
            let ruleset = if i.is_multiple_of(2) { "r1" } else { "r2" };
            Arc::new(verdict(i, ruleset, kind, 1_000 + i64::try_from(i).unwrap()))
        })
        .collect();
    f.store.put_verdicts(&batch).await.unwrap();
    assert_eq!(f.store.counts().await.unwrap().verdicts, 1203);
    for v in &batch {
        assert_eq!(
            f.store.find_verdict(&v.sha256, &v.scanner).await.unwrap(),
            Some(v.as_ref().clone())
        );
    }
    // The same content under the other rule set was never put.
    let other = identity(if batch[0].scanner.ruleset_version == "r1" {
        "r2"
    } else {
        "r1"
    });
    assert_eq!(
        f.store
            .find_verdict(&batch[0].sha256, &other)
            .await
            .unwrap(),
        None
    );
}

/// Same meaning as `put_verdict`: a stored key is replaced; within one batch the later of two
/// verdicts of one key wins (as if they had been put one after the other).
async fn a_batch_replaces_stored_verdicts_and_its_last_duplicate_wins(f: Fixture) {
    let stored = verdict(1, "r1", VerdictKind::Error, 10);
    f.store.put_verdict(&stored).await.unwrap();

    let replacement = verdict(1, "r1", VerdictKind::Malicious, 20);
    let first_of_two = verdict(2, "r1", VerdictKind::Malicious, 30);
    let second_of_two = verdict(2, "r1", VerdictKind::Clean, 40);
    let other_rules = verdict(2, "r2", VerdictKind::Suspicious, 50);
    f.store
        .put_verdicts(&[
            replacement.clone(),
            first_of_two,
            other_rules.clone(),
            second_of_two.clone(),
        ])
        .await
        .unwrap();
    assert_eq!(f.store.counts().await.unwrap().verdicts, 3);
    for expected in [&replacement, &second_of_two, &other_rules] {
        assert_eq!(
            f.store
                .find_verdict(&expected.sha256, &expected.scanner)
                .await
                .unwrap()
                .as_ref(),
            Some(expected)
        );
    }

    // Putting the same batch again changes nothing.
    let again = [&replacement, &second_of_two, &other_rules];
    f.store.put_verdicts(&again).await.unwrap();
    f.store.put_verdicts(&again).await.unwrap();
    assert_eq!(f.store.counts().await.unwrap().verdicts, 3);
}

async fn an_empty_batch_does_nothing(f: Fixture) {
    f.store.put_verdicts::<Verdict>(&[]).await.unwrap();
    assert_eq!(f.store.counts().await.unwrap().verdicts, 0);
}

async fn a_batch_with_a_value_out_of_range_writes_nothing(f: Fixture) {
    let good = verdict(1, "r1", VerdictKind::Clean, 10);
    let bad = Verdict {
        scan_micros: u64::MAX,
        ..verdict(2, "r1", VerdictKind::Clean, 10)
    };
    let err = f.store.put_verdicts(&[good, bad]).await.unwrap_err();
    assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
    assert_eq!(f.store.counts().await.unwrap().verdicts, 0);
}

/// What a broker that owns its store reads at start: every content with a fleet-wide verdict,
/// once however many identities judged it, in digest order, page by page. Tenants' own verdicts
/// are not the fleet's.
async fn stored_contents_are_paged_in_digest_order_once_each(f: Fixture) {
    let mut batch: Vec<Verdict> = (0..25)
        .map(|i| verdict(i, "r1", VerdictKind::Clean, 10))
        .collect();
    batch.extend((0..10).map(|i| verdict(i, "r2", VerdictKind::Clean, 10)));
    f.store.put_verdicts(&batch).await.unwrap();
    f.store
        .put_tenant_verdict("acme", &verdict(100, "r1", VerdictKind::Clean, 10))
        .await
        .unwrap();
    let mut expected: Vec<Sha256> = (0..25)
        .map(|i| verdict(i, "r1", VerdictKind::Clean, 10).sha256)
        .collect();
    expected.sort();

    let mut read = Vec::new();
    let mut after = None;
    loop {
        let page = f
            .store
            .verdict_contents_after(after.as_ref(), 7)
            .await
            .unwrap();
        assert!(page.len() <= 7);
        read.extend_from_slice(&page);
        match page.last() {
            Some(last) if page.len() == 7 => after = Some(*last),
            _ => break,
        }
    }
    assert_eq!(read, expected);
}
