//! `AgentService.Session`: one long-lived stream per agent.
//!
//! The first message must be the hello; then every access request gets a Decision — at once from
//! the memory cache, or after a flight (store, content, scan) — unless its deadline passes first,
//! in which case the broker stops waiting and the agent answers the kernel itself. One bad
//! request is answered by the fail mode; it never ends the stream. Records are written after
//! the decision is sent, through the write-behind queue; the stream's reader never waits on the
//! store.
//!
//! Each access is decided by the policy of its tenant and namespace, with the verdicts of every
//! pool that policy requires. A tenant's own agent (its hello names a tenant other than the
//! fleet operator's) speaks for that tenant only: every access it sends is that tenant's, whatever
//! namespace it names, so that it can never reach another tenant's pools, verdicts or records.
//! Only the fleet operator's agents attribute accesses by namespace (the broker's mapping, then
//! the label the agent read; host processes are the fleet operator's). The session's agent is
//! sent the whole policy set right after `SessionAccepted` and again on every new version.
//!
//! The cached path (known content, the fleet's steady state) is the hot one: it must never
//! spawn, await the store, or build a record for an allowed access (those are only counted).
//! Requests that arrive together are decided together before the reader yields, so that their
//! decisions leave in one write, and the outbound side drains its queue without re-arming its
//! select for every message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use fleetscan_core::tenancy::{EffectivePolicy, check_name};
use fleetscan_core::{
    AccessKind, AccessRecord, Action, DEFAULT_TENANT, DecidedBy, PoolKey, Sha256, Tenancy, Verdict,
    now_unix_ms,
};
use fleetscan_proto::convert;
use fleetscan_proto::v1::{self, agent_message, broker_message};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::cache::IdentityId;
use crate::content::{AgentLink, ContentEvent, ContentSource};
use crate::decide::{self, Decided, Resolution};
use crate::engine::{Engine, Pending, PoolLookup, SessionInfo, tenant_or_default};
use crate::error::BrokerError;
use crate::shutdown::Shutdown;
use crate::stats::{add, bump};
use crate::writer::{HostSeen, WriteOp};

/// How long a new stream may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the broker sends a heartbeat on an idle stream.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(10);
/// How often a session refreshes its host row and flushes its counters.
const HOST_PERIOD: Duration = Duration::from_secs(60);

/// The capability of an agent that keys its cached decisions by tenant and namespace policy
/// (and sets kernel ignore marks only for decisions that hold for every policy). Without it,
/// when more than one policy is in force, no decision may be cached: a file allowed for one
/// namespace (audit-only, another tenant's clean verdict) could otherwise be allowed from the
/// cache for another that must deny it.
pub use fleetscan_proto::CAPABILITY_SCOPED_CACHE as SCOPED_CACHE_CAPABILITY;
/// Messages queued towards one agent; when full, the session's reader waits for the agent.
const OUTBOUND: usize = 1024;
/// Requests of one session waiting for a scan at once; beyond, the fail mode answers at once.
const MAX_PENDING: usize = 4096;
/// The longest a request is waited for, whatever deadline the agent gives.
const MAX_REQUEST_DEADLINE: Duration = Duration::from_secs(60);
/// Messages the reader handles in a row once one arrived, when more are already buffered,
/// before it goes back to its select (stop, closed, host tick): bounded so those are still
/// seen under a steady flood.
const INBOUND_BATCH: usize = 256;
/// Messages the outbound side yields in a row from its queue before it looks at its select
/// again; a pending flush or stop ends the run at once.
const OUTBOUND_BATCH: usize = 256;

pub type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::BrokerMessage, Status>> + Send>>;

pub struct AgentSvc {
    pub engine: Arc<Engine>,
    pub shutdown: Shutdown,
}

