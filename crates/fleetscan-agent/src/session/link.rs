//! How the hashing threads reach the broker session: the [`SessionSlot`] says whether a
//! session is up and gives its [`Link`]; [`Link::send`] hands an access over to that session
//! and puts its request on the wire, without waiting for anything.
//!
//! A hand-off and the session's end are ordered by the link's one lock: the session closes the
//! link and takes what was handed over in one step, and a hand-off onto a closed link fails.
//! So an access handed over is answered by the session (its decision, or the fail mode when
//! the session ends), and one that could not be is answered by the hashing thread: never both,
//! never neither. The access request is the only protocol message built outside the session
//! task; it is built here, at the session's edge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fleetscan_core::Subject;
use fleetscan_proto::v1::agent_message::Msg as Out;
use fleetscan_proto::{convert, v1};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc};

use crate::access::{Access, Hashed};
use crate::paths::AccessPaths;

/// Hand-offs waiting for the session to take them before it is woken for them (it takes them
/// anyway whenever a decision or a content request comes).
const BACKLOG: usize = 256;

/// The live broker session, if any, as the reader and the hashing threads see it.
#[derive(Debug, Default)]
pub(crate) struct SessionSlot {
    current: RwLock<Option<Arc<Link>>>,
    next_epoch: AtomicU64,
}

impl SessionSlot {
    /// Whether a broker session is up.
    pub fn is_up(&self) -> bool {
        self.current.read().is_some()
    }

    /// The live session's link.
    pub fn current(&self) -> Option<Arc<Link>> {
        self.current.read().clone()
    }

    /// An accepted session's link, current from now on; `requests` is its outbound queue.
    pub(super) fn open(&self, requests: mpsc::Sender<v1::AgentMessage>) -> Arc<Link> {
        let link = Arc::new(Link {
            epoch: self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1,
            next_id: AtomicU64::new(1),
            handed: Mutex::new(Some(Vec::new())),
            backlog: Notify::new(),
            requests,
        });
        *self.current.write() = Some(link.clone());
        link
    }

    /// Forgets `link` if it is still the current one.
    pub(super) fn clear(&self, link: &Link) {
        let mut cur = self.current.write();
        if cur.as_ref().is_some_and(|l| l.epoch == link.epoch) {
            *cur = None;
        }
    }
}

/// One broker session, as the hashing threads see it.
#[derive(Debug)]
pub(crate) struct Link {
    epoch: u64,
    /// Request ids, unique within the session.
    next_id: AtomicU64,
    /// Accesses handed over and not yet taken by the session; `None` once it ended.
    handed: Mutex<Option<Vec<InFlight>>>,
    backlog: Notify,
    requests: mpsc::Sender<v1::AgentMessage>,
}

/// An access whose request went out on a session, with what was hashed of it.
#[derive(Debug)]
pub(super) struct InFlight {
    pub id: u64,
    pub access: Arc<Access>,
    pub hashed: Hashed,
}

/// Why [`Link::send`] did not send.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// The session ended before the access could be handed over.
    SessionLost,
    /// The session's outbound queue is full (or closed): no answer could come in time.
    QueueFull,
}

