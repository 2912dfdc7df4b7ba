//! The writer against a fake store: batching, retries that keep the batch, losses counted,
//! the drain on shutdown.

use fleetscan_core::{AccessKind, Action, DecidedBy, ScannerIdentity, Sha256, VerdictKind};
use parking_lot::Mutex;

use super::*;

#[derive(Default)]
struct Recorded {
    access_batches: Vec<usize>,
    accesses: usize,
    verdict_batches: Vec<usize>,
    verdicts: usize,
    tenant_verdicts: Vec<(String, Sha256)>,
    hosts: Vec<HostSeen>,
    counts: HashMap<String, (u64, u64)>,
    calls: u32,
}

/// A sink that fails its first `fail_first` calls, or every call when `fail_first` is
/// `u32::MAX`, and every call while `down` is set.
#[derive(Clone, Default)]
struct FakeSink {
    recorded: Arc<Mutex<Recorded>>,
    fail_first: u32,
    retryable: bool,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeSink {
    fn call(&self) -> Result<(), SinkError> {
        let mut r = self.recorded.lock();
        r.calls += 1;
        if r.calls <= self.fail_first || self.down.load(Ordering::Relaxed) {
            return Err(SinkError {
                retryable: self.retryable,
                message: "database is down".into(),
            });
        }
        Ok(())
    }
}

impl Sink for FakeSink {
    async fn host_seen(&self, host: &HostSeen) -> Result<(), SinkError> {
        self.call()?;
        self.recorded.lock().hosts.push(host.clone());
        Ok(())
    }
    async fn put_verdicts(&self, verdicts: &[Arc<Verdict>]) -> Result<(), SinkError> {
        self.call()?;
        let mut r = self.recorded.lock();
        r.verdict_batches.push(verdicts.len());
        r.verdicts += verdicts.len();
        Ok(())
    }
    async fn put_tenant_verdicts(
        &self,
        tenant: &str,
        verdicts: &[Arc<Verdict>],
    ) -> Result<(), SinkError> {
        self.call()?;
        let mut r = self.recorded.lock();
        r.tenant_verdicts
            .extend(verdicts.iter().map(|v| (tenant.to_owned(), v.sha256)));
        Ok(())
    }
    async fn record_accesses(&self, records: &[AccessRecord]) -> Result<(), SinkError> {
        self.call()?;
        let mut r = self.recorded.lock();
        r.access_batches.push(records.len());
        r.accesses += records.len();
        Ok(())
    }
    async fn add_host_counts(
        &self,
        _tenant: &str,
        node: &str,
        allowed: u64,
        denied: u64,
    ) -> Result<(), SinkError> {
        self.call()?;
        let mut r = self.recorded.lock();
        let c = r.counts.entry(node.to_owned()).or_default();
        c.0 += allowed;
        c.1 += denied;
        Ok(())
    }
}

fn access(i: u32) -> WriteOp {
    WriteOp::Access(Box::new(AccessRecord {
        at_unix_ms: 1,
        tenant: "default".into(),
        node: "n1".into(),
        path: format!("/bin/{i}"),
        kind: AccessKind::Open,
        action: Action::Deny,
        reason: "malicious: X".into(),
        sha256: None,
        threat_name: None,
        pid: i,
        uid: 0,
        exe: String::new(),
        decided_by: DecidedBy::Broker,
        context: Default::default(),
    }))
}

fn verdict() -> WriteOp {
    WriteOp::Verdict(Arc::new(Verdict {
        sha256: Sha256::of(b"x"),
        scanner: ScannerIdentity::default(),
        kind: VerdictKind::Clean,
        threat_name: None,
        detail: None,
        scanned_at_unix_ms: 0,
        scan_micros: 0,
    }))
}

#[tokio::test(start_paused = true)]
async fn records_are_batched_and_all_written() {
    // Two and a half batches' worth.
    let n = MAX_BATCH * 5 / 2;
    let (wb, queue) = write_behind(4 * MAX_BATCH);
    let sink = FakeSink::default();
    let writer = spawn_writer(queue, sink.clone());
    for i in 0..n {
        assert!(wb.submit(access(u32::try_from(i).unwrap())));
    }
    wb.submit(verdict());
    for _ in 0..3 {
        wb.submit(WriteOp::HostCounts {
            tenant: "default".into(),
            node: "n1".into(),
            allowed: 5,
            denied: 1,
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let r = sink.recorded.lock();
        assert_eq!(r.accesses, n);
        assert!(r.access_batches.iter().all(|n| *n <= MAX_BATCH));
        assert!(r.access_batches.len() >= 3);
        assert_eq!(r.verdicts, 1);
        assert_eq!(r.counts["n1"], (15, 3), "counts are summed, never lost");
    }
    assert_eq!(wb.backlog(), 0);
    assert_eq!(writer.shutdown(Duration::from_secs(5)).await, 0);
}

/// Verdicts go to the sink a batch at a time, not one call each, and in the order they
/// came (the later of two verdicts of one key must win).
#[tokio::test(start_paused = true)]
async fn verdicts_are_written_a_batch_per_call() {
    let n = MAX_BATCH * 5 / 2;
    let (wb, queue) = write_behind(4 * MAX_BATCH);
    let sink = FakeSink::default();
    let writer = spawn_writer(queue, sink.clone());
    for _ in 0..n {
        assert!(wb.submit(verdict()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let r = sink.recorded.lock();
        assert_eq!(r.verdicts, n);
        assert!(
            r.verdict_batches.iter().all(|n| *n <= MAX_BATCH),
            "{:?}",
            r.verdict_batches
        );
        assert!(
            r.verdict_batches.len() <= 5,
            "a call per batch: {:?}",
            r.verdict_batches
        );
    }
    assert_eq!(writer.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(start_paused = true)]
async fn store_errors_are_retried_keeping_the_batch() {
    let (wb, queue) = write_behind(100);
    let sink = FakeSink {
        fail_first: 5,
        retryable: true,
        ..Default::default()
    };
    let writer = spawn_writer(queue, sink.clone());
    wb.submit(WriteOp::HostSeen(HostSeen {
        tenant: "default".into(),
        node: "n1".into(),
        cluster: "c".into(),
        agent_version: "1".into(),
        at_unix_ms: 1,
    }));
    for i in 0..10 {
        wb.submit(access(i));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.recorded.lock().accesses, 0, "store still down");
    assert!(wb.backlog() > 0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    {
        let r = sink.recorded.lock();
        assert_eq!(r.accesses, 10);
        assert_eq!(
            r.access_batches,
            vec![10],
            "written once, after the store came back"
        );
        assert_eq!(r.hosts.len(), 1);
    }
    assert_eq!(wb.records_lost(), 0);
    assert_eq!(writer.shutdown(Duration::from_secs(5)).await, 0);
}

/// A tenant's private verdict made while the store is down is kept, in its tenant's scope,
/// and written once the store is back; it counts in the backlog until then.
#[tokio::test(start_paused = true)]
async fn a_tenants_verdict_is_written_when_the_store_returns() {
    let (wb, queue) = write_behind(100);
    let sink = FakeSink {
        fail_first: 5,
        retryable: true,
        ..Default::default()
    };
    let writer = spawn_writer(queue, sink.clone());
    let private = |tenant: &str, content: &[u8]| WriteOp::TenantVerdict {
        tenant: tenant.into(),
        verdict: Arc::new(Verdict {
            sha256: Sha256::of(content),
            scanner: ScannerIdentity::default(),
            kind: VerdictKind::Malicious,
            threat_name: Some("Tenant-Blocked".into()),
            detail: None,
            scanned_at_unix_ms: 0,
            scan_micros: 0,
        }),
    };
    assert!(wb.submit(private("acme", b"a")));
    assert!(wb.submit(private("globex", b"g")));
    assert!(wb.submit(private("acme", b"b")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        sink.recorded.lock().tenant_verdicts.is_empty(),
        "store still down"
    );
    assert_eq!(wb.backlog(), 3);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        sink.recorded.lock().tenant_verdicts,
        vec![
            ("acme".to_owned(), Sha256::of(b"a")),
            ("acme".to_owned(), Sha256::of(b"b")),
            ("globex".to_owned(), Sha256::of(b"g")),
        ]
    );
    assert_eq!(wb.backlog(), 0);
    assert_eq!(writer.shutdown(Duration::from_secs(5)).await, 0);
}

#[tokio::test(start_paused = true)]
async fn full_queue_drops_and_counts_and_shutdown_counts_the_rest() {
    let (wb, queue) = write_behind(5);
    let sink = FakeSink {
        fail_first: u32::MAX,
        retryable: true,
        ..Default::default()
    };
    let writer = spawn_writer(queue, sink.clone());
    let accepted = (0..20).filter(|i| wb.submit(access(*i))).count();
    assert_eq!(accepted, 5);
    assert_eq!(wb.records_lost(), 15);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wb.backlog(), 5, "queued or in the retried batch");
    let lost = writer.shutdown(Duration::from_secs(2)).await;
    assert_eq!(lost, 20, "every record is either written or counted");
    assert_eq!(sink.recorded.lock().accesses, 0);
    assert!(!wb.submit(access(99)), "closed after shutdown");
    assert_eq!(wb.records_lost(), 21);
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_the_queue_first() {
    let (wb, queue) = write_behind(10_000);
    let sink = FakeSink::default();
    let writer = spawn_writer(queue, sink.clone());
    for i in 0..3000 {
        wb.submit(access(i));
    }
    let lost = writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(lost, 0);
    assert_eq!(sink.recorded.lock().accesses, 3000);
}

#[tokio::test(start_paused = true)]
async fn a_batch_the_store_refuses_is_given_up_and_counted() {
    let (wb, queue) = write_behind(100);
    let sink = FakeSink {
        fail_first: 3,
        retryable: false,
        ..Default::default()
    };
    let writer = spawn_writer(queue, sink.clone());
    for i in 0..4 {
        wb.submit(access(i));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(wb.records_lost(), 4);
    wb.submit(access(9));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sink.recorded.lock().accesses,
        1,
        "later batches still go through"
    );
    assert_eq!(writer.shutdown(Duration::from_secs(5)).await, 4);
}

/// The delay between tries of a batch grows while the store stays down, and is back at the
/// floor for the next batch once one went through: a store back from a long outage is not
/// made to wait seconds for the next failed write's retry.
#[tokio::test(start_paused = true)]
async fn the_backoff_starts_again_from_the_floor_once_a_batch_went_through() {
    let (wb, queue) = write_behind(100);
    let sink = FakeSink {
        retryable: true,
        ..Default::default()
    };
    let writer = spawn_writer(queue, sink.clone());
    sink.down.store(true, Ordering::Relaxed);
    wb.submit(access(1));
    // Long enough for the delays to reach their ceiling.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(sink.recorded.lock().accesses, 0, "store still down");
    let calls_while_down = sink.recorded.lock().calls;
    // Delays of 50 ms throughout would be some 600 tries.
    assert!(
        calls_while_down < 50,
        "the delays grew: {calls_while_down} tries in 30 s"
    );
    sink.down.store(false, Ordering::Relaxed);
    tokio::time::sleep(MAX_BACKOFF + Duration::from_secs(1)).await;
    assert_eq!(sink.recorded.lock().accesses, 1, "written once back");

    sink.down.store(true, Ordering::Relaxed);
    let before = sink.recorded.lock().calls;
    wb.submit(access(2));
    // The linger, then tries at most 50, 100 and 200 ms apart: four within half a second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tries = sink.recorded.lock().calls - before;
    assert!(
        tries >= 4,
        "{tries} tries in 500 ms: the delay did not start again"
    );
    sink.down.store(false, Ordering::Relaxed);
    assert_eq!(writer.shutdown(Duration::from_secs(5)).await, 0);
    assert_eq!(sink.recorded.lock().accesses, 2);
}
