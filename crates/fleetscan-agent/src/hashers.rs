//! The hashing threads: a fixed number of OS threads that take waiting accesses from the
//! reader, read their content through the event's descriptor (`pread`, never by path), hash
//! it, work out the paths and the process, and hand the access with what they hashed to the
//! broker session.
//!
//! Content is hashed under a read lease (see [`fleetscan_fanotify::ReadLease`]) and its
//! identity (dev, inode, ctime, mtime, size) taken with the lease held. A write updates the
//! ctime when it starts and copies the data after, so an identity taken without the lease can
//! already name the new version while the read still sees the old bytes: a verdict on those
//! bytes, cached under that identity (or turned into an ignore mark after the write's modify
//! event went by) would let the new content through unscanned. When the lease cannot be had
//! (someone has the file open for writing) the verdict answers this access only: it is never
//! cached nor turned into an ignore mark.
//!
//! Each thread reads with one buffer of [`HASH_READ`] bytes, allocated once: large reads keep
//! the system-call cost small next to SHA-256 itself. Their queue is bounded; the reader's
//! `submit` never blocks, and a full queue makes the reader answer with the fail mode at once.
//! A hung read only ties up its own thread: the deadline thread answers the access regardless.
//! These threads never wait on the broker: the hand-off to the session never blocks either.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use fleetscan_core::{Sha256, Sha256Hasher};
use fleetscan_fanotify::{LeaseOutcome, ReadLease};
use parking_lot::Mutex;
use tracing::debug;

use crate::access::{self, Access, Failure, Hashed};
use crate::cache::FileKey;
use crate::interceptor::Interceptor;
use crate::paths;
use crate::session::{SessionSlot, Unsent};
use crate::stats::bump;

/// The submitting side; dropping it ends the threads once the queue is empty.
#[derive(Debug)]
pub(crate) struct Hashers {
    tx: SyncSender<Arc<Access>>,
}

impl Hashers {
    /// Queues a waiting access; gives it back when the queue is full.
    pub fn submit(&self, access: Arc<Access>) -> Result<(), Arc<Access>> {
        match self.tx.try_send(access) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => Err(a),
        }
    }
}

/// Starts `threads` hashing threads with a queue of `capacity` accesses.
pub(crate) fn start(
    ic: &Arc<Interceptor>,
    session: &Arc<SessionSlot>,
    threads: usize,
    capacity: usize,
) -> io::Result<(Hashers, Vec<JoinHandle<()>>)> {
    let (tx, rx) = sync_channel(capacity.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::new();
    for i in 0..threads.max(1) {
        let (ic, session, rx) = (ic.clone(), session.clone(), rx.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("fleetscan-hash-{i}"))
                .spawn(move || hasher(&ic, &session, &rx))?,
        );
    }
    Ok((Hashers { tx }, handles))
}

/// Bytes per `pread` while hashing, in one buffer per thread.
pub(crate) const HASH_READ: usize = 1024 * 1024;

