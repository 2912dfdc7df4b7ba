//! The agent against the real kernel (a tmpfs each test mounts) and a scripted broker on
//! loopback. Files are opened by child processes. Needs root.
//!
//! Each test names the invariant it guards; each would fail if that invariant broke.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use fleetscan_agent::{AgentConfig, AgentTuning};
use fleetscan_core::{FailMode, Sha256};
use fleetscan_fanotify::testing::BindMount;
use fleetscan_proto::v1;
use fleetscan_proto::v1::broker_message::Msg as BrokerMsg;
use support::*;

const SETTLE: Duration = Duration::from_secs(5);

/// Opens `file` (it must be allowed) and waits until the agent has placed its `marks`th
/// ignore mark.
async fn opened_and_marked(agent: &Running, file: &std::path::Path, marks: u64) {
    assert!(cat(file).await.ok);
    wait_for("ignore mark", SETTLE, || {
        agent.stats.snapshot().ignore_marks == marks
    })
    .await;
}

/// The usual agent of these tests: one broker, fail-closed, a 4 s deadline.
fn closed_config(env: &Env, broker: &FakeBroker) -> AgentConfig {
    config(
        env,
        vec![broker.url()],
        FailMode::Closed,
        Duration::from_secs(4),
    )
}

async fn connected(r: &Running, n: u64) {
    wait_for("broker session", SETTLE, || {
        r.stats.snapshot().sessions >= n
    })
    .await;
}

/// Invariant 2: the agent's own opens are allowed first, never waiting on anything, even with
/// a broker that never answers and fail-closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_opens_never_wait() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let file = env.protected.join("mine.txt");
    let start = Instant::now();
    fs::write(&file, b"mine").unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"mine");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    // Counted just after the answer, so the count may trail the open by a moment.
    wait_for("own accesses counted", SETTLE, || {
        agent.stats.snapshot().own_pid >= 2
    })
    .await;
    let s = agent.stats.snapshot();
    assert_eq!(s.events, 0, "own accesses are not processed: {s:?}");
    assert!(broker.accesses().is_empty());
    agent.stop().await;
}

/// Invariant 1, fail-open: a broker that never answers costs an open the deadline (here the
/// config's 400 ms, below the policy's 5 s), then the fail mode allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_broker_fail_open_answers_at_the_deadline() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Open, 5000));
    let agent = run(config(
        &env,
        vec![broker.url()],
        FailMode::Open,
        Duration::from_millis(400),
    ));
    connected(&agent, 1).await;
    let file = env.protected.join("a.txt");
    fs::write(&file, b"content a").unwrap();
    let got = cat(&file).await;
    assert!(got.ok, "{got:?}");
    assert_eq!(got.stdout, b"content a");
    assert!(
        got.elapsed >= Duration::from_millis(350),
        "waited for the broker: {got:?}"
    );
    assert!(
        got.elapsed < Duration::from_millis(400 + 600),
        "bounded: {got:?}"
    );
    assert_eq!(agent.stats.snapshot().deadline_expiries, 1);
    let acc = broker.accesses();
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0].sha256, Sha256::of(b"content a").to_hex());
    assert_eq!(acc[0].path, file.to_str().unwrap());
    assert_eq!(acc[0].kind, i32::from(v1::AccessKind::Open));
    assert!(acc[0].deadline_ms <= 400);
    assert!(acc[0].subject.as_ref().unwrap().exe.ends_with("cat"));
    wait_for("deadline report", SETTLE, || {
        broker
            .reports()
            .iter()
            .any(|r| r.reason == i32::from(v1::LocalReason::Deadline))
    })
    .await;
    agent.stop().await;
}

