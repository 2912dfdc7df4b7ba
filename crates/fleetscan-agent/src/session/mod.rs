//! The broker session: one long-lived `AgentService.Session` stream at a time, reconnected
//! with a jittered backoff over the configured brokers. A broker named by a host name that
//! resolves to several addresses (DNS with one record per replica) counts as that many
//! brokers: the agent moves to the next address when one fails.
//!
//! A session says hello, waits for `SessionAccepted` (policy, verdict generation), then serves:
//! decisions answer the accesses whose requests it sent (`requests.rs`), content requests
//! start uploads read from the access's descriptor (`upload.rs`), policy updates and cache
//! flushes are applied, reports and heartbeats go out. When a session ends, the accesses it
//! was asked about are answered at once with the fail mode: nothing waits for a broker that is
//! gone. The hashing threads reach the live session through its link (`link.rs`).
//!
//! This is the agent's protocol edge: the only code that sees `fleetscan_proto::v1` types,
//! converting to and from the domain on the way through. Nothing here is on the path that
//! answers the kernel in time: the deadline thread does that whatever this task does, so a
//! stuck runtime delays decisions but never an answer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetscan_core::{Backoff, LocalReport};
use fleetscan_proto::v1::agent_message::Msg as Out;
use fleetscan_proto::v1::agent_service_client::AgentServiceClient;
use fleetscan_proto::v1::broker_message::Msg as In;
use fleetscan_proto::{MAX_MESSAGE_SIZE, v1};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::interceptor::Interceptor;
use crate::reports::ReportQueue;
use crate::stats::bump;

mod link;
mod requests;
mod upload;

use link::msg;
pub(crate) use link::{SessionSlot, Unsent};
use requests::Requests;

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

/// The first wait before reconnecting, and the longest.
const RECONNECT_FLOOR: Duration = Duration::from_millis(100);
const RECONNECT_CEILING: Duration = Duration::from_secs(2);
/// An accepted session that lived this long worked: the next reconnect starts from the floor,
/// however it ended (a broker crash too).
const WORKED_AFTER: Duration = Duration::from_secs(1);

/// How long resolving the brokers' host names may take before the names are tried as they are.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs sessions forever (until the future is dropped).
pub(crate) async fn run(ic: Arc<Interceptor>, slot: Arc<SessionSlot>) {
    let mut backoff = Backoff::new(RECONNECT_FLOOR, RECONNECT_CEILING, WORKED_AFTER);
    // The brokers to try, in order; resolved again once every one of them failed, so that DNS
    // changes (a replica added or gone) are followed.
    let mut candidates: VecDeque<String> = VecDeque::new();
    loop {
        if candidates.is_empty() {
            candidates = resolve_all(&ic.config.brokers).await.into();
        }
        let Some(url) = candidates.front().cloned() else {
            // No broker configured: nothing to connect to (the config check forbids this).
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        };
        let mut accepted = None;
        match session(&ic, &slot, &url, &mut accepted).await {
            // It was accepted and then ended: try the same broker again first.
            Ok(()) => info!(broker = %url, "broker session ended"),
            Err(e) => {
                warn!(broker = %url, error = %e, "broker session failed");
                candidates.pop_front();
            }
        }
        let lived = accepted.map(|at: Instant| at.elapsed());
        tokio::time::sleep(reconnect_delay(&mut backoff, lived)).await;
    }
}

/// The wait before the next attempt, after one whose session was accepted and lived `lived`
/// (`None`: never accepted). A session that worked for a while resets the backoff however it
/// ended, so that every broker crash is followed by a quick reconnect; one that fails at once
/// keeps the waits growing, so that a broker that accepts and then fails is not hammered.
fn reconnect_delay(backoff: &mut Backoff, lived: Option<Duration>) -> Duration {
    if let Some(lived) = lived {
        backoff.worked_for(lived);
    }
    backoff.next_delay()
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

/// One session with the broker at `url`, until it ends. `accepted` is set when the broker
/// accepted it, so that the caller knows how long it worked, whatever ended it.
async fn session(
    ic: &Interceptor,
    slot: &SessionSlot,
    url: &str,
    accepted: &mut Option<Instant>,
) -> Result<(), SessionError> {
    let t = &ic.tuning;
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
    ctl_tx
        .try_send(msg(Out::Hello(hello(ic))))
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
    let accepted_msg = match first.and_then(|m| m.msg) {
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
    apply_accepted(ic, &accepted_msg);
    // From here on the hashing threads hand accesses to this session; dropping `requests`
    // (however this function ends) answers those it still has.
    let link = slot.open(ctl_tx.clone());
    let mut requests = Requests::new(ic, slot, link.clone());
    *accepted = Some(Instant::now());
    bump(&ic.counters.sessions);
    info!(broker = %url, broker_id = %accepted_msg.broker_id, generation = accepted_msg.verdict_generation, "broker session accepted");

    let mut heartbeat = tokio::time::interval(t.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let uploads_allowed = Arc::new(Semaphore::new(t.upload_concurrency.max(1)));
    // Dropped with the session: aborts its uploads.
    let mut uploads = JoinSet::new();
    let out = Outbound {
        ctl_tx,
        content_tx,
        uploads_allowed,
    };
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    let Some(m) = m.msg else { continue };
                    handle(ic, m, &mut requests, &out, &mut uploads);
                }
                Ok(None) => return Ok(()),
                Err(status) => return Err(status.into()),
            },
            _ = heartbeat.tick() => {
                let hb = v1::Heartbeat { sent_at_unix_ms: fleetscan_core::now_unix_ms() };
                let _ = out.ctl_tx.try_send(msg(Out::Heartbeat(hb)));
                flush_reports(&ic.reports, &out.ctl_tx, true);
                requests.take_handed();
            }
            () = ic.reports.ready() => flush_reports(&ic.reports, &out.ctl_tx, false),
            () = link.backlog() => requests.take_handed(),
            Some(_) = uploads.join_next(), if !uploads.is_empty() => {}
        }
    }
}

