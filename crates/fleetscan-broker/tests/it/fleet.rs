//! Several brokers over one Postgres store: one scan per content fleet-wide, claims taken over
//! from a dead owner, one verdict generation for every replica, and a store that goes away and
//! comes back without anything lost.
//!
//! Needs root and the Postgres server binaries (a private `initdb`/`pg_ctl` cluster per test
//! process); fails with a message saying so otherwise, never skips.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fleetscan_core::{FailMode, Sha256};
use fleetscan_proto::v1;
use fleetscan_store::testing::PgCluster;
use fleetscan_store::{Claim, Store};

use crate::common::{ScriptedAgent, ScriptedWorker, TestBroker, eventually, identity};

fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(PgCluster::start)
}

/// Asks `agent` about `content` and has `worker` answer the job it causes.
async fn scanned(
    agent: &mut ScriptedAgent,
    worker: &mut ScriptedWorker,
    request_id: u64,
    content: &[u8],
    result: v1::VerdictResult,
) -> v1::Decision {
    agent.request(request_id, content, 10_000).await;
    let answer = async {
        let job = worker.job().await;
        let threat = if result == v1::VerdictResult::Malicious {
            "Test.Fleet"
        } else {
            ""
        };
        worker.answer(job.job.job_id, result, threat).await;
    };
    // The agent serves the broker's content request while the worker waits for its job.
    let (decision, ()) = tokio::join!(agent.decision(), answer);
    decision
}

async fn replica(url: &str, id: &str) -> TestBroker {
    let (url, id) = (url.to_owned(), id.to_owned());
    TestBroker::start(move |c| {
        c.store_url = url;
        c.broker_id = id;
        c.claim_ttl = Duration::from_secs(2);
    })
    .await
}

#[tokio::test]
async fn two_brokers_asked_for_the_same_new_content_at_once_scan_it_once() {
    let url = cluster().new_database();
    let a = replica(&url, "a").await;
    let b = replica(&url, "b").await;
    let mut worker_a = a.worker("wa", &identity("r1")).await;
    let mut worker_b = b.worker("wb", &identity("r1")).await;
    worker_a.credit(8).await;
    worker_b.credit(8).await;
    let mut agent_a = a.agent("host-a").await;
    let mut agent_b = b.agent("host-b").await;
    let content = b"new content, asked for on two brokers at once";
    agent_a.request(1, content, 10_000).await;
    agent_b.request(1, content, 10_000).await;
    let da = tokio::spawn(async move { agent_a.decision().await });
    let db = tokio::spawn(async move { agent_b.decision().await });

    // Exactly one of the two workers gets the job; the other broker waits on the claim.
    let job = tokio::select! {
        job = worker_a.job() => { job }
        job = worker_b.job() => { job }
    };
    assert_eq!(job.content, content);
    let answer = async |w: &crate::common::ScriptedWorker| {
        w.answer(job.job.job_id, v1::VerdictResult::Malicious, "Test.Fleet")
            .await;
    };
    // Answer on whichever holds it: the one whose job id matches gets it, the other ignores it.
    answer(&worker_a).await;
    answer(&worker_b).await;
    let (da, db) = (da.await.unwrap(), db.await.unwrap());
    assert_eq!(da.action(), v1::Action::Deny, "{}", da.reason);
    assert_eq!(db.action(), v1::Action::Deny, "{}", db.reason);
    assert!(
        worker_a
            .job_within(Duration::from_millis(300))
            .await
            .is_none()
            && worker_b
                .job_within(Duration::from_millis(300))
                .await
                .is_none(),
        "a second scan of the same content"
    );
    let (sa, sb) = (a.stats().await, b.stats().await);
    assert_eq!(sa.scans_started + sb.scans_started, 1, "{sa:?} {sb:?}");
    // The other broker decided on the stored verdict: it waited on the claim, or found the
    // verdict when it looked again after winning a just-released claim.
    assert!(
        sa.scans_deduplicated + sb.scans_deduplicated + sa.store_hits + sb.store_hits >= 1,
        "{sa:?} {sb:?}"
    );
}

#[tokio::test]
async fn a_claim_whose_owner_died_is_taken_over_after_it_expires() {
    let url = cluster().new_database();
    let broker = replica(&url, "survivor").await;
    let mut worker = broker.worker("w", &identity("r1")).await;
    worker.credit(4).await;
    let content = b"claimed by a broker that then died";
    let sha = Sha256::of(content);
    let store = Store::connect(&url).await.unwrap();
    let ttl = Duration::from_millis(1500);
    assert_eq!(
        store
            .claim_scan(&sha, &identity("r1"), "dead-broker", ttl)
            .await
            .unwrap(),
        Claim::Won
    );
    let claimed = Instant::now();
    let mut agent = broker.agent("host").await;
    agent.request(1, content, 10_000).await;
    let decided = tokio::spawn(async move { agent.decision().await });
    let job = worker.job().await;
    let taken_over = claimed.elapsed();
    assert!(
        taken_over >= ttl - Duration::from_millis(100),
        "the claim was taken over while it held: after {taken_over:?}"
    );
    assert!(
        taken_over <= ttl + Duration::from_secs(1),
        "taken over only after {taken_over:?} (ttl {ttl:?})"
    );
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    assert_eq!(decided.await.unwrap().action(), v1::Action::Allow);
}

