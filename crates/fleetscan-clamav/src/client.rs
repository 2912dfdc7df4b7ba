//! A blocking clamd client: one connection per command, every step bounded by a deadline.
//!
//! One connection per command keeps a scan independent of every other (clamd handles each on
//! a thread of its own) and leaves no idle connection for clamd's `IdleTimeout` to cut. On a
//! unix socket a connection costs a few microseconds next to a scan.
//!
//! This module must never block without a bound: a connect waits at most its connect timeout,
//! and every read and write is cut at the command's deadline, so a hung clamd costs a caller
//! its timeout and nothing more. It never reads more than `MAX_REPLY` bytes of a reply.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::protocol::{self, END_OF_STREAM, MAX_REPLY, ParseError};

/// How `INSTREAM` content is cut. clamd accepts any chunk size up to its `StreamMaxLength`;
/// 256 KiB keeps the syscalls few and the copy buffer small.
const CHUNK_SIZE: usize = 256 * 1024;

/// Between two tries of a unix-socket connect whose listen queue is full.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// Where clamd listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClamdAddr {
    /// clamd's `LocalSocket`, e.g. `/run/clamav/clamd.ctl` on Debian.
    Unix(PathBuf),
    /// clamd's `TCPSocket`/`TCPAddr` as `host:port`, e.g. `127.0.0.1:3310`. clamd's TCP socket
    /// has neither authentication nor encryption: keep it on loopback or a private link.
    Tcp(String),
}

impl FromStr for ClamdAddr {
    type Err = ClamdError;

    /// `unix:PATH` or `tcp:HOST:PORT` say which; otherwise anything with a `/` is a socket
    /// path, `HOST:PORT` with a numeric port is TCP, and any other word is a socket path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| ClamdError::Address {
            addr: s.to_owned(),
            reason: why.to_owned(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(invalid("no socket path after unix:"));
            }
            return Ok(ClamdAddr::Unix(PathBuf::from(path)));
        }
        let tcp = s.strip_prefix("tcp://").or_else(|| s.strip_prefix("tcp:"));
        if tcp.is_none() && s.contains('/') {
            return Ok(ClamdAddr::Unix(PathBuf::from(s)));
        }
        let host_port = tcp.unwrap_or(s);
        match host_port.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ClamdAddr::Tcp(host_port.to_owned()))
            }
            _ if tcp.is_some() => Err(invalid("expected tcp:HOST:PORT")),
            _ => Ok(ClamdAddr::Unix(PathBuf::from(s))),
        }
    }
}

impl fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClamdAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ClamdAddr::Tcp(host_port) => write!(f, "tcp:{host_port}"),
        }
    }
}

/// Why a command to clamd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClamdError {
    #[error("invalid clamd address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to clamd at {addr}: {source}")]
    Connect {
        addr: ClamdAddr,
        #[source]
        source: io::Error,
    },
    #[error("clamd at {addr} did not {step} within {} ms", .after.as_millis())]
    Timeout {
        addr: ClamdAddr,
        step: &'static str,
        after: Duration,
    },
    #[error("i/o error with clamd at {addr} while {step}: {source}")]
    Io {
        addr: ClamdAddr,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("clamd at {addr} closed the connection without a reply")]
    NoReply { addr: ClamdAddr },
    #[error("clamd at {addr} sent a reply longer than {MAX_REPLY} bytes")]
    ReplyTooLong { addr: ClamdAddr },
    #[error(transparent)]
    Reply(#[from] ParseError),
}

impl ClamdError {
    /// Whether another try, later or on another worker, may succeed: true for a clamd that is
    /// down, restarting, overloaded or slow; false for replies this client does not understand
    /// (the same clamd will say the same again) and for a bad address.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClamdError::Connect { .. }
            | ClamdError::Timeout { .. }
            | ClamdError::Io { .. }
            | ClamdError::NoReply { .. } => true,
            ClamdError::Address { .. } | ClamdError::ReplyTooLong { .. } | ClamdError::Reply(_) => {
                false
            }
        }
    }
}

/// The timeouts of one command.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// For the connect alone (within the command's deadline).
    pub(crate) connect: Duration,
    /// For the whole command: connect, send, clamd's work, reply.
    pub(crate) total: Duration,
}

/// One connection to clamd, either kind.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
}

/// One command in progress: its connection and its deadline.
struct Exchange<'a> {
    addr: &'a ClamdAddr,
    stream: Stream,
    started: Instant,
    deadline: Instant,
}

