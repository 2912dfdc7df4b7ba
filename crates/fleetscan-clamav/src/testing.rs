//! A throw-away clamd for tests of this and other crates (feature `testing`).
//!
//! [`Clamd::start`] runs Debian's `clamd` in the foreground with a configuration and a
//! signature database of its own in a fresh temporary directory, waits until it answers, and
//! kills it (by its pid) when dropped. The signatures are written by the test ([`Signatures`]):
//! nothing is downloaded, and a database of a few signatures loads in well under a second.
//!
//! This module must never touch the system's clamd, its configuration or its database, and
//! never writes a test virus to disk: signatures hold only hex patterns and digests.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetscan_core::Sha256;
use md5::{Digest, Md5};

use crate::client::{self, ClamdAddr, Limits};
use crate::protocol;

/// The EICAR anti-virus test file: harmless, and detected by every scanner that loads a
/// signature for it (here, the one [`Signatures::eicar`] writes).
pub const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The name [`Signatures::eicar`] gives the EICAR signature.
pub const EICAR_SIGNATURE: &str = "EICAR-Test-Sig";

/// Where clamd is looked for, before `PATH`.
const CLAMD_PATHS: &[&str] = &["/usr/sbin/clamd", "/usr/local/sbin/clamd"];

/// How long clamd may take to start. A tiny database loads in a fraction of a second; the
/// margin is for a machine busy compiling.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A signature database written by a test.
///
/// Signatures go into `fleetscan-test.ndb` (body patterns), `.hdb` (MD5 of a whole file) and
/// `.hsb` (SHA-256 of a whole file); or, with [`Signatures::daily`], all into a `daily.cud`,
/// an unsigned database container with a version number, which makes clamd report a database
/// version in `VERSION` as it does with the official `daily.cvd`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signatures {
    ndb: Vec<String>,
    hdb: Vec<String>,
    hsb: Vec<String>,
    daily: Option<u32>,
}

impl Signatures {
    pub fn new() -> Self {
        Self::default()
    }

    /// The EICAR test file, as [`EICAR_SIGNATURE`] at offset 0.
    pub fn eicar(mut self) -> Self {
        self.ndb
            .push(format!("{EICAR_SIGNATURE}:0:0:{}", hex_of(EICAR)));
        self
    }

    /// A body signature: `pattern` anywhere in any file.
    pub fn pattern(mut self, name: &str, pattern: &[u8]) -> Self {
        self.ndb.push(format!("{name}:0:*:{}", hex_of(pattern)));
        self
    }

    /// A whole-file MD5 signature (`.hdb`: `md5:size:name`).
    pub fn md5(mut self, name: &str, content: &[u8]) -> Self {
        let digest = Md5::digest(content);
        self.hdb
            .push(format!("{}:{}:{name}", hex_of(&digest), content.len()));
        self
    }

    /// A whole-file SHA-256 signature (`.hsb`: `sha256:size:name:73`, 73 being the lowest
    /// engine functionality level that reads SHA-256 hash signatures).
    pub fn sha256(mut self, name: &str, content: &[u8]) -> Self {
        self.hsb.push(format!(
            "{}:{}:{name}:73",
            Sha256::of(content).to_hex(),
            content.len()
        ));
        self
    }

    /// Ships every signature in a `daily.cud` of this version instead of plain files.
    pub fn daily(mut self, version: u32) -> Self {
        self.daily = Some(version);
        self
    }

    /// The database files: (file name, content).
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        for (ext, lines) in [("ndb", &self.ndb), ("hdb", &self.hdb), ("hsb", &self.hsb)] {
            if !lines.is_empty() {
                let mut text = lines.join("\n");
                text.push('\n');
                files.push((ext, text.into_bytes()));
            }
        }
        match self.daily {
            None => files
                .into_iter()
                .map(|(ext, data)| (format!("fleetscan-test.{ext}"), data))
                .collect(),
            Some(version) => {
                let sigs = self.ndb.len() + self.hdb.len() + self.hsb.len();
                let inner: Vec<(String, Vec<u8>)> = files
                    .into_iter()
                    .map(|(ext, data)| (format!("daily.{ext}"), data))
                    .collect();
                vec![("daily.cud".to_owned(), cud(version, sigs, &inner))]
            }
        }
    }

    /// Replaces the database files in `dir` by these.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let ours = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "ndb" | "hdb" | "hsb" | "cud"));
            if ours {
                fs::remove_file(&path)?;
            }
        }
        for (name, data) in self.files() {
            // Written aside and renamed, so a reloading clamd never reads half a file.
            let tmp = dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, data)?;
            fs::rename(&tmp, dir.join(name))?;
        }
        Ok(())
    }
}

