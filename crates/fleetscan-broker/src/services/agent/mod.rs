//! `AgentService.Session`: one long-lived stream per agent, and its mechanics.
//!
//! The first message must be the hello; the agent is then sent `SessionAccepted` and, right
//! after, the whole policy set (again on every new version). Every access request is converted
//! into an [`Access`] and decided by the access layer ([`Agent::decide`]): its decision is sent
//! at once, or once the access layer's flights ended, unless the request's deadline passes
//! first (the agent then answers the kernel itself). One bad request is answered by the fail
//! mode; it never ends the stream. Content uploads and reports go to the access layer as they
//! come.
//!
//! Requests that arrive together are decided together before the reader yields (up to
//! `INBOUND_BATCH`), so that their decisions leave in one write; the outbound side (`outbound`)
//! drains its queue in runs. The cached decision costs the reader no spawn and no
//! await but the send of the decision. Must never: wait on the store, decide anything itself, or
//! send a decision before `SessionAccepted` or after a flush it would contradict.

mod outbound;

use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use fleetscan_core::Tenancy;
use fleetscan_proto::convert;
use fleetscan_proto::v1::{self, agent_message, broker_message};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

pub use self::outbound::SessionStream;
use crate::access::{self, Access, Agent, Answer, Decision, Report, Subject, Verdicts};
use crate::engine::Engine;
use crate::engine::content::{AskContent, Asking, ContentEvent, SessionGone};
use crate::services::stream::first_message;
use crate::shutdown::Shutdown;

/// How often a session refreshes its host row and flushes its counters.
const HOST_PERIOD: Duration = Duration::from_secs(60);

/// The capability of an agent that keys its cached decisions by tenant and namespace policy
/// ([`access::Hello::scoped_cache`]).
pub use fleetscan_proto::CAPABILITY_SCOPED_CACHE as SCOPED_CACHE_CAPABILITY;
/// Messages queued towards one agent; when full, the session's reader waits for the agent.
const OUTBOUND: usize = 1024;
/// Messages the reader handles in a row once one arrived, when more are already buffered,
/// before it goes back to its select (stop, closed, host tick): bounded so those are still
/// seen under a steady flood.
const INBOUND_BATCH: usize = 256;

pub struct AgentSvc {
    engine: Arc<Engine>,
    shutdown: Shutdown,
}

impl AgentSvc {
    pub fn new(engine: Arc<Engine>, shutdown: Shutdown) -> AgentSvc {
        AgentSvc { engine, shutdown }
    }
}

/// One session: the agent as the access layer knows it, and the stream's outbound queue.
struct Session {
    agent: Arc<Agent>,
    tx: Outbound,
}

/// A session's outbound queue. The engine asks the agent for content through it.
#[derive(Clone)]
struct Outbound(mpsc::Sender<Result<v1::BrokerMessage, Status>>);

impl AskContent for Outbound {
    fn ask(&self, request_id: u64) -> Asking<'_> {
        let request = v1::BrokerMessage {
            msg: Some(broker_message::Msg::ContentRequest(v1::ContentRequest {
                request_id,
            })),
        };
        Box::pin(async move { self.0.send(Ok(request)).await.map_err(|_| SessionGone) })
    }
}

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentSvc {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = first_message(&mut inbound, "an AgentHello", |m| match m.msg {
            Some(agent_message::Msg::Hello(hello)) => Some(hello),
            _ => None,
        })
        .await?;
        let engine = &self.engine;
        let (tx, rx) = mpsc::channel(OUTBOUND);
        let scoped_cache = hello
            .capabilities
            .iter()
            .any(|c| c == SCOPED_CACHE_CAPABILITY);
        let hello = access::Hello {
            node: hello.node,
            tenant: hello.tenant,
            cluster: hello.cluster,
            agent_version: hello.agent_version,
            scoped_cache,
        };
        let agent = Arc::new(Agent::new(engine.clone(), hello, Outbound(tx.clone()))?);
        let mut generation = engine.subscribe_generation();
        let verdict_generation = *generation.borrow_and_update();
        let mut policies = engine.subscribe_tenancy();
        let tenancy = policies.borrow_and_update().clone();
        let accepted = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(v1::SessionAccepted {
                broker_id: engine.config().broker_id.clone(),
                policy: Some((&tenancy.resolve(agent.tenant(), "").policy).into()),
                verdict_generation,
            })),
        };
        // The policy set goes out right after SessionAccepted, before any decision: the queue
        // is empty, so this cannot fail.
        let _ = tx.try_send(Ok(policy_update(&tenancy, agent.tenant())));
        agent.host_seen();
        info!(node = %agent.node(), tenant = %agent.tenant(), cluster = %agent.cluster(), agent_version = %agent.agent_version(), "agent connected");
        let session = Arc::new(Session {
            agent,
            tx: Outbound(tx),
        });
        let outbound = outbound::outbound(accepted, rx, generation, self.shutdown.clone());
        tokio::spawn(read_loop(session, inbound, policies, self.shutdown.clone()));
        Ok(Response::new(outbound))
    }
}

