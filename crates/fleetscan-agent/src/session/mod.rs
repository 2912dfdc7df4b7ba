//! The broker session: one long-lived `AgentService.Session` stream at a time, reconnected
//! with backoff over the configured brokers. A broker named by a host name that resolves to
//! several addresses (DNS with one record per replica) counts as that many brokers: the agent
//! moves to the next address when one fails.
//!
//! A session says hello, waits for `SessionAccepted` (policy, verdict generation), then serves:
//! decisions answer pending events (through the pending map's gate), content requests start
//! uploads read from the event's descriptor, policy updates and cache flushes are applied,
//! reports and heartbeats go out. When a session ends, its pending events are answered at
//! once with the fail mode: nothing waits for a broker that is gone.
//!
//! Nothing here is on the path that answers the kernel in time: the deadline thread does that
//! whatever this task does, so a stuck runtime delays decisions but never an answer.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetscan_core::Action;
use fleetscan_proto::v1::agent_message::Msg as Out;
use fleetscan_proto::v1::agent_service_client::AgentServiceClient;
use fleetscan_proto::v1::broker_message::Msg as In;
use fleetscan_proto::{CHUNK_SIZE, MAX_MESSAGE_SIZE, convert, v1};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::cache::{CachedDecision, FileKey};
use crate::state::{SessionLink, Shared, bump};

/// Why a session attempt ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("bad broker url: {0}")]
    Url(#[source] tonic::transport::Error),
    #[error("connect failed: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("broker: {0}")]
    Status(#[from] tonic::Status),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

/// Exponential backoff between attempts: 100 ms doubling to 2 s, reset by an accepted
/// session.
#[derive(Debug)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// How long resolving the brokers' host names may take before the names are tried as they are.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs sessions forever (until the future is dropped).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // The brokers to try, in order; resolved again once every one of them failed, so that DNS
    // changes (a replica added or gone) are followed.
    let mut candidates: std::collections::VecDeque<String> = Default::default();
    loop {
        if candidates.is_empty() {
            candidates = resolve_all(&shared.config.brokers).await.into();
        }
        let Some(url) = candidates.front().cloned() else {
            // No broker configured: nothing to connect to (the config check forbids this).
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        };
        match session(&shared, &url).await {
            Ok(()) => {
                // It was accepted and then ended: try the same broker again first, quickly.
                backoff.reset();
                info!(broker = %url, "broker session ended");
            }
            Err(e) => {
                warn!(broker = %url, error = %e, "broker session failed");
                candidates.pop_front();
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Every broker URL with a host name becomes one URL per address the name resolves to, in the
/// resolver's order; URLs with an address, and names that do not resolve in time, are kept as
/// they are (connecting to them reports the error). Duplicates are dropped.
pub(crate) async fn resolve_all(brokers: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in brokers {
        for resolved in resolve(url).await {
            if !out.contains(&resolved) {
                out.push(resolved);
            }
        }
    }
    out
}

async fn resolve(url: &str) -> Vec<String> {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return vec![url.to_owned()];
    };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return vec![url.to_owned()];
    };
    if host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok()
    {
        return vec![url.to_owned()];
    }
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let urls: Vec<String> = addrs.map(|a| format!("{scheme}://{a}")).collect();
            if urls.is_empty() {
                vec![url.to_owned()]
            } else {
                debug!(broker = url, addresses = ?urls, "broker name resolved");
                urls
            }
        }
        _ => vec![url.to_owned()],
    }
}

fn msg(m: Out) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(m) }
}

/// Ends a session on every path out, including the future being dropped at shutdown: marks it
/// dead first (so no request is assigned to it any more), then answers its pending events.
struct SessionGuard<'a> {
    shared: &'a Shared,
    epoch: u64,
    alive: Arc<AtomicBool>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.shared.clear_session(self.epoch);
        if self.shared.shutting_down.load(Ordering::SeqCst) {
            // The agent is stopping: it allows everything pending itself.
            return;
        }
        let drained = self.shared.pending.drain_session(self.epoch);
        if !drained.is_empty() {
            info!(
                count = drained.len(),
                "answering accesses of the lost session"
            );
        }
        for (_, ev) in drained {
            bump(&self.shared.counters.no_broker);
            self.shared
                .fail_pending(ev, "broker session lost", v1::LocalReason::NoBroker);
        }
    }
}

