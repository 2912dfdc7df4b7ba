//! The broker end to end on loopback: a real server, a real SQLite store, scripted agents and
//! workers speaking the generated protocol.

use std::time::Duration;

use fleetscan_core::{
    AccessKind, Action, DecidedBy, FailMode, Sha256, Verdict, VerdictKind, now_unix_ms,
};
use fleetscan_proto::v1::{self, agent_message};
use fleetscan_store::AccessFilter;
use tonic::Code;

use crate::common::{TestBroker, WAIT, eventually, identity};

const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn list_denials() -> v1::ListEventsRequest {
    v1::ListEventsRequest {
        action: v1::Action::Deny.into(),
        ..Default::default()
    }
}

/// A malicious verdict of the pool's identity ("r1") on `content`.
fn malicious(content: &[u8], threat: &str) -> Verdict {
    Verdict {
        sha256: Sha256::of(content),
        scanner: identity("r1"),
        kind: VerdictKind::Malicious,
        threat_name: Some(threat.into()),
        detail: None,
        scanned_at_unix_ms: now_unix_ms(),
        scan_micros: 5,
    }
}

/// The decision of a request the broker can answer only from its store: without a verdict
/// there its job would get no answer in time.
async fn decided_from_store(agent: &mut crate::common::ScriptedAgent) -> v1::Decision {
    agent
        .decision_within(Duration::from_secs(3))
        .await
        .expect("decided from the store")
}

#[tokio::test]
async fn known_verdict_is_answered_without_a_job() {
    // A verdict of the pool's identity is already in the store.
    let broker =
        TestBroker::start_with_verdicts(&[malicious(EICAR, "EICAR-Test-File")], |_| {}).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(4).await;
    let mut agent = broker.agent("node-a").await;

    agent.request(1, EICAR, 5000).await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny);
    assert!(d.reason.contains("EICAR-Test-File"), "{}", d.reason);
    // No time limit: it holds until the file or the rules change (decide::VERDICT_TTL_SECONDS).
    assert!(d.cacheable && d.ttl_seconds == 0);
    assert_eq!(d.verdicts.len(), 1);
    // The second time it comes from the memory cache.
    agent.request(2, EICAR, 5000).await;
    assert_eq!(agent.decision().await.action(), v1::Action::Deny);

    assert!(
        agent.content_requests.is_empty(),
        "known content is never uploaded"
    );
    assert!(
        worker
            .job_within(Duration::from_millis(300))
            .await
            .is_none(),
        "known content is never scanned"
    );
    let stats = broker.stats().await;
    assert_eq!(stats.store_hits, 1);
    assert_eq!(stats.cache_hits, 1);
    assert_eq!(stats.scans_started, 0);
    assert_eq!(stats.decisions, 2);
}

