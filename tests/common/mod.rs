//! Helpers shared by the end-to-end tests.

#![allow(dead_code)]

use std::path::Path;

pub use fleetscan_testkit::*;

/// A sandbox that starts this build's `fleetscan` binary.
pub fn sandbox() -> Sandbox {
    Sandbox::new(env!("CARGO_BIN_EXE_fleetscan"))
}

/// Lower-case hex SHA-256 of `data`, computed by `sha256sum` so the tests do not share code
/// with the system under test.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Writes `data` to `path` (creating or truncating it).
pub fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Runs the `fleetscan` binary with `args` and returns its standard output; panics on failure.
pub fn fleetscan(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetscan"))
        .args(args)
        .output()
        .expect("running fleetscan");
    assert!(
        out.status.success(),
        "fleetscan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
