//! The clamd wire protocol, as pure functions: commands, `INSTREAM` framing and the parsing of
//! replies. No I/O here, so every reply clamd can give is tested without a daemon.
//!
//! Commands use the `z` prefix: the command ends with a NUL byte and so does clamd's reply,
//! which keeps replies unambiguous even when a threat name contains spaces.
//!
//! This module must never guess: a reply it does not recognise is an error carrying the text,
//! never a clean verdict.

use std::fmt;

/// `VERSION`: `ClamAV <engine>` or `ClamAV <engine>/<database version>/<database date>`.
pub(crate) const VERSION: &[u8] = b"zVERSION\0";
/// `INSTREAM`: chunks follow, each a 4-byte big-endian length and that many bytes, ended by a
/// zero length.
pub(crate) const INSTREAM: &[u8] = b"zINSTREAM\0";
/// `RELOAD`: clamd answers `RELOADING` and loads its database again in the background.
#[cfg(feature = "testing")]
pub(crate) const RELOAD: &[u8] = b"zRELOAD\0";

/// The longest reply accepted. clamd's replies are one short line (a threat name is well under
/// a hundred bytes); anything longer is not clamd talking, and is not buffered further.
pub(crate) const MAX_REPLY: usize = 16 * 1024;

/// The suffix clamd appends to names of signatures from databases it did not verify as
/// Cisco-Talos signed (local `.ndb`, `.hdb`, `.hsb`, `.cud`, ...).
pub const UNOFFICIAL_SUFFIX: &str = ".UNOFFICIAL";

/// The frame header of one `INSTREAM` chunk of `len` bytes.
pub(crate) fn chunk_header(len: usize) -> [u8; 4] {
    // Chunks are far below 4 GiB (see `CHUNK_SIZE` in `client`), so this never saturates.
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

/// The zero-length frame that ends an `INSTREAM`.
pub(crate) const END_OF_STREAM: [u8; 4] = [0; 4];

/// What clamd reported for `VERSION`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClamdVersion {
    /// The ClamAV version, e.g. "1.4.6".
    pub engine_version: String,
    /// The version of the loaded database, from its `daily` part (`daily.cvd`, `.cld` or
    /// `.cud`). `None` when clamd runs on local signature files only: it then prints no
    /// database version at all.
    pub database_version: Option<u32>,
    /// The build date of that database as clamd prints it, e.g. "Sun Nov 29 05:04:54 2026".
    pub database_date: Option<String>,
}

impl ClamdVersion {
    /// Parses a `VERSION` reply (without its terminator).
    pub fn parse(reply: &str) -> Result<ClamdVersion, ParseError> {
        let bad = || ParseError {
            what: "VERSION",
            reply: reply.to_owned(),
        };
        let rest = reply.trim().strip_prefix("ClamAV ").ok_or_else(bad)?;
        let mut parts = rest.splitn(3, '/');
        let engine_version = parts.next().unwrap_or("").trim();
        if engine_version.is_empty() || engine_version.contains(char::is_whitespace) {
            return Err(bad());
        }
        let (database_version, database_date) = match (parts.next(), parts.next()) {
            (None, _) => (None, None),
            (Some(db), date) => {
                let db: u32 = db.trim().parse().map_err(|_| bad())?;
                // clamd prints no database version rather than a zero one, so a zero means
                // something else is talking.
                if db == 0 {
                    return Err(bad());
                }
                let date = date.map(str::trim).filter(|d| !d.is_empty());
                (Some(db), date.map(str::to_owned))
            }
        };
        Ok(ClamdVersion {
            engine_version: engine_version.to_owned(),
            database_version,
            database_date,
        })
    }
}

impl fmt::Display for ClamdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClamAV {}", self.engine_version)?;
        if let Some(db) = self.database_version {
            write!(f, "/{db}")?;
            if let Some(date) = &self.database_date {
                write!(f, "/{date}")?;
            }
        }
        Ok(())
    }
}

/// What clamd said about one `INSTREAM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanReply {
    /// `stream: OK`.
    Clean,
    /// `stream: <name> FOUND`, with the name exactly as clamd printed it.
    Found(String),
    /// The stream went over clamd's `StreamMaxLength`: `INSTREAM size limit exceeded. ERROR`.
    SizeLimitExceeded,
    /// Any other `... ERROR`, with clamd's text (without the trailing "ERROR").
    Error(String),
}