struct Session {
    id: u64,
    tenant: String,
    node: String,
    cluster: String,
    agent_version: String,
    /// The agent keys its cache by policy ([`SCOPED_CACHE_CAPABILITY`]).
    scoped_cache: bool,
    link: Arc<AgentLink>,
    /// Accesses allowed and denied since the host counters were last flushed.
    allowed: AtomicU64,
    denied: AtomicU64,
    pending: Arc<Semaphore>,
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// The first message of a stream (agents' and workers' alike), which must come within
/// [`HELLO_TIMEOUT`] and be the one `extract` accepts; anything else ends the stream with an
/// error naming what was expected.
pub(crate) async fn first_message<M, T>(
    inbound: &mut Streaming<M>,
    what: &'static str,
    extract: impl FnOnce(M) -> Option<T>,
) -> Result<T, Status> {
    match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Err(_) => Err(BrokerError::Timeout("no first message within 10 s").into()),
        Ok(Err(status)) => Err(status),
        Ok(Ok(message)) => message.and_then(extract).ok_or_else(|| {
            BrokerError::Protocol(format!("the first message must be {what}")).into()
        }),
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
        if hello.node.is_empty() {
            return Err(
                BrokerError::InvalidArgument("AgentHello without a node name".into()).into(),
            );
        }
        // The session's tenant decides every access of a tenant's agent: a name the tenancy
        // could never hold is refused rather than guessed at.
        if !hello.tenant.is_empty()
            && let Err(e) = check_name("tenant", &hello.tenant)
        {
            return Err(BrokerError::InvalidArgument(format!("AgentHello: {e}")).into());
        }
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(OUTBOUND);
        let session = Arc::new(Session {
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            tenant: tenant_or_default(&hello.tenant),
            node: hello.node.clone(),
            cluster: hello.cluster,
            agent_version: hello.agent_version,
            scoped_cache: hello
                .capabilities
                .iter()
                .any(|c| c == SCOPED_CACHE_CAPABILITY),
            link: Arc::new(AgentLink::new(hello.node, tx.clone())),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
        });
        let mut generation = engine.generation.subscribe();
        let verdict_generation = *generation.borrow_and_update();
        let mut policies = engine.tenancy.subscribe();
        let tenancy = policies.borrow_and_update().clone();
        let accepted = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(v1::SessionAccepted {
                broker_id: engine.config.broker_id.clone(),
                policy: Some((&tenancy.resolve(&session.tenant, "").policy).into()),
                verdict_generation,
            })),
        };
        // The policy set goes out right after SessionAccepted, before any decision: the queue
        // is empty, so this cannot fail.
        let _ = tx.try_send(Ok(policy_update(&tenancy, &session.tenant)));
        drop(tx);
        engine.sessions.lock().insert(
            session.id,
            SessionInfo {
                tenant: session.tenant.clone(),
                node: session.node.clone(),
            },
        );
        session.host_seen(&engine);
        info!(node = %session.node, tenant = %session.tenant, cluster = %session.cluster, agent_version = %session.agent_version, "agent connected");
        let outbound = outbound(accepted, rx, generation, self.shutdown.clone());
        tokio::spawn(read_loop(
            engine,
            session,
            inbound,
            policies,
            self.shutdown.clone(),
        ));
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

/// The broker's side of the stream: `SessionAccepted` first, always (a flush or a decision
/// must never overtake it), then queued messages, cache flushes, heartbeats.
fn outbound(
    accepted: v1::BrokerMessage,
    mut rx: mpsc::Receiver<Result<v1::BrokerMessage, Status>>,
    mut generation: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) -> SessionStream {
    Box::pin(async_stream::stream! {
        yield Ok(accepted);
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + HEARTBEAT_PERIOD, HEARTBEAT_PERIOD);
        loop {
            tokio::select! {
                biased;
                () = shutdown.recv() => break,
                // Before decisions: a decision made under new rules must not overtake the flush.
                changed = generation.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let verdict_generation = *generation.borrow_and_update();
                    yield Ok(v1::BrokerMessage {
                        msg: Some(broker_message::Msg::Flush(v1::CacheFlush {
                            verdict_generation,
                            reason: "scanner rules changed".into(),
                        })),
                    });
                }
                message = rx.recv() => {
                    let mut next = message;
                    let mut yielded = 0;
                    let mut end = false;
                    // Whatever else is queued goes out in the same run. A flush is never
                    // overtaken: a changed generation ends the run and the select sends it first.
                    loop {
                        match next {
                            Some(Ok(message)) => yield Ok(message),
                            Some(Err(status)) => {
                                yield Err(status);
                                end = true;
                                break;
                            }
                            None => {
                                end = true;
                                break;
                            }
                        }
                        yielded += 1;
                        if yielded == OUTBOUND_BATCH
                            || generation.has_changed().unwrap_or(true)
                            || shutdown.is_shutdown()
                        {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(message) => next = Some(message),
                            Err(_) => break,
                        }
                    }
                    if end {
                        break;
                    }
                }
                _ = heartbeat.tick() => yield Ok(v1::BrokerMessage {
                    msg: Some(broker_message::Msg::Heartbeat(v1::Heartbeat {
                        sent_at_unix_ms: now_unix_ms(),
                    })),
                }),
            }
        }
    })
}

