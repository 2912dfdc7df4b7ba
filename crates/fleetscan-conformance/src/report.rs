//! The report a vendor reads, and the wording shared by every check's detail.
//!
//! The summary line is exactly "N passed, M failed", the plain closing line CI tooling reads;
//! it must never change its wording.

use std::io::Write;
use std::time::Duration;

use fleetscan_proto::v1;

use crate::CheckResult;

/// One line per check ("PASS name (12 ms)" or "FAIL name: detail"), then "N passed, M failed".
pub fn print_report(results: &[CheckResult], out: &mut impl Write) -> std::io::Result<()> {
    for r in results {
        if r.passed {
            writeln!(out, "PASS {} ({} ms)", r.name, r.elapsed.as_millis())?;
        } else {
            // One line per check, whatever the detail holds.
            let detail = r.detail.replace(['\r', '\n'], " ");
            writeln!(out, "FAIL {}: {}", r.name, detail.trim())?;
        }
    }
    let passed = results.iter().filter(|r| r.passed).count();
    writeln!(out, "{passed} passed, {} failed", results.len() - passed)
}

/// "350 ms" below 10 s, "12.3 s" above.
pub(crate) fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A verdict value by its short name ("CLEAN"), or the raw number when unknown.
pub(crate) fn verdict_name(raw: i32) -> String {
    match v1::VerdictResult::try_from(raw) {
        Ok(v) => v
            .as_str_name()
            .trim_start_matches("VERDICT_RESULT_")
            .to_owned(),
        Err(_) => format!("unknown verdict value {raw}"),
    }
}

/// A result as the details quote it: `ERROR (retryable, detail "…")`.
pub(crate) fn describe(result: &v1::ScanResult) -> String {
    let mut parts = Vec::new();
    if !result.threat_name.is_empty() {
        parts.push(format!("threat {:?}", result.threat_name));
    }
    if result.result == v1::VerdictResult::Error as i32 {
        parts.push(
            if result.retryable {
                "retryable"
            } else {
                "not retryable"
            }
            .to_owned(),
        );
    }
    if !result.detail.is_empty() {
        parts.push(format!("detail {:?}", result.detail));
    }
    let name = verdict_name(result.result);
    if parts.is_empty() {
        name
    } else {
        format!("{name} ({})", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &'static str, passed: bool, detail: &str, ms: u64) -> CheckResult {
        CheckResult {
            name,
            passed,
            detail: detail.into(),
            elapsed: Duration::from_millis(ms),
        }
    }

    #[test]
    fn the_report_has_a_line_per_check_and_the_summary() {
        let mut out = Vec::new();
        print_report(
            &[
                result("register", true, "scanner x", 12),
                result("eicar", false, "expected MALICIOUS,\ngot CLEAN", 40),
                result("cancel", true, "", 2001),
            ],
            &mut out,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "PASS register (12 ms)\nFAIL eicar: expected MALICIOUS, got CLEAN\n\
             PASS cancel (2001 ms)\n2 passed, 1 failed\n"
        );
        let mut out = Vec::new();
        print_report(&[], &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "0 passed, 0 failed\n");
    }

    #[test]
    fn results_are_described_by_their_short_names() {
        let r = v1::ScanResult {
            result: v1::VerdictResult::Error as i32,
            detail: "sha256 mismatch".into(),
            ..Default::default()
        };
        assert_eq!(
            describe(&r),
            "ERROR (not retryable, detail \"sha256 mismatch\")"
        );
        let r = v1::ScanResult {
            result: v1::VerdictResult::Malicious as i32,
            threat_name: "EICAR".into(),
            ..Default::default()
        };
        assert_eq!(describe(&r), "MALICIOUS (threat \"EICAR\")");
        assert_eq!(verdict_name(42), "unknown verdict value 42");
        assert_eq!(human(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3 s");
    }
}