async fn session(shared: &Arc<Shared>, url: &str) -> Result<(), SessionError> {
    let t = &shared.tuning;
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(SessionError::Url)?
        .connect_timeout(t.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(t.heartbeat)
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = tokio::time::timeout(t.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| SessionError::Timeout("connecting"))?
        .map_err(SessionError::Connect)?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);

    // Two outbound queues merged into the stream: control messages (requests, reports,
    // heartbeats), and content chunks with little room, so that uploads of large files are
    // paced by the network instead of piling up in memory.
    let (ctl_tx, ctl_rx) = mpsc::channel(t.session_queue);
    let (content_tx, content_rx) = mpsc::channel(4);
    let mut capabilities = Vec::new();
    if shared.config.ignore_marks {
        capabilities.push("ignore-marks".to_string());
    }
    if shared.group.reports_pidfd() {
        capabilities.push("pidfd".to_string());
    }
    // Decisions are cached per policy scope (tenant, namespace overrides): the broker may send
    // cacheable decisions while several policies are in force.
    capabilities.push(fleetscan_proto::CAPABILITY_SCOPED_CACHE.to_string());
    let hello = v1::AgentHello {
        node: shared.config.node.clone(),
        cluster: shared.config.cluster.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities,
        tenant: String::new(),
    };
    ctl_tx
        .try_send(msg(Out::Hello(hello)))
        .expect("a fresh queue has room");
    let outbound = ReceiverStream::new(ctl_rx).merge(ReceiverStream::new(content_rx));
    let handshake = t.connect_timeout;
    let response = tokio::time::timeout(handshake, client.session(outbound))
        .await
        .map_err(|_| SessionError::Timeout("opening the session"))??;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(handshake, inbound.message())
        .await
        .map_err(|_| SessionError::Timeout("waiting for SessionAccepted"))??;
    let accepted = match first.and_then(|m| m.msg) {
        Some(In::Accepted(a)) => a,
        Some(_) => {
            return Err(SessionError::Protocol(
                "first message is not SessionAccepted",
            ));
        }
        None => {
            return Err(SessionError::Protocol(
                "stream closed before SessionAccepted",
            ));
        }
    };
    apply_accepted(shared, &accepted);
    let epoch = shared.next_epoch();
    let alive = Arc::new(AtomicBool::new(true));
    shared.set_session(SessionLink {
        epoch,
        alive: alive.clone(),
        tx: ctl_tx.clone(),
    });
    let _guard = SessionGuard {
        shared,
        epoch,
        alive,
    };
    bump(&shared.counters.sessions);
    info!(broker = %url, broker_id = %accepted.broker_id, generation = accepted.verdict_generation, "broker session accepted");

    let mut heartbeat = tokio::time::interval(t.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let uploads_allowed = Arc::new(Semaphore::new(t.upload_concurrency.max(1)));
    // Dropped with the session: aborts its uploads.
    let mut uploads = JoinSet::new();
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    let Some(m) = m.msg else { continue };
                    handle(shared, epoch, m, &ctl_tx, &content_tx, &uploads_allowed, &mut uploads);
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(status.into()),
            },
            _ = heartbeat.tick() => {
                let hb = v1::Heartbeat { sent_at_unix_ms: fleetscan_core::now_unix_ms() };
                let _ = ctl_tx.try_send(msg(Out::Heartbeat(hb)));
                flush_reports(shared, &ctl_tx, true);
            }
            () = shared.reports.ready() => flush_reports(shared, &ctl_tx, false),
            Some(_) = uploads.join_next(), if !uploads.is_empty() => {}
        }
    }
}

fn apply_accepted(shared: &Shared, a: &v1::SessionAccepted) {
    if let Some(p) = a.policy {
        shared.set_policy(p.into(), true);
    }
    shared.set_generation(a.verdict_generation);
}

/// Moves queued reports into the session, as many as fit; the rest wait for the next round.
fn flush_reports(shared: &Shared, tx: &mpsc::Sender<v1::AgentMessage>, counters_only: bool) {
    loop {
        let batch = shared.reports.take(64, counters_only);
        if batch.is_empty() {
            return;
        }
        let mut rest = batch.into_iter();
        while let Some(r) = rest.next() {
            if let Err(e) = tx.try_send(msg(Out::Report(r))) {
                let Some(Out::Report(r)) = e.into_inner().msg else {
                    unreachable!("a report was sent")
                };
                let mut back = vec![r];
                back.extend(rest);
                shared.reports.put_back(back);
                return;
            }
        }
        if counters_only {
            // A counters-only round sends what is queued now, not in an endless loop.
            return;
        }
    }
}

fn handle(
    shared: &Arc<Shared>,
    epoch: u64,
    m: In,
    ctl_tx: &mpsc::Sender<v1::AgentMessage>,
    content_tx: &mpsc::Sender<v1::AgentMessage>,
    uploads_allowed: &Arc<Semaphore>,
    uploads: &mut JoinSet<()>,
) {
    match m {
        In::Decision(d) => decide(shared, epoch, d),
        In::ContentRequest(r) => {
            let id = r.request_id;
            let found = shared.pending.with(id, |ev| {
                (ev.session == Some(epoch)).then(|| (ev.file.clone(), ev.hashed_len, ev.key))
            });
            match found.flatten() {
                Some((file, len, key)) => {
                    uploads.spawn(upload(
                        shared.clone(),
                        id,
                        file,
                        len,
                        key,
                        ctl_tx.clone(),
                        content_tx.clone(),
                        uploads_allowed.clone(),
                    ));
                }
                None => {
                    let _ = ctl_tx.try_send(unavailable(id, "no pending access with this id"));
                }
            }
        }
        In::Policy(u) => {
            if let Some(p) = u.policy {
                shared.set_policy(p.into(), false);
            }
            if let Some(set) = u.policy_set {
                shared.set_policy_set(set.into());
            }
        }
        In::Flush(f) => shared.flush(f.verdict_generation, &f.reason),
        In::Accepted(a) => apply_accepted(shared, &a),
        In::Heartbeat(_) => {}
    }
}