async fn read_loop(
    engine: Arc<Engine>,
    session: Arc<Session>,
    mut inbound: Streaming<v1::AgentMessage>,
    mut policies: watch::Receiver<Arc<Tenancy>>,
    mut shutdown: Shutdown,
) {
    let mut host_tick = tokio::time::interval_at(Instant::now() + HOST_PERIOD, HOST_PERIOD);
    loop {
        tokio::select! {
            biased;
            () = shutdown.recv() => break,
            _ = session.link.tx.closed() => break,
            changed = policies.changed() => {
                if changed.is_err() {
                    break; // The engine is gone.
                }
                let tenancy = policies.borrow_and_update().clone();
                info!(node = %session.node, version = tenancy.version(), "sending a new policy set");
                if session.link.tx.send(Ok(policy_update(&tenancy, &session.tenant))).await.is_err() {
                    break;
                }
            }
            _ = host_tick.tick() => {
                session.host_seen(&engine);
                session.flush_counts(&engine);
            }
            message = inbound.message() => {
                if !on_inbound(&engine, &session, message).await
                    || !drain_inbound(&engine, &session, &mut inbound).await
                {
                    break;
                }
            }
        }
    }
    session.link.close();
    engine.sessions.lock().remove(&session.id);
    session.flush_counts(&engine);
    info!(node = %session.node, "agent disconnected");
}

/// Handles one result of the inbound stream; false when the stream is over.
async fn on_inbound(
    engine: &Arc<Engine>,
    session: &Arc<Session>,
    message: Result<Option<v1::AgentMessage>, Status>,
) -> bool {
    match message {
        Ok(Some(message)) => {
            handle(engine, session, message).await;
            true
        }
        Ok(None) => false,
        Err(status) => {
            debug!(node = %session.node, %status, "agent stream failed");
            // E.g. an oversized message: tell the agent why its stream ends.
            let _ = session.link.tx.try_send(Err(status));
            false
        }
    }
}

/// Handles the messages already received (up to [`INBOUND_BATCH`]) without waiting for more,
/// so that a burst of requests is decided before this task yields and the connection writes
/// their decisions at once. False when the stream is over.
async fn drain_inbound(
    engine: &Arc<Engine>,
    session: &Arc<Session>,
    inbound: &mut Streaming<v1::AgentMessage>,
) -> bool {
    for _ in 0..INBOUND_BATCH {
        // One poll: a message already decoded or buffered is Ready, anything else is Pending
        // (and the select's next poll waits for it).
        let next =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *inbound).poll_next(cx))).await;
        match next {
            Poll::Ready(message) => {
                if !on_inbound(engine, session, message.transpose()).await {
                    return false;
                }
            }
            Poll::Pending => return true,
        }
    }
    true
}

async fn handle(engine: &Arc<Engine>, session: &Arc<Session>, message: v1::AgentMessage) {
    match message.msg {
        Some(agent_message::Msg::Access(request)) => access(engine, session, request).await,
        Some(agent_message::Msg::Content(chunk)) => {
            let event = ContentEvent::Chunk {
                offset: chunk.offset,
                data: chunk.data,
                last: chunk.last,
            };
            session.link.route(chunk.request_id, event).await;
        }
        Some(agent_message::Msg::ContentUnavailable(u)) => {
            session
                .link
                .route(u.request_id, ContentEvent::Unavailable(u.reason))
                .await;
        }
        Some(agent_message::Msg::Report(report)) => session.report(engine, report),
        Some(agent_message::Msg::Hello(_)) => {
            warn!(node = %session.node, "second AgentHello ignored");
        }
        // Heartbeats only show the agent is alive; unknown messages come from newer agents.
        Some(agent_message::Msg::Heartbeat(_)) | None => {}
    }
}

