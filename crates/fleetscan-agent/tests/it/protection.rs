//! Which accesses the agent answers at once, whatever the broker does: its own (invariant 2),
//! files outside the protected directories (invariant 3, through bind mounts and other mount
//! namespaces too), and execs as execs.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use fleetscan_core::{FailMode, Sha256};
use fleetscan_fanotify::testing::BindMount;
use fleetscan_proto::v1;

use crate::support::*;

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