fn hasher(ic: &Interceptor, session: &SessionSlot, rx: &Mutex<Receiver<Arc<Access>>>) {
    let mut buf = vec![0u8; HASH_READ];
    loop {
        let next = rx.lock().recv();
        let Ok(access) = next else { return };
        process(ic, session, &access, &mut buf);
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
/// proves it too large), `buf.len()` bytes at a time; `after_read` runs after every read.
pub(crate) fn hash_content(
    r: &impl ReadAt,
    limit: u64,
    buf: &mut [u8],
    mut after_read: impl FnMut(),
) -> Result<(Sha256, u64), HashError> {
    let mut h = Sha256Hasher::new();
    let mut offset = 0u64;
    loop {
        let n = match r.read_at(buf, offset) {
            Ok(0) => return Ok((h.finish(), offset)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HashError::Io(e)),
        };
        after_read();
        offset += n as u64;
        if offset > limit {
            return Err(HashError::TooLarge(offset));
        }
        h.update(&buf[..n]);
    }
}

/// Hashes `file` and says which version of it was hashed.
pub(crate) fn hash_version(file: &File, limit: u64, buf: &mut [u8]) -> Result<Hashed, HashError> {
    let mut lease = ReadLease::try_acquire(file.as_fd());
    // Taken with the lease held: no write is under way now, and none can start (an open for
    // writing waits for the lease) until it is dropped below.
    let before = fleetscan_fanotify::statx_fd(file.as_fd()).map_err(HashError::Io)?;
    let (sha256, len) = hash_content(file, limit, buf, || {
        // A writer is waiting for the lease: let it go now rather than after the whole hash
        // (it would wait for us up to the kernel's lease-break-time). The content may change
        // from here on, so the result will answer this access only.
        if matches!(&lease, LeaseOutcome::Held(l) if !l.intact()) {
            lease = LeaseOutcome::Writers;
        }
    })?;
    let stable = match &lease {
        // Held throughout: nothing can have changed since `before`.
        LeaseOutcome::Held(_) => len == before.size,
        LeaseOutcome::Writers => false,
        // No leases on this filesystem: only the identity before and after the read vouches
        // for it, which misses a same-size write that started before the first statx.
        LeaseOutcome::Unsupported(e) => {
            debug!(error = %e, "read lease unsupported, hashing without");
            let after = fleetscan_fanotify::statx_fd(file.as_fd()).map_err(HashError::Io)?;
            FileKey::from(&after) == FileKey::from(&before) && len == before.size
        }
    };
    drop(lease);
    Ok(Hashed {
        sha256,
        len,
        key: FileKey::from(&before),
        stable,
    })
}

fn process(ic: &Interceptor, session: &SessionSlot, access: &Arc<Access>, buf: &mut [u8]) {
    let Some(lent) = access.borrow() else {
        return; // Answered meanwhile (deadline).
    };
    let policy = &access.scope.policy;
    if access.key.size > policy.max_file_size {
        access::oversize(ic, access, access.key.size);
        return;
    }
    // The opener's view of the path, and the host's.
    let paths = paths::resolve(
        lent.file.as_fd(),
        Path::new(&lent.path),
        access.pid,
        lent.pidfd.as_deref(),
    );
    // Path exclusions are judged on the path as the opening process sees it, before the
    // process is looked at in /proc: an excluded access needs nothing more.
    if let Some(why) = access.scope.skip_path(&paths.path) {
        access::skip(ic, access, &why);
        return;
    }
    let subject = lent
        .subject
        .unwrap_or_else(|| ic.subject(access.pid, lent.pidfd.as_deref()));
    access.resolved(&paths, &subject);
    let hashed = match hash_version(&lent.file, policy.max_file_size, buf) {
        Ok(h) => h,
        Err(HashError::TooLarge(size)) => {
            access::oversize(ic, access, size);
            return;
        }
        Err(HashError::Io(e)) => {
            access::fail(ic, access, Failure::Unreadable(e));
            return;
        }
    };
    if !access.hashed(hashed.sha256) {
        return; // Answered meanwhile.
    }
    let Some(link) = session.current() else {
        access::fail(ic, access, Failure::NoBroker);
        return;
    };
    match link.send(access, hashed, paths, subject) {
        Ok(id) => {
            bump(&ic.counters.requests_sent);
            debug!(id, sha256 = %hashed.sha256, size = hashed.len, "access request sent");
        }
        Err(Unsent::SessionLost) => {
            access::fail(ic, access, Failure::SessionLost);
        }
        // The session's queue is full or closed: no answer can come in time.
        Err(Unsent::QueueFull) => {
            access::fail(ic, access, Failure::BrokerQueueFull);
        }
    }
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
        let mut buf = vec![0u8; 4096];
        let (sha, len) = hash_content(&Mem(data.clone()), 10_000, &mut buf, || {}).unwrap();
        assert_eq!((sha, len), (Sha256::of(&data), 5000));
    }

    #[test]
    fn too_large_and_unreadable_are_told_apart() {
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            hash_content(&Mem(vec![0; 5000]), 4999, &mut buf, || {}),
            Err(HashError::TooLarge(_))
        ));
        assert!(matches!(
            hash_content(&Broken, 10, &mut buf, || {}),
            Err(HashError::Io(_))
        ));
    }

    /// The rule that keeps a write caught half-way from being cached: content hashed while
    /// someone has the file open for writing is never "stable".
    #[test]
    fn only_content_hashed_without_a_writer_is_stable() {
        let dir = std::env::temp_dir().join(format!("fleetscan-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"version 1").unwrap();
        let mut buf = vec![0u8; 4096];
        let reader = File::open(&path).unwrap();
        let h = hash_version(&reader, 1 << 20, &mut buf).unwrap();
        assert!(h.stable, "{h:?}");
        assert_eq!((h.sha256, h.len), (Sha256::of(b"version 1"), 9));
        let st = fleetscan_fanotify::statx_fd(reader.as_fd()).unwrap();
        assert_eq!(h.key, FileKey::from(&st));

        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let h = hash_version(&reader, 1 << 20, &mut buf).unwrap();
        assert!(!h.stable, "a writer has it open: {h:?}");
        drop(writer);
        assert!(hash_version(&reader, 1 << 20, &mut buf).unwrap().stable);
        std::fs::remove_dir_all(&dir).unwrap();
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