/// Invariant 1, fail-closed, with the policy's deadline (400 ms) below the config's (4 s): the
/// effective deadline is the smaller one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_broker_fail_closed_denies_at_the_policy_deadline() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 400));
    let agent = run(config(
        &env,
        vec![broker.url()],
        FailMode::Open,
        Duration::from_secs(4),
    ));
    connected(&agent, 1).await;
    let file = env.protected.join("b.txt");
    fs::write(&file, b"content b").unwrap();
    let got = cat(&file).await;
    assert!(got.denied(), "{got:?}");
    assert!(got.elapsed >= Duration::from_millis(350), "{got:?}");
    assert!(got.elapsed < Duration::from_millis(400 + 600), "{got:?}");
    assert_eq!(agent.stats.snapshot().deadline_expiries, 1);
    wait_for("denial report", SETTLE, || {
        broker.reports().iter().any(|r| {
            r.reason == i32::from(v1::LocalReason::Deadline)
                && r.action == i32::from(v1::Action::Deny)
                && r.path == file.to_str().unwrap()
        })
    })
    .await;
    agent.stop().await;
}

/// Invariant 1 (no broker: fail mode at once, no waiting for the deadline) and 7 (reports made
/// while disconnected are delivered once a broker comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_answers_at_once_and_reports_later() {
    let env = env();
    let addr = free_addr();
    let agent = run(config(
        &env,
        vec![format!("http://{addr}")],
        FailMode::Closed,
        Duration::from_secs(4),
    ));
    let file = env.protected.join("c.txt");
    fs::write(&file, b"content c").unwrap();
    let got = cat(&file).await;
    assert!(got.denied(), "{got:?}");
    assert!(
        got.elapsed < Duration::from_millis(500),
        "not the 4 s deadline: {got:?}"
    );
    assert!(agent.stats.snapshot().no_broker >= 1);
    let broker = FakeBroker::start_on(addr, Mode::Clean, policy(FailMode::Closed, 5000));
    wait_for("queued report delivered", SETTLE, || {
        broker.reports().iter().any(|r| {
            r.reason == i32::from(v1::LocalReason::NoBroker)
                && r.action == i32::from(v1::Action::Deny)
                && r.path == file.to_str().unwrap()
        })
    })
    .await;
    // And now the broker decides.
    let got = cat(&file).await;
    assert!(got.ok, "{got:?}");
    assert_eq!(broker.accesses().len(), 1);
    agent.stop().await;
}

/// Invariant 3: files outside the protected directory, on the same filesystem, never wait on a
/// hung broker; nor does a sibling whose name merely starts like the protected one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotected_files_are_not_stalled_by_a_hung_broker() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let sibling = env.tmp.path().join("protected2");
    fs::create_dir(&sibling).unwrap();
    for (i, dir) in [&env.other, &sibling].into_iter().enumerate() {
        let file = dir.join("free.txt");
        fs::write(&file, b"free").unwrap();
        let got = cat(&file).await;
        assert!(got.ok, "{got:?}");
        assert!(got.elapsed < Duration::from_millis(500), "{got:?}");
        assert_eq!(agent.stats.snapshot().unprotected, i as u64 + 1);
    }
    assert!(broker.accesses().is_empty());
    agent.stop().await;
}

/// Invariant 3 and the design's rule 1: a bind mount of the protected directory elsewhere is
/// still protected (the path is mapped back to the filesystem), and the path as seen is
/// recorded. Also: a deny reaches the child as EACCES, and the cached denial of the second
/// open is reported with reason CACHED (invariant 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mount_is_protected_and_denials_are_cached_and_reported() {
    let env = env();
    let broker = FakeBroker::start(Mode::Malicious, policy(FailMode::Open, 5000));
    let agent = run(config(
        &env,
        vec![broker.url()],
        FailMode::Open,
        Duration::from_secs(4),
    ));
    connected(&agent, 1).await;
    fs::write(env.protected.join("evil.txt"), b"evil").unwrap();
    let bind = BindMount::new(&env.protected);
    let via_bind = bind.path().join("evil.txt");
    let got = cat(&via_bind).await;
    assert!(got.denied(), "{got:?}");
    let acc = broker.accesses();
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0].path, via_bind.to_str().unwrap(), "the path as seen");
    wait_for("decision cached", SETTLE, || {
        agent.stats.snapshot().decisions_cached == 1
    })
    .await;
    let got = cat(&env.protected.join("evil.txt")).await;
    assert!(got.denied(), "{got:?}");
    assert_eq!(
        broker.accesses().len(),
        1,
        "second open decided from the cache"
    );
    assert_eq!(agent.stats.snapshot().cache_hits, 1);
    wait_for("cached denial reported", SETTLE, || {
        broker.reports().iter().any(|r| {
            r.reason == i32::from(v1::LocalReason::Cached)
                && r.action == i32::from(v1::Action::Deny)
                && r.threat_name == "Test-Threat"
                && r.sha256 == Sha256::of(b"evil").to_hex()
        })
    })
    .await;
    agent.stop().await;
    drop(bind);
}

