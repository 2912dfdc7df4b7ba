//! The broker session: a broker killed mid-stream, the broker list, content uploads, oversize
//! files decided locally.

use std::fs;
use std::time::{Duration, Instant};

use fleetscan_core::FailMode;
use fleetscan_proto::v1;

use crate::support::*;

/// Invariants 1 and 8: a broker killed mid-stream has its pending accesses answered at once
/// (not at the 4 s deadline), and the agent reconnects to a new broker on the same port,
/// adopting its policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_stream_then_reconnect() {
    let env = env();
    let mut first = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 5000));
    let addr = first.addr;
    let agent = run(config(
        &env,
        vec![first.url()],
        FailMode::Open,
        Duration::from_secs(4),
    ));
    connected(&agent, 1).await;
    let file = env.protected.join("d.txt");
    fs::write(&file, b"content d").unwrap();
    let pending = cat_in_background(&file);
    wait_for("request at the broker", SETTLE, || {
        first.accesses().len() == 1
    })
    .await;
    let killed = Instant::now();
    first.kill();
    let got = pending.await.unwrap();
    assert!(
        got.denied(),
        "the broker's fail-closed policy still applies: {got:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "answered at once: {:?}",
        killed.elapsed()
    );
    assert_eq!(agent.stats.snapshot().deadline_expiries, 0);

    let mut p = policy(FailMode::Open, 5000);
    p.version = 2;
    p.max_file_size = 4;
    let second = FakeBroker::start_on(addr, Mode::Clean, p);
    connected(&agent, 2).await;
    let got = cat(&file).await;
    assert!(got.ok, "{got:?}");
    assert_eq!(
        agent.stats.snapshot().oversize,
        1,
        "the new policy (max 4 bytes) applies"
    );
    let small = env.protected.join("s.txt");
    fs::write(&small, b"ok").unwrap();
    assert!(cat(&small).await.ok);
    assert_eq!(second.accesses().len(), 1);
    assert_eq!(second.state.hellos.lock()[0].node, "test-node");
    agent.stop().await;
}

/// A broker that crashes after its session worked for a while is reconnected to within about
/// the backoff's floor, however many crashes came before: a crash is not a failed attempt
/// (each used to add to the next wait: 0.1, 0.2, 0.4, 0.8 s …).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_crash_of_a_broker_that_worked_is_followed_by_a_quick_reconnect() {
    let env = env();
    let mut broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let addr = broker.addr;
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    for crash in 1..=5 {
        // Long enough for the session to count as one that worked.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        broker.kill();
        let killed = Instant::now();
        broker = FakeBroker::start_on(addr, Mode::Clean, policy(FailMode::Closed, 5000));
        connected(&agent, crash + 1).await;
        assert!(
            killed.elapsed() < Duration::from_millis(600),
            "crash {crash}: back after {:?}",
            killed.elapsed()
        );
    }
    agent.stop().await;
}

/// Invariant 8: the broker list is tried in order and round, so a dead first broker does not
/// keep the agent from the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_over_the_broker_list() {
    let env = env();
    let broker = FakeBroker::start(Mode::Malicious, policy(FailMode::Open, 5000));
    let dead = format!("http://{}", free_addr());
    let agent = run(config(
        &env,
        vec![dead, broker.url()],
        FailMode::Open,
        Duration::from_secs(4),
    ));
    connected(&agent, 1).await;
    let file = env.protected.join("e.txt");
    fs::write(&file, b"e").unwrap();
    assert!(cat(&file).await.denied());
    assert_eq!(broker.accesses().len(), 1);
    agent.stop().await;
}

/// The content path: the broker asks for the content, the agent uploads it from the event's
/// descriptor in chunks of at most CHUNK_SIZE, the broker checks it against the SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_uploaded_in_chunks_on_request() {
    let env = env();
    let broker = FakeBroker::start(Mode::AskContent, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let data: Vec<u8> = (0..(2 * fleetscan_proto::CHUNK_SIZE + 12345))
        .map(|i| (i % 253) as u8)
        .collect();
    let file = env.protected.join("big.bin");
    fs::write(&file, &data).unwrap();
    let got = cat(&file).await;
    assert!(got.ok, "{:?}", got.stderr);
    assert_eq!(got.stdout.len(), data.len());
    let (matched, chunks) = {
        let uploads = broker.state.uploads.lock();
        let u = uploads.values().next().expect("an upload");
        (u.matched, u.chunks.clone())
    };
    assert_eq!(matched, Some(true));
    assert_eq!(chunks.len(), 3);
    let mut offset = 0;
    for (i, (off, len, last)) in chunks.iter().enumerate() {
        assert_eq!(*off, offset);
        assert!(*len <= fleetscan_proto::CHUNK_SIZE);
        assert_eq!(*last, i == 2);
        offset += *len as u64;
    }
    assert_eq!(offset, data.len() as u64);
    agent.stop().await;
}

/// Invariant 6: content above the policy's maximum is decided locally by its oversize action
/// and reported, never sent to the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_is_decided_locally() {
    let env = env();
    let mut p = policy(FailMode::Open, 5000);
    p.max_file_size = 1000;
    p.oversize_action = v1::Action::Deny.into();
    let broker = FakeBroker::start(Mode::Clean, p);
    let agent = run(config(
        &env,
        vec![broker.url()],
        FailMode::Open,
        Duration::from_secs(4),
    ));
    connected(&agent, 1).await;
    let file = env.protected.join("huge.bin");
    fs::write(&file, vec![7u8; 2000]).unwrap();
    let got = cat(&file).await;
    assert!(got.denied(), "{got:?}");
    assert!(broker.accesses().is_empty());
    assert_eq!(agent.stats.snapshot().oversize, 1);
    wait_for("oversize report", SETTLE, || {
        broker
            .reports()
            .iter()
            .any(|r| r.reason == i32::from(v1::LocalReason::Oversize))
    })
    .await;
    agent.stop().await;
}
