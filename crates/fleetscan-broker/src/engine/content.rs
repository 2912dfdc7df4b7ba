//! Getting the content of a file to scan: from an agent that has it (asked through its
//! session, which then routes the agent's chunks here) or from bytes already in hand
//! (ScanService).
//!
//! What an agent uploads is bounded by the size it declared (itself at most the policy's
//! maximum, checked before asking), must arrive in order, and must hash to the SHA-256 it
//! claimed; anything else fails this source and the caller tries another. Never trust an
//! upload that was not verified, never buffer past the declared size. The session's stream is
//! not known here: it is reached through [`AskContent`], which the agent service implements.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetscan_core::{Sha256, Sha256Hasher};
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// Chunks buffered between an agent's stream reader and the fetch that consumes them; when
/// full, the reader waits (backpressure on that agent's stream only).
const CONTENT_CHANNEL: usize = 8;

/// What an agent sent about content the broker asked for.
#[derive(Debug)]
pub enum ContentEvent {
    Chunk {
        offset: u64,
        data: Bytes,
        last: bool,
    },
    Unavailable(String),
}

/// The agent's session is gone: it can be asked nothing any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionGone;

/// A future of [`AskContent::ask`].
pub type Asking<'a> = Pin<Box<dyn Future<Output = Result<(), SessionGone>> + Send + 'a>>;

/// How an agent is asked for content: its session sends the request on its stream.
pub trait AskContent: Send + Sync + 'static {
    /// Asks the agent for the content of its request `request_id`; waits while the session's
    /// outbound queue is full.
    fn ask(&self, request_id: u64) -> Asking<'_>;
}

/// The part of an agent session that content fetches use: the way to ask its agent for
/// content, and the fetches waiting for its chunks, by request id.
pub struct AgentLink {
    asker: Box<dyn AskContent>,
    pending: Mutex<HashMap<u64, mpsc::Sender<ContentEvent>>>,
    /// Set (under `pending`'s lock) when the session's reader ended: no chunk can come any more,
    /// so a fetch that starts later fails at once instead of stalling for its idle timeout.
    closed: AtomicBool,
}

impl AgentLink {
    pub fn new(asker: impl AskContent) -> Self {
        AgentLink {
            asker: Box::new(asker),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Hands an agent's content message to the fetch waiting for it. Content nobody waits for
    /// (a fetch that already gave up) is dropped.
    pub async fn route(&self, request_id: u64, event: ContentEvent) {
        let waiting = self.pending.lock().get(&request_id).cloned();
        if let Some(tx) = waiting
            && tx.send(event).await.is_err()
        {
            self.pending.lock().remove(&request_id);
        }
    }

    /// The session ended: every fetch from it fails at once.
    pub fn close(&self) {
        let mut pending = self.pending.lock();
        self.closed.store(true, Ordering::Relaxed);
        pending.clear();
    }
}

/// Removes a fetch's registration however the fetch ends.
struct Registration<'a> {
    link: &'a AgentLink,
    request_id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.link.pending.lock().remove(&self.request_id);
    }
}

/// Somewhere the content of one SHA-256 can be had.
pub enum ContentSource {
    /// Bytes in hand, already hashed by the broker.
    Memory(Bytes),
    /// An agent that asked about the content in request `request_id` of its session.
    Agent {
        link: Arc<AgentLink>,
        request_id: u64,
        /// The size this agent declared for the content. Each source is held to its own claim:
        /// another waiter's wrong size must not make this source's honest upload fail.
        size: u64,
    },
}

impl ContentSource {
    /// The size of the content this source claims to have.
    pub fn size(&self) -> u64 {
        match self {
            ContentSource::Memory(bytes) => bytes.len() as u64,
            ContentSource::Agent { size, .. } => *size,
        }
    }

