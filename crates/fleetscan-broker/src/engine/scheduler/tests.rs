//! The scheduler's bookkeeping: liveness, credits, job ids, tenants' lanes, the queue's bound.
//! The helpers are shared with `run`'s tests.

use super::*;

pub(super) fn identity() -> ScannerIdentity {
    ScannerIdentity {
        scanner: "reference".into(),
        engine: "test".into(),
        engine_version: "1".into(),
        ruleset_version: "r1".into(),
    }
}

pub(super) fn attach(
    s: &Scheduler,
    name: &str,
    tenants: &[&str],
) -> (WorkerId, mpsc::Receiver<ToWorker>) {
    let (tx, rx) = mpsc::channel(WORKER_CHANNEL);
    let id = s.attach(
        Attach {
            name: name.into(),
            identity: identity(),
            pool: "default".into(),
            tenants: tenants.iter().map(|t| (*t).to_owned()).collect(),
            max_file_size: 0,
            attached_at_unix_ms: 0,
        },
        tx,
    );
    (id, rx)
}

pub(super) fn payload(tenant: &str, content: &'static [u8]) -> Arc<JobPayload> {
    Arc::new(JobPayload {
        sha256: Sha256::of(content),
        tenant: tenant.into(),
        content: Bytes::from_static(content),
        path_hint: String::new(),
    })
}

pub(super) fn report(kind: VerdictKind, retryable: bool) -> WorkerReport {
    WorkerReport {
        kind,
        threat_name: None,
        detail: None,
        retryable,
        scan_micros: 1,
        identity: identity(),
    }
}

pub(super) fn job_id(cmd: ToWorker) -> JobId {
    match cmd {
        ToWorker::Job { job_id, .. } => job_id,
        other => panic!("expected a job, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pool_is_live_only_once_a_worker_asks_for_work() {
    let s = Arc::new(Scheduler::default());
    assert!(!s.is_live("default", "default", 1));
    let (w, _rx) = attach(&s, "w1", &["default"]);
    assert!(!s.is_live("default", "default", 1), "attached is not live");
    assert_eq!(
        s.enqueue("default", payload("default", b"x"), 1, &[], true)
            .err(),
        Some(EnqueueError::NoLiveWorker)
    );
    s.grant(w, 1);
    assert!(s.is_live("default", "default", 1));
    assert!(!s.is_live("default", "other-tenant", 1));
    s.detach(w);
    assert!(!s.is_live("default", "default", 1));
}

#[tokio::test]
async fn no_job_is_sent_without_credit() {
    let s = Arc::new(Scheduler::default());
    let (w, mut rx) = attach(&s, "w1", &["default"]);
    s.grant(w, 2);
    let tickets: Vec<_> = [b"a" as &'static [u8], b"b", b"c"]
        .into_iter()
        .map(|c| {
            s.enqueue("default", payload("default", c), 1, &[], true)
                .unwrap()
        })
        .collect();
    assert!(rx.try_recv().is_ok());
    assert!(rx.try_recv().is_ok());
    assert!(rx.try_recv().is_err(), "third job must wait for credit");
    assert_eq!(s.queued(), 1);
    // Finishing a job does not return its credit.
    s.complete(w, tickets[0].job_id(), report(VerdictKind::Clean, false))
        .unwrap();
    assert!(rx.try_recv().is_err());
    s.grant(w, 1);
    assert_eq!(job_id(rx.try_recv().unwrap()), tickets[2].job_id());
    assert_eq!(s.queued(), 0);
}

#[tokio::test]
async fn unknown_or_foreign_job_ids_are_refused() {
    let s = Arc::new(Scheduler::default());
    let (w1, mut rx1) = attach(&s, "w1", &["default"]);
    let (w2, _rx2) = attach(&s, "w2", &["default"]);
    s.grant(w1, 1);
    let _ticket = s
        .enqueue("default", payload("default", b"x"), 1, &[], true)
        .unwrap();
    let id = job_id(rx1.try_recv().unwrap());
    assert_eq!(
        s.complete(w1, 999_999, report(VerdictKind::Clean, false)),
        Err(UnknownJob(999_999))
    );
    assert_eq!(
        s.complete(w2, id, report(VerdictKind::Clean, false)),
        Err(UnknownJob(id)),
        "a worker cannot answer another worker's job"
    );
    assert!(
        s.complete(w1, id, report(VerdictKind::Clean, false))
            .is_ok()
    );
    assert!(
        s.complete(w1, id, report(VerdictKind::Clean, false))
            .is_err(),
        "a job is answered once"
    );
}

#[tokio::test]
async fn tenants_are_served_round_robin_and_only_by_their_workers() {
    let s = Arc::new(Scheduler::default());
    let (w, mut rx) = attach(&s, "w1", &["a", "b"]);
    let (other, mut other_rx) = attach(&s, "only-c", &["c"]);
    s.grant(other, 5);
    // Make the pool live for a and b without giving credit yet, then queue a burst for a.
    let mut tickets = Vec::new();
    s.grant(w, 0);
    {
        let mut inner = s.inner.lock();
        let pool = inner.pools.get_mut("default").unwrap();
        pool.workers.get_mut(&w).unwrap().asked_for_work = true;
    }
    for c in [b"a1" as &'static [u8], b"a2", b"a3"] {
        tickets.push((
            "a",
            s.enqueue("default", payload("a", c), 1, &[], true).unwrap(),
        ));
    }
    tickets.push((
        "b",
        s.enqueue("default", payload("b", b"b1"), 1, &[], true)
            .unwrap(),
    ));
    assert!(
        other_rx.try_recv().is_err(),
        "tenant c's worker takes no a/b job"
    );
    s.grant(w, 4);
    let order: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|cmd| match cmd {
            ToWorker::Job { payload, .. } => payload.tenant.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(order, vec!["a", "b", "a", "a"]);
}

#[tokio::test]
async fn queue_is_bounded() {
    let s = Arc::new(Scheduler::new(2));
    let (w, _rx) = attach(&s, "w1", &["default"]);
    s.grant(w, 0);
    {
        let mut inner = s.inner.lock();
        let pool = inner.pools.get_mut("default").unwrap();
        pool.workers.get_mut(&w).unwrap().asked_for_work = true;
    }
    let _a = s
        .enqueue("default", payload("default", b"a"), 1, &[], true)
        .unwrap();
    let b = s
        .enqueue("default", payload("default", b"b"), 1, &[], true)
        .unwrap();
    assert_eq!(
        s.enqueue("default", payload("default", b"c"), 1, &[], true)
            .err(),
        Some(EnqueueError::QueueFull)
    );
    drop(b);
    assert_eq!(s.queued(), 1, "a dropped ticket leaves the queue");
    assert!(
        s.enqueue("default", payload("default", b"c"), 1, &[], true)
            .is_ok()
    );
}