/// How long the broker waits for a request: the agent's deadline, or the policy's.
fn request_deadline(request: &v1::AccessRequest, policy: &EffectivePolicy) -> Duration {
    if request.deadline_ms == 0 {
        policy.policy.effective_deadline()
    } else {
        Duration::from_millis(u64::from(request.deadline_ms)).min(MAX_REQUEST_DEADLINE)
    }
}

/// The namespace, the tenant the agent read from its label, and the image of an access's
/// subject (empty when unknown, or for a host process).
fn attribution(subject: Option<&v1::Subject>) -> (&str, &str, &str) {
    subject.map_or(("", "", ""), |s| {
        (
            s.k8s_namespace.as_str(),
            s.tenant.as_str(),
            s.image.as_str(),
        )
    })
}

/// The tenant an access of a session of `session_tenant` belongs to: a tenant's own agent's
/// accesses are all that tenant's (its agent cannot speak for another tenant's namespaces); the
/// fleet operator's agents' are attributed by namespace and label.
fn access_tenant<'a>(
    tenancy: &'a Tenancy,
    session_tenant: &'a str,
    namespace: &str,
    labelled: &'a str,
) -> &'a str {
    if session_tenant == DEFAULT_TENANT {
        tenancy.tenant_of(namespace, labelled)
    } else {
        session_tenant
    }
}

/// The kind an access is skipped (or not) by: an unknown or unspecified kind (a newer agent,
/// a broken one) counts as an exec, the kind no policy lets through unscanned.
fn skip_kind(raw: i32) -> AccessKind {
    match v1::AccessKind::try_from(raw) {
        Ok(v1::AccessKind::Open) => AccessKind::Open,
        Ok(v1::AccessKind::Exec | v1::AccessKind::Unspecified) | Err(_) => AccessKind::Exec,
    }
}

/// What one access is decided under, looked up once per access: its policy, and whether that
/// policy is the only one (read from the same tenancy snapshot).
struct Scope {
    effective: Arc<EffectivePolicy>,
    single_policy: bool,
}

impl Scope {
    /// The policy in force for an access of `session`'s agent from the subject's namespace (the
    /// access's tenant's policy, or its namespace's within the tenant).
    fn of(engine: &Engine, session: &Session, namespace: &str, labelled: &str) -> Scope {
        let tenancy = engine.tenancy.borrow();
        let tenant = access_tenant(&tenancy, &session.tenant, namespace, labelled);
        Scope {
            effective: tenancy.resolve(tenant, namespace),
            single_policy: tenancy.is_single_policy(),
        }
    }
}

/// The path an access is known by (the agent's view; the host's when the agent gave none),
/// and the host path a record keeps beside it (empty when it is the path itself).
fn paths(request: &v1::AccessRequest) -> (&str, &str) {
    if request.path.is_empty() {
        (&request.host_path, "")
    } else {
        (&request.path, &request.host_path)
    }
}

fn pool_lookup(
    session: &Session,
    request: &v1::AccessRequest,
    sha256: Sha256,
    effective: &EffectivePolicy,
    pool: &PoolKey,
) -> PoolLookup {
    PoolLookup {
        sha256,
        size: request.size,
        tenant: effective.tenant.clone(),
        pool: pool.key(),
        max_file_size: effective.policy.max_file_size,
        path_hint: request.path.clone(),
        source: ContentSource::Agent {
            link: session.link.clone(),
            request_id: request.request_id,
            size: request.size,
        },
    }
}