/// A clamd of the test's own, killed on drop.
pub struct Clamd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    database: PathBuf,
    log: PathBuf,
}

impl Clamd {
    /// Starts clamd with `signatures` and the default settings. Panics with the reason
    /// (clamd missing, clamd refusing the configuration or the database, no answer in time).
    pub fn start(signatures: &Signatures) -> Clamd {
        Self::start_with(signatures, &[])
    }

    /// Like [`Clamd::start`], with clamd.conf settings added or replaced, e.g.
    /// `("StreamMaxLength", "1M")`.
    pub fn start_with(signatures: &Signatures, settings: &[(&str, &str)]) -> Clamd {
        let binary = clamd_binary();
        let dir = tempfile::Builder::new()
            .prefix("fleetscan-clamd-")
            .tempdir()
            .expect("creating a temporary directory for clamd");
        let root = dir.path();
        let socket = root.join("clamd.sock");
        let database = root.join("db");
        let temporary = root.join("tmp");
        let log = root.join("clamd.log");
        fs::create_dir(&database).expect("creating clamd's database directory");
        fs::create_dir(&temporary).expect("creating clamd's temporary directory");
        signatures
            .write_to(&database)
            .expect("writing the test signatures");
        let mut conf: Vec<(String, String)> = [
            ("Foreground", "yes".to_owned()),
            ("LocalSocket", socket.display().to_string()),
            ("DatabaseDirectory", database.display().to_string()),
            ("TemporaryDirectory", temporary.display().to_string()),
            ("LogFile", log.display().to_string()),
            ("LogVerbose", "yes".to_owned()),
            ("StreamMaxLength", "64M".to_owned()),
            ("MaxThreads", "4".to_owned()),
            // No bytecode database is loaded; skipping its engine speeds the start up.
            ("Bytecode", "no".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in settings {
            match conf.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = (*value).to_owned(),
                None => conf.push(((*key).to_owned(), (*value).to_owned())),
            }
        }
        let conf_path = root.join("clamd.conf");
        let text: String = conf.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        fs::write(&conf_path, text).expect("writing clamd.conf");
        let out = fs::File::create(root.join("clamd.out")).expect("creating clamd.out");
        let err = out.try_clone().expect("cloning clamd.out");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut clamd = Clamd {
            child: Some(child),
            dir,
            socket,
            database,
            log,
        };
        clamd.wait_ready();
        clamd
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        let limits = Limits {
            connect: Duration::from_secs(1),
            total: Duration::from_secs(5),
        };
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "clamd exited at start ({status}):\n{}\n{}",
                    self.output(),
                    self.log()
                );
            }
            if self.socket.exists()
                && client::command(&self.addr(), limits, protocol::VERSION).is_ok()
            {
                return;
            }
            if started.elapsed() > START_TIMEOUT {
                self.stop();
                panic!(
                    "clamd did not answer on {} within {} s:\n{}\n{}",
                    self.socket.display(),
                    START_TIMEOUT.as_secs(),
                    self.output(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> ClamdAddr {
        ClamdAddr::Unix(self.socket.clone())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn database_dir(&self) -> &Path {
        &self.database
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// clamd's log file so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn output(&self) -> String {
        fs::read_to_string(self.dir.path().join("clamd.out")).unwrap_or_default()
    }

    /// Replaces the database files and has clamd load them. clamd reloads in the background:
    /// its `VERSION` changes once the new database is active.
    pub fn set_signatures(&self, signatures: &Signatures) {
        signatures
            .write_to(&self.database)
            .expect("writing the test signatures");
        self.reload();
    }

    /// Sends `RELOAD`; panics unless clamd answers `RELOADING`.
    pub fn reload(&self) {
        let limits = Limits {
            connect: Duration::from_secs(1),
            total: Duration::from_secs(5),
        };
        let reply = client::command(&self.addr(), limits, protocol::RELOAD)
            .unwrap_or_else(|e| panic!("RELOAD failed: {e}\n{}", self.log()));
        assert_eq!(reply.trim(), "RELOADING", "RELOAD answered {reply:?}");
    }

    /// Kills clamd (by its pid) and waits for it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The clamd binary the tests run. Panics with what to install when there is none.
pub fn clamd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("clamd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    CLAMD_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "these tests need a real clamd, which is not installed (looked in {CLAMD_PATHS:?} \
                 and PATH): install Debian's clamav-daemon (apt-get install clamav-daemon); \
                 no signature database is needed"
            )
        })
}

fn hex_of(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// An unsigned ClamAV database container (`.cud`): a 512-byte header
/// `ClamAV-VDB:<build time>:<version>:<signatures>:<functionality level>:<md5>:<dsig>:<builder>:<build time in s>`
/// followed by a tar of the database files and a `.info` file listing them. clamd loads it
/// without checking a digital signature, and takes its version as the database version when
/// the name starts with `daily`.
fn cud(version: u32, sigs: usize, files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let stime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The build time is free text but may not contain ':' (the field separator).
    let fields = |md5: &str| {
        format!("ClamAV-VDB:01 Jan 2026 00-00 +0000:{version}:{sigs}:90:{md5}:X:fleetscan:{stime}")
    };
    let mut info = fields("X");
    info.push('\n');
    for (name, data) in files {
        let _ = writeln!(info, "{name}:{}:{}", data.len(), Sha256::of(data).to_hex());
    }
    let mut entries = vec![("daily.info".to_owned(), info.into_bytes())];
    entries.extend(files.iter().cloned());
    let body = tar(&entries, stime);
    let mut header = fields(&hex_of(&Md5::digest(&body))).into_bytes();
    assert!(header.len() <= 512, "cud header too long");
    header.resize(512, b' ');
    header.extend_from_slice(&body);
    header
}

/// A minimal ustar archive of regular files.
fn tar(files: &[(String, Vec<u8>)], mtime: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut header = [0u8; 512];
        let mut put = |at: usize, value: &[u8]| header[at..at + value.len()].copy_from_slice(value);
        assert!(name.len() < 100, "tar name too long");
        put(0, name.as_bytes());
        put(100, b"0000644\0");
        put(108, b"0000000\0");
        put(116, b"0000000\0");
        put(124, format!("{:011o}\0", data.len()).as_bytes());
        put(136, format!("{mtime:011o}\0").as_bytes());
        put(148, b"        ");
        put(156, b"0");
        put(257, b"ustar\0");
        put(263, b"00");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_files() {
        let content = b"generated content";
        let files = Signatures::new()
            .eicar()
            .md5("Gen.Md5", content)
            .sha256("Gen.Sha", content)
            .files();
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "fleetscan-test.ndb",
                "fleetscan-test.hdb",
                "fleetscan-test.hsb"
            ]
        );
        let ndb = String::from_utf8(files[0].1.clone()).unwrap();
        assert!(ndb.starts_with("EICAR-Test-Sig:0:0:58354f2150"), "{ndb}");
        assert_eq!(ndb.trim_end().len(), "EICAR-Test-Sig:0:0:".len() + 68 * 2);
        let hdb = String::from_utf8(files[1].1.clone()).unwrap();
        // md5("generated content"), checked with md5sum.
        // The digest as `md5sum` prints it for "generated content".
        assert_eq!(hdb, "635d45b7bab9e88c86e5ca1b85791065:17:Gen.Md5\n");
        let hsb = String::from_utf8(files[2].1.clone()).unwrap();
        assert_eq!(
            hsb,
            format!("{}:17:Gen.Sha:73\n", Sha256::of(content).to_hex())
        );
    }

    #[test]
    fn tar_headers_carry_a_valid_checksum_and_padding() {
        let archive = tar(&[("a.ndb".into(), b"x".to_vec())], 0);
        assert_eq!(archive.len(), 512 + 512 + 1024);
        let header = &archive[..512];
        let stored =
            u32::from_str_radix(std::str::from_utf8(&header[148..154]).unwrap(), 8).unwrap();
        let sum: u32 = header
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(*b)
                }
            })
            .sum();
        assert_eq!(stored, sum);
        assert_eq!(&archive[512..513], b"x");
    }

    #[test]
    fn a_daily_container_has_a_versioned_header() {
        let files = Signatures::new().eicar().daily(27123).files();
        assert_eq!(files.len(), 1);
        let (name, data) = &files[0];
        assert_eq!(name, "daily.cud");
        let header = std::str::from_utf8(&data[..512]).unwrap().trim_end();
        let fields: Vec<_> = header.split(':').collect();
        assert_eq!(fields[0], "ClamAV-VDB");
        assert_eq!(fields[2], "27123");
        assert_eq!(fields[3], "1", "one signature");
        assert_eq!(fields[5], hex_of(&Md5::digest(&data[512..])));
        assert_eq!(&data[512..522], b"daily.info");
    }
}