impl ScanReply {
    /// Parses an `INSTREAM` reply (without its terminator).
    pub fn parse(reply: &str) -> Result<ScanReply, ParseError> {
        let text = reply.trim_end_matches(['\0', '\n', '\r']).trim();
        let bad = || ParseError {
            what: "INSTREAM",
            reply: reply.to_owned(),
        };
        if let Some(message) = text.strip_suffix(" ERROR").or_else(|| {
            // A bare "ERROR" carries no message; keep it recognisable.
            (text == "ERROR").then_some("")
        }) {
            let message = message.trim();
            if message.contains("size limit exceeded") {
                return Ok(ScanReply::SizeLimitExceeded);
            }
            let message = message.strip_prefix("stream:").unwrap_or(message).trim();
            return Ok(ScanReply::Error(message.to_owned()));
        }
        // Only the reply to a stream is accepted: "stream: OK" or "stream: <name> FOUND".
        let body = text.strip_prefix("stream:").ok_or_else(bad)?.trim();
        if body == "OK" {
            return Ok(ScanReply::Clean);
        }
        match body.strip_suffix(" FOUND") {
            Some(name) if !name.trim().is_empty() => Ok(ScanReply::Found(name.trim().to_owned())),
            _ => Err(bad()),
        }
    }
}

/// A reply that is not what the command's protocol allows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unexpected clamd reply to {what}: {reply:?}")]
pub struct ParseError {
    pub what: &'static str,
    pub reply: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_without_a_database_version() {
        // What clamd 1.4.6 prints on this machine with local .ndb/.hdb files only.
        let v = ClamdVersion::parse("ClamAV 1.4.6").unwrap();
        assert_eq!(v.engine_version, "1.4.6");
        assert_eq!(v.database_version, None);
        assert_eq!(v.database_date, None);
        assert_eq!(v.to_string(), "ClamAV 1.4.6");
    }

    #[test]
    fn version_with_a_daily_database() {
        let v = ClamdVersion::parse("ClamAV 1.0.7/27000/Mon Nov 27 09:28:26 2023\n").unwrap();
        assert_eq!(v.engine_version, "1.0.7");
        assert_eq!(v.database_version, Some(27000));
        assert_eq!(v.database_date.as_deref(), Some("Mon Nov 27 09:28:26 2023"));
        assert_eq!(v.to_string(), "ClamAV 1.0.7/27000/Mon Nov 27 09:28:26 2023");
        // A build date is optional; only the number matters.
        let v = ClamdVersion::parse("ClamAV 1.4.6/27123").unwrap();
        assert_eq!(v.database_version, Some(27123));
        assert_eq!(v.database_date, None);
    }

    #[test]
    fn anything_else_is_not_a_version() {
        for reply in [
            "",
            "PONG",
            "ClamAV",
            "ClamAV ",
            "clamav 1.4.6",
            "ClamAV 1.4.6/abc/date",
            "ClamAV 1.4.6/0/date",
            "ClamAV 1.4 6",
            "UNKNOWN COMMAND",
        ] {
            let err = ClamdVersion::parse(reply).unwrap_err();
            assert_eq!(err.what, "VERSION");
            assert_eq!(err.reply, reply);
        }
    }

    #[test]
    fn scan_replies() {
        assert_eq!(ScanReply::parse("stream: OK"), Ok(ScanReply::Clean));
        assert_eq!(ScanReply::parse("stream: OK\0"), Ok(ScanReply::Clean));
        assert_eq!(
            ScanReply::parse("stream: EICAR-Test-Sig.UNOFFICIAL FOUND"),
            Ok(ScanReply::Found("EICAR-Test-Sig.UNOFFICIAL".into()))
        );
        assert_eq!(
            ScanReply::parse("stream: Win.Test.EICAR_HDB-1 FOUND\n"),
            Ok(ScanReply::Found("Win.Test.EICAR_HDB-1".into()))
        );
        assert_eq!(
            ScanReply::parse("INSTREAM size limit exceeded. ERROR"),
            Ok(ScanReply::SizeLimitExceeded)
        );
        assert_eq!(
            ScanReply::parse("stream: Can't create temporary file ERROR"),
            Ok(ScanReply::Error("Can't create temporary file".into()))
        );
        assert_eq!(
            ScanReply::parse("ERROR"),
            Ok(ScanReply::Error(String::new()))
        );
    }

    #[test]
    fn unknown_scan_replies_are_errors_never_clean() {
        for reply in [
            "",
            "OK",
            "stream:",
            "stream: FOUND",
            "stream:  FOUND",
            "stream: OKAY",
            "PONG",
            "UNKNOWN COMMAND",
            "ClamAV 1.4.6",
        ] {
            let err = ScanReply::parse(reply).unwrap_err();
            assert_eq!(err.what, "INSTREAM", "{reply:?}");
        }
    }

    #[test]
    fn chunk_frames_are_big_endian_lengths() {
        assert_eq!(chunk_header(1), [0, 0, 0, 1]);
        assert_eq!(chunk_header(0x0102_0304), [1, 2, 3, 4]);
        assert_eq!(END_OF_STREAM, chunk_header(0));
    }
}