async fn access(engine: &Arc<Engine>, session: &Arc<Session>, mut request: v1::AccessRequest) {
    let scope = {
        let (namespace, labelled, image) = attribution(request.subject.as_ref());
        let scope = Scope::of(engine, session, namespace, labelled);
        let (path, _) = paths(&request);
        if let Some(why) = scope
            .effective
            .skip(skip_kind(request.kind), path, image, namespace)
        {
            let decided = decide::skipped(why);
            session
                .decide(engine, &request, &scope, None, decided, Vec::new())
                .await;
            return;
        }
        scope
    };
    let effective = &scope.effective;
    let policy = &effective.policy;
    let (sha256, canonical) = match parse_canonical_sha256(&request.sha256) {
        Some(sha256) => (sha256, true),
        None => match convert::sha256("sha256", &request.sha256) {
            Ok(sha256) => (sha256, false),
            Err(e) => {
                let decided = decide::fail(policy, format!("invalid request: {e}"));
                session
                    .decide(engine, &request, &scope, None, decided, Vec::new())
                    .await;
                return;
            }
        },
    };
    // The hot path: known content of the pools' current identities, no store, no spawn.
    if let [pool] = effective.pools.as_slice()
        && let Some(verdict) = engine.cached_in(&sha256, pool)
    {
        bump(&engine.stats.cache_hits);
        let decided = decide::decide(policy, &Resolution::Verdict(verdict.clone()));
        // The request's digest is the verdict's, already in canonical form: echo it rather
        // than format the digest again.
        let hex = if canonical {
            std::mem::take(&mut request.sha256)
        } else {
            sha256.to_hex()
        };
        let verdict = verdict_to_proto(&verdict, hex);
        session
            .decide(
                engine,
                &request,
                &scope,
                Some(sha256),
                decided,
                vec![verdict],
            )
            .await;
        return;
    }
    if effective.pools.len() > 1 {
        let cached: Option<Vec<Arc<Verdict>>> = effective
            .pools
            .iter()
            .map(|pool| engine.cached_in(&sha256, pool))
            .collect();
        if let Some(cached) = cached {
            bump(&engine.stats.cache_hits);
            let resolutions: Vec<Resolution> =
                cached.into_iter().map(Resolution::Verdict).collect();
            let decided = decide::decide_all(policy, &resolutions);
            let verdicts = resolutions.iter().filter_map(verdict_of).collect();
            session
                .decide(engine, &request, &scope, Some(sha256), decided, verdicts)
                .await;
            return;
        }
    }
    let Ok(permit) = session.pending.clone().try_acquire_owned() else {
        let decided = decide::fail(policy, "broker overloaded: too many pending requests");
        session
            .decide(engine, &request, &scope, Some(sha256), decided, Vec::new())
            .await;
        return;
    };
    let deadline = Instant::now() + request_deadline(&request, effective);
    // The pools are asked one after another: a flight that needs the content asks the agent
    // for it under this request's id, and one id carries one upload at a time.
    let mut resolutions = Vec::with_capacity(effective.pools.len());
    let mut identities: Vec<(PoolKey, Option<IdentityId>)> =
        Vec::with_capacity(effective.pools.len());
    let mut waiting = None;
    for (i, pool) in effective.pools.iter().enumerate() {
        let (identity, pending) =
            engine.resolve_in(pool_lookup(session, &request, sha256, effective, pool));
        identities.push((pool.clone(), identity));
        match pending {
            Pending::Ready(resolution) => resolutions.push(resolution),
            Pending::Wait(waiter) => {
                waiting = Some((waiter, i + 1));
                break;
            }
        }
    }
    let Some((waiter, mut next)) = waiting else {
        drop(permit);
        let decided = decide::decide_all(policy, &resolutions);
        let verdicts = resolutions.iter().filter_map(verdict_of).collect();
        session
            .decide(engine, &request, &scope, Some(sha256), decided, verdicts)
            .await;
        return;
    };
    let engine = engine.clone();
    let session = session.clone();
    tokio::spawn(async move {
        let effective = &scope.effective;
        let _permit = permit;
        let mut waiter = Some(waiter);
        loop {
            if let Some(w) = waiter.take() {
                let Ok(resolution) = tokio::time::timeout_at(deadline, w.wait()).await else {
                    // The agent answers the kernel with its fail mode and reports it; the scan
                    // goes on and its verdict serves the next request.
                    debug!(node = %session.node, request_id = request.request_id, sha256 = %sha256, "decision deadline passed");
                    return;
                };
                resolutions.push(
                    resolution.unwrap_or_else(|| Resolution::Failed("scan abandoned".into())),
                );
            }
            let Some(pool) = effective.pools.get(next) else {
                break;
            };
            next += 1;
            let (identity, pending) =
                engine.resolve_in(pool_lookup(&session, &request, sha256, effective, pool));
            identities.push((pool.clone(), identity));
            match pending {
                Pending::Ready(resolution) => resolutions.push(resolution),
                Pending::Wait(w) => waiter = Some(w),
            }
        }
        let mut decided = decide::decide_all(&effective.policy, &resolutions);
        if identities
            .iter()
            .any(|(pool, identity)| engine.current_of(pool).map(|c| c.id) != *identity)
        {
            // The rules changed during the scan: answer, but let no agent keep it.
            decided.cacheable = false;
            decided.ttl_seconds = 0;
        }
        let verdicts = resolutions.iter().filter_map(verdict_of).collect();
        session
            .decide(&engine, &request, &scope, Some(sha256), decided, verdicts)
            .await;
    });
}

