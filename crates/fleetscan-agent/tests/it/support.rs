//! Test support: a scripted in-process `AgentService` standing in for the broker, and helpers
//! to run the agent and to open files from CHILD processes (the agent runs in the test
//! process, so the test's own opens are "own pid" and always allowed).
//!
//! The fake broker runs on a runtime of its own on its own thread, so that `kill` drops every
//! connection at once, like a broker process that dies.
//!
//! Every test takes its turn on the machine through [`env`] (alongside the others) or
//! [`env_alone`] (while no other test of this binary runs): a test that changes what the whole
//! process shares (its descriptor limit) or that needs the machine quiet (a stress test, whose
//! load would also break other tests' time bounds) runs alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use fleetscan_agent::{Agent, AgentConfig, AgentTuning, Stats};
use fleetscan_core::{FailMode, Sha256};
use fleetscan_fanotify::testing::{Tmpfs, watchdog};
use fleetscan_proto::v1::agent_message::Msg as AgentMsg;
use fleetscan_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleetscan_proto::v1::broker_message::Msg as BrokerMsg;
use fleetscan_proto::{MAX_MESSAGE_SIZE, v1};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// How the fake broker answers access requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Accepts the session, never decides.
    Hang,
    /// Allows, cacheable, with a clean verdict.
    Clean,
    /// Denies, cacheable, with a malicious verdict "Test-Threat".
    Malicious,
    /// Asks for the content; allows (clean) when the upload matches the request's SHA-256,
    /// denies otherwise.
    AskContent,
    /// Denies (malicious, cacheable) content whose SHA-256 (hex) is listed, allows (clean,
    /// cacheable) the rest: a scanner that knows some malware.
    Blocklist(Vec<String>),
}

#[derive(Debug, Default)]
pub struct Upload {
    pub sha256: String,
    pub data: Vec<u8>,
    pub chunks: Vec<(u64, usize, bool)>,
    pub matched: Option<bool>,
}

#[derive(Debug)]
pub struct BrokerState {
    pub mode: Mutex<Mode>,
    pub policy: Mutex<v1::Policy>,
    pub generation: Mutex<u64>,
    pub hellos: Mutex<Vec<v1::AgentHello>>,
    pub accesses: Mutex<Vec<v1::AccessRequest>>,
    pub reports: Mutex<Vec<v1::AccessReport>>,
    pub uploads: Mutex<HashMap<u64, Upload>>,
    pub unavailable: Mutex<Vec<v1::ContentUnavailable>>,
    sessions: Mutex<Vec<mpsc::Sender<Result<v1::BrokerMessage, Status>>>>,
}

fn scanner() -> v1::ScannerIdentity {
    v1::ScannerIdentity {
        scanner: "fake".into(),
        engine: "fake".into(),
        engine_version: "1".into(),
        ruleset_version: "1".into(),
    }
}

fn decision(id: u64, sha256: &str, malicious: bool) -> v1::BrokerMessage {
    let (action, result, threat, reason) = if malicious {
        (
            v1::Action::Deny,
            v1::VerdictResult::Malicious,
            "Test-Threat",
            "malicious: Test-Threat",
        )
    } else {
        (v1::Action::Allow, v1::VerdictResult::Clean, "", "clean")
    };
    v1::BrokerMessage {
        msg: Some(BrokerMsg::Decision(v1::Decision {
            request_id: id,
            action: action.into(),
            reason: reason.into(),
            cacheable: true,
            ttl_seconds: 0,
            verdicts: vec![v1::Verdict {
                sha256: sha256.into(),
                scanner: Some(scanner()),
                result: result.into(),
                threat_name: threat.into(),
                ..Default::default()
            }],
        })),
    }
}

struct Svc(Arc<BrokerState>);