/// The policy set for an agent of `tenant`, with that tenant's own policy (what agents that
/// predate policy sets apply to everything).
fn policy_update(tenancy: &Tenancy, tenant: &str) -> v1::BrokerMessage {
    v1::BrokerMessage {
        msg: Some(broker_message::Msg::Policy(v1::PolicyUpdate {
            policy: Some((&tenancy.resolve(tenant, "").policy).into()),
            policy_set: Some((&tenancy.policy_set()).into()),
        })),
    }
}

async fn read_loop(
    session: Arc<Session>,
    mut inbound: Streaming<v1::AgentMessage>,
    mut policies: watch::Receiver<Arc<Tenancy>>,
    mut shutdown: Shutdown,
) {
    let agent = &session.agent;
    let mut host_tick = tokio::time::interval_at(Instant::now() + HOST_PERIOD, HOST_PERIOD);
    loop {
        tokio::select! {
            biased;
            () = shutdown.recv() => break,
            _ = session.tx.0.closed() => break,
            changed = policies.changed() => {
                if changed.is_err() {
                    break; // The engine is gone.
                }
                let tenancy = policies.borrow_and_update().clone();
                info!(node = %agent.node(), version = tenancy.version(), "sending a new policy set");
                let update = policy_update(&tenancy, agent.tenant());
                if session.tx.0.send(Ok(update)).await.is_err() {
                    break;
                }
            }
            _ = host_tick.tick() => {
                agent.host_seen();
                agent.flush_counts();
            }
            message = inbound.message() => {
                if !on_inbound(&session, message).await
                    || !drain_inbound(&session, &mut inbound).await
                {
                    break;
                }
            }
        }
    }
    agent.close();
    agent.flush_counts();
    info!(node = %agent.node(), "agent disconnected");
}

/// Handles one result of the inbound stream; false when the stream is over.
async fn on_inbound(
    session: &Arc<Session>,
    message: Result<Option<v1::AgentMessage>, Status>,
) -> bool {
    match message {
        Ok(Some(message)) => {
            handle(session, message).await;
            true
        }
        Ok(None) => false,
        Err(status) => {
            debug!(node = %session.agent.node(), %status, "agent stream failed");
            // E.g. an oversized message: tell the agent why its stream ends.
            let _ = session.tx.0.try_send(Err(status));
            false
        }
    }
}

/// Handles the messages already received (up to [`INBOUND_BATCH`]) without waiting for more,
/// so that a burst of requests is decided before this task yields and the connection writes
/// their decisions at once. False when the stream is over.
async fn drain_inbound(session: &Arc<Session>, inbound: &mut Streaming<v1::AgentMessage>) -> bool {
    for _ in 0..INBOUND_BATCH {
        // One poll: a message already decoded or buffered is Ready, anything else is Pending
        // (and the select's next poll waits for it).
        let next =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *inbound).poll_next(cx))).await;
        match next {
            Poll::Ready(message) => {
                if !on_inbound(session, message.transpose()).await {
                    return false;
                }
            }
            Poll::Pending => return true,
        }
    }
    true
}