/// A SQLite store is its broker's alone: once the broker has read which contents it holds, the
/// look-up of new content (which must miss) is skipped — and every stored verdict is still
/// found: one in the store before the start, and one the broker wrote itself, after a restart.
#[tokio::test]
async fn a_broker_owning_its_store_skips_look_ups_that_must_miss_and_finds_every_stored_verdict() {
    let mut first =
        TestBroker::start_with_verdicts(&[malicious(EICAR, "EICAR-Test-File")], |_| {}).await;
    let skipped = |b: &TestBroker| {
        b.engine
            .stats()
            .store_lookups_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    first.wait_until_store_contents_known().await;
    let mut worker = first.worker("w1", &identity("r1")).await;
    worker.credit(4).await;
    let mut agent = first.agent("node-a").await;

    // Stored before the start: found in the store, not scanned (its job would get no answer).
    agent.request(1, EICAR, 5000).await;
    let d = decided_from_store(&mut agent).await;
    assert_eq!(d.action(), v1::Action::Deny);
    assert_eq!(first.stats().await.store_hits, 1);
    assert_eq!(skipped(&first), 0);

    // New: no look-up, scanned.
    let fresh = b"content this store has never held".to_vec();
    agent.request(2, &fresh, 5000).await;
    // The agent uploads the content while it waits for the decision.
    let decided = tokio::spawn(async move { agent.decision().await });
    let job = worker.job().await;
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    assert_eq!(decided.await.unwrap().action(), v1::Action::Allow);
    assert_eq!(skipped(&first), 1);
    drop(worker);
    first.shutdown().await;

    // The next broker on the same file: both answers come from the store, with no look-up
    // skipped. (Not found, they would wait for a worker that grants no credit until the scan
    // deadline.)
    let store_url = first.store_url.clone();
    let second = TestBroker::start(|c| {
        c.store_url = store_url;
        c.scan_deadline = Duration::from_millis(500);
    })
    .await;
    second.wait_until_store_contents_known().await;
    let _worker = second.worker("w1", &identity("r1")).await;
    let mut agent = second.agent("node-a").await;
    agent.request(1, &fresh, 5000).await;
    let d = decided_from_store(&mut agent).await;
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
    agent.request(2, EICAR, 5000).await;
    let d = decided_from_store(&mut agent).await;
    assert_eq!(d.action(), v1::Action::Deny);
    assert_eq!(second.stats().await.store_hits, 2);
    assert_eq!(skipped(&second), 0);

    // A verdict stored behind the broker's back (which a SQLite store's broker does not
    // expect): its look-up is skipped, but when the scan cannot decide (no credit, deadline) the
    // stored verdict decides, not the fail mode.
    let behind = b"stored by another writer".to_vec();
    second
        .store()
        .await
        .put_verdict(&malicious(&behind, "Behind-The-Back"))
        .await
        .unwrap();
    agent.request(3, &behind, 5000).await;
    let d = decided_from_store(&mut agent).await;
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert!(d.reason.contains("Behind-The-Back"), "{}", d.reason);
    assert_eq!(skipped(&second), 1);
    assert_eq!(second.stats().await.store_hits, 3);
}

#[tokio::test]
async fn unknown_content_is_uploaded_scanned_decided_and_recorded() {
    let broker = TestBroker::start(|_| {}).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    assert_eq!(worker.registered.broker_id, "test-broker");
    assert_eq!(
        worker.registered.chunk_size as usize,
        fleetscan_proto::CHUNK_SIZE
    );
    worker.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    // Larger than one chunk, so that content travels in several chunks both ways.
    let mut content = vec![7u8; 2 * fleetscan_proto::CHUNK_SIZE + 123];
    content[..EICAR.len()].copy_from_slice(EICAR);

    agent.request(1, &content, 10_000).await;
    let decided = tokio::spawn(async move {
        let d = agent.decision().await;
        (agent, d)
    });
    let job = worker.job().await;
    assert_eq!(job.content, content, "the worker gets exactly the content");
    assert_eq!(job.job.sha256, Sha256::of(&content).to_hex());
    assert_eq!(job.job.attempt, 1);
    assert_eq!(job.job.tenant, "default");
    worker
        .answer(
            job.job.job_id,
            v1::VerdictResult::Malicious,
            "EICAR-Test-File",
        )
        .await;
    let (agent, d) = decided.await.unwrap();
    assert_eq!(agent.content_requests, vec![1]);
    assert_eq!(d.action(), v1::Action::Deny);
    assert!(d.cacheable);
    assert_eq!(d.verdicts[0].threat_name, "EICAR-Test-File");

    // The denial and the verdict are persisted behind the decision.
    let admin = broker.admin().await;
    let event = eventually("the denial in ListEvents", || {
        let mut admin = admin.clone();
        async move {
            let events = admin
                .list_events(list_denials())
                .await
                .unwrap()
                .into_inner();
            events.events.into_iter().next()
        }
    })
    .await;
    assert_eq!(event.node, "node-a");
    assert_eq!(event.path, "/data/file-1");
    assert_eq!(event.decided_by, "broker");
    assert_eq!(event.threat_name, "EICAR-Test-File");
    assert_eq!(event.sha256, Sha256::of(&content).to_hex());
    assert_eq!((event.pid, event.uid), (4242, 1000));
    assert_eq!(event.exe, "/usr/bin/cat");
    let verdicts = eventually("the verdict in GetVerdicts", || {
        let mut admin = admin.clone();
        let sha256 = Sha256::of(&content).to_hex();
        async move {
            let v = admin
                .get_verdicts(v1::GetVerdictsRequest { sha256 })
                .await
                .unwrap()
                .into_inner()
                .verdicts;
            (!v.is_empty()).then_some(v)
        }
    })
    .await;
    assert_eq!(verdicts[0].result(), v1::VerdictResult::Malicious);
    assert_eq!(verdicts[0].scanner.as_ref().unwrap().ruleset_version, "r1");
    let workers = broker.workers().await;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].jobs_done, 1);
    assert_eq!(
        workers[0].credits, 0,
        "a finished job does not return its credit"
    );
    let stats = broker.stats().await;
    assert_eq!((stats.scans_started, stats.denied), (1, 1));
}

