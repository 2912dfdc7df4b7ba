//! Tests of the YARA scanner and the reference scanner on generated content and rule files
//! written to temporary directories.

use std::path::Path;

use fleetscan_core::{Sha256, VerdictKind};
use fleetscan_worker::Scanner;
use fleetscan_yara::{YaraError, YaraScanner, reference_scanner};

/// The standard 68-byte EICAR test string.
const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn eicar_is_malicious_with_its_threat_name() {
    assert_eq!(EICAR.len(), 68);
    let yara = YaraScanner::load(None).unwrap();
    let outcome = yara.scan(EICAR);
    assert_eq!(outcome.kind, VerdictKind::Malicious);
    assert_eq!(outcome.threat_name.as_deref(), Some("EICAR-Test-File"));
}

#[test]
fn eicar_followed_by_whitespace_within_128_bytes_is_still_the_test_file() {
    let yara = YaraScanner::load(None).unwrap();
    let mut padded = EICAR.to_vec();
    padded.extend_from_slice(b"\r\n\t \x1a");
    assert_eq!(yara.scan(&padded).kind, VerdictKind::Malicious);
    let mut full = EICAR.to_vec();
    full.resize(128, b' ');
    assert_eq!(yara.scan(&full).kind, VerdictKind::Malicious);
}

#[test]
fn eicar_anywhere_else_or_with_more_is_clean_as_the_spec_says() {
    let yara = YaraScanner::load(None).unwrap();
    let mut embedded = vec![b'A'; 1000];
    embedded.extend_from_slice(EICAR);
    embedded.extend_from_slice(&[b'B'; 500]);
    assert_eq!(yara.scan(&embedded).kind, VerdictKind::Clean);

    let mut trailing_text = EICAR.to_vec();
    trailing_text.extend_from_slice(b" not whitespace");
    assert_eq!(yara.scan(&trailing_text).kind, VerdictKind::Clean);

    let mut too_long = EICAR.to_vec();
    too_long.resize(129, b' ');
    assert_eq!(yara.scan(&too_long).kind, VerdictKind::Clean);

    assert_eq!(yara.scan(&EICAR[..67]).kind, VerdictKind::Clean);
    assert_eq!(yara.scan(b"").kind, VerdictKind::Clean);
}

#[test]
fn rules_from_a_directory_match_and_name_their_threat() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "custom.yar",
        r#"rule Custom_Marker { meta: threat_name = "Test.Custom" strings: $m = "fleetscan-test-marker" condition: $m }"#,
    );
    write(
        dir.path(),
        "other.yara",
        r#"rule No_Meta_Name { strings: $m = { DE AD BE EF } condition: $m }"#,
    );
    // Not a rule file: ignored even though it would not compile.
    write(dir.path(), "README.txt", "this is not yara");

    let yara = YaraScanner::load(Some(dir.path())).unwrap();
    assert_eq!(yara.rule_files().len(), 3, "{:?}", yara.rule_files());
    let hit = yara.scan(b"prefix fleetscan-test-marker suffix");
    assert_eq!(hit.kind, VerdictKind::Malicious);
    assert_eq!(hit.threat_name.as_deref(), Some("Test.Custom"));
    let by_identifier = yara.scan(&[0, 1, 0xde, 0xad, 0xbe, 0xef, 2]);
    assert_eq!(by_identifier.threat_name.as_deref(), Some("No_Meta_Name"));
    assert_eq!(yara.scan(b"nothing here").kind, VerdictKind::Clean);
    // The shipped rules are still there.
    assert_eq!(yara.scan(EICAR).kind, VerdictKind::Malicious);
}

