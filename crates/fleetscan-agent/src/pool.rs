//! The hashing pool: a fixed number of OS threads that take pending events, read their content
//! through the event's descriptor (`pread`, never by path), hash it and send the access request
//! to the broker.
//!
//! Its queue is bounded; the reader's `submit` never blocks, and a full queue makes the reader
//! answer with the fail mode at once. A hung read only ties up its own thread: the deadline
//! thread answers the event regardless.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use fleetscan_core::{Sha256, Sha256Hasher};
use fleetscan_proto::{CHUNK_SIZE, convert, v1};
use parking_lot::Mutex;
use tracing::debug;

use crate::pending::AssignError;
use crate::state::{ReportCtx, Shared, bump};

/// The submitting side; dropping it ends the threads once the queue is empty.
#[derive(Debug)]
pub(crate) struct HashPool {
    tx: SyncSender<u64>,
}

impl HashPool {
    /// Queues a pending event; false when the queue is full.
    pub fn submit(&self, id: u64) -> bool {
        match self.tx.try_send(id) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

pub(crate) fn start(
    shared: &Arc<Shared>,
    threads: usize,
    capacity: usize,
) -> io::Result<(HashPool, Vec<JoinHandle<()>>)> {
    let (tx, rx) = sync_channel(capacity.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::new();
    for i in 0..threads.max(1) {
        let (shared, rx) = (shared.clone(), rx.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("fleetscan-hash-{i}"))
                .spawn(move || worker(&shared, &rx))?,
        );
    }
    Ok((HashPool { tx }, handles))
}

fn worker(shared: &Shared, rx: &Mutex<Receiver<u64>>) {
    loop {
        let next = rx.lock().recv();
        let Ok(id) = next else { return };
        process(shared, id);
    }
}

/// Positioned reads, so that tests can stand in a failing file.
pub(crate) trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

/// Why content could not be hashed.
#[derive(Debug)]
pub(crate) enum HashError {
    /// More than the limit: the size seen so far.
    TooLarge(u64),
    Io(io::Error),
}

/// Hashes the content from offset 0 to its end, reading at most `limit` bytes (one more byte
/// proves it too large).
pub(crate) fn hash_content(r: &impl ReadAt, limit: u64) -> Result<(Sha256, u64), HashError> {
    let mut h = Sha256Hasher::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut offset = 0u64;
    loop {
        let n = match r.read_at(&mut buf, offset) {
            Ok(0) => return Ok((h.finish(), offset)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HashError::Io(e)),
        };
        offset += n as u64;
        if offset > limit {
            return Err(HashError::TooLarge(offset));
        }
        h.update(&buf[..n]);
    }
}

fn process(shared: &Shared, id: u64) {
    let Some((file, key, pid)) = shared
        .pending
        .with(id, |ev| (ev.file.clone(), ev.key, ev.pid))
    else {
        return; // Answered meanwhile (deadline).
    };
    let policy = shared.policy();
    let oversize = |size: u64| {
        if let Some(ev) = shared.pending.take(id) {
            bump(&shared.counters.oversize);
            let outcome = policy.oversize(size);
            let ctx = ReportCtx {
                path: &ev.path,
                kind: Some(ev.kind),
                pid: ev.pid,
                pidfd: ev.pidfd.as_deref(),
                ..Default::default()
            };
            shared.conclude(&ev.file, &outcome, v1::LocalReason::Oversize, ctx, true);
        }
    };
    if key.size > policy.max_file_size {
        oversize(key.size);
        return;
    }
    let pidfd = shared.pending.with(id, |ev| ev.pidfd.clone()).flatten();
    let subject = crate::subject::resolve(pid, pidfd.as_deref());
    let (sha256, len) = match hash_content(file.as_ref(), policy.max_file_size) {
        Ok(r) => r,
        Err(HashError::TooLarge(size)) => {
            oversize(size);
            return;
        }
        Err(HashError::Io(e)) => {
            if let Some(mut ev) = shared.pending.take(id) {
                bump(&shared.counters.unreadable);
                ev.subject = Some(subject);
                shared.fail_pending(ev, &format!("unreadable: {e}"), v1::LocalReason::Unreadable);
            }
            return;
        }
    };
    let Some(link) = shared.current_session() else {
        if let Some(mut ev) = shared.pending.take(id) {
            bump(&shared.counters.no_broker);
            ev.sha256 = Some(sha256);
            ev.subject = Some(subject);
            shared.fail_pending(ev, "no broker connected", v1::LocalReason::NoBroker);
        }
        return;
    };
    let request = shared.pending.with(id, |ev| {
        ev.sha256 = Some(sha256);
        ev.hashed_len = len;
        ev.subject = Some(subject.clone());
        v1::AccessRequest {
            request_id: id,
            file: Some(v1::FileIdentity {
                dev: ev.key.dev,
                ino: ev.key.ino,
                ctime_sec: ev.key.ctime_sec,
                ctime_nsec: ev.key.ctime_nsec,
                size: ev.key.size,
            }),
            sha256: sha256.to_hex(),
            size: len,
            subject: Some(subject),
            path: ev.path.clone(),
            host_path: String::new(),
            kind: convert::access_kind_to_proto(ev.kind).into(),
            deadline_ms: u32::try_from(
                ev.deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis(),
            )
            .unwrap_or(u32::MAX),
        }
    });
    let Some(request) = request else { return };
    match shared.pending.assign(id, link.epoch, &link.alive) {
        Ok(()) => {}
        Err(AssignError::Gone) => return,
        Err(AssignError::SessionDead) => {
            if let Some(ev) = shared.pending.take(id) {
                bump(&shared.counters.no_broker);
                shared.fail_pending(ev, "broker session lost", v1::LocalReason::NoBroker);
            }
            return;
        }
    }
    let msg = v1::AgentMessage {
        msg: Some(v1::agent_message::Msg::Access(request)),
    };
    if link.tx.try_send(msg).is_err() {
        // The session's queue is full or closed: no answer can come in time.
        if let Some(ev) = shared.pending.take(id) {
            bump(&shared.counters.overloaded);
            shared.fail_pending(ev, "broker queue full", v1::LocalReason::Deadline);
        }
        return;
    }
    bump(&shared.counters.requests_sent);
    debug!(id, sha256 = %sha256, size = len, "access request sent");
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl ReadAt for Mem {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let off = usize::try_from(offset).unwrap().min(self.0.len());
            // Short reads on purpose, to exercise the loop.
            let n = (self.0.len() - off).min(buf.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[off..off + n]);
            Ok(n)
        }
    }

    struct Broken;
    impl ReadAt for Broken {
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(5))
        }
    }

    #[test]
    fn hashes_across_short_reads() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let (sha, len) = hash_content(&Mem(data.clone()), 10_000).unwrap();
        assert_eq!((sha, len), (Sha256::of(&data), 5000));
    }

    #[test]
    fn too_large_and_unreadable_are_told_apart() {
        assert!(matches!(
            hash_content(&Mem(vec![0; 5000]), 4999),
            Err(HashError::TooLarge(_))
        ));
        assert!(matches!(hash_content(&Broken, 10), Err(HashError::Io(_))));
    }

    #[test]
    fn unreadable_takes_the_failure_outcome_of_the_policy() {
        // What `process` applies for a read error: the fail mode, never cacheable.
        let closed = fleetscan_core::Policy {
            fail_mode: fleetscan_core::FailMode::Closed,
            ..Default::default()
        };
        let o = closed.on_failure("unreadable: Input/output error");
        assert_eq!(o.action, fleetscan_core::Action::Deny);
        assert!(!o.cacheable);
    }
}