async fn handle(session: &Arc<Session>, message: v1::AgentMessage) {
    let agent = &session.agent;
    match message.msg {
        Some(agent_message::Msg::Access(request)) => session.access(request).await,
        Some(agent_message::Msg::Content(chunk)) => {
            let event = ContentEvent::Chunk {
                offset: chunk.offset,
                data: chunk.data,
                last: chunk.last,
            };
            agent.content(chunk.request_id, event).await;
        }
        Some(agent_message::Msg::ContentUnavailable(u)) => {
            agent
                .content(u.request_id, ContentEvent::Unavailable(u.reason))
                .await;
        }
        Some(agent_message::Msg::Report(report)) => agent.report(report_of(report)),
        Some(agent_message::Msg::Hello(_)) => {
            warn!(node = %agent.node(), "second AgentHello ignored");
        }
        // Heartbeats only show the agent is alive; unknown messages come from newer agents.
        Some(agent_message::Msg::Heartbeat(_)) | None => {}
    }
}

impl Session {
    /// Has the access layer decide a request, and sends the decision: at once when it is
    /// ready, else from a task of its own.
    async fn access(self: &Arc<Self>, request: v1::AccessRequest) {
        let request_id = request.request_id;
        debug!(node = %self.agent.node(), request_id, sha256 = %request.sha256, "access request received");
        let (access, echo) = access_of(request);
        match self.agent.decide(access) {
            Answer::Now(decision) => self.reply(request_id, echo, decision).await,
            Answer::Later(later) => {
                let session = self.clone();
                tokio::spawn(async move {
                    if let Some(decision) = later.decision().await {
                        session.reply(request_id, None, decision).await;
                    }
                });
            }
        }
    }

    /// Sends the decision, then has it counted and recorded (never the other way round).
    async fn reply(&self, request_id: u64, echo: Option<String>, decision: Decision) {
        let Decision {
            action,
            reason,
            cacheable,
            ttl_seconds,
            verdicts,
            tally,
        } = decision;
        let message = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Decision(v1::Decision {
                request_id,
                action: convert::action_to_proto(action).into(),
                reason,
                cacheable,
                ttl_seconds,
                verdicts: verdicts_to_proto(&verdicts, echo),
            })),
        };
        if self.tx.0.send(Ok(message)).await.is_err() {
            debug!(node = %self.agent.node(), request_id, "agent gone before its decision");
        }
        self.agent.settle(tally);
    }
}

/// The access a request describes, and its digest as sent when that is in canonical form (to
/// echo rather than format the digest again). Every field is named, so that a new field of the
/// message cannot be forgotten here.
fn access_of(request: v1::AccessRequest) -> (Access, Option<String>) {
    let v1::AccessRequest {
        request_id,
        file: _,
        sha256: hex,
        size,
        subject,
        path,
        host_path,
        kind,
        deadline_ms,
    } = request;
    let (sha256, echo) = match convert::canonical_sha256(&hex) {
        Some(sha256) => (Ok(sha256), Some(hex)),
        // Upper case is valid but not canonical: the general parser decides.
        None => (
            convert::sha256("sha256", &hex).map_err(|e| e.to_string()),
            None,
        ),
    };
    let access = Access {
        request_id,
        sha256,
        size,
        kind: convert::access_kind_known(kind),
        path,
        host_path,
        deadline: (deadline_ms > 0).then(|| Duration::from_millis(u64::from(deadline_ms))),
        subject: subject_of(subject),
    };
    (access, echo)
}

/// Who made an access, by moving the subject's fields (nothing is copied).
fn subject_of(subject: Option<v1::Subject>) -> Subject {
    let Some(mut s) = subject else {
        return Subject::default();
    };
    Subject {
        pid: s.pid,
        uid: s.uid,
        exe: mem::take(&mut s.exe),
        labelled_tenant: mem::take(&mut s.tenant),
        context: s.into(),
    }
}

