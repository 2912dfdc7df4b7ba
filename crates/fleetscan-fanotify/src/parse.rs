//! Parsing of the byte stream `read(2)` returns from a fanotify group: event headers
//! (`fanotify_event_metadata`) and the info records that follow each header.
//!
//! This module is pure: it turns bytes into plain numbers and never owns, opens or closes a file
//! descriptor. The caller wraps every descriptor number it returns into an `OwnedFd` at once,
//! before doing anything else, so that none leaks. It must never skip over a header without
//! returning its descriptors: a descriptor the parser drops is a descriptor that leaks.

use std::mem::size_of;

/// One event as the kernel wrote it, descriptors still as raw numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawEvent {
    pub mask: u64,
    /// The event's file descriptor, or a negative value (`FAN_NOFD`).
    pub fd: i32,
    pub pid: i32,
    /// From a `FAN_EVENT_INFO_TYPE_PIDFD` record: a descriptor (>= 0), `FAN_NOPIDFD` or
    /// `FAN_EPIDFD`; `None` when the event carried no such record.
    pub pidfd: Option<i32>,
}

/// The buffer did not hold well-formed events. Events parsed before the fault are still
/// returned (their descriptors must be owned by the caller).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("fanotify metadata version {0}, expected {expected}", expected = libc::FANOTIFY_METADATA_VERSION)]
    Version(u8),
    #[error("malformed fanotify event at byte {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
}

