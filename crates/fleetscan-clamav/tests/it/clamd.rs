//! The scanner against a real clamd (Debian's clamav-daemon), one throw-away clamd per test with
//! a signature database the test writes. Needs `/usr/sbin/clamd`; no downloaded database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetscan_clamav::testing::{Clamd, EICAR, EICAR_SIGNATURE, Signatures};
use fleetscan_clamav::{
    ClamdAddr, ClamdError, ClamdOptions, ClamdScanner, ScanReply, UNOFFICIAL_SUFFIX,
    UNVERSIONED_RULESET,
};
use fleetscan_core::VerdictKind;
use fleetscan_worker::{ScanOutcome, Scanner};

/// Deterministic bytes that no signature matches by chance (a xorshift stream).
fn generated(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// The ClamAV version the installed clamd prints for `--version`, e.g. "1.4.6".
fn installed_version() -> String {
    let out = std::process::Command::new(fleetscan_clamav::testing::clamd_binary())
        .arg("--version")
        .output()
        .expect("running clamd --version (install Debian's clamav-daemon)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("ClamAV ")
        .and_then(|v| v.split('/').next())
        .unwrap_or_else(|| panic!("unexpected clamd --version output {text:?}"))
        .to_owned()
}

fn connect(clamd: &Clamd) -> ClamdScanner {
    ClamdScanner::connect(clamd.addr(), "clamav-test").expect("connecting to the test clamd")
}

#[test]
fn local_signatures_give_an_unversioned_identity_and_clean_content_is_clean() {
    let clamd = Clamd::start(&Signatures::new().eicar());
    let scanner = connect(&clamd);
    // With local signature files only, clamd prints just "ClamAV <version>": no database
    // version, so the rule-set version is the documented placeholder.
    let version = scanner.query_version().unwrap();
    assert_eq!(
        version.to_string(),
        format!("ClamAV {}", installed_version())
    );
    assert_eq!(version.database_version, None);
    assert_eq!(&version, scanner.version());
    let id = scanner.identity();
    assert_eq!(id.scanner, "clamav-test");
    assert_eq!(id.engine, "clamav");
    assert_eq!(id.engine_version, installed_version());
    assert_eq!(id.ruleset_version, UNVERSIONED_RULESET);

    assert_eq!(scanner.scan(b"hello, world\n"), ScanOutcome::clean());
    assert_eq!(scanner.scan(b""), ScanOutcome::clean(), "empty content");
    assert_eq!(scanner.scan(&generated(100_000, 7)), ScanOutcome::clean());
}

#[test]
fn eicar_is_malicious_under_its_signature_name() {
    let clamd = Clamd::start(&Signatures::new().eicar());
    let scanner = connect(&clamd);
    // clamd marks every name from a database it did not verify as signed; the name is kept
    // as clamd says it.
    let expected = format!("{EICAR_SIGNATURE}{UNOFFICIAL_SUFFIX}");
    assert_eq!(
        scanner.scan_reply(EICAR).unwrap(),
        ScanReply::Found(expected.clone())
    );
    assert_eq!(scanner.scan(EICAR), ScanOutcome::malicious(expected));
    assert!(
        clamd.log().contains("EICAR-Test-Sig.UNOFFICIAL FOUND"),
        "{}",
        clamd.log()
    );
}

#[test]
fn a_generated_file_is_matched_by_its_md5_and_its_sha256() {
    let by_md5 = generated(4096, 1);
    let by_sha256 = generated(10_000, 2);
    let clamd = Clamd::start(
        &Signatures::new()
            .eicar()
            .md5("Generated.Test.File", &by_md5)
            .sha256("Generated.Sha256.File", &by_sha256),
    );
    let scanner = connect(&clamd);
    assert_eq!(
        scanner.scan(&by_md5),
        ScanOutcome::malicious("Generated.Test.File.UNOFFICIAL")
    );
    assert_eq!(
        scanner.scan(&by_sha256),
        ScanOutcome::malicious("Generated.Sha256.File.UNOFFICIAL")
    );
    // A hash signature is for the whole file: one byte more and it no longer matches.
    let mut longer = by_md5.clone();
    longer.push(0);
    assert_eq!(scanner.scan(&longer), ScanOutcome::clean());
}

#[test]
fn large_content_is_streamed_whole() {
    const MARK: &[u8] = b"fleetscan-end-of-a-large-file-marker";
    let clamd = Clamd::start(
        &Signatures::new()
            .eicar()
            .pattern("Fleetscan.Test.Tail", MARK),
    );
    let scanner = connect(&clamd);
    let mut content = generated(30 * 1024 * 1024, 3);
    assert_eq!(scanner.scan(&content), ScanOutcome::clean());
    // The marker in the very last bytes is seen only if every chunk arrived.
    let at = content.len() - MARK.len();
    content[at..].copy_from_slice(MARK);
    assert_eq!(
        scanner.scan(&content),
        ScanOutcome::malicious("Fleetscan.Test.Tail.UNOFFICIAL")
    );
}

#[test]
fn content_over_stream_max_length_is_unsupported() {
    let clamd = Clamd::start_with(&Signatures::new().eicar(), &[("StreamMaxLength", "1M")]);
    let scanner = connect(&clamd);
    assert_eq!(
        scanner.scan_reply(&generated(3 * 1024 * 1024, 4)).unwrap(),
        ScanReply::SizeLimitExceeded
    );
    let outcome = scanner.scan(&generated(3 * 1024 * 1024, 4));
    assert_eq!(outcome.kind, VerdictKind::Unsupported);
    assert!(!outcome.retryable);
    // Up to the limit is scanned.
    assert_eq!(
        scanner.scan(&generated(1000 * 1000, 5)),
        ScanOutcome::clean()
    );
}

#[test]
fn clamd_gone_is_a_retryable_error() {
    let mut clamd = Clamd::start(&Signatures::new().eicar());
    let scanner = connect(&clamd);
    assert_eq!(scanner.scan(b"x"), ScanOutcome::clean());
    clamd.stop();
    let outcome = scanner.scan(EICAR);
    assert_eq!(outcome.kind, VerdictKind::Error, "{outcome:?}");
    assert!(outcome.retryable);
    assert!(
        outcome
            .detail
            .as_deref()
            .unwrap()
            .contains("cannot connect"),
        "{outcome:?}"
    );
    // Connecting to a clamd that is not there fails at once, and may be retried.
    let started = Instant::now();
    let err = match ClamdScanner::connect(clamd.addr(), "clamav-test") {
        Err(err) => err,
        Ok(_) => panic!("connected to a stopped clamd"),
    };
    assert!(matches!(err, ClamdError::Connect { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(2));
    let missing = ClamdAddr::Unix(clamd.database_dir().join("no-such.sock"));
    assert!(ClamdScanner::connect(missing, "x").is_err());
}

#[test]
fn a_daily_database_version_is_the_ruleset_version_and_a_reload_is_seen() {
    let clamd = Clamd::start(&Signatures::new().eicar().daily(27001));
    let scanner = connect(&clamd);
    let version = scanner.version().clone();
    // What clamd prints with a daily database: "ClamAV 1.4.6/27001/<build date>".
    assert_eq!(version.database_version, Some(27001), "{version}");
    assert!(version.database_date.is_some(), "{version}");
    assert!(
        version
            .to_string()
            .starts_with(&format!("ClamAV {}/27001/", installed_version())),
        "{version}"
    );
    assert_eq!(scanner.identity().ruleset_version, "27001");
    assert_eq!(scanner.changed_version().unwrap(), None);
    assert_eq!(
        scanner.scan(EICAR),
        ScanOutcome::malicious(format!("{EICAR_SIGNATURE}{UNOFFICIAL_SUFFIX}"))
    );
    let labelled = ClamdScanner::connect_with(
        clamd.addr(),
        "clamav-test",
        ClamdOptions {
            ruleset_label: Some("site-7".into()),
            ..ClamdOptions::default()
        },
    )
    .unwrap();
    assert_eq!(labelled.identity().ruleset_version, "27001+site-7");

    clamd.set_signatures(&Signatures::new().eicar().daily(27002));
    // clamd reloads in the background; the scanner's own identity never changes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        if let Some(new) = scanner.changed_version().unwrap() {
            break new;
        }
        assert!(
            Instant::now() < deadline,
            "clamd did not load the new database:\n{}",
            clamd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(new.database_version, Some(27002));
    assert_eq!(scanner.identity().ruleset_version, "27001");
    let again = connect(&clamd);
    assert_eq!(again.identity().ruleset_version, "27002");
    assert_eq!(again.changed_version().unwrap(), None);
}

#[test]
fn concurrent_scans_are_independent() {
    let clamd = Clamd::start(&Signatures::new().eicar());
    let scanner = Arc::new(connect(&clamd));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let scanner = scanner.clone();
            std::thread::spawn(move || {
                for round in 0..5 {
                    if (i + round) % 2 == 0 {
                        assert_eq!(scanner.scan(EICAR).kind, VerdictKind::Malicious);
                    } else {
                        let content = generated(200_000, (i * 10 + round) as u64);
                        assert_eq!(scanner.scan(&content), ScanOutcome::clean());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