/// An access the agent decided itself. Every field is named.
fn report_of(report: v1::AccessReport) -> Report {
    let v1::AccessReport {
        at_unix_ms,
        action,
        reason,
        sha256,
        subject,
        path,
        kind,
        threat_name,
        allowed_count,
        dropped_reports,
        host_path,
    } = report;
    Report {
        at_unix_ms,
        action: convert::action_from_proto(action),
        decided_by: convert::local_reason_from_proto(reason),
        sha256: convert::sha256("sha256", &sha256).ok(),
        path,
        host_path,
        kind: convert::access_kind_from_proto(kind),
        threat_name: (!threat_name.is_empty()).then_some(threat_name),
        subject: subject_of(subject),
        allowed_count,
        dropped_reports,
    }
}

/// The verdicts behind a decision, on the wire. The one verdict of the cached path carries the
/// request's own digest when that was canonical (the verdict's digest is the request's).
fn verdicts_to_proto(verdicts: &Verdicts, echo: Option<String>) -> Vec<v1::Verdict> {
    match verdicts {
        Verdicts::None => Vec::new(),
        Verdicts::One(v) => {
            let hex = echo.unwrap_or_else(|| v.sha256.to_hex());
            vec![convert::verdict_to_proto(v, hex)]
        }
        Verdicts::Of(_) => verdicts.iter().map(|v| v.as_ref().into()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use fleetscan_core::tenancy::EffectivePolicy;
    use fleetscan_core::{AccessKind, Sha256};

    use super::*;

    /// An exec-only policy skips plain opens only: a kind the broker does not know (a newer
    /// agent's, or none) must be scanned, not let through as an open.
    #[test]
    fn unknown_access_kinds_are_skipped_as_execs() {
        let skip_kind = |raw| access::skip_kind(convert::access_kind_known(raw));
        assert_eq!(skip_kind(v1::AccessKind::Open as i32), AccessKind::Open);
        assert_eq!(skip_kind(v1::AccessKind::Exec as i32), AccessKind::Exec);
        assert_eq!(
            skip_kind(v1::AccessKind::Unspecified as i32),
            AccessKind::Exec
        );
        assert_eq!(skip_kind(99), AccessKind::Exec);
        let exec_only = EffectivePolicy {
            tenant: "acme".into(),
            namespace: Some("ci".into()),
            policy: fleetscan_core::Policy::default(),
            exec_only: true,
            exclusions: Default::default(),
            pools: Vec::new(),
        };
        assert!(exec_only.skip(skip_kind(1), "/x", "", "ci").is_some());
        for unknown in [0, 3, 99] {
            assert_eq!(exec_only.skip(skip_kind(unknown), "/x", "", "ci"), None);
        }
    }

    /// A canonical digest is kept to be echoed; any other valid one is parsed and formatted
    /// again; an invalid one is the access layer's to answer by the fail mode.
    #[test]
    fn requests_become_accesses_without_copies() {
        let digest = Sha256::of(b"x");
        let request = |hex: String| v1::AccessRequest {
            request_id: 7,
            sha256: hex,
            path: "/p".into(),
            deadline_ms: 300,
            subject: Some(v1::Subject {
                pid: 1,
                k8s_namespace: "shop".into(),
                tenant: "acme".into(),
                exe: "/bin/sh".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (access, echo) = access_of(request(digest.to_hex()));
        assert_eq!(access.sha256, Ok(digest));
        assert_eq!(echo, Some(digest.to_hex()));
        assert_eq!(access.deadline, Some(Duration::from_millis(300)));
        assert_eq!(access.subject.context.namespace, "shop");
        assert_eq!(access.subject.labelled_tenant, "acme");
        assert_eq!(access.subject.exe, "/bin/sh");
        let (access, echo) = access_of(request(digest.to_hex().to_uppercase()));
        assert_eq!((access.sha256, echo), (Ok(digest), None));
        let (access, _) = access_of(request("nope".into()));
        assert!(access.sha256.unwrap_err().contains("sha256"));
        assert_eq!(access_of(v1::AccessRequest::default()).0.deadline, None);
    }
}