const META_LEN: usize = size_of::<libc::fanotify_event_metadata>();
const INFO_HDR_LEN: usize = size_of::<libc::fanotify_event_info_header>();

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn i32_at(buf: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses every event in `buf` (the bytes one `read(2)` returned).
///
/// Field offsets follow `struct fanotify_event_metadata` of `<linux/fanotify.h>`:
/// `event_len: u32 @0, vers: u8 @4, reserved: u8 @5, metadata_len: u16 @6, mask: u64 @8,
/// fd: i32 @16, pid: i32 @20`, and `struct fanotify_event_info_header`:
/// `info_type: u8 @0, pad: u8 @1, len: u16 @2`.
pub(crate) fn parse_events(buf: &[u8]) -> (Vec<RawEvent>, Option<ParseError>) {
    let mut events = Vec::new();
    // The first malformed info record. Parsing goes on after it: the header's length is
    // checked on its own, and every event after it carries descriptors that must be owned and
    // a permission event that must be answered (dropping them would hang their openers).
    let mut first_fault = None;
    let mut offset = 0;
    while offset < buf.len() {
        let rest = &buf[offset..];
        if rest.len() < META_LEN {
            let fault = ParseError::Malformed {
                offset,
                what: "truncated header",
            };
            return (events, Some(first_fault.unwrap_or(fault)));
        }
        let event_len = u32_at(rest, 0) as usize;
        let vers = rest[4];
        let metadata_len = usize::from(u16_at(rest, 6));
        if vers != libc::FANOTIFY_METADATA_VERSION {
            return (
                events,
                Some(first_fault.unwrap_or(ParseError::Version(vers))),
            );
        }
        if metadata_len < META_LEN || event_len < metadata_len || event_len > rest.len() {
            let fault = ParseError::Malformed {
                offset,
                what: "bad event or metadata length",
            };
            return (events, Some(first_fault.unwrap_or(fault)));
        }
        let mut event = RawEvent {
            mask: u64_at(rest, 8),
            fd: i32_at(rest, 16),
            pid: i32_at(rest, 20),
            pidfd: None,
        };
        // Info records fill the rest of the event; each says its own length, so an unknown
        // type is skipped without being understood.
        let mut at = metadata_len;
        let mut fault = None;
        while at < event_len {
            if event_len - at < INFO_HDR_LEN {
                fault = Some("truncated info record header");
                break;
            }
            let info_type = rest[at];
            let len = usize::from(u16_at(rest, at + 2));
            if len < INFO_HDR_LEN || at + len > event_len {
                fault = Some("bad info record length");
                break;
            }
            if info_type == libc::FAN_EVENT_INFO_TYPE_PIDFD {
                if len < INFO_HDR_LEN + 4 {
                    fault = Some("short pidfd record");
                    break;
                }
                event.pidfd = Some(i32_at(rest, at + INFO_HDR_LEN));
            }
            at += len;
        }
        // The header is complete, so its descriptors are real: return them even when a record
        // is malformed, so that the caller owns (and closes) them.
        events.push(event);
        if let Some(what) = fault {
            first_fault.get_or_insert(ParseError::Malformed {
                offset: offset + at,
                what,
            });
        }
        offset += event_len;
    }
    (events, first_fault)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds the bytes of one event as the kernel lays them out.
    pub(crate) fn event_bytes(mask: u64, fd: i32, pid: i32, records: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (ty, payload) in records {
            let len = u16::try_from(INFO_HDR_LEN + payload.len()).unwrap();
            body.push(*ty);
            body.push(0);
            body.extend_from_slice(&len.to_ne_bytes());
            body.extend_from_slice(payload);
        }
        let event_len = u32::try_from(META_LEN + body.len()).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&event_len.to_ne_bytes());
        out.push(libc::FANOTIFY_METADATA_VERSION);
        out.push(0);
        out.extend_from_slice(&u16::try_from(META_LEN).unwrap().to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&fd.to_ne_bytes());
        out.extend_from_slice(&pid.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn header_layout_matches_the_kernel_struct() {
        assert_eq!(META_LEN, 24);
        assert_eq!(INFO_HDR_LEN, 4);
        assert_eq!(size_of::<libc::fanotify_event_info_pidfd>(), 8);
    }

    #[test]
    fn parses_events_with_pidfd_and_skips_unknown_records() {
        let mut buf = event_bytes(
            libc::FAN_OPEN_PERM,
            7,
            100,
            &[
                (99, vec![1, 2, 3, 4, 5, 6, 7, 8]),
                (libc::FAN_EVENT_INFO_TYPE_PIDFD, 9i32.to_ne_bytes().to_vec()),
            ],
        );
        buf.extend(event_bytes(libc::FAN_Q_OVERFLOW, libc::FAN_NOFD, 0, &[]));
        buf.extend(event_bytes(
            libc::FAN_OPEN_EXEC_PERM,
            11,
            101,
            &[(
                libc::FAN_EVENT_INFO_TYPE_PIDFD,
                libc::FAN_EPIDFD.to_ne_bytes().to_vec(),
            )],
        ));
        let (events, err) = parse_events(&buf);
        assert_eq!(err, None);
        assert_eq!(
            events,
            vec![
                RawEvent {
                    mask: libc::FAN_OPEN_PERM,
                    fd: 7,
                    pid: 100,
                    pidfd: Some(9)
                },
                RawEvent {
                    mask: libc::FAN_Q_OVERFLOW,
                    fd: libc::FAN_NOFD,
                    pid: 0,
                    pidfd: None
                },
                RawEvent {
                    mask: libc::FAN_OPEN_EXEC_PERM,
                    fd: 11,
                    pid: 101,
                    pidfd: Some(libc::FAN_EPIDFD)
                },
            ]
        );
    }

    #[test]
    fn a_bad_record_still_returns_the_descriptors_of_its_event() {
        let mut buf = event_bytes(
            libc::FAN_OPEN_PERM,
            7,
            100,
            &[(libc::FAN_EVENT_INFO_TYPE_PIDFD, 9i32.to_ne_bytes().to_vec())],
        );
        let mut bad = event_bytes(libc::FAN_OPEN_PERM, 8, 100, &[(5, vec![0; 4])]);
        // Corrupt the record length so that it runs past the event.
        bad[META_LEN + 2] = 200;
        buf.extend(bad);
        let (events, err) = parse_events(&buf);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].fd, 8);
        assert!(matches!(err, Some(ParseError::Malformed { .. })));
    }

    #[test]
    fn events_after_a_bad_record_are_still_returned() {
        let mut buf = event_bytes(libc::FAN_OPEN_PERM, 7, 100, &[(5, vec![0; 4])]);
        // The record claims to run past its event; the event's own length is sound.
        buf[META_LEN + 2] = 200;
        buf.extend(event_bytes(
            libc::FAN_OPEN_PERM,
            8,
            101,
            &[(libc::FAN_EVENT_INFO_TYPE_PIDFD, 9i32.to_ne_bytes().to_vec())],
        ));
        let (events, err) = parse_events(&buf);
        assert!(
            matches!(err, Some(ParseError::Malformed { offset, .. }) if offset == META_LEN),
            "{err:?}"
        );
        assert_eq!(
            events.len(),
            2,
            "the event after the bad one is not dropped"
        );
        assert_eq!((events[0].fd, events[0].pidfd), (7, None));
        assert_eq!((events[1].fd, events[1].pidfd), (8, Some(9)));
    }

    #[test]
    fn zero_length_record_does_not_loop() {
        let mut buf = event_bytes(libc::FAN_OPEN_PERM, 7, 1, &[(5, vec![0; 4])]);
        buf[META_LEN + 2] = 0;
        buf[META_LEN + 3] = 0;
        let (events, err) = parse_events(&buf);
        assert_eq!(events.len(), 1);
        assert!(err.is_some());
    }

    #[test]
    fn truncated_and_wrong_version_are_errors() {
        let buf = event_bytes(libc::FAN_OPEN_PERM, 7, 1, &[]);
        let (events, err) = parse_events(&buf[..10]);
        assert!(events.is_empty());
        assert!(err.is_some());
        let mut v = buf.clone();
        v[4] = 2;
        assert_eq!(parse_events(&v).1, Some(ParseError::Version(2)));
        let mut long = buf;
        long[0] = 200;
        assert!(parse_events(&long).1.is_some());
    }
}
