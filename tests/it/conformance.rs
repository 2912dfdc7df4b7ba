//! Every worker that ships passes the conformance kit: `fleetscan conformance` plays the broker
//! and checks `fleetscan worker` (the reference engine, and ClamAV through a real clamd).

use fleetscan_clamav::testing::{Clamd, Signatures};

use crate::common::shared_blocking;

fn conformance(worker_args: &str) -> String {
    let bin = env!("CARGO_BIN_EXE_fleetscan");
    let out = std::process::Command::new(bin)
        .args([
            "conformance",
            "--worker-command",
            &format!("exec {bin} worker --broker {{broker}} {worker_args}"),
        ])
        .output()
        .expect("running fleetscan conformance");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the worker failed the conformance kit:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_reference_worker_conforms() {
    let _turn = shared_blocking();
    let report = conformance("");
    assert!(report.contains("9 passed, 0 failed"), "{report}");
}

#[test]
fn the_clamav_worker_conforms() {
    let _turn = shared_blocking();
    let clamd = Clamd::start(&Signatures::new().eicar().daily(27001));
    let report = conformance(&format!("--engine clamav --clamd {}", clamd.addr()));
    assert!(report.contains("9 passed, 0 failed"), "{report}");
}

/// A worker written in Python from the `.proto` files alone (grpcio from PyPI, installed by
/// `.ci/run`): a vendor needs nothing but the protocol.
#[test]
fn the_python_worker_conforms() {
    let _turn = shared_blocking();
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs python3 with grpcio and grpcio-tools: \
         pip install -r workers/python/requirements.txt (.ci/run does)"
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../workers/python/fleetscan_worker.py"
    );
    let bin = env!("CARGO_BIN_EXE_fleetscan");
    let out = std::process::Command::new(bin)
        .args([
            "conformance",
            "--worker-command",
            &format!("exec python3 {script} --broker {{broker}}"),
        ])
        .output()
        .expect("running fleetscan conformance");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("9 passed, 0 failed"), "{report}");
}
