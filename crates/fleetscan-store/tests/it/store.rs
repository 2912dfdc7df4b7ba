//! One test suite, run against both backends: every body in `both_backends!` runs on a fresh
//! SQLite file and on a fresh database of the Postgres cluster this test process shares
//! (a private `initdb`/`pg_ctl` cluster, or the server named by DATABASE_URL).
//!
//! Postgres is required: without root and the Postgres binaries (or DATABASE_URL) the Postgres
//! half fails with a message saying so; it is never skipped.

use fleetscan_core::{
    AccessKind, AccessRecord, Action, DecidedBy, ScannerIdentity, Sha256, Verdict, VerdictKind,
};
use fleetscan_store::testing::PgCluster;
use fleetscan_store::{AccessFilter, HostRecord, Store, StoreError, StoredCounts};
use sqlx::Connection as _;

use crate::common::{Fixture, postgres_fixture, sqlite_fixture};

both_backends!(
    verdict_is_found_only_by_its_exact_identity,
    put_verdict_is_idempotent_and_replaces,
    verdicts_for_lists_newest_first,
    record_and_list_accesses_with_each_filter,
    list_accesses_pages_with_before_id_and_clamps_limit,
    record_accesses_of_an_empty_batch_does_nothing,
    host_seen_keeps_first_seen_and_moves_last_seen,
    add_host_counts_adds_and_creates_hosts,
    counts_count_rows,
    migrations_are_idempotent,
    unparseable_stored_values_are_errors,
);

fn identity(ruleset: &str) -> ScannerIdentity {
    ScannerIdentity {
        scanner: "reference".into(),
        engine: "yara".into(),
        engine_version: "1.2.3".into(),
        ruleset_version: ruleset.into(),
    }
}

fn verdict(content: &[u8], scanner: ScannerIdentity, kind: VerdictKind, at: i64) -> Verdict {
    Verdict {
        sha256: Sha256::of(content),
        scanner,
        kind,
        threat_name: kind.blocks().then(|| "EICAR-Test-File".to_owned()),
        detail: Some(format!("scanned at {at}")),
        scanned_at_unix_ms: at,
        scan_micros: 1234,
    }
}

fn access(
    i: usize,
    tenant: &str,
    node: &str,
    action: Action,
    content: Option<&[u8]>,
) -> AccessRecord {
    AccessRecord {
        at_unix_ms: 1_700_000_000_000 + i64::try_from(i).unwrap(),
        tenant: tenant.into(),
        node: node.into(),
        path: format!("/srv/file-{i}"),
        kind: if i.is_multiple_of(2) {
            AccessKind::Open
        } else {
            AccessKind::Exec
        },
        action,
        reason: format!("reason {i}"),
        sha256: content.map(Sha256::of),
        threat_name: (action == Action::Deny).then(|| format!("threat-{i}")),
        pid: u32::MAX - u32::try_from(i).unwrap(),
        uid: u32::try_from(i).unwrap(),
        exe: "/usr/bin/cat".into(),
        decided_by: if action == Action::Deny {
            DecidedBy::Broker
        } else {
            DecidedBy::AgentNoBroker
        },
        // Every other access from a container, with a path the JSON must escape.
        context: if i.is_multiple_of(2) {
            fleetscan_core::AccessContext {
                ns_pid: 7,
                cgroup: format!("/kubepods.slice/cri-containerd-{i:064}.scope"),
                container_id: format!("{i:064}"),
                pod_uid: "0f3c2b1a-1111-2222-3333-444455556666".into(),
                namespace: "shop".into(),
                image: "registry.example/app:1".into(),
                host_path: format!("/var/lib/containerd/\"x\"/file-{i}"),
            }
        } else {
            Default::default()
        },
    }
}

async fn verdict_is_found_only_by_its_exact_identity(f: Fixture) {
    let v = verdict(b"eicar", identity("r1"), VerdictKind::Malicious, 10);
    f.store.put_verdict(&v).await.unwrap();
    assert_eq!(
        f.store.find_verdict(&v.sha256, &v.scanner).await.unwrap(),
        Some(v.clone())
    );

    let other_rules = identity("r2");
    assert_eq!(
        f.store.find_verdict(&v.sha256, &other_rules).await.unwrap(),
        None
    );
    for change in [
        |s: &mut ScannerIdentity| s.scanner.push('x'),
        |s: &mut ScannerIdentity| s.engine.push('x'),
        |s: &mut ScannerIdentity| s.engine_version.push('x'),
    ] {
        let mut other = identity("r1");
        change(&mut other);
        assert_eq!(f.store.find_verdict(&v.sha256, &other).await.unwrap(), None);
    }
    let other_content = Sha256::of(b"something else");
    assert_eq!(
        f.store
            .find_verdict(&other_content, &v.scanner)
            .await
            .unwrap(),
        None
    );

    // Optional fields round-trip as absent, too.
    let clean = Verdict {
        threat_name: None,
        detail: None,
        ..verdict(b"clean", identity("r1"), VerdictKind::Clean, 11)
    };
    f.store.put_verdict(&clean).await.unwrap();
    assert_eq!(
        f.store
            .find_verdict(&clean.sha256, &clean.scanner)
            .await
            .unwrap(),
        Some(clean)
    );
}