impl<'a> Exchange<'a> {
    fn open(addr: &'a ClamdAddr, limits: Limits) -> Result<Exchange<'a>, ClamdError> {
        let started = Instant::now();
        let deadline = started + limits.total;
        let connect_by = (started + limits.connect).min(deadline);
        let stream = match addr {
            ClamdAddr::Unix(path) => Stream::Unix(connect_unix(addr, path, connect_by)?),
            ClamdAddr::Tcp(host_port) => Stream::Tcp(connect_tcp(addr, host_port, connect_by)?),
        };
        Ok(Exchange {
            addr,
            stream,
            started,
            deadline,
        })
    }

    /// What is left of the deadline, or the timeout error of `step` when nothing is.
    fn remaining(&self, step: &'static str) -> Result<Duration, ClamdError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout(step));
        }
        Ok(left)
    }

    fn timeout(&self, step: &'static str) -> ClamdError {
        ClamdError::Timeout {
            addr: self.addr.clone(),
            step,
            after: self.started.elapsed(),
        }
    }

    fn io_error(&self, step: &'static str, source: io::Error) -> ClamdError {
        if is_timeout(&source) {
            return self.timeout(step);
        }
        ClamdError::Io {
            addr: self.addr.clone(),
            step,
            source,
        }
    }

    /// Writes all of `buf` before the deadline. Each write waits at most what is left, so
    /// the deadline holds however slowly clamd reads.
    fn send(&mut self, mut buf: &[u8], step: &'static str) -> Result<(), Sent> {
        while !buf.is_empty() {
            let left = self.remaining(step).map_err(Sent::Failed)?;
            self.stream
                .set_write_timeout(left)
                .map_err(|e| Sent::Failed(self.io_error(step, e)))?;
            match self.stream.write(buf) {
                Ok(0) => return Err(Sent::PeerClosed),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if peer_closed(&e) => return Err(Sent::PeerClosed),
                Err(e) => return Err(Sent::Failed(self.io_error(step, e))),
            }
        }
        Ok(())
    }

    /// Reads one reply: up to its NUL terminator, or to the end of the connection.
    fn reply(&mut self) -> Result<String, ClamdError> {
        let mut reply = Vec::with_capacity(128);
        let mut buf = [0u8; 1024];
        loop {
            let left = self.remaining("reply")?;
            self.stream
                .set_read_timeout(left)
                .map_err(|e| self.io_error("reading the reply", e))?;
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if let Some(end) = reply.iter().position(|b| *b == 0) {
                        reply.truncate(end);
                        break;
                    }
                    if reply.len() > MAX_REPLY {
                        return Err(ClamdError::ReplyTooLong {
                            addr: self.addr.clone(),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if peer_closed(&e) => break,
                Err(e) => return Err(self.io_error("reading the reply", e)),
            }
        }
        if reply.is_empty() {
            return Err(ClamdError::NoReply {
                addr: self.addr.clone(),
            });
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }
}

/// How sending ended early.
enum Sent {
    /// clamd closed its side; it may have said why before closing.
    PeerClosed,
    Failed(ClamdError),
}

/// Sends a command without payload (`VERSION`, `RELOAD`, ...) and returns the reply.
pub(crate) fn command(
    addr: &ClamdAddr,
    limits: Limits,
    command: &'static [u8],
) -> Result<String, ClamdError> {
    let mut exchange = Exchange::open(addr, limits)?;
    match exchange.send(command, "taking the command") {
        Ok(()) | Err(Sent::PeerClosed) => {}
        Err(Sent::Failed(e)) => return Err(e),
    }
    exchange.reply()
}

/// Streams `content` with `INSTREAM` and returns clamd's reply.
pub(crate) fn instream(
    addr: &ClamdAddr,
    limits: Limits,
    content: &[u8],
) -> Result<String, ClamdError> {
    let mut exchange = Exchange::open(addr, limits)?;
    match stream_content(&mut exchange, content) {
        // Either all was sent, or clamd stopped reading and closed: then it usually said why
        // first ("INSTREAM size limit exceeded. ERROR"), and that reply is still readable.
        Ok(()) | Err(Sent::PeerClosed) => exchange.reply(),
        Err(Sent::Failed(e)) => Err(e),
    }
}

fn stream_content(exchange: &mut Exchange<'_>, content: &[u8]) -> Result<(), Sent> {
    exchange.send(protocol::INSTREAM, "taking the command")?;
    // Header and data in one buffer: one write per chunk instead of two.
    let mut frame = Vec::with_capacity(CHUNK_SIZE.min(content.len()) + 4);
    for chunk in content.chunks(CHUNK_SIZE) {
        frame.clear();
        frame.extend_from_slice(&protocol::chunk_header(chunk.len()));
        frame.extend_from_slice(chunk);
        exchange.send(&frame, "taking the content")?;
    }
    exchange.send(&END_OF_STREAM, "taking the content")
}

/// A unix-socket connect bounded by `by`. A connect to a listening unix socket is immediate
/// unless clamd's listen queue is full (clamd not accepting: hung or overloaded), when a
/// blocking connect would wait without bound; so it is made non-blocking and retried.
fn connect_unix(
    addr: &ClamdAddr,
    path: &std::path::Path,
    by: Instant,
) -> Result<UnixStream, ClamdError> {
    let failed = |source: io::Error| ClamdError::Connect {
        addr: addr.clone(),
        source,
    };
    let started = Instant::now();
    let sockaddr = SockAddr::unix(path).map_err(failed)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    loop {
        match socket.connect(&sockaddr) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= by {
                    return Err(ClamdError::Timeout {
                        addr: addr.clone(),
                        step: "accept the connection",
                        after: started.elapsed(),
                    });
                }
                std::thread::sleep(CONNECT_RETRY.min(by - now));
            }
            Err(e) => return Err(failed(e)),
        }
    }
    socket.set_nonblocking(false).map_err(failed)?;
    Ok(UnixStream::from(socket))
}

fn connect_tcp(addr: &ClamdAddr, host_port: &str, by: Instant) -> Result<TcpStream, ClamdError> {
    let started = Instant::now();
    let failed = |source: io::Error| ClamdError::Connect {
        addr: addr.clone(),
        source,
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for sockaddr in host_port.to_socket_addrs().map_err(failed)? {
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClamdError::Timeout {
                addr: addr.clone(),
                step: "accept the connection",
                after: started.elapsed(),
            });
        }
        match TcpStream::connect_timeout(&sockaddr, left) {
            Ok(stream) => {
                // Small frames (the command, the end-of-stream marker) go out at once.
                stream.set_nodelay(true).map_err(failed)?;
                return Ok(stream);
            }
            Err(e) if is_timeout(&e) => {
                return Err(ClamdError::Timeout {
                    addr: addr.clone(),
                    step: "accept the connection",
                    after: started.elapsed(),
                });
            }
            Err(e) => last = e,
        }
    }
    Err(failed(last))
}