fn unavailable(id: u64, reason: &str) -> v1::AgentMessage {
    msg(Out::ContentUnavailable(v1::ContentUnavailable {
        request_id: id,
        reason: reason.to_string(),
    }))
}

/// Applies a broker decision to its pending event, exactly once; a decision for an event that
/// was already answered (deadline) is only counted.
fn decide(shared: &Shared, epoch: u64, d: v1::Decision) {
    let Some(ev) = shared.pending.take_for_session(d.request_id, epoch) else {
        bump(&shared.counters.late_decisions);
        debug!(id = d.request_id, "late decision ignored");
        return;
    };
    let Some(action) = convert::action_from_proto(d.action) else {
        shared.fail_pending(
            ev,
            "decision without an action",
            v1::LocalReason::Unspecified,
        );
        return;
    };
    shared.answer(&ev.file, action);
    bump(&shared.counters.broker_decisions);
    if d.cacheable {
        // Judged by the result alone: a blocking verdict with some other field malformed (so
        // that it would not convert) must still keep the file from an ignore mark.
        let blocking = d
            .verdicts
            .iter()
            .find(|v| convert::verdict_kind_from_proto(v.result).blocks());
        let threat_name = blocking.map(|v| v.threat_name.clone()).unwrap_or_default();
        // A kernel ignore mark stands only for a clean file: an allow that rests on a blocking
        // verdict (audit-only) must keep producing events, and a mark cannot expire with a ttl.
        let ignorable = action == Action::Allow && blocking.is_none() && d.ttl_seconds == 0;
        let expires = (d.ttl_seconds > 0)
            .then(|| std::time::Instant::now() + Duration::from_secs(u64::from(d.ttl_seconds)));
        shared.cache_decision(
            &ev,
            CachedDecision {
                action,
                reason: d.reason.clone(),
                sha256: ev.sha256.map(|s| s.to_hex()).unwrap_or_default(),
                threat_name,
                ignorable,
                expires,
            },
        );
    }
    debug!(id = d.request_id, action = action.as_str(), reason = %d.reason, "broker decision applied");
}

/// Uploads the hashed content of a pending event, read from its descriptor, in chunks of at
/// most `CHUNK_SIZE`. Stops (saying why) when the event is no longer pending or the file
/// changed since it was hashed.
#[allow(clippy::too_many_arguments)]
async fn upload(
    shared: Arc<Shared>,
    id: u64,
    file: Arc<File>,
    len: u64,
    key: FileKey,
    ctl_tx: mpsc::Sender<v1::AgentMessage>,
    content_tx: mpsc::Sender<v1::AgentMessage>,
    allowed: Arc<Semaphore>,
) {
    let Ok(_permit) = allowed.acquire_owned().await else {
        return;
    };
    let check = file.clone();
    let unchanged = tokio::task::spawn_blocking(move || {
        fleetscan_fanotify::statx_fd(check.as_fd()).is_ok_and(|st| FileKey::from(&st) == key)
    })
    .await
    .unwrap_or(false);
    if !unchanged {
        let _ = ctl_tx
            .send(unavailable(id, "file changed since it was hashed"))
            .await;
        return;
    }
    let mut offset = 0u64;
    loop {
        if !shared.pending.contains(id) {
            let _ = ctl_tx
                .send(unavailable(id, "access already decided (deadline)"))
                .await;
            return;
        }
        let n = usize::try_from((len - offset).min(CHUNK_SIZE as u64)).expect("chunk fits");
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await;
        let data = match read {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = ctl_tx
                    .send(unavailable(id, &format!("read failed: {e}")))
                    .await;
                return;
            }
            Err(_) => return,
        };
        let last = offset + n as u64 >= len;
        let chunk = v1::ContentChunk {
            request_id: id,
            offset,
            data: data.into(),
            last,
        };
        if content_tx.send(msg(Out::Content(chunk))).await.is_err() {
            return;
        }
        offset += n as u64;
        if last {
            debug!(id, bytes = len, "content uploaded");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let got: Vec<_> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_broker_name_becomes_one_broker_per_address() {
        // `localhost` comes from /etc/hosts: no DNS traffic leaves the machine.
        let resolved = resolve_all(&["http://localhost:7701".to_owned()]).await;
        assert!(!resolved.is_empty());
        assert!(
            resolved.contains(&"http://127.0.0.1:7701".to_owned()),
            "{resolved:?}"
        );
        for url in &resolved {
            let host = url
                .trim_start_matches("http://")
                .rsplit_once(':')
                .unwrap()
                .0;
            assert!(
                host.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok(),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn addresses_are_kept_in_order_without_duplicates() {
        let brokers = [
            "http://10.1.2.3:7700".to_owned(),
            "http://[::1]:7700".to_owned(),
            "http://10.1.2.3:7700".to_owned(),
        ];
        assert_eq!(
            resolve_all(&brokers).await,
            ["http://10.1.2.3:7700", "http://[::1]:7700"]
        );
    }
}