#[test]
fn an_invalid_rule_file_fails_the_load_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "good.yar", "rule Good { condition: true }");
    write(
        dir.path(),
        "broken.yar",
        "rule Broken { condition: $undefined }",
    );
    let err = match YaraScanner::load(Some(dir.path())) {
        Err(err) => err,
        Ok(_) => panic!("a broken rule file was accepted"),
    };
    assert!(matches!(err, YaraError::Compile { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("broken.yar"), "{text}");

    // Includes are refused: an included file would change the rules but not their digest.
    let inc = tempfile::tempdir().unwrap();
    write(inc.path(), "base.yara", "rule Base { condition: true }");
    write(
        inc.path(),
        "main.yar",
        "include \"base.yara\"\nrule Main { condition: Base }",
    );
    let text = match YaraScanner::load(Some(inc.path())) {
        Err(err) => err.to_string(),
        Ok(_) => panic!("an include was accepted"),
    };
    assert!(text.contains("main.yar"), "{text}");

    let missing = match YaraScanner::load(Some(&dir.path().join("missing"))) {
        Err(err) => err,
        Ok(_) => panic!("a missing directory was accepted"),
    };
    assert!(matches!(missing, YaraError::ReadDir { .. }), "{missing:?}");
}

#[test]
fn identity_names_the_engine_and_digests_the_rules() {
    let builtin = YaraScanner::load(None).unwrap().identity();
    assert_eq!(builtin.engine, "yara-x");
    assert_eq!(builtin.engine_version, yara_x_version());
    assert_eq!(builtin.ruleset_version.len(), 16);
    assert!(
        builtin
            .ruleset_version
            .chars()
            .all(|c| c.is_ascii_hexdigit())
    );
    // Stable across loads of the same rules.
    assert_eq!(YaraScanner::load(None).unwrap().identity(), builtin);

    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yar",
        r#"rule A { strings: $a = "one" condition: $a }"#,
    );
    let with_a = YaraScanner::load(Some(dir.path())).unwrap().identity();
    assert_ne!(with_a.ruleset_version, builtin.ruleset_version);
    write(
        dir.path(),
        "a.yar",
        r#"rule A { strings: $a = "two" condition: $a }"#,
    );
    let changed = YaraScanner::load(Some(dir.path())).unwrap().identity();
    assert_ne!(changed.ruleset_version, with_a.ruleset_version);
    assert_eq!(changed.engine_version, with_a.engine_version);
}

/// The yara-x version this crate was built with, read from the lock file so the test does not
/// just restate the code under test.
fn yara_x_version() -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"))
        .expect("the workspace lock file");
    let at = lock
        .find("name = \"yara-x\"\nversion = \"")
        .expect("yara-x in the lock file");
    let rest = &lock[at + "name = \"yara-x\"\nversion = \"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

#[test]
fn scans_run_in_parallel_on_one_scanner() {
    let yara = std::sync::Arc::new(YaraScanner::load(None).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let yara = yara.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let outcome = if i % 2 == 0 {
                        yara.scan(EICAR)
                    } else {
                        yara.scan(b"clean")
                    };
                    let expected = if i % 2 == 0 {
                        VerdictKind::Malicious
                    } else {
                        VerdictKind::Clean
                    };
                    assert_eq!(outcome.kind, expected);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn reference_scanner_blocks_listed_hashes_and_eicar_and_passes_clean_files() {
    let dir = tempfile::tempdir().unwrap();
    let listed = b"a harmless-looking but blocked build artefact";
    let blocklist = dir.path().join("blocklist.txt");
    std::fs::write(
        &blocklist,
        format!("# test list\n{} Blocked.Artefact\n", Sha256::of(listed)),
    )
    .unwrap();

    let reference = reference_scanner(None, Some(&blocklist)).unwrap();
    let id = reference.identity();
    assert_eq!(id.scanner, "reference");
    assert_eq!(id.engine, "yara-x+sha256-list");
    assert_eq!(id.ruleset_version.split('+').count(), 2);

    let blocked = reference.scan(listed);
    assert_eq!(blocked.kind, VerdictKind::Malicious);
    assert_eq!(blocked.threat_name.as_deref(), Some("Blocked.Artefact"));
    let eicar = reference.scan(EICAR);
    assert_eq!(eicar.kind, VerdictKind::Malicious);
    assert_eq!(eicar.threat_name.as_deref(), Some("EICAR-Test-File"));
    assert_eq!(reference.scan(b"an ordinary file").kind, VerdictKind::Clean);

    // Without a list: YARA alone.
    let yara_only = reference_scanner(None, None).unwrap();
    assert_eq!(yara_only.identity().engine, "yara-x");
    assert_eq!(yara_only.scan(listed).kind, VerdictKind::Clean);

    // A bad list is an error at load time.
    std::fs::write(&blocklist, "not a digest\n").unwrap();
    assert!(matches!(
        reference_scanner(None, Some(&blocklist)),
        Err(YaraError::Blocklist(_))
    ));
}