fn verdict_of(resolution: &Resolution) -> Option<v1::Verdict> {
    match resolution {
        Resolution::Verdict(v) => Some(v.as_ref().into()),
        _ => None,
    }
}

/// The verdict on the wire, with its digest already in hex. Every field is named, so that a new
/// field of the message cannot be forgotten here.
fn verdict_to_proto(v: &Verdict, sha256_hex: String) -> v1::Verdict {
    v1::Verdict {
        sha256: sha256_hex,
        scanner: Some((&v.scanner).into()),
        result: convert::verdict_kind_to_proto(v.kind).into(),
        threat_name: v.threat_name.clone().unwrap_or_default(),
        detail: v.detail.clone().unwrap_or_default(),
        scanned_at_unix_ms: v.scanned_at_unix_ms,
        scan_micros: v.scan_micros,
    }
}

/// The digest of a request when it is in canonical form (64 lower-case hex digits, what agents
/// send), else `None` (the general parser then decides, and accepts upper case too).
fn parse_canonical_sha256(hex: &str) -> Option<Sha256> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(Sha256(out))
}

impl Session {
    /// Sends the decision, then counts and records it (never the other way round). The record
    /// belongs to the access's tenant (`scope`'s), which for the fleet operator's agents is not
    /// necessarily the agent's.
    async fn decide(
        &self,
        engine: &Engine,
        request: &v1::AccessRequest,
        scope: &Scope,
        sha256: Option<Sha256>,
        decided: Decided,
        verdicts: Vec<v1::Verdict>,
    ) {
        let mut decided = decided;
        if decided.cacheable && !self.scoped_cache && !scope.single_policy {
            decided.cacheable = false;
            decided.ttl_seconds = 0;
        }
        let record = decided.record.then(|| {
            let (path, host_path) = paths(request);
            AccessRecord {
                at_unix_ms: now_unix_ms(),
                tenant: scope.effective.tenant.clone(),
                node: self.node.clone(),
                path: path.to_owned(),
                kind: convert::access_kind_from_proto(request.kind),
                action: decided.action,
                reason: decided.reason.clone(),
                sha256,
                threat_name: decided.threat_name.clone(),
                pid: request.subject.as_ref().map_or(0, |s| s.pid),
                uid: request.subject.as_ref().map_or(0, |s| s.uid),
                exe: request
                    .subject
                    .as_ref()
                    .map(|s| s.exe.clone())
                    .unwrap_or_default(),
                decided_by: DecidedBy::Broker,
                context: context_of(
                    request.subject.as_ref().unwrap_or(&v1::Subject::default()),
                    host_path,
                ),
            }
        });
        let action = decided.action;
        let message = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Decision(v1::Decision {
                request_id: request.request_id,
                action: convert::action_to_proto(action).into(),
                reason: decided.reason,
                cacheable: decided.cacheable,
                ttl_seconds: decided.ttl_seconds,
                verdicts,
            })),
        };
        if self.link.tx.send(Ok(message)).await.is_err() {
            debug!(node = %self.node, request_id = request.request_id, "agent gone before its decision");
        }
        let stats = &engine.stats;
        bump(&stats.decisions);
        if decided.fail_mode {
            bump(&stats.fail_mode_decisions);
        }
        if decided.oversize {
            bump(&stats.oversize);
        }
        match action {
            Action::Deny => {
                bump(&stats.denied);
                self.denied.fetch_add(1, Ordering::Relaxed);
            }
            Action::Allow => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(record) = record {
            engine.writer.submit(WriteOp::Access(Box::new(record)));
        }
    }

    /// An access the agent decided itself: denials are recorded; allowed ones only counted. A
    /// report with action ALLOW counts itself; `allowed_count` counts accesses never reported
    /// one by one.
    fn report(&self, engine: &Engine, report: v1::AccessReport) {
        if report.dropped_reports > 0 {
            add(&engine.stats.dropped_reports, report.dropped_reports);
            warn!(node = %self.node, dropped = report.dropped_reports, "agent dropped access reports while disconnected");
        }
        self.allowed
            .fetch_add(report.allowed_count, Ordering::Relaxed);
        match convert::action_from_proto(report.action) {
            Some(Action::Allow) => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
            }
            Some(Action::Deny) => {
                self.denied.fetch_add(1, Ordering::Relaxed);
                let (decided_by, why) = local_reason(report.reason);
                let threat_name = (!report.threat_name.is_empty()).then_some(report.threat_name);
                let reason = match &threat_name {
                    Some(threat) => format!("{why}: {threat}"),
                    None => why.to_owned(),
                };
                let subject = report.subject.unwrap_or_default();
                // The access's tenant, by the broker's rules (a tenant's agent reports for its
                // own tenant only), not what the report claims.
                let tenant = {
                    let tenancy = engine.tenancy.borrow();
                    access_tenant(
                        &tenancy,
                        &self.tenant,
                        &subject.k8s_namespace,
                        &subject.tenant,
                    )
                    .to_owned()
                };
                engine.writer.submit(WriteOp::Access(Box::new(AccessRecord {
                    at_unix_ms: if report.at_unix_ms > 0 {
                        report.at_unix_ms
                    } else {
                        now_unix_ms()
                    },
                    tenant,
                    node: self.node.clone(),
                    path: report.path,
                    kind: convert::access_kind_from_proto(report.kind),
                    action: Action::Deny,
                    reason,
                    sha256: report.sha256.parse().ok(),
                    threat_name,
                    pid: subject.pid,
                    uid: subject.uid,
                    context: context_of(&subject, &report.host_path),
                    exe: subject.exe,
                    decided_by,
                })));
            }
            // A report that only carries counts.
            None => {}
        }
    }

    fn host_seen(&self, engine: &Engine) {
        engine.writer.submit(WriteOp::HostSeen(HostSeen {
            tenant: self.tenant.clone(),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            agent_version: self.agent_version.clone(),
            at_unix_ms: now_unix_ms(),
        }));
    }

    fn flush_counts(&self, engine: &Engine) {
        let allowed = self.allowed.swap(0, Ordering::Relaxed);
        let denied = self.denied.swap(0, Ordering::Relaxed);
        if allowed + denied > 0 {
            engine.writer.submit(WriteOp::HostCounts {
                tenant: self.tenant.clone(),
                node: self.node.clone(),
                allowed,
                denied,
            });
        }
    }
}

