//! The scanner against a fake clamd on loopback: the misbehaviours a real clamd shows only
//! under load or breakage (no reply, a hang, garbage, a full listen queue), and the TCP path.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetscan_clamav::{ClamdAddr, ClamdError, ClamdOptions, ClamdScanner};
use fleetscan_core::VerdictKind;
use fleetscan_worker::{ScanOutcome, Scanner};

const VERSION_REPLY: &[u8] = b"ClamAV 1.0.7/27000/Mon Nov 27 09:28:26 2023\0";

/// What the fake does once it has read a command (and, for INSTREAM, the whole stream).
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers like clamd: the version, or "stream: OK".
    Normal,
    /// Answers the version, then hangs on every INSTREAM without a reply.
    HangOnScan,
    /// Answers the version, then sends garbage for every INSTREAM.
    GarbageOnScan,
    /// Answers the version, then closes every INSTREAM connection without a word.
    CloseOnScan,
}

struct Fake {
    addr: String,
    streamed: Arc<AtomicUsize>,
}

/// Reads up to and including the NUL that ends a z-command.
fn read_command(conn: &mut TcpStream) -> Option<String> {
    let mut command = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte) {
            Ok(1) if byte[0] == 0 => return Some(String::from_utf8_lossy(&command).into()),
            Ok(1) => command.push(byte[0]),
            _ => return None,
        }
    }
}

/// Reads INSTREAM chunks to the zero-length one; returns the bytes streamed.
fn read_stream(conn: &mut TcpStream) -> Option<usize> {
    let mut total = 0;
    loop {
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).ok()?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            return Some(total);
        }
        let mut chunk = vec![0u8; len];
        conn.read_exact(&mut chunk).ok()?;
        total += len;
    }
}

fn fake(behaviour: Behaviour) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let streamed = Arc::new(AtomicUsize::new(0));
    let counter = streamed.clone();
    // The thread ends with the test process; each connection gets a thread of its own so a
    // hung one does not stop the others.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let Some(command) = read_command(&mut conn) else {
                    return;
                };
                match command.as_str() {
                    "zVERSION" => {
                        let _ = conn.write_all(VERSION_REPLY);
                    }
                    "zINSTREAM" => {
                        let Some(n) = read_stream(&mut conn) else {
                            return;
                        };
                        counter.fetch_add(n, Ordering::SeqCst);
                        match behaviour {
                            Behaviour::Normal => {
                                let _ = conn.write_all(b"stream: OK\0");
                            }
                            Behaviour::HangOnScan => std::thread::sleep(Duration::from_secs(60)),
                            Behaviour::GarbageOnScan => {
                                let _ = conn.write_all(b"HELLO THERE\0");
                            }
                            Behaviour::CloseOnScan => {}
                        }
                    }
                    _ => {
                        let _ = conn.write_all(b"UNKNOWN COMMAND\0");
                    }
                }
            });
        }
    });
    Fake { addr, streamed }
}

fn options(scan_timeout: Duration) -> ClamdOptions {
    ClamdOptions {
        connect_timeout: Duration::from_millis(500),
        scan_timeout,
        ..ClamdOptions::default()
    }
}

fn connect(fake: &Fake, scan_timeout: Duration) -> ClamdScanner {
    ClamdScanner::connect_with(
        ClamdAddr::Tcp(fake.addr.clone()),
        "clamav-fake",
        options(scan_timeout),
    )
    .expect("connecting to the fake clamd")
}

#[test]
fn tcp_connect_reads_the_database_version() {
    let fake = fake(Behaviour::Normal);
    let scanner = connect(&fake, Duration::from_secs(5));
    let id = scanner.identity();
    assert_eq!(id.engine, "clamav");
    assert_eq!(id.engine_version, "1.0.7");
    assert_eq!(id.ruleset_version, "27000");
    assert_eq!(scanner.scan(&vec![7u8; 600_000]), ScanOutcome::clean());
    assert_eq!(fake.streamed.load(Ordering::SeqCst), 600_000);
    // The address parses from what an operator types.
    let parsed: ClamdAddr = format!("tcp:{}", fake.addr).parse().unwrap();
    assert_eq!(parsed, ClamdAddr::Tcp(fake.addr.clone()));
}

#[test]
fn a_hung_clamd_costs_the_scan_timeout_and_a_retryable_error() {
    let fake = fake(Behaviour::HangOnScan);
    let timeout = Duration::from_millis(400);
    let scanner = connect(&fake, timeout);
    let started = Instant::now();
    let outcome = scanner.scan(b"anything");
    let took = started.elapsed();
    assert_eq!(outcome.kind, VerdictKind::Error, "{outcome:?}");
    assert!(outcome.retryable);
    assert!(
        outcome.detail.as_deref().unwrap().contains("within"),
        "{outcome:?}"
    );
    assert!(took >= timeout, "gave up after {took:?}");
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
}

#[test]
fn a_reply_that_is_not_clamd_is_an_error_never_clean() {
    let fake = fake(Behaviour::GarbageOnScan);
    let scanner = connect(&fake, Duration::from_secs(5));
    let outcome = scanner.scan(b"anything");
    assert_eq!(outcome.kind, VerdictKind::Error, "{outcome:?}");
    assert!(!outcome.retryable, "the same clamd would say the same");
    assert!(
        outcome.detail.as_deref().unwrap().contains("HELLO THERE"),
        "{outcome:?}"
    );
}

#[test]
fn a_connection_closed_without_a_reply_is_retryable() {
    let fake = fake(Behaviour::CloseOnScan);
    let scanner = connect(&fake, Duration::from_secs(5));
    let outcome = scanner.scan(b"anything");
    assert_eq!(outcome.kind, VerdictKind::Error, "{outcome:?}");
    assert!(outcome.retryable);
}

#[test]
fn something_that_is_not_clamd_is_refused_at_connect() {
    // An HTTP-ish server: answers anything with text that is not a clamd version.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = read_command(&mut conn);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let err = match ClamdScanner::connect(ClamdAddr::Tcp(addr), "x") {
        Err(err) => err,
        Ok(_) => panic!("accepted a server that is not clamd"),
    };
    assert!(matches!(err, ClamdError::Reply(_)), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn a_clamd_that_stops_accepting_costs_the_connect_timeout() {
    // A unix socket whose listen queue is full: nothing accepts, so a blocking connect would
    // wait for ever.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    let listener =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&socket2::SockAddr::unix(&path).unwrap())
        .unwrap();
    listener.listen(0).unwrap();
    let mut queued = Vec::new();
    for _ in 0..64 {
        let client =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&socket2::SockAddr::unix(&path).unwrap()) {
            Ok(()) => queued.push(client),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the listen queue: {e}"),
        }
    }
    assert!(queued.len() < 64, "the listen queue never filled");
    let started = Instant::now();
    let err = match ClamdScanner::connect_with(
        ClamdAddr::Unix(path),
        "x",
        ClamdOptions {
            connect_timeout: Duration::from_millis(300),
            ..ClamdOptions::default()
        },
    ) {
        Err(err) => err,
        Ok(_) => panic!("connected through a full listen queue"),
    };
    let took = started.elapsed();
    assert!(matches!(err, ClamdError::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
