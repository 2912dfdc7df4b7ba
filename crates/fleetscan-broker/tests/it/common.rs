//! A real broker on 127.0.0.1:0 over a real SQLite store in a temp dir, and scripted agent and
//! worker streams written with the generated clients.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use fleetscan_broker::{Broker, BrokerConfig, BrokerError};
use fleetscan_core::{ScannerIdentity, Sha256, Verdict};
use fleetscan_proto::v1::admin_service_client::AdminServiceClient;
use fleetscan_proto::v1::agent_service_client::AgentServiceClient;
use fleetscan_proto::v1::scan_service_client::ScanServiceClient;
use fleetscan_proto::v1::worker_service_client::WorkerServiceClient;
use fleetscan_proto::v1::{self, agent_message, broker_message, worker_command, worker_message};
use fleetscan_store::Store;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Every wait in these tests is bounded by this: a hang fails the test instead of blocking it.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn identity(ruleset: &str) -> ScannerIdentity {
    ScannerIdentity {
        scanner: "reference".into(),
        engine: "scripted".into(),
        engine_version: "1.0".into(),
        ruleset_version: ruleset.into(),
    }
}

pub struct TestBroker {
    pub url: String,
    pub engine: std::sync::Arc<fleetscan_broker::engine::Engine>,
    pub store_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), BrokerError>>>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start(configure: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        TestBroker::start_with_verdicts(&[], configure).await
    }

    /// A broker whose SQLite store holds `verdicts` before it starts: a SQLite store is its
    /// broker's alone, so nothing else writes to it while the broker runs.
    pub async fn start_with_verdicts(
        verdicts: &[Verdict],
        configure: impl FnOnce(&mut BrokerConfig),
    ) -> TestBroker {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "fleetscan_broker=debug".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let store_url = format!("sqlite://{}", dir.path().join("fleetscan.db").display());
        let mut config = BrokerConfig {
            broker_id: "test-broker".into(),
            store_url: store_url.clone(),
            ..BrokerConfig::default()
        };
        configure(&mut config);
        let store_url = config.store_url.clone();
        if !verdicts.is_empty() {
            let store = Store::connect(&store_url).await.expect("store");
            store.put_verdicts(verdicts).await.expect("verdicts stored");
        }
        let broker = Broker::new(config).await.expect("broker starts");
        let engine = broker.engine();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(broker.serve(listener, async move {
            let _ = stopped.await;
        }));
        TestBroker {
            url,
            engine,
            store_url,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the broker and waits for `serve` to return (after its write-behind flush).
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task")
                .expect("serve ok");
        }
    }

    /// A second connection to the broker's store.
    pub async fn store(&self) -> Store {
        Store::connect(&self.store_url).await.expect("store")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect to broker")
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub async fn scan(&self) -> ScanServiceClient<Channel> {
        ScanServiceClient::new(self.channel().await)
            .max_decoding_message_size(fleetscan_proto::MAX_MESSAGE_SIZE)
    }

    pub async fn agent(&self, node: &str) -> ScriptedAgent {
        ScriptedAgent::connect(self, hello(node)).await
    }

    /// An agent that declares `capabilities` in its hello.
    pub async fn agent_with(&self, node: &str, capabilities: &[&str]) -> ScriptedAgent {
        let mut hello = hello(node);
        if let Some(agent_message::Msg::Hello(h)) = &mut hello.msg {
            h.capabilities = capabilities.iter().map(|c| (*c).to_owned()).collect();
        }
        ScriptedAgent::connect(self, hello).await
    }

    pub async fn worker(&self, name: &str, identity: &ScannerIdentity) -> ScriptedWorker {
        ScriptedWorker::connect(self, name, identity, "", &[])
            .await
            .expect("attach accepted")
    }

    /// An agent whose hello names `tenant` as its own.
    pub async fn agent_of(&self, node: &str, tenant: &str) -> ScriptedAgent {
        let mut hello = hello(node);
        if let Some(agent_message::Msg::Hello(h)) = &mut hello.msg {
            h.tenant = tenant.to_owned();
        }
        ScriptedAgent::connect(self, hello).await
    }

    /// A worker of `pool` for `tenants` that was accepted and gave `credits`, once the broker
    /// lists it with credit (so that its pool is live for the next access).
    pub async fn credited_worker_in(
        &self,
        name: &str,
        identity: &ScannerIdentity,
        pool: &str,
        tenants: &[&str],
        credits: u32,
    ) -> ScriptedWorker {
        let worker = self
            .worker_in(name, identity, pool, tenants)
            .await
            .expect("attach accepted");
        worker.credit(credits).await;
        self.wait_for_worker(Some(name)).await;
        worker
    }

    /// Waits (within `WAIT`) until the broker lists a worker with credit: the one named
    /// `name`, or any.
    pub async fn wait_for_worker(&self, name: Option<&str>) -> v1::Worker {
        eventually("a worker to ask for work", || async move {
            self.workers()
                .await
                .into_iter()
                .find(|w| name.is_none_or(|n| w.worker_name == n) && w.credits > 0)
        })
        .await
    }

    /// The workers the broker lists now (admin `ListWorkers`).
    pub async fn workers(&self) -> Vec<v1::Worker> {
        self.admin()
            .await
            .list_workers(v1::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers
    }

    /// Waits (within `WAIT`) until the broker has read which contents its SQLite store holds.
    pub async fn wait_until_store_contents_known(&self) {
        let engine = self.engine.clone();
        assert!(
            engine.stored_contents_known().is_some(),
            "a SQLite broker knows its store"
        );
        eventually("the store's contents read", || {
            let done = engine.stored_contents_known() == Some(true);
            async move { done.then_some(()) }
        })
        .await;
    }

    /// A worker of `pool` for `tenants`; the broker's refusal as an error.
    pub async fn worker_in(
        &self,
        name: &str,
        identity: &ScannerIdentity,
        pool: &str,
        tenants: &[&str],
    ) -> Result<ScriptedWorker, Status> {
        ScriptedWorker::connect(self, name, identity, pool, tenants).await
    }

    pub async fn stats(&self) -> v1::Stats {
        self.admin()
            .await
            .get_stats(v1::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An agent session driven by the test.
pub struct ScriptedAgent {
    tx: mpsc::Sender<v1::AgentMessage>,
    rx: Streaming<v1::BrokerMessage>,
    pub accepted: v1::SessionAccepted,
    /// Content the agent uploads when asked, by request id.
    contents: HashMap<u64, Vec<u8>>,
    /// Content requests received, by request id.
    pub content_requests: Vec<u64>,
    pub flushes: Vec<v1::CacheFlush>,
    /// Policy updates received, in order (the first comes right after SessionAccepted).
    pub policies: Vec<v1::PolicyUpdate>,
}

pub fn hello(node: &str) -> v1::AgentMessage {
    v1::AgentMessage {
        msg: Some(agent_message::Msg::Hello(v1::AgentHello {
            node: node.into(),
            cluster: "test-cluster".into(),
            agent_version: "0.0.1".into(),
            capabilities: vec![],
            tenant: String::new(),
        })),
    }
}

impl ScriptedAgent {
    async fn connect(broker: &TestBroker, hello: v1::AgentMessage) -> ScriptedAgent {
        let mut client = AgentServiceClient::new(broker.channel().await);
        let (tx, rx) = mpsc::channel(256);
        tx.send(hello).await.unwrap();
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .expect("session accepted")
            .into_inner();
        let first = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("SessionAccepted in time")
            .expect("stream ok")
            .expect("a first message");
        let Some(broker_message::Msg::Accepted(accepted)) = first.msg else {
            panic!("expected SessionAccepted, got {first:?}")
        };
        ScriptedAgent {
            tx,
            rx: inbound,
            accepted,
            contents: HashMap::new(),
            content_requests: Vec::new(),
            flushes: Vec::new(),
            policies: Vec::new(),
        }
    }

    pub async fn send(&self, msg: agent_message::Msg) {
        self.tx
            .send(v1::AgentMessage { msg: Some(msg) })
            .await
            .expect("agent stream open");
    }

    /// Asks about `content` for a host process; the agent uploads it when the broker asks.
    pub async fn request(&mut self, request_id: u64, content: &[u8], deadline_ms: u32) {
        self.request_with(
            request_id,
            content,
            v1::AccessKind::Open,
            deadline_ms,
            v1::Subject::default(),
        )
        .await;
    }

    /// Asks about `content` (uploaded when the broker asks) for `subject`, which is given the
    /// test's pid, uid and executable.
    async fn request_with(
        &mut self,
        request_id: u64,
        content: &[u8],
        kind: v1::AccessKind,
        deadline_ms: u32,
        subject: v1::Subject,
    ) {
        self.contents.insert(request_id, content.to_vec());
        self.request_raw(v1::AccessRequest {
            request_id,
            sha256: Sha256::of(content).to_hex(),
            size: content.len() as u64,
            path: format!("/data/file-{request_id}"),
            kind: kind.into(),
            deadline_ms,
            subject: Some(v1::Subject {
                pid: 4242,
                uid: 1000,
                exe: "/usr/bin/cat".into(),
                ..subject
            }),
            ..Default::default()
        })
        .await;
    }

    /// Asks about `content` for a process of pod namespace `namespace` (empty: a host
    /// process) whose namespace label named `tenant`.
    pub async fn request_from(
        &mut self,
        request_id: u64,
        content: &[u8],
        kind: v1::AccessKind,
        namespace: &str,
        tenant: &str,
    ) {
        let subject = v1::Subject {
            k8s_namespace: namespace.into(),
            tenant: tenant.into(),
            ..Default::default()
        };
        self.request_with(request_id, content, kind, 10_000, subject)
            .await;
    }

    /// Waits for a policy update (recorded or new) within `WAIT`.
    pub async fn policy_update(&mut self) -> v1::PolicyUpdate {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if !self.policies.is_empty() {
                return self.policies.remove(0);
            }
            // Read the stream itself: `next_within` keeps policy updates aside and waits on.
            let message = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .expect("a policy update in time")
                .expect("agent stream ok")
                .expect("agent stream open");
            match message.msg {
                Some(broker_message::Msg::Policy(update)) => self.policies.push(update),
                Some(broker_message::Msg::Flush(f)) => self.flushes.push(f),
                Some(broker_message::Msg::Heartbeat(_)) => {}
                other => panic!("expected a policy update, got {other:?}"),
            }
        }
    }

    pub async fn request_raw(&self, request: v1::AccessRequest) {
        self.send(agent_message::Msg::Access(request)).await;
    }

    /// The next message that is not a heartbeat, within `wait`; `None` on timeout.
    pub async fn next_within(
        &mut self,
        wait: Duration,
    ) -> Option<Result<v1::BrokerMessage, Status>> {
        loop {
            match tokio::time::timeout(wait, self.rx.message()).await {
                Err(_) => return None,
                Ok(Err(status)) => return Some(Err(status)),
                Ok(Ok(None)) => return Some(Err(Status::cancelled("stream ended"))),
                Ok(Ok(Some(v1::BrokerMessage {
                    msg: Some(broker_message::Msg::Heartbeat(_)),
                }))) => continue,
                Ok(Ok(Some(v1::BrokerMessage {
                    msg: Some(broker_message::Msg::Policy(update)),
                }))) => self.policies.push(update),
                Ok(Ok(Some(message))) => return Some(Ok(message)),
            }
        }
    }

    /// Serves content requests and records flushes until a decision arrives within `wait`.
    pub async fn decision_within(&mut self, wait: Duration) -> Option<v1::Decision> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self.next_within(left).await?.expect("agent stream ok");
            match message.msg {
                Some(broker_message::Msg::Decision(d)) => return Some(d),
                Some(broker_message::Msg::ContentRequest(r)) => {
                    self.content_requests.push(r.request_id);
                    self.upload(r.request_id).await;
                }
                Some(broker_message::Msg::Flush(f)) => self.flushes.push(f),
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    pub async fn decision(&mut self) -> v1::Decision {
        self.decision_within(WAIT)
            .await
            .expect("a decision within the test's wait")
    }

    /// Uploads the content of a request in 1 MiB chunks.
    pub async fn upload(&self, request_id: u64) {
        let content = self
            .contents
            .get(&request_id)
            .cloned()
            .unwrap_or_else(|| panic!("content of request {request_id} asked for but unknown"));
        let chunks: Vec<&[u8]> = if content.is_empty() {
            vec![&[]]
        } else {
            content.chunks(fleetscan_proto::CHUNK_SIZE).collect()
        };
        let mut offset = 0u64;
        let count = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.send(agent_message::Msg::Content(v1::ContentChunk {
                request_id,
                offset,
                data: chunk.to_vec().into(),
                last: i + 1 == count,
            }))
            .await;
            offset += chunk.len() as u64;
        }
    }

    /// Waits for a cache flush (recorded or new) within `WAIT`.
    pub async fn flush(&mut self) -> v1::CacheFlush {
        if let Some(f) = self.flushes.pop() {
            return f;
        }
        let message = self
            .next_within(WAIT)
            .await
            .expect("a flush in time")
            .expect("agent stream ok");
        match message.msg {
            Some(broker_message::Msg::Flush(f)) => f,
            other => panic!("expected a flush, got {other:?}"),
        }
    }

    /// Ends the session from the agent's side.
    pub fn close(self) {
        drop(self.tx);
    }
}

/// A worker stream driven by the test.
pub struct ScriptedWorker {
    tx: mpsc::Sender<v1::WorkerMessage>,
    rx: Streaming<v1::WorkerCommand>,
    pub registered: v1::Registered,
}

/// A job as the worker received it, with its content.
#[derive(Debug)]
pub struct ReceivedJob {
    pub job: v1::Job,
    pub content: Vec<u8>,
}

impl ScriptedWorker {
    async fn connect(
        broker: &TestBroker,
        name: &str,
        identity: &ScannerIdentity,
        pool: &str,
        tenants: &[&str],
    ) -> Result<ScriptedWorker, Status> {
        let mut client = WorkerServiceClient::new(broker.channel().await);
        let (tx, rx) = mpsc::channel(64);
        tx.send(v1::WorkerMessage {
            msg: Some(worker_message::Msg::Register(v1::Register {
                worker_name: name.into(),
                scanner: Some(identity.into()),
                pool: pool.into(),
                tenants: tenants.iter().map(|t| (*t).to_owned()).collect(),
                max_file_size: 0,
                content_types: vec![],
            })),
        })
        .await
        .unwrap();
        let mut inbound = client.attach(ReceiverStream::new(rx)).await?.into_inner();
        let first = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("Registered in time")
            .expect("stream ok")
            .expect("a first message");
        let Some(worker_command::Msg::Registered(registered)) = first.msg else {
            panic!("expected Registered, got {first:?}")
        };
        Ok(ScriptedWorker {
            tx,
            rx: inbound,
            registered,
        })
    }

    pub async fn send(&self, msg: worker_message::Msg) {
        self.tx
            .send(v1::WorkerMessage { msg: Some(msg) })
            .await
            .expect("worker stream open");
    }

    pub async fn credit(&self, credits: u32) {
        self.send(worker_message::Msg::Credit(v1::Credit { credits }))
            .await;
    }

    /// The next job with its whole content, or `None` if none comes within `wait`.
    pub async fn job_within(&mut self, wait: Duration) -> Option<ReceivedJob> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut job: Option<v1::Job> = None;
        let mut content = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = match tokio::time::timeout(left, self.rx.message()).await {
                Err(_) => return None,
                Ok(message) => message
                    .expect("worker stream ok")
                    .expect("worker stream open"),
            };
            match message.msg {
                Some(worker_command::Msg::Job(j)) => {
                    assert!(
                        job.is_none(),
                        "a job started before the previous one's last chunk"
                    );
                    job = Some(j);
                }
                Some(worker_command::Msg::Chunk(chunk)) => {
                    let j = job.as_ref().expect("chunk before its job");
                    assert_eq!(chunk.job_id, j.job_id);
                    assert_eq!(chunk.offset, content.len() as u64);
                    content.extend_from_slice(&chunk.data);
                    if chunk.last {
                        return Some(ReceivedJob {
                            job: job.take().unwrap(),
                            content,
                        });
                    }
                }
                Some(worker_command::Msg::Heartbeat(_) | worker_command::Msg::Cancel(_)) => {}
                other => panic!("unexpected command {other:?}"),
            }
        }
    }

    pub async fn job(&mut self) -> ReceivedJob {
        self.job_within(WAIT)
            .await
            .expect("a job within the test's wait")
    }

    /// Takes the next job (within `WAIT`) and answers it.
    pub async fn answer_next(&mut self, result: v1::VerdictResult, threat: &str) -> ReceivedJob {
        let job = self.job().await;
        self.answer(job.job.job_id, result, threat).await;
        job
    }

    pub async fn answer(&self, job_id: u64, result: v1::VerdictResult, threat: &str) {
        self.send(worker_message::Msg::Result(v1::ScanResult {
            job_id,
            result: result.into(),
            threat_name: threat.into(),
            scan_micros: 10,
            ..Default::default()
        }))
        .await;
    }

    /// Whether the broker ended the stream (or it failed) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        loop {
            match tokio::time::timeout(wait, self.rx.message()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None) | Err(_)) => return true,
            }
        }
    }

    /// Drops the worker's stream, as a crashed worker would.
    pub fn crash(self) {
        drop(self);
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