    /// The content, verified against `sha256` and the source's own declared size; `idle` bounds
    /// the wait for each message from an agent.
    pub async fn fetch(self, sha256: &Sha256, idle: Duration) -> Result<Bytes, String> {
        let (link, request_id, size) = match self {
            ContentSource::Memory(bytes) => return Ok(bytes),
            ContentSource::Agent {
                link,
                request_id,
                size,
            } => (link, request_id, size),
        };
        if size == 0 {
            // Nothing to upload: the empty content is known.
            return if *sha256 == Sha256::of(b"") {
                Ok(Bytes::new())
            } else {
                Err("declared size 0 but sha256 is not the empty content's".into())
            };
        }
        let capacity = usize::try_from(size).map_err(|_| "declared size too large")?;
        let (tx, mut rx) = mpsc::channel(CONTENT_CHANNEL);
        {
            let mut pending = link.pending.lock();
            if link.closed.load(Ordering::Relaxed) {
                return Err("agent disconnected".into());
            }
            pending.insert(request_id, tx);
        }
        let _registration = Registration {
            link: &link,
            request_id,
        };
        match tokio::time::timeout(idle, link.asker.ask(request_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("agent disconnected".into()),
            Err(_) => return Err("agent stream congested".into()),
        }
        // Content uploaded in one chunk is kept as that chunk (a slice of the message it came
        // in); only content in several chunks is copied together.
        let mut whole = None;
        let mut content = BytesMut::new();
        let mut received = 0u64;
        let mut hasher = Sha256Hasher::new();
        loop {
            let event = match tokio::time::timeout(idle, rx.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => return Err("agent disconnected".into()),
                Err(_) => return Err("content upload stalled".into()),
            };
            match event {
                ContentEvent::Unavailable(reason) => {
                    return Err(format!("agent could not provide the content: {reason}"));
                }
                ContentEvent::Chunk { offset, data, last } => {
                    if offset != received {
                        return Err(format!("chunk at offset {offset}, expected {received}"));
                    }
                    if received + data.len() as u64 > size {
                        return Err(format!("more content than the declared {size} bytes"));
                    }
                    hasher.update(&data);
                    received += data.len() as u64;
                    if last && content.is_empty() {
                        whole = Some(data);
                        break;
                    }
                    if content.capacity() == 0 {
                        content.reserve(capacity);
                    }
                    content.extend_from_slice(&data);
                    if last {
                        break;
                    }
                }
            }
        }
        if received != size {
            return Err(format!("{received} bytes uploaded, {size} declared"));
        }
        if hasher.finish() != *sha256 {
            return Err("sha256 mismatch".into());
        }
        Ok(whole.unwrap_or_else(|| content.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's outbound queue, as far as content is concerned: the request ids asked for.
    struct Outbound(mpsc::Sender<u64>);

    impl AskContent for Outbound {
        fn ask(&self, request_id: u64) -> Asking<'_> {
            Box::pin(async move { self.0.send(request_id).await.map_err(|_| SessionGone) })
        }
    }

    fn new_link() -> (Arc<AgentLink>, mpsc::Receiver<u64>) {
        let (tx, rx) = mpsc::channel(16);
        (Arc::new(AgentLink::new(Outbound(tx))), rx)
    }

    /// Answers the first content request on `rx` with `chunks`.
    fn agent(link: Arc<AgentLink>, mut rx: mpsc::Receiver<u64>, chunks: Vec<ContentEvent>) {
        tokio::spawn(async move {
            let Some(request_id) = rx.recv().await else {
                panic!("expected a content request")
            };
            for chunk in chunks {
                link.route(request_id, chunk).await;
            }
            // Keep the session open until the test ends.
            std::future::pending::<()>().await;
        });
    }

    fn chunk(offset: u64, data: &[u8], last: bool) -> ContentEvent {
        ContentEvent::Chunk {
            offset,
            data: Bytes::copy_from_slice(data),
            last,
        }
    }

    const IDLE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn verified_content_is_assembled() {
        let (link, rx) = new_link();
        agent(
            link.clone(),
            rx,
            vec![chunk(0, b"hello ", false), chunk(6, b"world", true)],
        );
        let got = ContentSource::Agent {
            link,
            request_id: 7,
            size: 11,
        }
        .fetch(&Sha256::of(b"hello world"), IDLE)
        .await
        .unwrap();
        assert_eq!(&got[..], b"hello world");
    }

    #[tokio::test]
    async fn mismatching_or_malformed_uploads_are_refused() {
        let cases: Vec<(Vec<ContentEvent>, &str)> = vec![
            (vec![chunk(0, b"hello world", true)], "sha256 mismatch"),
            (vec![chunk(5, b"x", true)], "offset"),
            (vec![chunk(0, b"evil content!", true)], "more content"),
            (vec![chunk(0, b"evil", true)], "declared"),
            (
                vec![ContentEvent::Unavailable("file vanished".into())],
                "file vanished",
            ),
        ];
        for (chunks, expected) in cases {
            let (link, rx) = new_link();
            agent(link.clone(), rx, chunks);
            let err = ContentSource::Agent {
                link,
                request_id: 1,
                size: 11,
            }
            .fetch(&Sha256::of(b"other thing"), IDLE)
            .await
            .unwrap_err();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_or_vanished_agent_fails_the_fetch() {
        let (link, rx) = new_link();
        agent(link.clone(), rx, vec![]);
        let err = ContentSource::Agent {
            link: link.clone(),
            request_id: 1,
            size: 1,
        }
        .fetch(&Sha256::of(b"x"), IDLE)
        .await
        .unwrap_err();
        assert!(err.contains("stalled"), "{err}");
        assert!(link.pending.lock().is_empty(), "registration removed");

        let (link, rx) = new_link();
        drop(rx);
        let err = ContentSource::Agent {
            link,
            request_id: 1,
            size: 1,
        }
        .fetch(&Sha256::of(b"x"), IDLE)
        .await
        .unwrap_err();
        assert!(err.contains("disconnected"), "{err}");
    }

    /// A session that already ended is not asked for content: its reader is gone, so no chunk
    /// could ever arrive, and waiting out the idle timeout would starve the flight's other
    /// waiters of the time to fetch from another source.
    #[tokio::test(start_paused = true)]
    async fn a_closed_session_fails_a_later_fetch_at_once() {
        let (link, mut rx) = new_link();
        link.close();
        let started = tokio::time::Instant::now();
        let err = ContentSource::Agent {
            link: link.clone(),
            request_id: 1,
            size: 1,
        }
        .fetch(&Sha256::of(b"x"), IDLE)
        .await
        .unwrap_err();
        assert!(err.contains("disconnected"), "{err}");
        assert_eq!(started.elapsed(), Duration::ZERO, "failed at once");
        assert!(
            rx.try_recv().is_err(),
            "no content request to a closed session"
        );
        assert!(link.pending.lock().is_empty(), "nothing registered");
    }

    #[tokio::test]
    async fn empty_content_needs_no_upload() {
        let (link, _rx) = new_link();
        let got = ContentSource::Agent {
            link,
            request_id: 1,
            size: 0,
        }
        .fetch(&Sha256::of(b""), IDLE)
        .await
        .unwrap();
        assert!(got.is_empty());
    }
}