/// Invariant 4 without kernel marks: a clean verdict is reused for the unchanged file, a
/// rewrite (new ctime) is judged again, and a CacheFlush with a new generation drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_keyed_by_file_version_and_generation() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let mut cfg = closed_config(&env, &broker);
    cfg.ignore_marks = false;
    let agent = run(cfg);
    connected(&agent, 1).await;
    let file = env.protected.join("doc.txt");
    fs::write(&file, b"version 1").unwrap();
    assert!(cat(&file).await.ok);
    wait_for("decision cached", SETTLE, || {
        agent.stats.snapshot().decisions_cached == 1
    })
    .await;
    assert!(cat(&file).await.ok);
    assert_eq!(broker.accesses().len(), 1);
    assert_eq!(agent.stats.snapshot().cache_hits, 1);
    assert_eq!(
        agent.stats.snapshot().events,
        2,
        "no ignore marks: every open is an event"
    );

    fs::write(&file, b"version 2, rewritten").unwrap();
    assert!(cat(&file).await.ok);
    let acc = broker.accesses();
    assert_eq!(acc.len(), 2, "a rewritten file is judged again");
    assert_eq!(acc[1].sha256, Sha256::of(b"version 2, rewritten").to_hex());
    wait_for("decision cached", SETTLE, || {
        agent.stats.snapshot().decisions_cached == 2
    })
    .await;

    broker.push(BrokerMsg::Flush(v1::CacheFlush {
        verdict_generation: 2,
        reason: "rules changed".into(),
    }));
    // Adopting the first session's generation counted as one flush; the CacheFlush is two.
    wait_for("flush applied", SETTLE, || {
        agent.stats.snapshot().flushes == 2
    })
    .await;
    assert!(cat(&file).await.ok);
    assert_eq!(
        broker.accesses().len(),
        3,
        "the flush dropped the cached verdict"
    );
    agent.stop().await;
}

/// Invariant 4 with kernel marks: after a clean verdict the next open of the unchanged file
/// produces no event at all; a write brings events back (and a new judgement); a CacheFlush
/// removes the marks too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_mark_makes_the_second_open_free() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let file = env.protected.join("lib.so");
    fs::write(&file, b"clean bytes").unwrap();
    opened_and_marked(&agent, &file, 1).await;
    assert_eq!(agent.stats.snapshot().events, 1);
    assert!(cat(&file).await.ok);
    assert!(cat(&file).await.ok);
    assert_eq!(
        agent.stats.snapshot().events,
        1,
        "no event at all on later opens"
    );

    fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b" and more"))
        .unwrap();
    let got = cat(&file).await;
    assert_eq!(got.stdout, b"clean bytes and more");
    assert_eq!(agent.stats.snapshot().events, 2, "a write removes the mark");
    assert_eq!(broker.accesses().len(), 2, "and the new content is judged");
    wait_for("ignore mark", SETTLE, || {
        agent.stats.snapshot().ignore_marks == 2
    })
    .await;

    broker.push(BrokerMsg::Flush(v1::CacheFlush {
        verdict_generation: 7,
        reason: "rules changed".into(),
    }));
    wait_for("flush applied", SETTLE, || {
        agent.stats.snapshot().flushes == 2
    })
    .await;
    assert!(cat(&file).await.ok);
    assert_eq!(
        agent.stats.snapshot().events,
        3,
        "the flush removed the mark"
    );
    assert_eq!(broker.accesses().len(), 3);
    agent.stop().await;
}