#[tokio::test]
async fn ten_requests_from_three_sessions_cause_one_job() {
    let broker = TestBroker::start(|_| {}).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(20).await;
    let mut agents = vec![
        broker.agent("node-a").await,
        broker.agent("node-b").await,
        broker.agent("node-c").await,
    ];
    let content = b"brand new content nobody has scanned".to_vec();
    for i in 0..10u64 {
        agents[(i % 3) as usize]
            .request(100 + i, &content, 10_000)
            .await;
    }
    let waiting: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, mut agent)| {
            let expected = (0..10u64).filter(|r| (r % 3) as usize == i).count();
            tokio::spawn(async move {
                let mut decisions = Vec::new();
                for _ in 0..expected {
                    decisions.push(agent.decision().await);
                }
                (agent.content_requests.len(), decisions)
            })
        })
        .collect();
    let job = worker.job().await;
    assert_eq!(job.content, content);
    // Let every request reach the broker before the scan ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    let mut uploads = 0;
    let mut decisions = 0;
    for task in waiting {
        let (uploaded, ds) = task.await.unwrap();
        uploads += uploaded;
        for d in ds {
            assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
            assert_eq!(d.reason, "clean");
            decisions += 1;
        }
    }
    assert_eq!(decisions, 10);
    assert_eq!(uploads, 1, "the content is uploaded once");
    assert!(
        worker
            .job_within(Duration::from_millis(500))
            .await
            .is_none(),
        "exactly one job"
    );
    let stats = broker.stats().await;
    assert_eq!(stats.scans_started, 1);
    assert_eq!(stats.scans_deduplicated, 9);
}

#[tokio::test]
async fn no_live_worker_means_the_fail_mode() {
    let broker = TestBroker::start(|c| c.policy.fail_mode = FailMode::Closed).await;
    let mut agent = broker.agent("node-a").await;
    assert_eq!(
        agent.accepted.policy.as_ref().unwrap().fail_mode(),
        v1::FailMode::Closed
    );
    agent.request(1, b"anything", 5000).await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny);
    assert!(d.reason.contains("no live scanner"), "{}", d.reason);
    assert!(!d.cacheable);
    assert_eq!(d.ttl_seconds, 0);

    // A worker that attached but never asked for work does not make the pool live.
    let mut worker = broker.worker("w1", &identity("r1")).await;
    agent.request(2, b"anything", 5000).await;
    let d = agent.decision().await;
    assert!(d.reason.contains("no live scanner"), "{}", d.reason);
    assert!(
        worker
            .job_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    assert!(agent.content_requests.is_empty());
    assert_eq!(broker.stats().await.fail_mode_decisions, 2);
}

