//! One host protected end to end, against the real kernel: real `fleetscan` processes (broker,
//! reference worker, agent), a tmpfs of the test's own, and opens and execs from this process.
//! Needs root.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::common::*;

/// A YARA rule that is not shipped: the test writes it to the worker's rules directory.
const CUSTOM_RULE: &str = r#"
rule Test_Custom_Marker {
  meta:
    threat_name = "Test.Custom.Marker"
  strings:
    $m = "fleetscan-custom-marker-7f3a"
  condition:
    $m
}
"#;

fn blocked_payload() -> Vec<u8> {
    b"harmless-looking bytes that an operator has blocked by hash\n".repeat(10)
}

struct Host {
    sandbox: Sandbox,
    broker: BrokerProc,
    data: std::path::PathBuf,
}

/// A broker, a reference worker with a custom rule and a block list, and an agent protecting a
/// fresh tmpfs.
async fn host(agent_args: &[&str]) -> Host {
    let mut sandbox = sandbox();
    let data = sandbox.tmpfs("data");
    let rules = sandbox.dir().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    write(&rules.join("custom.yar"), CUSTOM_RULE.as_bytes());
    let blocklist = sandbox.dir().join("blocklist.txt");
    write(
        &blocklist,
        format!(
            "# blocked by the operator\n{}  Test.Blocked.ByHash\n",
            sha256_hex(&blocked_payload())
        )
        .as_bytes(),
    );
    let broker = sandbox.broker(&[]);
    sandbox.worker(
        &broker.url,
        &[
            "--rules",
            rules.to_str().unwrap(),
            "--blocklist",
            blocklist.to_str().unwrap(),
        ],
    );
    sandbox.agent("node-a", &[&broker.url], &[&data], agent_args);
    wait_for_host(&broker.url, "node-a").await;
    Host {
        sandbox,
        broker,
        data,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_files_are_denied_and_clean_files_read_normally() {
    let _turn = shared().await;
    let h = host(&[]).await;
    let clean = b"just a text file\n".repeat(1000);
    write(&h.data.join("clean.txt"), &clean);
    write(&h.data.join("eicar.com"), EICAR);
    write(
        &h.data.join("custom.bin"),
        b"header fleetscan-custom-marker-7f3a trailer",
    );
    write(&h.data.join("blocked.dat"), &blocked_payload());

    let ok = open_file(h.data.join("clean.txt")).await;
    assert_eq!(ok.result.as_ref().expect("clean file opens"), &clean);

    for name in ["eicar.com", "custom.bin", "blocked.dat"] {
        let out = open_file(h.data.join(name)).await;
        assert!(
            out.denied(),
            "{name}: expected EACCES/EPERM, got {:?}",
            out.result
        );
    }
    // A second open of a denied file is denied again (from the agent's cache).
    assert!(open_file(h.data.join("eicar.com")).await.denied());

    // Every denial is recorded, with what was opened, by whom, and why.
    let events = eventually(Duration::from_secs(10), "four denials recorded", || {
        let url = h.broker.url.clone();
        async move {
            let ev = events(&url).await;
            (ev.iter().filter(|e| e.action == 2).count() >= 4).then_some(ev)
        }
    })
    .await;
    let threat_of = |name: &str| {
        events
            .iter()
            .find(|e| e.path.ends_with(name) && e.action == 2)
            .unwrap_or_else(|| panic!("no denial recorded for {name}: {events:#?}"))
            .threat_name
            .clone()
    };
    assert_eq!(threat_of("eicar.com"), "EICAR-Test-File");
    assert_eq!(threat_of("custom.bin"), "Test.Custom.Marker");
    assert_eq!(threat_of("blocked.dat"), "Test.Blocked.ByHash");
    let e = events
        .iter()
        .find(|e| e.path.ends_with("eicar.com"))
        .unwrap();
    assert_eq!(e.node, "node-a");
    assert_eq!(e.pid, std::process::id());
    assert_eq!(e.sha256, sha256_hex(EICAR));

    // The command-line readers go through the admin API.
    let listed = fleetscan(&["events", "--broker", &h.broker.url, "--action", "deny"]);
    assert!(
        listed.contains("eicar.com") && listed.contains("EICAR-Test-File"),
        "{listed}"
    );
    let verdict = fleetscan(&["verdict", &sha256_hex(EICAR), "--broker", &h.broker.url]);
    assert!(
        verdict.contains("malicious") && verdict.contains("EICAR-Test-File"),
        "{verdict}"
    );
    let clean_verdict = fleetscan(&["verdict", &sha256_hex(&clean), "--broker", &h.broker.url]);
    assert!(clean_verdict.contains("clean"), "{clean_verdict}");
    drop(h.sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_of_a_malicious_binary_is_denied() {
    let _turn = shared().await;
    let h = host(&[]).await;
    let true_bin = std::fs::read("/bin/true").expect("/bin/true");
    let good = h.data.join("good-true");
    write(&good, &true_bin);
    // The same program with the custom rule's marker appended: still a valid ELF that runs,
    // but malicious by the worker's rules.
    let mut bad_bin = true_bin.clone();
    bad_bin.extend_from_slice(b"fleetscan-custom-marker-7f3a");
    let bad = h.data.join("bad-true");
    write(&bad, &bad_bin);
    for p in [&good, &bad] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (good2, bad2) = (good.clone(), bad.clone());
    let (ok, denied) = tokio::task::spawn_blocking(move || {
        (
            std::process::Command::new(&good2).status(),
            std::process::Command::new(&bad2).status(),
        )
    })
    .await
    .unwrap();
    assert!(ok.expect("clean binary runs").success());
    let err = denied.expect_err("malicious binary must not run");
    assert!(
        matches!(err.raw_os_error(), Some(1 | 13)),
        "expected EACCES/EPERM, got {err}"
    );
    let events = eventually(Duration::from_secs(10), "exec denial recorded", || {
        let url = h.broker.url.clone();
        async move {
            events(&url)
                .await
                .into_iter()
                .find(|e| e.path.ends_with("bad-true"))
        }
    })
    .await;
    assert_eq!(events.threat_name, "Test.Custom.Marker");
    drop(h.sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_mount_does_not_bypass_the_scanner() {
    let _turn = shared().await;
    let mut sandbox = sandbox();
    let fs = sandbox.tmpfs("fs");
    let protected = fs.join("protected");
    let elsewhere = fs.join("elsewhere");
    std::fs::create_dir_all(&protected).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    write(&protected.join("eicar.com"), EICAR);
    write(&elsewhere.join("eicar.com"), EICAR);
    let broker = sandbox.broker(&[]);
    sandbox.worker(&broker.url, &[]);
    sandbox.agent("node-b", &[&broker.url], &[&protected], &[]);
    wait_for_host(&broker.url, "node-b").await;
    let view = sandbox.bind_mount(&protected, "view");

    let through_bind = open_file(view.join("eicar.com")).await;
    assert!(
        through_bind.denied(),
        "opening through a bind mount must be denied too: {:?}",
        through_bind.result
    );
    assert!(open_file(protected.join("eicar.com")).await.denied());
    // The same filesystem outside the protected directory is not scanned.
    let outside = open_file(elsewhere.join("eicar.com")).await;
    assert_eq!(outside.result.expect("outside the protected set"), EICAR);
    drop(sandbox);
}

async fn rewrite_is_judged_again(agent_args: &[&str]) {
    let h = host(agent_args).await;
    let path = h.data.join("doc.txt");
    // Same length as EICAR, so only ctime tells the versions apart.
    let clean = vec![b'a'; EICAR.len()];
    write(&path, &clean);
    for _ in 0..3 {
        assert_eq!(open_file(&path).await.result.expect("clean"), clean);
    }
    write(&path, EICAR);
    let out = open_file(&path).await;
    assert!(out.denied(), "rewritten with EICAR: {:?}", out.result);
    // Back to clean content: allowed again.
    std::fs::remove_file(&path).unwrap();
    write(&path, &clean);
    assert_eq!(open_file(&path).await.result.expect("clean again"), clean);
    drop(h.sandbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_clean_file_rewritten_with_malware_is_denied() {
    let _turn = shared().await;
    rewrite_is_judged_again(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_clean_file_rewritten_with_malware_is_denied_without_ignore_marks() {
    let _turn = shared().await;
    rewrite_is_judged_again(&["--no-ignore-marks"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_survive_a_broker_restart_on_the_same_store() {
    let _turn = shared().await;
    let mut h = host(&[]).await;
    write(&h.data.join("eicar.com"), EICAR);
    assert!(open_file(h.data.join("eicar.com")).await.denied());
    eventually(Duration::from_secs(10), "denial recorded", || {
        let url = h.broker.url.clone();
        async move { (!events(&url).await.is_empty()).then_some(()) }
    })
    .await;
    let store = format!(
        "sqlite://{}",
        h.sandbox
            .dir()
            .join(format!("{}/fleetscan.db", h.broker.proc.name))
            .display()
    );
    assert!(
        h.sandbox.stop(&h.broker.proc),
        "broker stops cleanly on SIGTERM"
    );
    let again = h.sandbox.broker(&["--store", &store]);
    let ev = events(&again.url).await;
    assert!(
        ev.iter()
            .any(|e| e.path.ends_with("eicar.com") && e.threat_name == "EICAR-Test-File"),
        "{ev:#?}"
    );
    let verdict = fleetscan(&["verdict", &sha256_hex(EICAR), "--broker", &again.url]);
    assert!(verdict.contains("malicious"), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_protects_a_directory_in_one_process() {
    let _turn = shared().await;
    let mut sandbox = sandbox();
    let data = sandbox.tmpfs("data");
    write(&data.join("eicar.com"), EICAR);
    write(&data.join("hello.txt"), b"hello\n");
    let state = sandbox.dir().join("state");
    let (_up, line) = sandbox.spawn(
        "up",
        &[
            "up".into(),
            "--protect".into(),
            data.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            state.display().to_string(),
        ],
        "listening on",
    );
    let addr = line
        .split_whitespace()
        .find(|w| w.parse::<std::net::SocketAddr>().is_ok())
        .unwrap()
        .to_owned();
    let url = format!("http://{addr}");
    let node = fleetscan_hostname();
    wait_for_host(&url, &node).await;
    wait_for_worker(&url, None).await;
    assert_eq!(
        open_file(data.join("hello.txt")).await.result.unwrap(),
        b"hello\n"
    );
    assert!(open_file(data.join("eicar.com")).await.denied());
    assert!(
        state.join("fleetscan.db").exists(),
        "embedded SQLite store under the data dir"
    );
    let listed = eventually(Duration::from_secs(10), "the denial listed", || {
        let url = url.clone();
        async move {
            let listed = fleetscan(&["events", "--broker", &url]);
            listed.contains("EICAR-Test-File").then_some(listed)
        }
    })
    .await;
    assert!(listed.contains("eicar.com"), "{listed}");
    drop(sandbox);
}

fn fleetscan_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_postgres_records_and_reuses_verdicts() {
    let _turn = shared().await;
    let pg = fleetscan_store::testing::PgCluster::start();
    let store = pg.new_database();
    let mut sandbox = sandbox();
    let data = sandbox.tmpfs("data");
    write(&data.join("eicar.com"), EICAR);
    write(&data.join("plain.txt"), b"plain text");
    let broker = sandbox.broker(&["--store", &store]);
    sandbox.worker(&broker.url, &[]);
    sandbox.agent("pg-node", &[&broker.url], &[&data], &[]);
    wait_for_host(&broker.url, "pg-node").await;
    assert!(open_file(data.join("eicar.com")).await.denied());
    assert_eq!(
        open_file(data.join("plain.txt")).await.result.unwrap(),
        b"plain text"
    );
    eventually(
        Duration::from_secs(10),
        "the denial recorded in Postgres",
        || {
            let url = broker.url.clone();
            async move {
                events(&url)
                    .await
                    .into_iter()
                    .find(|e| e.path.ends_with("eicar.com"))
            }
        },
    )
    .await;
    assert!(
        sandbox.stop(&broker.proc),
        "broker stops cleanly on SIGTERM"
    );

    // A second broker on the same database knows both verdicts without scanning.
    let again = sandbox.broker(&["--store", &store]);
    sandbox.worker(&again.url, &[]);
    let mut scan =
        fleetscan_proto::v1::scan_service_client::ScanServiceClient::connect(again.url.clone())
            .await
            .unwrap();
    for (content, action) in [(EICAR, 2), (&b"plain text"[..], 1)] {
        let resp = scan
            .lookup(fleetscan_proto::v1::LookupRequest {
                sha256: sha256_hex(content),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(resp.known, "{resp:?}");
        assert_eq!(resp.action, action, "{resp:?}");
    }
    assert_eq!(stats(&again.url).await.scans_started, 0);
    drop(sandbox);
}