/// A policy set with `tenants` besides the fleet operator's, at `version`.
fn policy_set(version: u64, tenants: &[&str]) -> v1::PolicySet {
    let entry = |tenant: &str| v1::TenantPolicy {
        tenant: tenant.into(),
        policy: Some(policy(FailMode::Closed, 5000)),
        ..Default::default()
    };
    v1::PolicySet {
        version,
        default_tenant: fleetscan_core::DEFAULT_TENANT.into(),
        namespace_label: "fleetscan.io/tenant".into(),
        policies: std::iter::once(fleetscan_core::DEFAULT_TENANT)
            .chain(tenants.iter().copied())
            .map(entry)
            .collect(),
        ..Default::default()
    }
}

fn push_set(broker: &FakeBroker, set: v1::PolicySet) {
    broker.push(BrokerMsg::Policy(v1::PolicyUpdate {
        policy: None,
        policy_set: Some(set),
    }));
}

/// Invariants 4 and 7: a newer policy set drops every cached decision and ignore mark (they
/// were made under the old scopes); while several policies are in force a clean file gets no
/// ignore mark (a mark answers every process alike, whatever its tenant) but its decision is
/// still reused from the cache; an older set changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_set_drops_marks_and_several_policies_place_none() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let file = env.protected.join("tool");
    fs::write(&file, b"clean tool").unwrap();
    opened_and_marked(&agent, &file, 1).await;
    let flushes = agent.stats.snapshot().flushes;

    push_set(&broker, policy_set(2, &["acme"]));
    wait_for("policy set applied", SETTLE, || {
        agent.stats.snapshot().flushes == flushes + 1
    })
    .await;
    assert!(cat(&file).await.ok);
    assert_eq!(agent.stats.snapshot().events, 2, "the set removed the mark");
    assert_eq!(broker.accesses().len(), 2, "and the cached decision");
    // Decided and cached under the operator's scope, but no mark: the next open is an event
    // again, answered from the cache without the broker.
    wait_for("decision cached", SETTLE, || {
        agent.stats.snapshot().decisions_cached == 2
    })
    .await;
    assert!(cat(&file).await.ok);
    let s = agent.stats.snapshot();
    assert_eq!((s.events, s.ignore_marks), (3, 1), "{s:?}");
    assert_eq!(broker.accesses().len(), 2, "answered from the cache");

    push_set(&broker, policy_set(1, &["acme", "globex"]));
    assert!(cat(&file).await.ok);
    assert_eq!(
        agent.stats.snapshot().flushes,
        flushes + 1,
        "an older set is ignored"
    );
    assert_eq!(broker.accesses().len(), 2);
    agent.stop().await;
}

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

/// Invariant 9: an exec is an Exec access.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_is_reported_as_exec() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let prog = env.protected.join("true");
    fs::copy("/bin/true", &prog).unwrap();
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    let status = tokio::task::spawn_blocking(move || Command::new(prog).status())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let acc = broker.accesses();
    assert!(
        acc.iter()
            .any(|a| a.kind == i32::from(v1::AccessKind::Exec)),
        "{acc:?}"
    );
    agent.stop().await;
}

/// Invariant 5: beyond the bound on pending events, the fail mode answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_bound_answers_the_excess_at_once() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 5000));
    let tuning = AgentTuning {
        max_pending: 1,
        ..AgentTuning::default()
    };
    let agent = run_tuned(
        config(
            &env,
            vec![broker.url()],
            FailMode::Closed,
            Duration::from_millis(1500),
        ),
        tuning,
    );
    connected(&agent, 1).await;
    let (f1, f2) = (env.protected.join("1.txt"), env.protected.join("2.txt"));
    fs::write(&f1, b"one").unwrap();
    fs::write(&f2, b"two").unwrap();
    let first = cat_in_background(&f1);
    wait_for("first pending", SETTLE, || broker.accesses().len() == 1).await;
    let second = cat(&f2).await;
    assert!(second.denied(), "{second:?}");
    assert!(second.elapsed < Duration::from_millis(500), "{second:?}");
    assert_eq!(agent.stats.snapshot().overloaded, 1);
    let first = first.await.unwrap();
    assert!(first.denied(), "{first:?}");
    assert_eq!(agent.stats.snapshot().deadline_expiries, 1);
    agent.stop().await;
}