#[tokio::test]
async fn a_job_of_a_worker_that_disconnects_is_retried_on_another() {
    let broker = TestBroker::start(|_| {}).await;
    let mut first = broker.worker("w1", &identity("r1")).await;
    let mut second = broker.worker("w2", &identity("r1")).await;
    first.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    agent
        .request(1, b"content of a crashing scan", 10_000)
        .await;
    let decided = tokio::spawn(async move { agent.decision().await });
    let job = first.job().await;
    assert_eq!(job.job.attempt, 1);
    first.crash();
    second.credit(1).await;
    let retried = second.job().await;
    assert_eq!(retried.job.attempt, 2);
    assert_eq!(retried.content, b"content of a crashing scan");
    second
        .answer(retried.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    let d = decided.await.unwrap();
    assert_eq!(d.action(), v1::Action::Allow);
    assert_eq!(d.reason, "clean");
}

#[tokio::test]
async fn worker_garbage_is_survived_and_decided_in_time() {
    let broker = TestBroker::start(|c| c.policy.fail_mode = FailMode::Closed).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(2).await;
    let mut agent = broker.agent("node-a").await;
    agent.request(1, b"garbage ahead", 3000).await;
    let decided = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let d = agent.decision_within(Duration::from_millis(3000)).await;
        (agent, d, started.elapsed())
    });
    let job = worker.job().await;
    // A result for a job it does not hold, then an unknown result value.
    worker
        .answer(job.job.job_id + 1000, v1::VerdictResult::Clean, "")
        .await;
    worker
        .send(v1::worker_message::Msg::Result(v1::ScanResult {
            job_id: job.job.job_id,
            result: 42,
            ..Default::default()
        }))
        .await;
    let (mut agent, d, took) = decided.await.unwrap();
    let d = d.expect("decided within the deadline");
    assert!(took < Duration::from_millis(3000));
    assert_eq!(
        d.action(),
        v1::Action::Deny,
        "an unknown result is an error, never clean: {}",
        d.reason
    );
    assert!(d.reason.contains("error"), "{}", d.reason);
    assert!(!d.cacheable);
    // The worker's stream survived: it takes and answers the next job.
    agent.request(2, b"after the garbage", 5000).await;
    let decided = tokio::spawn(async move { agent.decision().await });
    let job = worker.job().await;
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    assert_eq!(decided.await.unwrap().action(), v1::Action::Allow);
    assert!(broker.stats().await.scan_errors >= 1);
}

#[tokio::test]
async fn a_rule_set_change_flushes_agents_and_old_verdicts_are_not_reused() {
    let broker = TestBroker::start(|_| {}).await;
    let mut old = broker.worker("old", &identity("r1")).await;
    old.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    let mut bystander = broker.agent("node-b").await;
    let content = b"judged clean by the old rules".to_vec();
    agent.request(1, &content, 10_000).await;
    let decided = tokio::spawn(async move {
        let d = agent.decision().await;
        (agent, d)
    });
    old.answer_next(v1::VerdictResult::Clean, "").await;
    let (mut agent, d) = decided.await.unwrap();
    assert_eq!(d.action(), v1::Action::Allow);
    old.crash();

    let mut new = broker.worker("new", &identity("r2")).await;
    let flush = agent.flush().await;
    assert_ne!(flush.verdict_generation, agent.accepted.verdict_generation);
    assert_eq!(
        bystander.flush().await.verdict_generation,
        flush.verdict_generation,
        "every connected agent is told"
    );
    // A session opened now starts at the new generation.
    let late = broker.agent("node-c").await;
    assert_eq!(late.accepted.verdict_generation, flush.verdict_generation);

    new.credit(1).await;
    agent.request(2, &content, 10_000).await;
    let decided = tokio::spawn(async move {
        let d = agent.decision().await;
        (agent, d)
    });
    let job = new.job().await;
    assert_eq!(
        job.content, content,
        "the content is scanned again under the new rules"
    );
    new.answer(job.job.job_id, v1::VerdictResult::Malicious, "New-Rule")
        .await;
    let (agent, d) = decided.await.unwrap();
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert_eq!(agent.content_requests, vec![1, 2]);
    assert_eq!(
        d.verdicts[0].scanner.as_ref().unwrap().ruleset_version,
        "r2"
    );
}

/// A worker of the old rules that is still attached (and has credit) when a worker with new
/// rules registers must not have its verdict decide a later access: the agents were told to
/// flush, and a decision resting on the old rules would be cached by them again.
#[tokio::test]
async fn a_verdict_of_a_superseded_identity_decides_nothing() {
    let broker = TestBroker::start(|c| c.policy.fail_mode = FailMode::Closed).await;
    let mut old = broker.worker("old", &identity("r1")).await;
    old.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    agent.request(1, b"judged by whoever is free", 10_000).await;
    let decided = tokio::spawn(async move { agent.decision().await });
    // The old worker holds the job when the new rules register.
    let job = old.job().await;
    let _new = broker.worker("new", &identity("r2")).await;
    old.answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    let d = decided.await.unwrap();
    assert!(
        d.verdicts
            .iter()
            .all(|v| v.scanner.as_ref().is_none_or(|s| s.ruleset_version != "r1")),
        "a decision after the rules changed rests on the old rules: {d:?}"
    );
    assert!(!d.cacheable, "{d:?}");
    assert_eq!(
        d.action(),
        v1::Action::Deny,
        "the fail mode decides: {}",
        d.reason
    );
}