/// The session's outbound side, as the handlers of broker messages use it.
struct Outbound {
    ctl_tx: mpsc::Sender<v1::AgentMessage>,
    content_tx: mpsc::Sender<v1::AgentMessage>,
    uploads_allowed: Arc<Semaphore>,
}

fn hello(ic: &Interceptor) -> v1::AgentHello {
    let mut capabilities = Vec::new();
    if ic.config.ignore_marks {
        capabilities.push("ignore-marks".to_string());
    }
    if ic.group.reports_pidfd() {
        capabilities.push("pidfd".to_string());
    }
    // Decisions are cached per policy scope (tenant, namespace overrides): the broker may send
    // cacheable decisions while several policies are in force.
    capabilities.push(fleetscan_proto::CAPABILITY_SCOPED_CACHE.to_string());
    v1::AgentHello {
        node: ic.config.node.clone(),
        cluster: ic.config.cluster.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities,
        tenant: String::new(),
    }
}

fn apply_accepted(ic: &Interceptor, a: &v1::SessionAccepted) {
    if let Some(p) = a.policy {
        ic.set_policy(p.into(), true);
    }
    ic.set_generation(a.verdict_generation);
}

fn handle(
    ic: &Interceptor,
    m: In,
    requests: &mut Requests<'_>,
    out: &Outbound,
    uploads: &mut JoinSet<()>,
) {
    match m {
        In::Decision(d) => requests.decide(d),
        In::ContentRequest(r) => {
            let id = r.request_id;
            match requests.for_upload(id) {
                Some((access, len, key)) => {
                    uploads.spawn(upload::upload(
                        id,
                        access,
                        len,
                        key,
                        out.ctl_tx.clone(),
                        out.content_tx.clone(),
                        out.uploads_allowed.clone(),
                    ));
                }
                None => {
                    let _ = out
                        .ctl_tx
                        .try_send(upload::unavailable(id, "no pending access with this id"));
                }
            }
        }
        In::Policy(u) => {
            if let Some(p) = u.policy {
                ic.set_policy(p.into(), false);
            }
            if let Some(set) = u.policy_set {
                ic.set_policy_set(set.into());
            }
        }
        In::Flush(f) => ic.flush(f.verdict_generation, &f.reason),
        In::Accepted(a) => apply_accepted(ic, &a),
        In::Heartbeat(_) => {}
    }
}

/// Reports taken from the queue at once.
const REPORT_BATCH: usize = 64;

/// Moves queued reports into the session, as many as fit; the rest wait for the next round.
/// With `counters_only`, counters with no report to ride on go out in a report of their own.
fn flush_reports(queue: &ReportQueue, tx: &mpsc::Sender<v1::AgentMessage>, counters_only: bool) {
    loop {
        let Framed {
            mut reports,
            wire,
            allowed,
            dropped,
        } = framed(queue, counters_only);
        if wire.is_empty() {
            return;
        }
        for (i, r) in wire.into_iter().enumerate() {
            if tx.try_send(msg(Out::Report(r))).is_err() {
                // What was not sent goes back: the reports from this one on, and the counters
                // if they were on it.
                queue.put_back(reports.split_off(i.min(reports.len())));
                if i == 0 {
                    queue.restore_counts(allowed, dropped);
                }
                return;
            }
        }
        if counters_only {
            // A counters-only round sends what is queued now, not in an endless loop.
            return;
        }
    }
}

/// One batch of queued reports, and its messages.
struct Framed {
    reports: Vec<LocalReport>,
    /// One per report (a counters-only one when there is none); the first carries the
    /// counters.
    wire: Vec<v1::AccessReport>,
    allowed: u64,
    dropped: u64,
}