/// Invariant 10: shutdown allows what is still pending, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_allows_everything_pending() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let file = env.protected.join("f.txt");
    fs::write(&file, b"f").unwrap();
    let pending = cat_in_background(&file);
    wait_for("request at the broker", SETTLE, || {
        broker.accesses().len() == 1
    })
    .await;
    let stopping = Instant::now();
    agent.stop().await;
    let got = pending.await.unwrap();
    assert!(got.ok, "{got:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    // After shutdown nothing is marked any more: opens go straight through.
    let got = cat(&file).await;
    assert!(
        got.ok && got.elapsed < Duration::from_millis(500),
        "{got:?}"
    );
}

/// Invariant 1, the enforcer's independence: with the agent's tokio runtime completely stuck
/// (its only thread blocked), an open still gets the fail mode at the deadline, because the
/// deadline thread needs nothing from the runtime.
#[test]
fn deadline_holds_while_the_runtime_is_stuck() {
    let env = env();
    let broker = FakeBroker::start(Mode::Hang, policy(FailMode::Closed, 5000));
    let agent = fleetscan_agent::Agent::start(config(
        &env,
        vec![broker.url()],
        FailMode::Closed,
        Duration::from_millis(400),
    ))
    .unwrap();
    let stats = agent.stats();
    let (blocked_tx, blocked_rx) = std::sync::mpsc::channel::<()>();
    let runtime = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let run = tokio::spawn(agent.run(async move {
                let _ = stop_rx.await;
            }));
            while stats.snapshot().sessions < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            blocked_tx.send(()).unwrap();
            // Blocks the runtime's only thread: no task of the agent can run meanwhile.
            std::thread::sleep(Duration::from_millis(1500));
            let _ = stop_tx.send(());
            run.await.unwrap().unwrap();
        });
    });
    blocked_rx.recv_timeout(SETTLE).expect("session up");
    let file = env.protected.join("g.txt");
    fs::write(&file, b"g").unwrap();
    let start = Instant::now();
    let out = Command::new("/bin/cat").arg(&file).output().unwrap();
    let elapsed = start.elapsed();
    assert!(!out.status.success(), "fail-closed denies");
    assert!(elapsed >= Duration::from_millis(350), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1000),
        "the stuck runtime did not matter: {elapsed:?}"
    );
    runtime.join().unwrap();
}

/// Invariant 3 for openers in another mount namespace (a container's): their mounts are not in
/// the agent's mount table, so the agent maps the file through the opener's own mountinfo.
/// Inside the namespace, the protected directory is bound at another path; it stays protected,
/// and the unprotected directory stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opener_in_another_mount_namespace() {
    let env = env();
    let broker = FakeBroker::start(Mode::Malicious, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    fs::write(env.protected.join("evil.txt"), b"evil").unwrap();
    fs::write(env.other.join("free.txt"), b"free").unwrap();
    let inside = env.tmp.path().join("inside");
    fs::create_dir(&inside).unwrap();
    let script = format!(
        "mount --bind {p} {i} && cat {i}/evil.txt; echo evil=$?; cat {o}/free.txt; echo; echo free=$?",
        p = env.protected.display(),
        i = inside.display(),
        o = env.other.display(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("evil=1"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("free\nfree=0"), "{stdout}");
    let acc = broker.accesses();
    assert_eq!(acc.len(), 1, "{acc:?}");
    assert!(acc[0].path.ends_with("inside/evil.txt"), "{}", acc[0].path);
    agent.stop().await;
}

/// Invariant 4 against a writer that leaves no modify event: a store through a shared mapping.
/// The mark of the clean version must not hide the opens of what the mapping wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_file_rewritten_through_a_shared_mapping_is_denied() {
    let env = env();
    let evil = b"EVIL EVIL EVIL".to_vec();
    let broker = FakeBroker::start(
        Mode::Blocklist(vec![Sha256::of(&evil).to_hex()]),
        policy(FailMode::Closed, 5000),
    );
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let file = env.protected.join("mapped");
    fs::write(&file, b"clean clean cl").unwrap();
    opened_and_marked(&agent, &file, 1).await;
    let path = file.to_str().unwrap().to_owned();
    let wrote = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                "-c",
                "import mmap,os,sys\n\
                 fd=os.open(sys.argv[1],os.O_RDWR)\n\
                 m=mmap.mmap(fd,14,mmap.MAP_SHARED)\n\
                 m[0:14]=b'EVIL EVIL EVIL'\n\
                 m.close();os.close(fd)",
                &path,
            ])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(wrote.success());
    let got = cat(&file).await;
    assert!(
        !got.ok,
        "content written through a mapping was let through: {:?} {:?}",
        String::from_utf8_lossy(&got.stdout),
        agent.stats.snapshot()
    );
    agent.stop().await;
}