#[tokio::test]
async fn during_a_rolling_upgrade_only_workers_with_the_new_rules_get_jobs() {
    let broker = TestBroker::start(|_| {}).await;
    let mut old = broker.worker("old", &identity("r1")).await;
    old.credit(4).await;
    let mut new = broker.worker("new", &identity("r2")).await;
    new.credit(4).await;
    // An old worker reconnecting does not turn the pool back to the old rules.
    let mut old_again = broker.worker("old-again", &identity("r1")).await;
    old_again.credit(4).await;
    let mut agent = broker.agent("node-a").await;
    for i in 0..3u64 {
        agent
            .request(i + 1, format!("content {i}").as_bytes(), 10_000)
            .await;
        let waiting = tokio::spawn(async move {
            let d = agent.decision().await;
            (agent, d)
        });
        new.answer_next(v1::VerdictResult::Clean, "").await;
        let (back, decided) = waiting.await.unwrap();
        agent = back;
        assert_eq!(decided.action(), v1::Action::Allow, "{}", decided.reason);
        assert!(
            decided.verdicts.iter().all(|v| v
                .scanner
                .as_ref()
                .is_some_and(|s| s.ruleset_version == "r2")),
            "{decided:?}"
        );
    }
    assert!(old.job_within(Duration::from_millis(200)).await.is_none());
    assert!(
        old_again
            .job_within(Duration::from_millis(200))
            .await
            .is_none()
    );
}

/// The first agent to ask about new content declares a wrong size for it (e.g. the file grew
/// between its stat and its read), so its upload fails. The flight must then fetch from another
/// waiter, holding that waiter to the size it declared itself.
#[tokio::test]
async fn a_wrong_size_from_one_agent_does_not_fail_the_other_waiters() {
    let broker = TestBroker::start(|_| {}).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(1).await;
    let content = b"content whose size one agent got wrong".to_vec();
    let mut liar = broker.agent("node-liar").await;
    let mut honest = broker.agent("node-honest").await;
    liar.request_raw(v1::AccessRequest {
        request_id: 1,
        sha256: Sha256::of(&content).to_hex(),
        size: content.len() as u64 + 5,
        path: "/data/growing".into(),
        kind: v1::AccessKind::Open.into(),
        deadline_ms: 10_000,
        ..Default::default()
    })
    .await;
    let asked = liar
        .next_within(WAIT)
        .await
        .expect("a content request in time")
        .expect("stream ok");
    assert!(
        matches!(
            asked.msg,
            Some(v1::broker_message::Msg::ContentRequest(
                v1::ContentRequest { request_id: 1 }
            ))
        ),
        "{asked:?}"
    );
    honest.request(7, &content, 10_000).await;
    eventually("the honest request to join the flight", || {
        let broker = &broker;
        async move { (broker.stats().await.scans_deduplicated == 1).then_some(()) }
    })
    .await;
    // The liar uploads what it has, which is not the size it declared.
    liar.send(agent_message::Msg::Content(v1::ContentChunk {
        request_id: 1,
        offset: 0,
        data: content.clone().into(),
        last: true,
    }))
    .await;
    let decided = tokio::spawn(async move {
        let d = honest.decision().await;
        (honest, d)
    });
    let job = worker.job().await;
    assert_eq!(job.content, content);
    worker
        .answer(job.job.job_id, v1::VerdictResult::Malicious, "Grown")
        .await;
    let (honest, d) = decided.await.unwrap();
    assert_eq!(honest.content_requests, vec![7]);
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    let d = liar.decision().await;
    assert_eq!(d.request_id, 1);
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
}

#[tokio::test]
async fn new_versions_in_a_result_become_the_pool_identity() {
    let broker = TestBroker::start(|_| {}).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    agent.request(1, b"x", 10_000).await;
    let decided = tokio::spawn(async move {
        let d = agent.decision().await;
        (agent, d)
    });
    let job = worker.job().await;
    worker
        .send(v1::worker_message::Msg::Result(v1::ScanResult {
            job_id: job.job.job_id,
            result: v1::VerdictResult::Clean.into(),
            ruleset_version: "r1-hotfix".into(),
            ..Default::default()
        }))
        .await;
    let (mut agent, d) = decided.await.unwrap();
    assert_eq!(
        d.verdicts[0].scanner.as_ref().unwrap().ruleset_version,
        "r1-hotfix"
    );
    let flush = agent.flush().await;
    assert_ne!(flush.verdict_generation, agent.accepted.verdict_generation);
    // The verdict was stored under the new identity, which is now current: a cache hit.
    agent.request(2, b"x", 10_000).await;
    assert_eq!(agent.decision().await.reason, "clean");
    assert_eq!(agent.content_requests, vec![1]);
}