/// Who decided a reported access, and why, from the agent's local reason. An unknown reason
/// (a newer agent) is recorded as the agent's cache, the commonest local decision.
fn local_reason(raw: i32) -> (DecidedBy, &'static str) {
    match v1::LocalReason::try_from(raw) {
        Ok(v1::LocalReason::Deadline) => {
            (DecidedBy::AgentDeadline, "no decision before the deadline")
        }
        Ok(v1::LocalReason::Oversize) => (DecidedBy::AgentOversize, "oversize"),
        Ok(v1::LocalReason::Unreadable) => (DecidedBy::AgentUnreadable, "unreadable"),
        Ok(v1::LocalReason::NoBroker) => (DecidedBy::AgentNoBroker, "no broker"),
        Ok(v1::LocalReason::Cached | v1::LocalReason::Unspecified) | Err(_) => {
            (DecidedBy::AgentCache, "cached decision")
        }
    }
}

/// What a record keeps of an access's origin besides pid, uid and executable.
fn context_of(s: &v1::Subject, host_path: &str) -> fleetscan_core::AccessContext {
    fleetscan_core::AccessContext {
        ns_pid: s.ns_pid,
        cgroup: s.cgroup.clone(),
        container_id: s.container_id.clone(),
        pod_uid: s.pod_uid.clone(),
        namespace: s.k8s_namespace.clone(),
        image: s.image.clone(),
        host_path: host_path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_reasons_map_to_who_decided() {
        assert_eq!(
            local_reason(v1::LocalReason::Deadline as i32).0,
            DecidedBy::AgentDeadline
        );
        assert_eq!(
            local_reason(v1::LocalReason::NoBroker as i32).0,
            DecidedBy::AgentNoBroker
        );
        assert_eq!(local_reason(99).0, DecidedBy::AgentCache);
    }

    /// A rule-set change racing with a new session must not put a CacheFlush (or anything else)
    /// before SessionAccepted: the agent rejects a session that does not start with it.
    #[tokio::test]
    async fn session_accepted_is_always_the_first_message() {
        use tokio_stream::StreamExt;

        let (generation_tx, generation) = watch::channel(1u64);
        let (_signal, shutdown) = crate::shutdown::channel();
        let (tx, rx) = mpsc::channel(4);
        let accepted = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(v1::SessionAccepted::default())),
        };
        // Both a flush and a queued message are ready before the stream is first polled.
        generation_tx.send(2).unwrap();
        tx.send(Ok(v1::BrokerMessage {
            msg: Some(broker_message::Msg::Heartbeat(v1::Heartbeat::default())),
        }))
        .await
        .unwrap();
        let mut stream = outbound(accepted, rx, generation, shutdown);
        let first = stream.next().await.unwrap().unwrap();
        assert!(
            matches!(first.msg, Some(broker_message::Msg::Accepted(_))),
            "{first:?}"
        );
        let second = stream.next().await.unwrap().unwrap();
        assert!(
            matches!(second.msg, Some(broker_message::Msg::Flush(_))),
            "{second:?}"
        );
    }

    /// The outbound side sends queued messages in runs; a rule-set change in the middle of a
    /// run must end it, so that the flush goes out before the rest of the queue.
    #[tokio::test]
    async fn a_flush_ends_a_run_of_queued_messages() {
        use tokio_stream::StreamExt;

        let (generation_tx, generation) = watch::channel(1u64);
        let (_signal, shutdown) = crate::shutdown::channel();
        let (tx, rx) = mpsc::channel(8);
        let accepted = v1::BrokerMessage {
            msg: Some(broker_message::Msg::Accepted(v1::SessionAccepted::default())),
        };
        let decision = |request_id| {
            Ok(v1::BrokerMessage {
                msg: Some(broker_message::Msg::Decision(v1::Decision {
                    request_id,
                    ..Default::default()
                })),
            })
        };
        let mut stream = outbound(accepted, rx, generation, shutdown);
        stream.next().await.unwrap().unwrap();
        for id in 1..=3 {
            tx.send(decision(id)).await.unwrap();
        }
        let kind = |m: v1::BrokerMessage| match m.msg {
            Some(broker_message::Msg::Decision(d)) => format!("decision {}", d.request_id),
            Some(broker_message::Msg::Flush(f)) => format!("flush {}", f.verdict_generation),
            other => format!("{other:?}"),
        };
        assert_eq!(kind(stream.next().await.unwrap().unwrap()), "decision 1");
        generation_tx.send(2).unwrap();
        let rest: Vec<String> = [
            stream.next().await,
            stream.next().await,
            stream.next().await,
        ]
        .into_iter()
        .map(|m| kind(m.unwrap().unwrap()))
        .collect();
        assert_eq!(rest, ["flush 2", "decision 2", "decision 3"]);
    }

    /// An exec-only policy skips plain opens only: a kind the broker does not know (a newer
    /// agent's, or none) must be scanned, not let through as an open.
    #[test]
    fn unknown_access_kinds_are_skipped_as_execs() {
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

    #[test]
    fn canonical_digests_parse_like_the_general_parser() {
        for content in [&b""[..], b"x", b"fleetscan"] {
            let digest = Sha256::of(content);
            let hex = digest.to_hex();
            assert_eq!(parse_canonical_sha256(&hex), Some(digest));
            // Upper case is valid but not canonical: the general parser takes it, and the
            // decision then carries the digest re-formatted.
            assert_eq!(parse_canonical_sha256(&hex.to_uppercase()), None);
            assert_eq!(
                convert::sha256("sha256", &hex.to_uppercase()).ok(),
                Some(digest)
            );
        }
        let hex = Sha256::of(b"x").to_hex();
        assert_eq!(parse_canonical_sha256(&hex[..63]), None);
        assert_eq!(parse_canonical_sha256(&format!("{hex}0")), None);
        assert_eq!(parse_canonical_sha256(&format!("g{}", &hex[1..])), None);
        assert_eq!(parse_canonical_sha256(&format!("é{}", &hex[2..])), None);
    }
}