async fn put_verdict_is_idempotent_and_replaces(f: Fixture) {
    let first = verdict(b"x", identity("r1"), VerdictKind::Error, 10);
    f.store.put_verdict(&first).await.unwrap();
    f.store.put_verdict(&first).await.unwrap();
    assert_eq!(f.store.counts().await.unwrap().verdicts, 1);

    let second = verdict(b"x", identity("r1"), VerdictKind::Malicious, 20);
    f.store.put_verdict(&second).await.unwrap();
    assert_eq!(f.store.counts().await.unwrap().verdicts, 1);
    assert_eq!(
        f.store
            .find_verdict(&first.sha256, &first.scanner)
            .await
            .unwrap(),
        Some(second)
    );

    let too_long = Verdict {
        scan_micros: u64::MAX,
        ..first
    };
    let err = f.store.put_verdict(&too_long).await.unwrap_err();
    assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
}

async fn verdicts_for_lists_newest_first(f: Fixture) {
    let old = verdict(b"x", identity("r1"), VerdictKind::Clean, 100);
    let new = verdict(b"x", identity("r2"), VerdictKind::Malicious, 300);
    let mid = verdict(b"x", identity("r3"), VerdictKind::Suspicious, 200);
    let unrelated = verdict(b"y", identity("r1"), VerdictKind::Clean, 400);
    for v in [&old, &new, &mid, &unrelated] {
        f.store.put_verdict(v).await.unwrap();
    }
    assert_eq!(
        f.store.verdicts_for(&old.sha256).await.unwrap(),
        vec![new, mid, old]
    );
    assert!(
        f.store
            .verdicts_for(&Sha256::of(b"none"))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn record_and_list_accesses_with_each_filter(f: Fixture) {
    let records = vec![
        access(0, "t1", "n1", Action::Deny, Some(b"evil")),
        access(1, "t1", "n2", Action::Allow, None),
        access(2, "t2", "n1", Action::Deny, Some(b"evil")),
        access(3, "t1", "n1", Action::Allow, Some(b"good")),
        access(4, "t1", "n2", Action::Deny, Some(b"evil")),
    ];
    let ids = f.store.record_accesses(&records).await.unwrap();
    assert_eq!(ids.len(), records.len());
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in input order: {ids:?}"
    );
    let stored: Vec<(i64, AccessRecord)> =
        ids.iter().copied().zip(records.iter().cloned()).collect();
    let expect = |indices: &[usize]| {
        indices
            .iter()
            .map(|&i| stored[i].clone())
            .collect::<Vec<_>>()
    };

    let list = |filter: AccessFilter| {
        let store = f.store.clone();
        async move { store.list_accesses(&filter).await.unwrap() }
    };
    let t1 = || AccessFilter {
        tenant: "t1".into(),
        ..AccessFilter::default()
    };
    assert_eq!(list(t1()).await, expect(&[4, 3, 1, 0]));
    assert_eq!(
        list(AccessFilter {
            tenant: "t2".into(),
            ..t1()
        })
        .await,
        expect(&[2])
    );
    assert_eq!(
        list(AccessFilter {
            tenant: "t3".into(),
            ..t1()
        })
        .await,
        vec![]
    );
    assert_eq!(
        list(AccessFilter {
            node: Some("n1".into()),
            ..t1()
        })
        .await,
        expect(&[3, 0])
    );
    assert_eq!(
        list(AccessFilter {
            action: Some(Action::Deny),
            ..t1()
        })
        .await,
        expect(&[4, 0])
    );
    assert_eq!(
        list(AccessFilter {
            sha256: Some(Sha256::of(b"evil")),
            ..t1()
        })
        .await,
        expect(&[4, 0])
    );
    assert_eq!(
        list(AccessFilter {
            node: Some("n2".into()),
            action: Some(Action::Deny),
            sha256: Some(Sha256::of(b"evil")),
            ..t1()
        })
        .await,
        expect(&[4])
    );
    assert_eq!(
        list(AccessFilter {
            before_id: Some(ids[3]),
            ..t1()
        })
        .await,
        expect(&[1, 0])
    );

    // A second batch gets later ids.
    let more = f.store.record_accesses(&records[..1]).await.unwrap();
    assert!(more[0] > ids[4]);
}

async fn list_accesses_pages_with_before_id_and_clamps_limit(f: Fixture) {
    // Large enough to show the limit clamp, and a batch of the size the broker writes.
    let records: Vec<_> = (0..1205)
        .map(|i| access(i, "t", &format!("n{}", i % 3), Action::Deny, Some(b"evil")))
        .collect();
    let ids = f.store.record_accesses(&records).await.unwrap();
    assert_eq!(ids.len(), records.len());
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let filter = |limit, before_id| AccessFilter {
        tenant: "t".into(),
        node: Some("n1".into()),
        limit,
        before_id,
        ..AccessFilter::default()
    };
    let mut seen = Vec::new();
    let mut before_id = None;
    loop {
        let page = f
            .store
            .list_accesses(&filter(150, before_id))
            .await
            .unwrap();
        assert!(page.len() <= 150);
        let Some(last) = page.last() else { break };
        before_id = Some(last.0);
        seen.extend(page);
    }
    let expected: Vec<_> = ids
        .iter()
        .copied()
        .zip(records)
        .filter(|(_, r)| r.node == "n1")
        .rev()
        .collect();
    assert_eq!(seen, expected);

    let all = |limit| AccessFilter {
        tenant: "t".into(),
        limit,
        ..AccessFilter::default()
    };
    assert_eq!(f.store.list_accesses(&all(0)).await.unwrap().len(), 1);
    assert_eq!(
        f.store.list_accesses(&all(u32::MAX)).await.unwrap().len(),
        1000
    );
}

async fn record_accesses_of_an_empty_batch_does_nothing(f: Fixture) {
    assert_eq!(
        f.store.record_accesses(&[]).await.unwrap(),
        Vec::<i64>::new()
    );
    assert_eq!(f.store.counts().await.unwrap().accesses, 0);
}

async fn host_seen_keeps_first_seen_and_moves_last_seen(f: Fixture) {
    f.store
        .host_seen("t", "node-b", "c1", "0.1.0", 1000)
        .await
        .unwrap();
    f.store
        .host_seen("t", "node-b", "c9", "0.9.0", 3000)
        .await
        .unwrap();
    // The latest hello sets cluster, version and last_seen; first_seen stays.
    f.store
        .host_seen("t", "node-b", "c2", "0.2.0", 5000)
        .await
        .unwrap();
    f.store
        .host_seen("t", "node-a", "c1", "0.1.0", 2000)
        .await
        .unwrap();
    f.store
        .host_seen("other", "node-c", "c1", "0.1.0", 2000)
        .await
        .unwrap();

    let hosts = f.store.list_hosts("t").await.unwrap();
    assert_eq!(
        hosts,
        vec![
            HostRecord {
                tenant: "t".into(),
                node: "node-a".into(),
                cluster: "c1".into(),
                agent_version: "0.1.0".into(),
                first_seen_unix_ms: 2000,
                last_seen_unix_ms: 2000,
                allowed_count: 0,
                denied_count: 0,
            },
            HostRecord {
                tenant: "t".into(),
                node: "node-b".into(),
                cluster: "c2".into(),
                agent_version: "0.2.0".into(),
                first_seen_unix_ms: 1000,
                last_seen_unix_ms: 5000,
                allowed_count: 0,
                denied_count: 0,
            },
        ]
    );
    assert!(f.store.list_hosts("nobody").await.unwrap().is_empty());
}

async fn add_host_counts_adds_and_creates_hosts(f: Fixture) {
    // Counts may arrive before the host's hello is stored.
    f.store.add_host_counts("t", "n", 3, 1).await.unwrap();
    f.store.add_host_counts("t", "n", 2, 5).await.unwrap();
    let hosts = f.store.list_hosts("t").await.unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!((hosts[0].allowed_count, hosts[0].denied_count), (5, 6));

    f.store.host_seen("t", "n", "c", "1.0", 42).await.unwrap();
    let host = &f.store.list_hosts("t").await.unwrap()[0];
    assert_eq!((host.allowed_count, host.denied_count), (5, 6));
    assert_eq!(
        (host.cluster.as_str(), host.agent_version.as_str()),
        ("c", "1.0")
    );
    assert_eq!((host.first_seen_unix_ms, host.last_seen_unix_ms), (42, 42));

    // u64 beyond the signed column is refused, not wrapped.
    let err = f
        .store
        .add_host_counts("t", "n", u64::MAX, 0)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
    assert!(!err.is_unavailable());
    // A sum past i64::MAX is refused by the database rather than stored wrong.
    let max = u64::try_from(i64::MAX).unwrap();
    let err = f.store.add_host_counts("t", "n", max, 0).await.unwrap_err();
    assert!(!err.is_unavailable(), "{err}");
    let host = &f.store.list_hosts("t").await.unwrap()[0];
    assert_eq!((host.allowed_count, host.denied_count), (5, 6));
}

async fn counts_count_rows(f: Fixture) {
    assert_eq!(f.store.counts().await.unwrap(), StoredCounts::default());
    for (i, content) in [&b"a"[..], b"b", b"c"].into_iter().enumerate() {
        let at = i64::try_from(i).unwrap();
        f.store
            .put_verdict(&verdict(content, identity("r"), VerdictKind::Clean, at))
            .await
            .unwrap();
    }
    let records: Vec<_> = (0..7)
        .map(|i| access(i, "t", "n", Action::Deny, None))
        .collect();
    f.store.record_accesses(&records).await.unwrap();
    assert_eq!(
        f.store.counts().await.unwrap(),
        StoredCounts {
            verdicts: 3,
            accesses: 7
        }
    );
}

async fn migrations_are_idempotent(f: Fixture) {
    let v = verdict(b"kept", identity("r"), VerdictKind::Malicious, 1);
    f.store.put_verdict(&v).await.unwrap();
    for _ in 0..2 {
        let again = Store::connect(&f.url).await.unwrap();
        assert_eq!(
            again.find_verdict(&v.sha256, &v.scanner).await.unwrap(),
            Some(v.clone())
        );
    }
}

async fn unparseable_stored_values_are_errors(f: Fixture) {
    let v = verdict(b"x", identity("r"), VerdictKind::Clean, 1);
    f.store.put_verdict(&v).await.unwrap();
    f.store
        .record_accesses(&[access(0, "t", "n", Action::Deny, None)])
        .await
        .unwrap();
    // Written behind the store's back, as a newer or broken writer might.
    raw_execute(&f.url, "UPDATE verdicts SET result = 'dangerous'").await;
    raw_execute(&f.url, "UPDATE accesses SET decided_by = 'oracle'").await;

    let err = f
        .store
        .find_verdict(&v.sha256, &v.scanner)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                column: "result",
                ..
            }
        ),
        "{err}"
    );
    assert!(f.store.verdicts_for(&v.sha256).await.is_err());
    let err = f
        .store
        .list_accesses(&AccessFilter {
            tenant: "t".into(),
            ..AccessFilter::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                column: "decided_by",
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_unavailable());
}