/// Socket timeouts surface as `WouldBlock` (EAGAIN) on Linux, `TimedOut` elsewhere.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let unix = |p: &str| ClamdAddr::Unix(PathBuf::from(p));
        let tcp = |a: &str| ClamdAddr::Tcp(a.to_owned());
        for (text, addr) in [
            ("/run/clamav/clamd.ctl", unix("/run/clamav/clamd.ctl")),
            ("unix:/tmp/c.sock", unix("/tmp/c.sock")),
            ("unix:///tmp/c.sock", unix("/tmp/c.sock")),
            ("unix:clamd.sock", unix("clamd.sock")),
            ("./clamd.sock", unix("./clamd.sock")),
            ("clamd.sock", unix("clamd.sock")),
            ("127.0.0.1:3310", tcp("127.0.0.1:3310")),
            ("localhost:3310", tcp("localhost:3310")),
            ("tcp:127.0.0.1:3310", tcp("127.0.0.1:3310")),
            ("tcp://[::1]:3310", tcp("[::1]:3310")),
        ] {
            assert_eq!(text.parse::<ClamdAddr>().unwrap(), addr, "{text}");
        }
        for bad in [
            "",
            "  ",
            "unix:",
            "tcp:localhost",
            "tcp::3310",
            "tcp:host:99999",
        ] {
            assert!(bad.parse::<ClamdAddr>().is_err(), "{bad:?}");
        }
        assert_eq!(unix("/a/b").to_string(), "unix:/a/b");
        assert_eq!(tcp("127.0.0.1:1").to_string(), "tcp:127.0.0.1:1");
        // What Display prints parses back to the same address.
        for addr in [unix("/a/b"), tcp("127.0.0.1:1")] {
            assert_eq!(addr.to_string().parse::<ClamdAddr>().unwrap(), addr);
        }
    }

    #[test]
    fn retryable_errors() {
        let addr = ClamdAddr::Tcp("127.0.0.1:1".into());
        let retryable = ClamdError::Connect {
            addr: addr.clone(),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(retryable.is_retryable());
        assert!(ClamdError::NoReply { addr: addr.clone() }.is_retryable());
        let parse = ClamdError::Reply(ParseError {
            what: "INSTREAM",
            reply: "??".into(),
        });
        assert!(!parse.is_retryable());
        assert!(!ClamdError::ReplyTooLong { addr }.is_retryable());
    }
}
