//! The ClamAV engine end to end: a real `clamd` (Debian's `clamav-daemon`) with a signature
//! database the test writes, behind `fleetscan worker --engine clamav`, a broker and an agent.
//! Needs root and clamd.

use std::time::Duration;

use fleetscan_clamav::testing::{Clamd, Signatures};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clamd_worker_blocks_what_clamd_finds() {
    let _turn = shared().await;
    let generated = b"a generated file that only a hash signature knows\n".repeat(64);
    let clamd = Clamd::start(
        &Signatures::new()
            .eicar()
            .md5("Generated.Test.File", &generated)
            .daily(27001),
    );
    let mut sandbox = sandbox();
    let data = sandbox.tmpfs("data");
    write(&data.join("eicar.com"), EICAR);
    write(&data.join("generated.bin"), &generated);
    write(&data.join("clean.txt"), b"nothing to see\n");
    let broker = sandbox.broker(&[]);
    sandbox.worker(
        &broker.url,
        &["--engine", "clamav", "--clamd", &clamd.addr().to_string()],
    );
    sandbox.agent("clam-node", &[&broker.url], &[&data], &[]);
    wait_for_host(&broker.url, "clam-node").await;

    assert_eq!(
        open_file(data.join("clean.txt")).await.result.unwrap(),
        b"nothing to see\n"
    );
    assert!(open_file(data.join("eicar.com")).await.denied());
    assert!(open_file(data.join("generated.bin")).await.denied());

    let events = eventually(Duration::from_secs(10), "both denials recorded", || {
        let url = broker.url.clone();
        async move {
            let ev = events(&url).await;
            (ev.len() >= 2).then_some(ev)
        }
    })
    .await;
    let threat = |name: &str| {
        events
            .iter()
            .find(|e| e.path.ends_with(name))
            .map(|e| e.threat_name.clone())
            .unwrap_or_default()
    };
    assert!(
        threat("eicar.com").starts_with("EICAR-Test-Sig"),
        "{events:#?}"
    );
    assert!(
        threat("generated.bin").starts_with("Generated.Test.File"),
        "{events:#?}"
    );
    // The verdict names the engine and the database version clamd reported.
    let verdict = fleetscan(&["verdict", &sha256_hex(EICAR), "--broker", &broker.url]);
    assert!(
        verdict.contains("clamav") && verdict.contains("27001"),
        "{verdict}"
    );
    drop(sandbox);
}