/// Takes a batch of queued reports and frames it: the first message carries the batch's
/// counters; with no report, a counters-only message (action unspecified, no path: the broker
/// records nothing for it but the counts) when `counters_only`, else no message at all and the
/// counters wait for a later batch.
fn framed(queue: &ReportQueue, counters_only: bool) -> Framed {
    let batch = queue.take(REPORT_BATCH);
    let mut wire: Vec<v1::AccessReport> = batch.reports.iter().map(Into::into).collect();
    let counters = batch.allowed > 0 || batch.dropped > 0;
    if wire.is_empty() && counters_only && counters {
        wire.push(v1::AccessReport {
            at_unix_ms: fleetscan_core::now_unix_ms(),
            action: v1::Action::Unspecified.into(),
            ..Default::default()
        });
    }
    match wire.first_mut() {
        Some(first) => {
            first.allowed_count += batch.allowed;
            first.dropped_reports += batch.dropped;
        }
        None => queue.restore_counts(batch.allowed, batch.dropped),
    }
    Framed {
        reports: batch.reports,
        wire,
        allowed: batch.allowed,
        dropped: batch.dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reports::tests::report;

    const STEPS_MS: [u64; 7] = [100, 200, 400, 800, 1600, 2000, 2000];

    /// Within the jitter (a random quarter of the step taken off), the wait is the step.
    fn about(d: Duration, step_ms: u64) -> bool {
        let step = Duration::from_millis(step_ms);
        d <= step && d >= step * 3 / 4
    }

    fn backoff() -> Backoff {
        Backoff::new(RECONNECT_FLOOR, RECONNECT_CEILING, WORKED_AFTER)
    }

    #[test]
    fn reconnect_waits_double_to_their_cap_and_reset() {
        let mut b = backoff();
        let got: Vec<_> = (0..7).map(|_| reconnect_delay(&mut b, None)).collect();
        for (d, step) in got.iter().zip(STEPS_MS) {
            assert!(about(*d, step), "{got:?}");
        }
        b.reset();
        assert!(about(reconnect_delay(&mut b, None), 100));
    }

    /// A broker that crashes after its session worked for a while: the agent is back within
    /// the floor each time, however many crashes came before (with a backoff reset only by a
    /// clean end, each crash added to the next wait: 0.1, 0.2, 0.4 … 2 s).
    #[test]
    fn each_crash_of_a_broker_that_worked_is_followed_by_a_quick_reconnect() {
        let mut b = backoff();
        for crash in 0..6 {
            let d = reconnect_delay(&mut b, Some(Duration::from_millis(1500)));
            assert!(about(d, 100), "crash {crash}: waited {d:?}");
        }
        // Also after failed attempts made the waits grow.
        for _ in 0..5 {
            reconnect_delay(&mut b, None);
        }
        let d = reconnect_delay(&mut b, Some(WORKED_AFTER));
        assert!(about(d, 100), "{d:?}");
    }

    /// A broker that accepts and then fails at once is not hammered.
    #[test]
    fn a_session_that_ends_at_once_keeps_the_waits_growing() {
        let mut b = backoff();
        let got: Vec<_> = (0..7)
            .map(|_| reconnect_delay(&mut b, Some(Duration::from_millis(10))))
            .collect();
        for (d, step) in got.iter().zip(STEPS_MS) {
            assert!(about(*d, step), "{got:?}");
        }
    }

    #[test]
    fn the_first_report_of_a_batch_carries_the_counters() {
        let q = ReportQueue::new(2);
        q.push(report("a"));
        q.push(report("b"));
        q.push(report("c"));
        q.count_allowed();
        q.count_allowed();
        let got = framed(&q, false).wire;
        assert_eq!(
            got.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(got[0].reason, i32::from(v1::LocalReason::Cached));
        assert_eq!(got[0].dropped_reports, 1);
        assert_eq!(got[0].allowed_count, 2);
        assert_eq!(got[1].dropped_reports, 0);
        // Counters were sent once: nothing left.
        assert!(framed(&q, true).wire.is_empty());
    }

    #[test]
    fn counters_only_report_when_nothing_else_to_send() {
        let q = ReportQueue::new(2);
        assert!(framed(&q, true).wire.is_empty());
        q.count_allowed();
        assert!(framed(&q, false).wire.is_empty(), "counters kept for later");
        let got = framed(&q, true).wire;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].allowed_count, 1);
        assert!(got[0].path.is_empty());
        assert_eq!(got[0].action, i32::from(v1::Action::Unspecified));
    }

    #[test]
    fn reports_that_do_not_fit_wait_with_their_counters() {
        let q = ReportQueue::new(3);
        q.push(report("a"));
        q.push(report("b"));
        q.count_allowed();
        // Room for one message: "a" (with the counters) goes, "b" waits.
        let (tx, mut rx) = mpsc::channel(1);
        flush_reports(&q, &tx, false);
        let Some(Out::Report(sent)) = rx.try_recv().unwrap().msg else {
            panic!("a report")
        };
        assert_eq!((sent.path.as_str(), sent.allowed_count), ("a", 1));
        q.push(report("c"));
        let again = framed(&q, false).wire;
        assert_eq!(
            again.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(again[0].allowed_count, 0, "counters went with a");
        // None fits: everything, counters too, waits.
        let (full, _rx) = mpsc::channel(1);
        full.try_send(msg(Out::Heartbeat(v1::Heartbeat::default())))
            .unwrap();
        q.push(report("d"));
        q.count_allowed();
        flush_reports(&q, &full, false);
        let kept = framed(&q, false).wire;
        assert_eq!(
            kept.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert_eq!(kept[0].allowed_count, 1);
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