#[tokio::test]
async fn every_replica_hands_out_the_same_generation_and_a_rule_change_reaches_all() {
    let url = cluster().new_database();
    let a = replica(&url, "a").await;
    let b = replica(&url, "b").await;
    let mut on_a = a.agent("host-1").await;
    let mut worker = a.worker("w1", &identity("r1")).await;
    worker.credit(4).await;
    // The worker attached to a; b learns the pool's identity and generation from the store.
    let generation = on_a.flush().await.verdict_generation;
    let mut on_b = eventually("b adopts the fleet generation", async || {
        let agent = b.agent("host-2").await;
        (agent.accepted.verdict_generation == generation).then_some(agent)
    })
    .await;

    // A verdict made through a serves an agent of b without a scan.
    let d = scanned(
        &mut on_a,
        &mut worker,
        1,
        b"judged once",
        v1::VerdictResult::Clean,
    )
    .await;
    assert_eq!(d.action(), v1::Action::Allow);
    on_b.request(1, b"judged once", 10_000).await;
    let d = on_b.decision().await;
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
    assert!(
        on_b.content_requests.is_empty(),
        "b asked for content it had a verdict on"
    );

    // New rules on a worker of a: agents of b are told to flush, with the fleet's new number.
    let _new = a.worker("w2", &identity("r2")).await;
    let flush_a = on_a.flush().await;
    let flush_b = on_b.flush().await;
    assert_ne!(flush_a.verdict_generation, generation);
    assert_eq!(flush_a.verdict_generation, flush_b.verdict_generation);
    // And b no longer answers from the old rules' verdict: no worker of r2 has credit, so the
    // fail mode decides.
    on_b.request(2, b"judged once", 10_000).await;
    let d = on_b.decision().await;
    assert!(!d.cacheable, "{d:?}");
}

#[tokio::test]
async fn with_postgres_down_brokers_decide_from_workers_and_write_the_backlog_when_it_returns() {
    // A private cluster of this test's own: it is stopped and started.
    let pg = PgCluster::start_local();
    let url = pg.new_database();
    let broker = TestBroker::start(|c| {
        c.store_url = url.clone();
        c.policy.fail_mode = FailMode::Closed;
    })
    .await;
    let mut worker = broker.worker("w", &identity("r1")).await;
    worker.credit(16).await;
    let mut agent = broker.agent("host").await;
    pg.stop();

    let contents: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("new while down {i}").into_bytes())
        .collect();
    for (i, content) in contents.iter().enumerate() {
        let started = Instant::now();
        let d = scanned(
            &mut agent,
            &mut worker,
            i as u64 + 1,
            content,
            v1::VerdictResult::Malicious,
        )
        .await;
        assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a decision took {:?} with the store down",
            started.elapsed()
        );
    }
    let stats = broker.stats().await;
    assert!(
        stats.write_backlog > 0,
        "nothing waits to be written: {stats:?}"
    );
    assert_eq!(stats.records_lost, 0);

    pg.start_again();
    let store = Store::connect(&url).await.unwrap();
    eventually("the backlog is written", async || {
        let stats = broker.stats().await;
        (stats.write_backlog == 0).then_some(())
    })
    .await;
    for content in &contents {
        let stored = store.verdicts_for(&Sha256::of(content)).await.unwrap();
        assert_eq!(
            stored.len(),
            1,
            "verdict of {:?}",
            String::from_utf8_lossy(content)
        );
    }
    let denials = store
        .list_accesses(&fleetscan_store::AccessFilter::default())
        .await
        .unwrap();
    assert_eq!(denials.len(), contents.len());
    assert_eq!(broker.stats().await.records_lost, 0);
}

/// `ScanService.Lookup` goes through the store-health guard like the decision path: with the
/// store gone, a verdict in memory is still answered, and a look-up that would need the store
/// fails at once with UNAVAILABLE instead of waiting on it.
#[tokio::test]
async fn with_postgres_down_lookups_answer_from_memory_or_say_unavailable_at_once() {
    let pg = PgCluster::start_local();
    let url = pg.new_database();
    let broker = TestBroker::start(|c| c.store_url = url.clone()).await;
    let mut worker = broker.worker("w", &identity("r1")).await;
    worker.credit(4).await;
    let mut agent = broker.agent("host").await;
    let known = b"judged before the store went".to_vec();
    let d = scanned(
        &mut agent,
        &mut worker,
        1,
        &known,
        v1::VerdictResult::Malicious,
    )
    .await;
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    pg.stop();

    let mut scan = broker.scan().await;
    let from_memory = scan
        .lookup(v1::LookupRequest {
            sha256: Sha256::of(&known).to_hex(),
        })
        .await
        .expect("a verdict in memory needs no store")
        .into_inner();
    assert!(from_memory.known, "{from_memory:?}");
    assert_eq!(from_memory.action(), v1::Action::Deny);

    for i in 0..3 {
        let started = Instant::now();
        let status = scan
            .lookup(v1::LookupRequest {
                sha256: Sha256::of(format!("never seen {i}").as_bytes()).to_hex(),
            })
            .await
            .expect_err("nothing to answer from without the store");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a look-up took {:?} with the store down",
            started.elapsed()
        );
    }
    pg.start_again();
}