#[tonic::async_trait]
impl AgentService for Svc {
    type SessionStream = ReceiverStream<Result<v1::BrokerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let st = self.0.clone();
        tokio::spawn(async move {
            let Ok(Some(first)) = inbound.message().await else {
                return;
            };
            let Some(AgentMsg::Hello(h)) = first.msg else {
                let _ = tx.send(Err(Status::invalid_argument("hello first"))).await;
                return;
            };
            st.hellos.lock().push(h);
            let accepted = v1::BrokerMessage {
                msg: Some(BrokerMsg::Accepted(v1::SessionAccepted {
                    broker_id: "fake".into(),
                    policy: Some(*st.policy.lock()),
                    verdict_generation: *st.generation.lock(),
                })),
            };
            if tx.send(Ok(accepted)).await.is_err() {
                return;
            }
            st.sessions.lock().push(tx.clone());
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(AgentMsg::Access(a)) => {
                        st.accesses.lock().push(a.clone());
                        let mode = st.mode.lock().clone();
                        let reply = match mode {
                            Mode::Hang => None,
                            Mode::Clean => Some(decision(a.request_id, &a.sha256, false)),
                            Mode::Malicious => Some(decision(a.request_id, &a.sha256, true)),
                            Mode::Blocklist(bad) => {
                                Some(decision(a.request_id, &a.sha256, bad.contains(&a.sha256)))
                            }
                            Mode::AskContent => {
                                st.uploads.lock().insert(
                                    a.request_id,
                                    Upload {
                                        sha256: a.sha256.clone(),
                                        ..Default::default()
                                    },
                                );
                                Some(v1::BrokerMessage {
                                    msg: Some(BrokerMsg::ContentRequest(v1::ContentRequest {
                                        request_id: a.request_id,
                                    })),
                                })
                            }
                        };
                        if let Some(r) = reply {
                            let _ = tx.send(Ok(r)).await;
                        }
                    }
                    Some(AgentMsg::Content(c)) => {
                        let reply = {
                            let mut ups = st.uploads.lock();
                            let Some(u) = ups.get_mut(&c.request_id) else {
                                continue;
                            };
                            u.chunks.push((c.offset, c.data.len(), c.last));
                            u.data.extend_from_slice(&c.data);
                            if c.last {
                                let ok = Sha256::of(&u.data).to_hex() == u.sha256;
                                u.matched = Some(ok);
                                Some(decision(c.request_id, &u.sha256, !ok))
                            } else {
                                None
                            }
                        };
                        if let Some(r) = reply {
                            let _ = tx.send(Ok(r)).await;
                        }
                    }
                    Some(AgentMsg::Report(r)) => st.reports.lock().push(r),
                    Some(AgentMsg::ContentUnavailable(u)) => st.unavailable.lock().push(u),
                    _ => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A scripted broker on a loopback port.
pub struct FakeBroker {
    pub addr: SocketAddr,
    pub state: Arc<BrokerState>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn policy(fail_mode: FailMode, deadline_ms: u32) -> v1::Policy {
    v1::Policy {
        version: 1,
        fail_mode: match fail_mode {
            FailMode::Open => v1::FailMode::Open,
            FailMode::Closed => v1::FailMode::Closed,
        }
        .into(),
        decision_deadline_ms: deadline_ms,
        max_file_size: 64 * 1024 * 1024,
        oversize_action: v1::Action::Allow.into(),
        audit_only: false,
    }
}

impl FakeBroker {
    pub fn start(mode: Mode, policy: v1::Policy) -> FakeBroker {
        FakeBroker::start_on("127.0.0.1:0".parse().unwrap(), mode, policy)
    }

    pub fn start_on(addr: SocketAddr, mode: Mode, policy: v1::Policy) -> FakeBroker {
        let state = Arc::new(BrokerState {
            mode: Mutex::new(mode),
            policy: Mutex::new(policy),
            generation: Mutex::new(1),
            hellos: Mutex::default(),
            accesses: Mutex::default(),
            reports: Mutex::default(),
            uploads: Mutex::default(),
            unavailable: Mutex::default(),
            sessions: Mutex::default(),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let svc = AgentServiceServer::new(Svc(st))
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE);
                let server = tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = server => {}
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime drops every connection and session task: a dead broker.
            drop(rt);
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("fake broker listening");
        FakeBroker {
            addr,
            state,
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the broker abruptly: every connection is dropped.
    pub fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// Sends a message to every live session.
    pub fn push(&self, m: BrokerMsg) {
        let sessions = self.state.sessions.lock().clone();
        for s in sessions {
            let _ = s.try_send(Ok(v1::BrokerMessage {
                msg: Some(m.clone()),
            }));
        }
    }

    pub fn accesses(&self) -> Vec<v1::AccessRequest> {
        self.state.accesses.lock().clone()
    }

    pub fn reports(&self) -> Vec<v1::AccessReport> {
        self.state.reports.lock().clone()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port with nothing listening on it (yet).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A tmpfs of the test's own with `protected/` and `other/` directories, and the test's turn
/// on the machine (see the module header).
pub struct Env {
    pub tmp: Tmpfs,
    pub protected: PathBuf,
    pub other: PathBuf,
    _turn: Turn,
}

/// Held for as long as a test runs.
enum Turn {
    Alongside(#[allow(dead_code, reason = "held, not read")] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code, reason = "held, not read")] RwLockWriteGuard<'static, ()>),
}

/// Taken by every test of this binary: shared by most, alone by some.
static MACHINE: RwLock<()> = RwLock::new(());

/// The environment of a test that runs alongside the others.
pub fn env() -> Env {
    // A test that failed while alone poisons the lock; the others still run.
    let turn = Turn::Alongside(MACHINE.read().unwrap_or_else(PoisonError::into_inner));
    make_env(turn)
}

/// The environment of a test that runs while no other test of this binary does.
pub fn env_alone() -> Env {
    let turn = Turn::Alone(MACHINE.write().unwrap_or_else(PoisonError::into_inner));
    make_env(turn)
}

fn make_env(turn: Turn) -> Env {
    // One limit for the whole binary, started by its first test.
    watchdog(Duration::from_secs(90));
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let tmp = Tmpfs::new();
    let protected = tmp.path().join("protected");
    let other = tmp.path().join("other");
    std::fs::create_dir(&protected).unwrap();
    std::fs::create_dir(&other).unwrap();
    Env {
        tmp,
        protected,
        other,
        _turn: turn,
    }
}

pub fn config(
    env: &Env,
    brokers: Vec<String>,
    fail_mode: FailMode,
    deadline: Duration,
) -> AgentConfig {
    AgentConfig {
        brokers,
        protect: vec![env.protected.clone()],
        node: "test-node".into(),
        cluster: "test".into(),
        fail_mode,
        decision_deadline: deadline,
        ..AgentConfig::default()
    }
}

/// An agent running on the test's runtime.
pub struct Running {
    pub stats: Stats,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), fleetscan_agent::AgentError>>,
}

pub fn run(config: AgentConfig) -> Running {
    run_tuned(config, AgentTuning::default())
}

pub fn run_tuned(config: AgentConfig, tuning: AgentTuning) -> Running {
    let agent = Agent::start_tuned(config, tuning).expect("agent starts");
    let stats = agent.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(agent.run(async move {
        let _ = rx.await;
    }));
    Running {
        stats,
        stop: Some(tx),
        handle,
    }
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.handle)
            .await
            .expect("run returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// Polls `cond` until true or `limit` passes.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a child process got when it opened a file.
#[derive(Debug)]
pub struct Opened {
    pub ok: bool,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Opened {
    pub fn denied(&self) -> bool {
        !self.ok
            && (self.stderr.contains("Permission denied")
                || self.stderr.contains("Operation not permitted"))
    }
}

/// `/bin/cat path` in a child process, off the runtime's threads.
pub async fn cat(path: &Path) -> Opened {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let out = Command::new("/bin/cat")
            .arg(&path)
            .output()
            .expect("spawn cat");
        Opened {
            ok: out.status.success(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        }
    })
    .await
    .unwrap()
}

/// Starts `/bin/cat path` in a child and returns its result later.
pub fn cat_in_background(path: &Path) -> tokio::task::JoinHandle<Opened> {
    let path = path.to_path_buf();
    tokio::spawn(async move { cat(&path).await })
}

pub const SETTLE: Duration = Duration::from_secs(5);

/// Opens `file` (it must be allowed) and waits until the agent has placed its `marks`th
/// ignore mark.
pub async fn opened_and_marked(agent: &Running, file: &std::path::Path, marks: u64) {
    assert!(cat(file).await.ok);
    wait_for("ignore mark", SETTLE, || {
        agent.stats.snapshot().ignore_marks == marks
    })
    .await;
}

/// The usual agent of these tests: one broker, fail-closed, a 4 s deadline.
pub fn closed_config(env: &Env, broker: &FakeBroker) -> AgentConfig {
    config(
        env,
        vec![broker.url()],
        FailMode::Closed,
        Duration::from_secs(4),
    )
}

pub async fn connected(r: &Running, n: u64) {
    wait_for("broker session", SETTLE, || {
        r.stats.snapshot().sessions >= n
    })
    .await;
}