#[tokio::test]
async fn a_bad_request_gets_the_fail_mode_and_the_stream_goes_on() {
    let broker = TestBroker::start(|c| c.policy.fail_mode = FailMode::Closed).await;
    let mut agent = broker.agent("node-a").await;
    agent
        .request_raw(v1::AccessRequest {
            request_id: 7,
            sha256: "not-a-digest".into(),
            ..Default::default()
        })
        .await;
    let d = agent.decision().await;
    assert_eq!(d.request_id, 7);
    assert_eq!(d.action(), v1::Action::Deny);
    assert!(d.reason.contains("invalid request"), "{}", d.reason);
    assert!(!d.cacheable);
    agent.request(8, b"fine", 5000).await;
    assert_eq!(agent.decision().await.request_id, 8);
}

#[tokio::test]
async fn a_stream_not_starting_with_a_hello_is_refused() {
    let broker = TestBroker::start(|_| {}).await;
    let mut client = v1::agent_service_client::AgentServiceClient::new(broker.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage {
        msg: Some(agent_message::Msg::Heartbeat(v1::Heartbeat::default())),
    })
    .await
    .unwrap();
    let status = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    // The same for a worker that does not register first.
    let mut client = v1::worker_service_client::WorkerServiceClient::new(broker.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::WorkerMessage {
        msg: Some(v1::worker_message::Msg::Credit(v1::Credit { credits: 1 })),
    })
    .await
    .unwrap();
    let status = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn past_its_deadline_a_request_is_left_to_the_agent_but_the_scan_goes_on() {
    let broker = TestBroker::start(|_| {}).await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    agent.request(1, b"slow to scan", 300).await;
    let waited = tokio::spawn(async move {
        let d = agent.decision_within(Duration::from_millis(1500)).await;
        (agent, d)
    });
    let job = worker.job().await;
    let (mut agent, d) = waited.await.unwrap();
    assert!(
        d.is_none(),
        "no decision after the request's deadline: {d:?}"
    );
    worker
        .answer(job.job.job_id, v1::VerdictResult::Malicious, "Slow")
        .await;
    // The verdict arrived after the deadline and serves the next request from the cache.
    let d = eventually("the late verdict to be cached", || {
        let broker = &broker;
        async move { (broker.stats().await.scans_started == 1).then_some(()) }
    })
    .await;
    let () = d;
    let mut decision = None;
    for id in 2..50 {
        agent.request(id, b"slow to scan", 5000).await;
        let d = agent.decision().await;
        if d.action() == v1::Action::Deny {
            decision = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = decision.expect("the late verdict is used");
    assert!(d.reason.contains("Slow"));
    assert_eq!(agent.content_requests, vec![1], "not uploaded again");
}

#[tokio::test]
async fn agent_reports_are_recorded_and_counted() {
    let broker = TestBroker::start(|_| {}).await;
    let mut agent = broker.agent("node-r").await;
    agent
        .send(agent_message::Msg::Report(v1::AccessReport {
            at_unix_ms: 1234,
            action: v1::Action::Deny.into(),
            reason: v1::LocalReason::Deadline.into(),
            sha256: Sha256::of(b"r").to_hex(),
            path: "/srv/app".into(),
            kind: v1::AccessKind::Exec.into(),
            allowed_count: 41,
            dropped_reports: 3,
            ..Default::default()
        }))
        .await;
    agent
        .send(agent_message::Msg::Report(v1::AccessReport {
            action: v1::Action::Allow.into(),
            reason: v1::LocalReason::Deadline.into(),
            ..Default::default()
        }))
        .await;
    // Make sure both reports were read before the session ends.
    agent.request(1, b"sync", 5000).await;
    agent.decision().await;
    agent.close();
    let store = broker.store().await;
    let records = eventually("the reported denial", || {
        let store = store.clone();
        async move {
            let r = store.list_accesses(&AccessFilter::default()).await.unwrap();
            (!r.is_empty()).then_some(r)
        }
    })
    .await;
    let (_, record) = &records[0];
    assert_eq!(record.decided_by, DecidedBy::AgentDeadline);
    assert_eq!(record.action, Action::Deny);
    assert_eq!(record.kind, AccessKind::Exec);
    assert_eq!(record.at_unix_ms, 1234);
    assert_eq!(record.path, "/srv/app");
    let host = eventually("the host's counters", || {
        let store = store.clone();
        async move {
            let hosts = store.list_hosts("default").await.unwrap();
            hosts
                .into_iter()
                .find(|h| h.node == "node-r" && h.allowed_count > 0)
        }
    })
    .await;
    // 41 counted + 1 allowed report + 1 broker decision (fail-open: no scanner).
    assert_eq!(host.allowed_count, 43);
    assert_eq!(host.denied_count, 1);
    assert_eq!(host.cluster, "test-cluster");
    assert_eq!(broker.stats().await.dropped_reports, 3);
    let hosts = broker
        .admin()
        .await
        .list_hosts(v1::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1);
    assert!(!hosts[0].connected, "the session ended");
}

#[tokio::test]
async fn events_page_newest_first() {
    let broker = TestBroker::start(|c| c.policy.fail_mode = FailMode::Closed).await;
    let mut agent = broker.agent("node-p").await;
    for id in 1..=5 {
        agent.request(id, format!("c{id}").as_bytes(), 5000).await;
        assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    }
    let mut admin = broker.admin().await;
    eventually("five events", || {
        let mut admin = admin.clone();
        async move {
            let n = admin
                .list_events(list_denials())
                .await
                .unwrap()
                .into_inner()
                .events
                .len();
            (n == 5).then_some(())
        }
    })
    .await;
    let page = admin
        .list_events(v1::ListEventsRequest {
            limit: 2,
            node: "node-p".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events.len(), 2);
    assert!(page.events[0].id > page.events[1].id);
    assert_eq!(page.events[0].path, "/data/file-5");
    assert_eq!(page.next_before_id, page.events[1].id);
    let rest = admin
        .list_events(v1::ListEventsRequest {
            limit: 10,
            before_id: page.next_before_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.events.len(), 3);
    assert_eq!(rest.next_before_id, 0);
    let none = admin
        .list_events(v1::ListEventsRequest {
            node: "elsewhere".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty());
    let bad = admin
        .list_events(v1::ListEventsRequest {
            sha256: "xyz".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad sha256");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn records_still_queued_at_shutdown_are_written() {
    let mut broker = TestBroker::start(|c| c.policy.fail_mode = FailMode::Closed).await;
    let mut agent = broker.agent("node-s").await;
    for id in 1..=20 {
        agent.request(id, format!("s{id}").as_bytes(), 5000).await;
    }
    for _ in 1..=20 {
        assert_eq!(agent.decision().await.action(), v1::Action::Deny);
    }
    // Shut down at once: the records are still in the write-behind queue's linger.
    broker.shutdown().await;
    let store = broker.store().await;
    let records = store
        .list_accesses(&AccessFilter {
            limit: 100,
            ..AccessFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        20,
        "every answered denial is durable after shutdown"
    );
    let hosts = store.list_hosts("default").await.unwrap();
    assert_eq!(hosts[0].denied_count, 20);
}

#[tokio::test]
async fn scan_service_scans_and_looks_up() {
    let broker = TestBroker::start(|_| {}).await;
    let mut scan = broker.scan().await;
    let digest = Sha256::of(EICAR).to_hex();
    let unknown = scan
        .lookup(v1::LookupRequest {
            sha256: digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.known);
    let no_worker = scan
        .scan_bytes(v1::ScanBytesRequest {
            data: EICAR.to_vec().into(),
            name: "upload.txt".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!no_worker.known);
    assert!(no_worker.reason.contains("no live scanner"));

    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(2).await;
    let scanning = tokio::spawn({
        let mut scan = scan.clone();
        async move {
            scan.scan_bytes(v1::ScanBytesRequest {
                data: EICAR.to_vec().into(),
                name: "upload.txt".into(),
            })
            .await
        }
    });
    let job = worker.job().await;
    assert_eq!(job.job.path_hint, "upload.txt");
    worker
        .answer(
            job.job.job_id,
            v1::VerdictResult::Malicious,
            "EICAR-Test-File",
        )
        .await;
    let r = scanning.await.unwrap().unwrap().into_inner();
    assert_eq!(r.sha256, digest);
    assert_eq!(r.action(), v1::Action::Deny);
    assert!(r.known);
    let looked_up = scan
        .lookup(v1::LookupRequest { sha256: digest })
        .await
        .unwrap()
        .into_inner();
    assert!(looked_up.known);
    assert_eq!(looked_up.verdicts[0].threat_name, "EICAR-Test-File");

    // A stream: metadata first, then chunks.
    let chunks = vec![
        v1::ScanStreamRequest {
            data: vec![].into(),
            name: "stream.bin".into(),
        },
        v1::ScanStreamRequest {
            data: b"part one, ".to_vec().into(),
            name: String::new(),
        },
        v1::ScanStreamRequest {
            data: b"part two".to_vec().into(),
            name: String::new(),
        },
    ];
    let streaming = tokio::spawn({
        let mut scan = scan.clone();
        async move { scan.scan_stream(tokio_stream::iter(chunks)).await }
    });
    let job = worker.job().await;
    assert_eq!(job.content, b"part one, part two");
    worker
        .answer(job.job.job_id, v1::VerdictResult::Clean, "")
        .await;
    let r = streaming.await.unwrap().unwrap().into_inner();
    assert_eq!(r.action(), v1::Action::Allow);
    assert_eq!(r.sha256, Sha256::of(b"part one, part two").to_hex());

    let bad = scan
        .lookup(v1::LookupRequest {
            sha256: "nope".into(),
        })
        .await
        .expect_err("bad digest");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn oversized_content_follows_the_policy() {
    let broker = TestBroker::start(|c| {
        c.policy.max_file_size = 16;
        c.policy.oversize_action = Action::Deny;
    })
    .await;
    let mut worker = broker.worker("w1", &identity("r1")).await;
    worker.credit(1).await;
    let mut agent = broker.agent("node-a").await;
    agent.request(1, &[1u8; 17], 5000).await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny);
    assert!(d.reason.contains("oversize"), "{}", d.reason);
    assert!(agent.content_requests.is_empty());
    assert!(
        worker
            .job_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    let r = broker
        .scan()
        .await
        .scan_bytes(v1::ScanBytesRequest {
            data: vec![1u8; 17].into(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.action(), v1::Action::Deny);
    assert_eq!(broker.stats().await.oversize, 2);
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_server_keeps_running() {
    let broker = TestBroker::start(|_| {}).await;
    let mut scan = broker.scan().await;
    let status = scan
        .scan_bytes(v1::ScanBytesRequest {
            data: vec![0u8; fleetscan_proto::MAX_MESSAGE_SIZE + 1].into(),
            name: String::new(),
        })
        .await
        .expect_err("too large");
    // tonic 0.14 refuses a message over the limit with OUT_OF_RANGE (RESOURCE_EXHAUSTED is
    // what it uses for a compressed one that inflates past it); either way, refused by size.
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let r = scan
        .lookup(v1::LookupRequest {
            sha256: Sha256::of(b"x").to_hex(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.known);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let broker = TestBroker::start(|_| {}).await;
    let mut health = HealthClient::new(broker.channel().await);
    for service in [
        "fleetscan.v1.AgentService",
        "fleetscan.v1.WorkerService",
        "fleetscan.v1.ScanService",
        "fleetscan.v1.AdminService",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(broker.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "fleetscan.v1.AgentService"),
        "{names:?}"
    );
}

#[tokio::test]
async fn session_accepted_carries_broker_id_policy_and_generation() {
    let broker = TestBroker::start(|c| c.policy.max_file_size = 1234).await;
    let agent = broker.agent("node-a").await;
    assert_eq!(agent.accepted.broker_id, "test-broker");
    assert_eq!(agent.accepted.policy.as_ref().unwrap().max_file_size, 1234);
    assert!(agent.accepted.verdict_generation > 0);
}