/// Kept marks are bounded (each holds a descriptor and a lease): beyond the bound the oldest
/// mark goes, and its file's next open reaches the agent again (answered from the cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_marks_kept_the_oldest_file_is_asked_about_again() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let tuning = AgentTuning {
        max_marks: 2,
        ..Default::default()
    };
    let agent = run_tuned(closed_config(&env, &broker), tuning);
    connected(&agent, 1).await;
    let files: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let f = env.protected.join(n);
            fs::write(&f, n.as_bytes()).unwrap();
            f
        })
        .collect();
    for (i, f) in files.iter().enumerate() {
        opened_and_marked(&agent, f, i as u64 + 1).await;
    }
    assert_eq!(agent.stats.snapshot().events, 3);
    assert!(cat(&files[2]).await.ok);
    assert!(cat(&files[1]).await.ok);
    assert_eq!(
        agent.stats.snapshot().events,
        3,
        "the two newest stay marked"
    );
    assert!(cat(&files[0]).await.ok);
    let s = agent.stats.snapshot();
    assert_eq!(
        (s.events, s.cache_hits),
        (4, 1),
        "the oldest was unmarked: {s:?}"
    );
    assert_eq!(broker.accesses().len(), 3, "and answered from the cache");
    agent.stop().await;
}

/// A kept mark holds a descriptor of its file: once the file is deleted the agent lets it go
/// (within one sweep, 5 s), so that its space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_file_deleted_does_not_keep_its_space() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    let free_blocks = || {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a"])
            .arg(&env.protected)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = free_blocks();
    let file = env.protected.join("big");
    fs::write(&file, vec![b'x'; 8 << 20]).unwrap();
    opened_and_marked(&agent, &file, 1).await;
    fs::remove_file(&file).unwrap();
    assert!(
        free_blocks() < before,
        "the agent's descriptor keeps the space for now"
    );
    wait_for("space freed", Duration::from_secs(8), || {
        free_blocks() >= before
    })
    .await;
    agent.stop().await;
}

/// A kept mark holds a descriptor, and so the mount its file was opened through: a pod's
/// volume could not be unmounted while it stood. Marks are short-lived, so `umount` (not a
/// lazy one) succeeds within a lifetime and a sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_whose_file_was_marked_can_be_unmounted_soon() {
    let env = env();
    let broker = FakeBroker::start(Mode::Clean, policy(FailMode::Closed, 5000));
    let agent = run(closed_config(&env, &broker));
    connected(&agent, 1).await;
    fs::write(env.protected.join("vol"), b"volume content").unwrap();
    let bind = BindMount::new(&env.protected);
    opened_and_marked(&agent, &bind.path().join("vol"), 1).await;
    let umount = || {
        Command::new("umount")
            .arg(bind.path())
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!umount(), "busy while the mark stands");
    wait_for("unmounted", Duration::from_secs(16), umount).await;
    agent.stop().await;
}
