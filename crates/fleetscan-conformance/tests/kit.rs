//! The kit against real worker processes: the SDK sample worker passes every check, and
//! deliberately wrong workers fail the checks their mistakes break, so each of those checks is
//! shown to be able to fail.

use std::time::Duration;

use fleetscan_conformance::{CheckResult, ConformanceConfig, ConformanceError, print_report, run};

const SAMPLE: &str = env!("CARGO_BIN_EXE_fleetscan-conformance-sample-worker");

/// Short waits where the protocol allows; `heartbeat_wait` stays above the SDK's fixed 10 s.
fn config(command: String, only: &[&str]) -> ConformanceConfig {
    ConformanceConfig {
        worker_command: command,
        check_timeout: Duration::from_secs(10),
        only: only.iter().map(|s| (*s).to_owned()).collect(),
        heartbeat_wait: Duration::from_secs(12),
        quiet_wait: Duration::from_secs(1),
        reconnect_wait: Duration::from_secs(10),
    }
}

fn report(results: &[CheckResult]) -> String {
    let mut out = Vec::new();
    print_report(results, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn get<'a>(results: &'a [CheckResult], name: &str) -> &'a CheckResult {
    results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no result for {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_worker_passes_every_check() {
    let results = run(config(
        format!("exec {SAMPLE} --mode sdk --credits 2 --broker {{broker}}"),
        &[],
    ))
    .await
    .unwrap();
    let text = report(&results);
    assert_eq!(results.len(), 9, "{text}");
    assert!(results.iter().all(|r| r.passed), "{text}");
    assert!(text.ends_with("9 passed, 0 failed\n"), "{text}");
    // What was observed is what the SDK does.
    assert!(
        get(&results, "credits").detail.contains("granted 2;"),
        "{text}"
    );
    assert!(
        get(&results, "hash-mismatch")
            .detail
            .contains("sha256 mismatch"),
        "{text}"
    );
    assert!(
        get(&results, "eicar").detail.contains("EICAR-Test-File"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_url_also_comes_in_the_environment() {
    // No {broker} in the command: the sample worker reads FLEETSCAN_WORKER_BROKER.
    let results = run(config(
        format!("exec {SAMPLE} --credits 1"),
        &["clean-file"],
    ))
    .await
    .unwrap();
    assert!(results[0].passed, "{}", report(&results));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_misses_eicar_fails_the_eicar_check_only() {
    let results = run(config(
        format!("exec {SAMPLE} --mode miss-eicar --broker {{broker}}"),
        &["clean-file", "eicar"],
    ))
    .await
    .unwrap();
    let text = report(&results);
    assert!(get(&results, "clean-file").passed, "{text}");
    let eicar = get(&results, "eicar");
    assert!(!eicar.passed, "{text}");
    assert!(
        eicar.detail.contains("answered CLEAN, expected MALICIOUS"),
        "{text}"
    );
    assert!(text.ends_with("1 passed, 1 failed\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_naive_worker_fails_the_protocol_checks() {
    let mut config = config(
        format!("exec {SAMPLE} --mode naive --credits 2 --broker {{broker}}"),
        &[
            "register",
            "cancel",
            "credits",
            "heartbeat",
            "hash-mismatch",
            "broker-restart",
        ],
    );
    // The failures come at these waits: keep them short.
    config.check_timeout = Duration::from_secs(3);
    config.heartbeat_wait = Duration::from_secs(1);
    config.reconnect_wait = Duration::from_secs(2);
    let results = run(config).await.unwrap();
    let text = report(&results);
    // It registers correctly: the kit does not fail everything.
    assert!(get(&results, "register").passed, "{text}");
    let expect_fail = |name: &str, needle: &str| {
        let r = get(&results, name);
        assert!(!r.passed, "{name} passed: {text}");
        assert!(
            r.detail.contains(needle),
            "{name}: {needle:?} not in: {text}"
        );
    };
    expect_fail("cancel", "a cancelled job gets no result");
    expect_fail("credits", "granted only 0 credit(s) again");
    expect_fail("heartbeat", "no heartbeat within");
    expect_fail("hash-mismatch", "answered CLEAN, expected ERROR");
    // It never reconnects: its process ends with its stream.
    expect_fail("broker-restart", "after the broker restart");
    assert!(text.ends_with("1 passed, 5 failed\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_never_sends_more_than_max_file_size() {
    let two_mib = 2 * 1024 * 1024;
    let results = run(config(
        format!("exec {SAMPLE} --max-file-size {two_mib} --broker {{broker}}"),
        &["chunked-large-file", "cancel", "credits"],
    ))
    .await
    .unwrap();
    let text = report(&results);
    let chunked = get(&results, "chunked-large-file");
    assert!(chunked.passed, "{text}");
    assert!(
        chunked.detail.starts_with("2097152 bytes in 2 chunks"),
        "{text}"
    );
    assert!(get(&results, "credits").passed, "{text}");
    // A job cancelled between chunks needs more than two full chunks: the check says so.
    let cancel = get(&results, "cancel");
    assert!(!cancel.passed, "{text}");
    assert!(
        cancel.detail.contains("declares max_file_size 2097152"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_that_exits_is_reported_with_its_output() {
    let results = run(config(
        "echo starting; echo 'no scanner licence' >&2; exit 3".into(),
        &["register"],
    ))
    .await
    .unwrap();
    let r = &results[0];
    assert!(!r.passed);
    assert!(r.detail.contains("exited"), "{}", r.detail);
    assert!(r.detail.contains('3'), "{}", r.detail);
    // Both streams of output are kept; their interleaving is the worker's.
    assert!(r.detail.contains("no scanner licence"), "{}", r.detail);
    assert!(r.detail.contains("starting"), "{}", r.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_dials_fails_in_check_timeout() {
    let mut config = config("exec sleep 30".into(), &["eicar"]);
    config.check_timeout = Duration::from_secs(1);
    let results = run(config).await.unwrap();
    let r = &results[0];
    assert!(!r.passed);
    assert!(
        r.detail.contains("did not attach within 1000 ms"),
        "{}",
        r.detail
    );
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
}

#[tokio::test]
async fn a_bad_config_is_an_error_not_a_report() {
    let err = run(config("true".into(), &["no-such-check"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConformanceError::UnknownCheck { .. }),
        "{err}"
    );
}
