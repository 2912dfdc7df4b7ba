//! The broker with the real worker SDK (`fleetscan_worker::run`) and a trivial scanner.

use std::sync::Arc;

use fleetscan_core::ScannerIdentity;
use fleetscan_proto::v1;
use fleetscan_worker::{ScanOutcome, Scanner, WorkerConfig};

use crate::common::TestBroker;

/// Finds "EVIL" anywhere in the content.
struct Substring;

impl Scanner for Substring {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "reference".into(),
            engine: "substring".into(),
            engine_version: "1".into(),
            ruleset_version: "evil-1".into(),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        if content.windows(4).any(|w| w == b"EVIL") {
            ScanOutcome::malicious("Test-Evil")
        } else {
            ScanOutcome::clean()
        }
    }
}

#[tokio::test]
async fn the_sdk_worker_scans_for_agents() {
    let broker = TestBroker::start(|_| {}).await;
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(fleetscan_worker::run(
        WorkerConfig {
            brokers: vec![broker.url.clone()],
            worker_name: "sdk-worker".into(),
            credits: 2,
            ..WorkerConfig::default()
        },
        Arc::new(Substring),
        async move {
            let _ = worker_stopped.await;
        },
    ));
    broker.wait_for_worker(None).await;

    let mut agent = broker.agent("node-a").await;
    agent.request(1, b"some EVIL bytes", 10_000).await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Deny, "{}", d.reason);
    assert!(d.reason.contains("Test-Evil"), "{}", d.reason);
    agent.request(2, b"harmless bytes", 10_000).await;
    let d = agent.decision().await;
    assert_eq!(d.action(), v1::Action::Allow, "{}", d.reason);
    assert_eq!(agent.content_requests, vec![1, 2]);

    let _ = stop_worker.send(());
    tokio::time::timeout(crate::common::WAIT, worker)
        .await
        .expect("worker stops")
        .unwrap()
        .expect("worker ran cleanly");
}
