//! A verdict is reused only for the same content (invariant 4): the verdict cache keyed by the
//! file's version, generation and policy scope, and kernel ignore marks that stand only while
//! no writer can change the file, and only for a while.

use std::fs;
use std::process::Command;
use std::time::Duration;

use fleetscan_agent::AgentTuning;
use fleetscan_core::{FailMode, Sha256};
use fleetscan_fanotify::testing::BindMount;
use fleetscan_proto::v1;
use fleetscan_proto::v1::broker_message::Msg as BrokerMsg;

use crate::support::*;

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