impl Link {
    /// Hands `access` to the session, then asks the broker about it; returns the request id.
    /// On `Err` the caller answers the access (an access handed over before the queue turned
    /// out full is answered by whoever comes first: the caller or the session's end).
    pub fn send(
        &self,
        access: &Arc<Access>,
        hashed: Hashed,
        paths: AccessPaths,
        subject: Subject,
    ) -> Result<u64, Unsent> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let k = hashed.key;
        let request = v1::AccessRequest {
            request_id: id,
            file: Some(v1::FileIdentity {
                dev: k.dev,
                ino: k.ino,
                ctime_sec: k.ctime_sec,
                ctime_nsec: k.ctime_nsec,
                size: k.size,
            }),
            sha256: hashed.sha256.to_hex(),
            size: hashed.len,
            subject: Some(subject.into()),
            path: paths.path,
            host_path: paths.host_path,
            kind: convert::access_kind_to_proto(access.kind).into(),
            deadline_ms: u32::try_from(
                access
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis(),
            )
            .unwrap_or(u32::MAX),
        };
        self.hand_over(InFlight {
            id,
            access: access.clone(),
            hashed,
        })?;
        self.requests
            .try_send(msg(Out::Access(request)))
            .map_err(|_| Unsent::QueueFull)?;
        Ok(id)
    }

    /// Before the request goes out, so that its decision always finds it.
    fn hand_over(&self, f: InFlight) -> Result<(), Unsent> {
        let mut handed = self.handed.lock();
        let list = handed.as_mut().ok_or(Unsent::SessionLost)?;
        list.push(f);
        if list.len() == BACKLOG {
            self.backlog.notify_one();
        }
        Ok(())
    }

    /// What was handed over since the last call.
    pub(super) fn take_handed(&self) -> Vec<InFlight> {
        self.handed
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Resolves when hand-offs pile up (see [`BACKLOG`]).
    pub(super) async fn backlog(&self) {
        self.backlog.notified().await;
    }

    /// The session ended: every hand-off fails from now on. Returns what was handed over and
    /// not taken yet.
    pub(super) fn close(&self) -> Vec<InFlight> {
        self.handed.lock().take().unwrap_or_default()
    }
}

/// A message to the broker.
pub(super) fn msg(m: Out) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use crate::access::tests::access;
    use crate::cache::FileKey;

    pub(crate) fn hashed() -> Hashed {
        Hashed {
            sha256: fleetscan_core::Sha256::of(b"x"),
            len: 1,
            key: FileKey::test(0),
            stable: true,
        }
    }

    pub(crate) fn link(slot: &SessionSlot) -> (Arc<Link>, mpsc::Receiver<v1::AgentMessage>) {
        let (tx, rx) = mpsc::channel(16);
        (slot.open(tx), rx)
    }

    /// The ordering the session's end relies on: an access handed over before the link closed
    /// is in what `close` returns; one handed over after is refused, for its hashing thread to
    /// answer.
    #[test]
    fn a_hand_off_is_either_drained_at_the_end_or_refused() {
        let slot = SessionSlot::default();
        let (link, mut rx) = link(&slot);
        let first = Arc::new(access());
        let id = link
            .send(&first, hashed(), AccessPaths::default(), Subject::default())
            .unwrap();
        assert!(matches!(
            rx.try_recv().unwrap().msg,
            Some(Out::Access(a)) if a.request_id == id
        ));
        let drained = link.close();
        slot.clear(&link);
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].id, id);
        let second = Arc::new(access());
        assert_eq!(
            link.send(
                &second,
                hashed(),
                AccessPaths::default(),
                Subject::default()
            ),
            Err(Unsent::SessionLost)
        );
        assert!(
            rx.try_recv().is_err(),
            "nothing sent for a refused hand-off"
        );
        assert!(!slot.is_up());
    }

    /// Hand-offs racing the end from several threads: every accepted one is drained, none is
    /// both drained and refused.
    #[test]
    fn hand_offs_racing_the_end_are_each_drained_or_refused() {
        for _ in 0..20 {
            let slot = SessionSlot::default();
            let (tx, _rx) = mpsc::channel(100_000);
            let link = slot.open(tx);
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let link = link.clone();
                    std::thread::spawn(move || {
                        (0..200)
                            .filter_map(|_| {
                                let a = Arc::new(access());
                                link.send(&a, hashed(), AccessPaths::default(), Subject::default())
                                    .ok()
                            })
                            .collect::<Vec<u64>>()
                    })
                })
                .collect();
            std::thread::yield_now();
            let mut drained: Vec<u64> = link.take_handed().into_iter().map(|f| f.id).collect();
            drained.extend(link.close().into_iter().map(|f| f.id));
            let mut sent: Vec<u64> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            sent.sort_unstable();
            drained.sort_unstable();
            assert_eq!(sent, drained);
        }
    }

    #[test]
    fn a_new_session_replaces_the_old_ones_link_and_only_its_own_end_clears_it() {
        let slot = SessionSlot::default();
        let (old, _rx) = link(&slot);
        let (new, _rx2) = link(&slot);
        slot.clear(&old);
        assert!(slot.is_up());
        assert_eq!(slot.current().unwrap().epoch, new.epoch);
        slot.clear(&new);
        assert!(slot.current().is_none());
    }
}
