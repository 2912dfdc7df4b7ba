//! Black-box tests of `fleetscan_worker::run` against a scripted `WorkerService` on a real
//! loopback socket. The test plays the broker: it reads what the worker sends and sends the
//! commands a broker would, step by step, so each protocol rule is checked in isolation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fleetscan_core::{ScannerIdentity, Sha256};
use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use fleetscan_proto::v1::{self, VerdictResult, WorkerCommand, WorkerMessage};
use fleetscan_worker::{ScanOutcome, Scanner, WorkerConfig, WorkerError, run};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// How long any single expected event may take before the test fails.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The scripted broker.

/// One attached worker stream, handed to the test.
struct Conn {
    inbound: Streaming<WorkerMessage>,
    tx: mpsc::Sender<Result<WorkerCommand, Status>>,
}

struct ScriptedBroker {
    conns: mpsc::Sender<Conn>,
}

#[tonic::async_trait]
impl WorkerService for ScriptedBroker {
    type AttachStream = ReceiverStream<Result<WorkerCommand, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        self.conns
            .send(Conn {
                inbound: request.into_inner(),
                tx,
            })
            .await
            .map_err(|_| Status::unavailable("test finished"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct TestServer {
    addr: SocketAddr,
    conns: mpsc::Receiver<Conn>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener)
    }

    /// Binds the same address again after a restart, waiting for the old listener to go.
    async fn restart_on(addr: SocketAddr) -> TestServer {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Self::serve(listener),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("rebind {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        }
    }

    fn serve(listener: TcpListener) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let (conns_tx, conns) = mpsc::channel(8);
        let service = WorkerServiceServer::new(ScriptedBroker { conns: conns_tx })
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        TestServer { addr, conns, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn accept(&mut self) -> Conn {
        tokio::time::timeout(STEP, self.conns.recv())
            .await
            .expect("the worker did not attach in time")
            .expect("server gone")
    }

    /// Stops accepting and closes the listening socket. Streams already handed out end when
    /// the test drops their `Conn`.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl Conn {
    /// The next message that is not a heartbeat, or None when the worker ended its stream.
    async fn next(&mut self) -> Option<Message> {
        loop {
            let msg = tokio::time::timeout(STEP, self.inbound.next())
                .await
                .expect("the worker sent nothing in time");
            match msg {
                None => return None,
                Some(Err(status)) => panic!("worker stream failed: {status}"),
                Some(Ok(WorkerMessage {
                    msg: Some(Message::Heartbeat(_)),
                })) => continue,
                Some(Ok(WorkerMessage { msg: Some(m) })) => return Some(m),
                Some(Ok(WorkerMessage { msg: None })) => panic!("empty worker message"),
            }
        }
    }

    async fn expect(&mut self) -> Message {
        self.next().await.expect("the worker ended its stream")
    }

    async fn expect_register(&mut self) -> v1::Register {
        match self.expect().await {
            Message::Register(r) => r,
            other => panic!("expected register, got {other:?}"),
        }
    }

    async fn expect_credit(&mut self) -> u32 {
        match self.expect().await {
            Message::Credit(c) => c.credits,
            other => panic!("expected a credit, got {other:?}"),
        }
    }

    async fn expect_result(&mut self) -> v1::ScanResult {
        match self.expect().await {
            Message::Result(r) => r,
            other => panic!("expected a scan result, got {other:?}"),
        }
    }

    /// Asserts that nothing but heartbeats arrives for `quiet`.
    async fn expect_silence(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.next()).await {
                Err(_) => return,
                Ok(Some(Ok(WorkerMessage {
                    msg: Some(Message::Heartbeat(_)),
                }))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    async fn send(&self, msg: Command) {
        self.tx
            .send(Ok(WorkerCommand { msg: Some(msg) }))
            .await
            .expect("worker stream gone");
    }

    /// Accepts the registration and returns it with the initial credit grant.
    async fn register(&mut self) -> (v1::Register, u32) {
        let register = self.expect_register().await;
        self.send(Command::Registered(v1::Registered {
            broker_id: "scripted".to_owned(),
            chunk_size: fleetscan_proto::CHUNK_SIZE as u32,
        }))
        .await;
        let credits = self.expect_credit().await;
        (register, credits)
    }

    async fn send_job_header(&self, job_id: u64, sha256: &Sha256, size: u64, deadline_ms: u32) {
        self.send(Command::Job(v1::Job {
            job_id,
            sha256: sha256.to_hex(),
            size,
            tenant: "default".to_owned(),
            deadline_ms,
            attempt: 1,
            path_hint: format!("/tmp/job-{job_id}"),
        }))
        .await;
    }

    async fn send_chunk(&self, job_id: u64, offset: u64, data: &[u8], last: bool) {
        self.send(Command::Chunk(v1::JobChunk {
            job_id,
            offset,
            data: data.to_vec().into(),
            last,
        }))
        .await;
    }

    /// Sends a whole job: header, then the content in chunks of `chunk` bytes.
    async fn send_job(&self, job_id: u64, content: &[u8], chunk: usize) {
        self.send_job_header(job_id, &Sha256::of(content), content.len() as u64, 10_000)
            .await;
        let pieces: Vec<&[u8]> = content.chunks(chunk).collect();
        for (i, piece) in pieces.iter().enumerate() {
            self.send_chunk(job_id, (i * chunk) as u64, piece, i + 1 == pieces.len())
                .await;
        }
    }

    async fn send_cancel(&self, job_id: u64) {
        self.send(Command::Cancel(v1::CancelJob {
            job_id,
            reason: "test".to_owned(),
        }))
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// A scanner the test controls.

/// Flags content starting with "EVIL"; records what it saw and how many scans ran at once;
/// optionally holds every scan until the test opens its gate.
struct TestScanner {
    seen: Mutex<Vec<Vec<u8>>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    gate: Mutex<bool>,
    opened: Condvar,
}

impl TestScanner {
    fn new(gated: bool) -> Arc<TestScanner> {
        Arc::new(TestScanner {
            seen: Mutex::new(Vec::new()),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            gate: Mutex::new(!gated),
            opened: Condvar::new(),
        })
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` scans are running at once.
    async fn wait_active(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + STEP;
        while self.active.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} scans never ran at once"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Scanner for TestScanner {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity {
            scanner: "test".to_owned(),
            engine: "test-engine".to_owned(),
            engine_version: "9.9".to_owned(),
            ruleset_version: "r42".to_owned(),
        }
    }

    fn scan(&self, content: &[u8]) -> ScanOutcome {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        self.seen.lock().unwrap().push(content.to_vec());
        // Bounded, so a failing test that never opens the gate still ends.
        let open = self.gate.lock().unwrap();
        let (open, _) = self
            .opened
            .wait_timeout_while(open, STEP * 3, |open| !*open)
            .unwrap();
        drop(open);
        self.active.fetch_sub(1, Ordering::SeqCst);
        if content.starts_with(b"EVIL") {
            ScanOutcome::malicious("Test.Evil")
        } else {
            ScanOutcome::clean()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The worker under test.

struct Worker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl Worker {
    fn start(config: WorkerConfig, scanner: Arc<dyn Scanner>) -> Worker {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(config, scanner, async move {
            let _ = stopped.await;
        }));
        Worker {
            stop: Some(stop),
            task,
        }
    }

    fn shutdown(&mut self) {
        let _ = self.stop.take().expect("shutdown twice").send(());
    }

    async fn join(self) -> Result<(), WorkerError> {
        tokio::time::timeout(STEP * 4, self.task)
            .await
            .expect("the worker did not stop in time")
            .expect("the worker panicked")
    }
}

fn config(server: &TestServer, credits: u32) -> WorkerConfig {
    WorkerConfig {
        brokers: vec![server.url()],
        worker_name: "test-worker".to_owned(),
        pool: String::new(),
        tenants: Vec::new(),
        credits,
        max_file_size: 0,
    }
}

fn verdict(r: &v1::ScanResult) -> VerdictResult {
    VerdictResult::try_from(r.result).expect("known verdict result")
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn registers_with_its_identity_and_settings_then_grants_its_credits() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(false);
    let worker = Worker::start(
        WorkerConfig {
            brokers: vec![server.url()],
            worker_name: "w-1".to_owned(),
            pool: "pool-a".to_owned(),
            tenants: vec!["acme".to_owned(), "globex".to_owned()],
            credits: 3,
            max_file_size: 4096,
        },
        scanner,
    );
    let mut conn = server.accept().await;
    let (register, credits) = conn.register().await;
    assert_eq!(register.worker_name, "w-1");
    assert_eq!(register.pool, "pool-a");
    assert_eq!(register.tenants, vec!["acme", "globex"]);
    assert_eq!(register.max_file_size, 4096);
    assert_eq!(
        register.scanner,
        Some(v1::ScannerIdentity {
            scanner: "test".to_owned(),
            engine: "test-engine".to_owned(),
            engine_version: "9.9".to_owned(),
            ruleset_version: "r42".to_owned(),
        })
    );
    assert_eq!(credits, 3);
    // Nothing more until there is work.
    conn.expect_silence(Duration::from_millis(300)).await;
    worker.task.abort();
}

#[tokio::test]
async fn never_holds_more_jobs_than_credits_and_grants_only_after_results() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(true);
    let worker = Worker::start(config(&server, 2), scanner.clone());
    let mut conn = server.accept().await;
    let (_, credits) = conn.register().await;
    assert_eq!(credits, 2);

    // Exactly as many jobs as credited; both scan at once, and nothing comes back while the
    // scans are held.
    conn.send_job(1, b"EVIL one", 1024).await;
    conn.send_job(2, b"clean two", 1024).await;
    scanner.wait_active(2).await;
    conn.expect_silence(Duration::from_millis(300)).await;

    scanner.open();
    let (mut results, mut granted) = (Vec::new(), 0u32);
    while results.len() < 2 || granted < 2 {
        match conn.expect().await {
            Message::Result(r) => results.push(r),
            Message::Credit(c) => {
                granted += c.credits;
                assert!(
                    granted as usize <= results.len(),
                    "credit granted before a result freed a slot"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    results.sort_by_key(|r| r.job_id);
    assert_eq!(results[0].job_id, 1);
    assert_eq!(verdict(&results[0]), VerdictResult::Malicious);
    assert_eq!(results[0].threat_name, "Test.Evil");
    assert_eq!(results[1].job_id, 2);
    assert_eq!(verdict(&results[1]), VerdictResult::Clean);
    assert!(results[1].threat_name.is_empty());

    // The re-granted credits are usable. Slots freed together may come back in one grant.
    conn.send_job(3, b"three", 1024).await;
    conn.send_job(4, b"four", 1024).await;
    let (mut ids, mut granted) = (vec![], 0u32);
    while ids.len() < 2 || granted < 2 {
        match conn.expect().await {
            Message::Result(r) => ids.push(r.job_id),
            Message::Credit(c) => {
                granted += c.credits;
                assert!(granted as usize <= ids.len(), "credit before its result");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![3, 4]);
    assert_eq!(scanner.max_active.load(Ordering::SeqCst), 2);
    worker.task.abort();
}

#[tokio::test]
async fn a_job_beyond_the_credits_is_refused_without_being_held() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(true);
    let worker = Worker::start(config(&server, 1), scanner.clone());
    let mut conn = server.accept().await;
    assert_eq!(conn.register().await.1, 1);
    conn.send_job(1, b"first", 1024).await;
    scanner.wait_active(1).await;
    conn.send_job(2, b"second", 1024).await;
    let refused = conn.expect_result().await;
    assert_eq!(refused.job_id, 2);
    assert_eq!(verdict(&refused), VerdictResult::Error);
    assert!(refused.retryable);
    // The refusal frees no credit: the one granted is still held by job 1.
    conn.expect_silence(Duration::from_millis(200)).await;
    scanner.open();
    assert_eq!(conn.expect_result().await.job_id, 1);
    assert_eq!(conn.expect_credit().await, 1);
    assert_eq!(scanner.seen(), vec![b"first".to_vec()]);
    worker.task.abort();
}

#[tokio::test]
async fn chunked_content_is_reassembled_and_verified() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(false);
    let worker = Worker::start(config(&server, 1), scanner.clone());
    let mut conn = server.accept().await;
    conn.register().await;

    // Full-size protocol chunks: 2.5 chunks of 1 MiB, so three messages near the size limit.
    let chunk = fleetscan_proto::CHUNK_SIZE;
    let mut big: Vec<u8> = b"EVIL".to_vec();
    big.extend((0..chunk * 5 / 2).map(|i| (i % 251) as u8));
    conn.send_job(7, &big, chunk).await;
    let result = conn.expect_result().await;
    assert_eq!(result.job_id, 7);
    assert_eq!(verdict(&result), VerdictResult::Malicious);
    assert_eq!(result.threat_name, "Test.Evil");
    assert_eq!(conn.expect_credit().await, 1);

    // Many small chunks of odd sizes.
    let small: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    conn.send_job(8, &small, 999).await;
    let result = conn.expect_result().await;
    assert_eq!((result.job_id, verdict(&result)), (8, VerdictResult::Clean));
    assert_eq!(conn.expect_credit().await, 1);

    assert_eq!(scanner.seen(), vec![big, small]);
    worker.task.abort();
}

#[tokio::test]
async fn a_digest_mismatch_is_an_error_that_is_not_retried() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(false);
    let worker = Worker::start(config(&server, 1), scanner.clone());
    let mut conn = server.accept().await;
    conn.register().await;

    let content = b"the real content, in three chunks";
    conn.send_job_header(
        5,
        &Sha256::of(b"something else"),
        content.len() as u64,
        10_000,
    )
    .await;
    conn.send_chunk(5, 0, &content[..10], false).await;
    conn.send_chunk(5, 10, &content[10..20], false).await;
    conn.send_chunk(5, 20, &content[20..], true).await;
    let result = conn.expect_result().await;
    assert_eq!(result.job_id, 5);
    assert_eq!(verdict(&result), VerdictResult::Error);
    assert!(!result.retryable);
    assert_eq!(result.detail, "sha256 mismatch");
    assert_eq!(conn.expect_credit().await, 1);
    assert!(scanner.seen().is_empty(), "mismatched content was scanned");
    worker.task.abort();
}

#[tokio::test]
async fn content_beyond_its_declared_size_or_the_limit_is_refused() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(false);
    let mut cfg = config(&server, 1);
    cfg.max_file_size = 100;
    let worker = Worker::start(cfg, scanner.clone());
    let mut conn = server.accept().await;
    conn.register().await;

    // More bytes than declared: refused at the chunk that overflows.
    conn.send_job_header(1, &Sha256::of(&[0u8; 20]), 10, 10_000)
        .await;
    conn.send_chunk(1, 0, &[0u8; 8], false).await;
    conn.send_chunk(1, 8, &[0u8; 12], true).await;
    let result = conn.expect_result().await;
    assert_eq!((result.job_id, verdict(&result)), (1, VerdictResult::Error));
    assert!(!result.retryable);
    assert_eq!(conn.expect_credit().await, 1);

    // Declared larger than max_file_size: refused before any byte.
    conn.send_job_header(2, &Sha256::of(&[0u8; 101]), 101, 10_000)
        .await;
    let result = conn.expect_result().await;
    assert_eq!((result.job_id, verdict(&result)), (2, VerdictResult::Error));
    assert!(result.detail.contains("max_file_size"), "{}", result.detail);
    assert_eq!(conn.expect_credit().await, 1);
    // Its chunks, if the broker sends them anyway, are ignored.
    conn.send_chunk(2, 0, &[0u8; 101], true).await;

    // The worker still works.
    conn.send_job(3, b"fine", 16).await;
    let result = conn.expect_result().await;
    assert_eq!((result.job_id, verdict(&result)), (3, VerdictResult::Clean));
    assert_eq!(scanner.seen(), vec![b"fine".to_vec()]);
    worker.task.abort();
}

#[tokio::test]
async fn a_cancelled_job_sends_no_result_but_frees_its_credit() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(true);
    let worker = Worker::start(config(&server, 1), scanner.clone());
    let mut conn = server.accept().await;
    conn.register().await;

    // Cancelled while scanning: the credit comes back once the scan is over, the result never.
    conn.send_job(1, b"EVIL but cancelled", 4).await;
    scanner.wait_active(1).await;
    conn.send_cancel(1).await;
    conn.expect_silence(Duration::from_millis(200)).await;
    scanner.open();
    assert_eq!(conn.expect_credit().await, 1);

    // Cancelled while receiving: the content is dropped and the credit comes back at once.
    conn.send_job_header(2, &Sha256::of(b"abcdef"), 6, 10_000)
        .await;
    conn.send_chunk(2, 0, b"abc", false).await;
    conn.send_cancel(2).await;
    assert_eq!(conn.expect_credit().await, 1);
    // Late chunks of the cancelled job are ignored.
    conn.send_chunk(2, 3, b"def", true).await;

    conn.send_job(3, b"after", 4).await;
    let result = conn.expect_result().await;
    assert_eq!((result.job_id, verdict(&result)), (3, VerdictResult::Clean));
    assert_eq!(
        scanner.seen(),
        vec![b"EVIL but cancelled".to_vec(), b"after".to_vec()]
    );
    worker.task.abort();
}

#[tokio::test]
async fn a_job_whose_chunks_stop_is_dropped_at_its_deadline() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(false);
    let worker = Worker::start(config(&server, 1), scanner.clone());
    let mut conn = server.accept().await;
    conn.register().await;

    let started = tokio::time::Instant::now();
    conn.send_job_header(9, &Sha256::of(b"0123456789"), 10, 300)
        .await;
    conn.send_chunk(9, 0, b"01234", false).await;
    let result = conn.expect_result().await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((result.job_id, verdict(&result)), (9, VerdictResult::Error));
    assert!(result.retryable);
    assert_eq!(conn.expect_credit().await, 1);
    conn.send_chunk(9, 5, b"56789", true).await;
    conn.expect_silence(Duration::from_millis(200)).await;
    assert!(scanner.seen().is_empty());
    worker.task.abort();
}

#[tokio::test]
async fn reconnects_after_the_broker_restarts_and_abandons_scans_in_flight() {
    let mut server = TestServer::start().await;
    let addr = server.addr;
    let scanner = TestScanner::new(true);
    let worker = Worker::start(config(&server, 2), scanner.clone());
    let mut conn = server.accept().await;
    assert_eq!(conn.register().await.1, 2);
    conn.send_job(1, b"in flight when the broker dies", 1024)
        .await;
    scanner.wait_active(1).await;

    // The broker goes away: its stream and its listening socket.
    drop(conn);
    server.kill().await;
    let mut server = TestServer::restart_on(addr).await;
    let mut conn = server.accept().await;
    let (register, credits) = conn.register().await;
    assert_eq!(register.worker_name, "test-worker");
    assert_eq!(credits, 2);

    // The abandoned scan finishes, but its result is not sent on the new stream.
    scanner.open();
    conn.expect_silence(Duration::from_millis(300)).await;
    conn.send_job(2, b"EVIL after restart", 1024).await;
    let result = conn.expect_result().await;
    assert_eq!(result.job_id, 2);
    assert_eq!(verdict(&result), VerdictResult::Malicious);
    assert_eq!(conn.expect_credit().await, 1);
    worker.task.abort();
}

#[tokio::test]
async fn shutdown_drains_scans_in_flight_then_closes() {
    let mut server = TestServer::start().await;
    let scanner = TestScanner::new(true);
    let mut worker = Worker::start(config(&server, 2), scanner.clone());
    let mut conn = server.accept().await;
    conn.register().await;

    conn.send_job(1, b"EVIL in flight", 1024).await;
    scanner.wait_active(1).await;
    // A second job is half received when shutdown comes: it is handed back at once.
    conn.send_job_header(2, &Sha256::of(b"abcdef"), 6, 10_000)
        .await;
    conn.send_chunk(2, 0, b"abc", false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    worker.shutdown();
    let handed_back = conn.expect_result().await;
    assert_eq!(handed_back.job_id, 2);
    assert_eq!(verdict(&handed_back), VerdictResult::Error);
    assert!(handed_back.retryable);
    // No credit is granted while draining, and the scan in flight is still answered.
    conn.expect_silence(Duration::from_millis(200)).await;
    scanner.open();
    let result = conn.expect_result().await;
    assert_eq!(
        (result.job_id, verdict(&result)),
        (1, VerdictResult::Malicious)
    );
    // Then the worker half-closes, with no credit after the result.
    assert!(
        conn.next().await.is_none(),
        "expected the worker to close its stream"
    );
    drop(conn);
    worker.join().await.unwrap();
}

#[tokio::test]
async fn shutdown_without_a_broker_returns_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut worker = Worker::start(
        WorkerConfig {
            brokers: vec![format!("http://{addr}")],
            credits: 1,
            ..WorkerConfig::default()
        },
        TestScanner::new(false),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !worker.task.is_finished(),
        "the worker gave up instead of retrying"
    );
    worker.shutdown();
    worker.join().await.unwrap();
}

#[tokio::test]
async fn a_refused_registration_ends_run_with_an_error() {
    let mut server = TestServer::start().await;
    let worker = Worker::start(config(&server, 1), TestScanner::new(false));
    let conn = server.accept().await;
    conn.tx
        .send(Err(Status::permission_denied("tenant not allowed")))
        .await
        .unwrap();
    match worker.join().await {
        Err(WorkerError::Rejected { message, .. }) => assert_eq!(message, "tenant not allowed"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_config_is_an_error() {
    let scanner: Arc<dyn Scanner> = TestScanner::new(false);
    let zero = WorkerConfig {
        credits: 0,
        ..WorkerConfig::default()
    };
    assert!(matches!(
        run(zero, scanner.clone(), std::future::pending()).await,
        Err(WorkerError::Config(_))
    ));
    let bad = WorkerConfig {
        brokers: vec!["not a url at all".to_owned()],
        ..WorkerConfig::default()
    };
    assert!(matches!(
        run(bad, scanner.clone(), std::future::pending()).await,
        Err(WorkerError::Config(_))
    ));
    let none = WorkerConfig {
        brokers: Vec::new(),
        ..WorkerConfig::default()
    };
    assert!(matches!(
        run(none, scanner.clone(), std::future::pending()).await,
        Err(WorkerError::Config(_))
    ));
    // Two streams to one broker would break the protocol.
    let twice = WorkerConfig {
        brokers: vec!["http://127.0.0.1:7700".to_owned(); 2],
        ..WorkerConfig::default()
    };
    assert!(matches!(
        run(twice, scanner, std::future::pending()).await,
        Err(WorkerError::Config(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Several brokers (a fleet of broker replicas).

/// Expects `n` results and at least `n` credits back on one stream, in any order; returns the
/// results' job ids, sorted, and their verdicts.
async fn expect_results_and_credits(conn: &mut Conn, n: usize) -> Vec<(u64, VerdictResult)> {
    let (mut results, mut granted) = (Vec::new(), 0usize);
    while results.len() < n || granted < n {
        match conn.expect().await {
            Message::Result(r) => results.push((r.job_id, verdict(&r))),
            Message::Credit(c) => granted += c.credits as usize,
            other => panic!("unexpected {other:?}"),
        }
    }
    results.sort_by_key(|(id, _)| *id);
    results
}

#[tokio::test]
async fn serves_every_broker_at_once_sharing_its_scan_slots() {
    let mut a = TestServer::start().await;
    let mut b = TestServer::start().await;
    let scanner = TestScanner::new(true);
    let mut worker = Worker::start(
        WorkerConfig {
            brokers: vec![a.url(), b.url()],
            worker_name: "fleet-worker".to_owned(),
            credits: 2,
            ..WorkerConfig::default()
        },
        scanner.clone(),
    );
    // One stream per broker, each registered with the same identity and granted the credits.
    let mut conn_a = a.accept().await;
    let mut conn_b = b.accept().await;
    let (reg_a, credits_a) = conn_a.register().await;
    let (reg_b, credits_b) = conn_b.register().await;
    assert_eq!((credits_a, credits_b), (2, 2));
    assert_eq!(reg_a.worker_name, "fleet-worker");
    assert_eq!(reg_a, reg_b);

    // Each broker uses its own credits: four jobs are held, but only two scan at once.
    conn_a.send_job(1, b"EVIL from a", 1024).await;
    conn_a.send_job(2, b"clean from a", 1024).await;
    conn_b.send_job(1, b"clean from b", 1024).await;
    conn_b.send_job(2, b"EVIL from b", 1024).await;
    scanner.wait_active(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(scanner.active.load(Ordering::SeqCst), 2);
    conn_a.expect_silence(Duration::from_millis(100)).await;

    // Every result goes back on the stream its job came from.
    scanner.open();
    assert_eq!(
        expect_results_and_credits(&mut conn_a, 2).await,
        vec![(1, VerdictResult::Malicious), (2, VerdictResult::Clean)]
    );
    assert_eq!(
        expect_results_and_credits(&mut conn_b, 2).await,
        vec![(1, VerdictResult::Clean), (2, VerdictResult::Malicious)]
    );
    assert_eq!(scanner.max_active.load(Ordering::SeqCst), 2);
    assert_eq!(scanner.seen().len(), 4);

    // Broker A goes away: B is served meanwhile, and A is attached again when it is back.
    let addr_a = a.addr;
    drop(conn_a);
    a.kill().await;
    conn_b.send_job(3, b"while a is down", 1024).await;
    assert_eq!(
        expect_results_and_credits(&mut conn_b, 1).await,
        vec![(3, VerdictResult::Clean)]
    );
    let mut a = TestServer::restart_on(addr_a).await;
    let mut conn_a = a.accept().await;
    assert_eq!(conn_a.register().await.1, 2);
    conn_a.send_job(7, b"EVIL after the restart", 1024).await;
    assert_eq!(
        expect_results_and_credits(&mut conn_a, 1).await,
        vec![(7, VerdictResult::Malicious)]
    );
    assert!(b.conns.try_recv().is_err(), "B's stream was never dropped");

    // Shutdown ends both streams and `run`.
    worker.shutdown();
    assert!(conn_a.next().await.is_none());
    assert!(conn_b.next().await.is_none());
    drop((conn_a, conn_b));
    worker.join().await.unwrap();
}

#[tokio::test]
async fn a_broker_that_refuses_the_worker_stops_it_on_every_broker() {
    let mut a = TestServer::start().await;
    let mut b = TestServer::start().await;
    let worker = Worker::start(
        WorkerConfig {
            brokers: vec![a.url(), b.url()],
            credits: 1,
            ..WorkerConfig::default()
        },
        TestScanner::new(false),
    );
    let mut conn_a = a.accept().await;
    conn_a.register().await;
    let conn_b = b.accept().await;
    conn_b
        .tx
        .send(Err(Status::unauthenticated("bad token")))
        .await
        .unwrap();
    // A's session drains and closes; `run` reports B's refusal.
    assert!(conn_a.next().await.is_none());
    drop(conn_a);
    match worker.join().await {
        Err(WorkerError::Rejected { message, .. }) => assert_eq!(message, "bad token"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}
