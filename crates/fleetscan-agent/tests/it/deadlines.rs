//! Every event is answered within its deadline, exactly once, whatever fails (invariant 1): a
//! hung broker, no broker, too many waiting, a stuck runtime, the agent's shutdown.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use fleetscan_agent::AgentTuning;
use fleetscan_core::{FailMode, Sha256};
use fleetscan_proto::v1;

use crate::support::*;

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