async fn raw_execute(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

#[tokio::test]
async fn in_memory_sqlite_keeps_its_data_across_calls() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let v = verdict(b"m", identity("r"), VerdictKind::Clean, 1);
    store.put_verdict(&v).await.unwrap();
    let (a, b) = tokio::join!(
        store.find_verdict(&v.sha256, &v.scanner),
        store.verdicts_for(&v.sha256)
    );
    assert_eq!(a.unwrap(), Some(v.clone()));
    assert_eq!(b.unwrap(), vec![v]);
}

#[tokio::test]
async fn bad_urls_are_rejected() {
    for url in [
        "mysql://localhost/db",
        "",
        "sqlite",
        "postgres://host:notaport/db",
    ] {
        let err = Store::connect(url).await.unwrap_err();
        assert!(matches!(err, StoreError::BadUrl(_)), "{url}: {err}");
        assert!(!err.is_unavailable(), "{url}");
    }
    // A SQLite file that cannot be created is an error, and not a passing unavailability.
    let err = Store::connect("sqlite:///nonexistent-dir/sub/store.db")
        .await
        .unwrap_err();
    assert!(!err.is_unavailable(), "{err}");
}

#[tokio::test]
async fn closed_port_is_unavailable_at_once() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = std::time::Instant::now();
    let err = Store::connect(&format!("postgres://postgres@127.0.0.1:{port}/db"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // No retrying inside connect: a refused connection is reported at once.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn stopped_cluster_is_unavailable() {
    let cluster = PgCluster::start_local();
    let store = Store::connect(&cluster.url()).await.unwrap();
    let v = verdict(b"x", identity("r"), VerdictKind::Clean, 1);
    store.put_verdict(&v).await.unwrap();

    drop(cluster);
    let err = store.find_verdict(&v.sha256, &v.scanner).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let err = store
        .record_accesses(&[access(0, "t", "n", Action::Deny, None)])
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}
