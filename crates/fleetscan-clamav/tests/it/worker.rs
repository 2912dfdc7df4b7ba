//! `run_worker` end to end: a real clamd, the SDK, and a scripted broker on a loopback socket
//! that checks what the worker registers, scans a job, and sees the worker register again with
//! the new database version after a clamd reload.

use std::time::Duration;

use fleetscan_clamav::testing::{Clamd, EICAR, Signatures};
use fleetscan_clamav::{ClamdAddr, ClamdOptions, ClamdWorkerError, run_worker};
use fleetscan_core::Sha256;
use fleetscan_proto::MAX_MESSAGE_SIZE;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use fleetscan_proto::v1::{self, VerdictResult, WorkerCommand, WorkerMessage};
use fleetscan_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// How long any single expected event may take before the test fails.
const STEP: Duration = Duration::from_secs(30);

struct Conn {
    inbound: Streaming<WorkerMessage>,
    tx: mpsc::Sender<Result<WorkerCommand, Status>>,
}

struct Scripted(mpsc::Sender<Conn>);

#[tonic::async_trait]
impl WorkerService for Scripted {
    type AttachStream = ReceiverStream<Result<WorkerCommand, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        self.0
            .send(Conn {
                inbound: request.into_inner(),
                tx,
            })
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn broker() -> (String, mpsc::Receiver<Conn>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(8);
    let service = WorkerServiceServer::new(Scripted(tx))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, rx)
}

async fn accept(conns: &mut mpsc::Receiver<Conn>) -> Conn {
    tokio::time::timeout(STEP, conns.recv())
        .await
        .expect("the worker did not attach in time")
        .expect("server gone")
}

/// The next message other than a heartbeat; None when the worker ended its side.
async fn next(conn: &mut Conn) -> Option<Message> {
    loop {
        match tokio::time::timeout(STEP, conn.inbound.next()).await {
            Ok(Some(Ok(WorkerMessage {
                msg: Some(Message::Heartbeat(_)),
            }))) => continue,
            Ok(Some(Ok(msg))) => return msg.msg,
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => panic!("no message from the worker in time"),
        }
    }
}

async fn send(conn: &Conn, msg: Command) {
    conn.tx
        .send(Ok(WorkerCommand { msg: Some(msg) }))
        .await
        .expect("worker stream gone");
}

/// Reads the Register, confirms it, and reads the first Credit; returns the registration.
async fn register(conn: &mut Conn) -> v1::Register {
    let Some(Message::Register(register)) = next(conn).await else {
        panic!("expected a Register first");
    };
    send(
        conn,
        Command::Registered(v1::Registered {
            broker_id: "scripted".into(),
            chunk_size: 1024 * 1024,
        }),
    )
    .await;
    let Some(Message::Credit(credit)) = next(conn).await else {
        panic!("expected a Credit after Registered");
    };
    assert!(credit.credits >= 1);
    register
}

async fn scan(conn: &mut Conn, job_id: u64, content: &[u8]) -> v1::ScanResult {
    send(
        conn,
        Command::Job(v1::Job {
            job_id,
            sha256: Sha256::of(content).to_hex(),
            size: content.len() as u64,
            tenant: "default".into(),
            deadline_ms: 10_000,
            attempt: 1,
            path_hint: String::new(),
        }),
    )
    .await;
    send(
        conn,
        Command::Chunk(v1::JobChunk {
            job_id,
            offset: 0,
            data: content.to_vec().into(),
            last: true,
        }),
    )
    .await;
    loop {
        match next(conn).await {
            Some(Message::Result(result)) => return result,
            Some(Message::Credit(_)) => continue,
            other => panic!("expected the result of job {job_id}, got {other:?}"),
        }
    }
}

/// Reads until the worker ends its side; only credits (for the jobs just answered) may come.
async fn until_closed(conn: &mut Conn) {
    while let Some(msg) = next(conn).await {
        assert!(
            matches!(msg, Message::Credit(_)),
            "unexpected message before the worker closed: {msg:?}"
        );
    }
}

fn config(url: String) -> WorkerConfig {
    WorkerConfig {
        brokers: vec![url],
        worker_name: "clamav-worker-test".into(),
        credits: 2,
        ..WorkerConfig::default()
    }
}

#[tokio::test]
async fn registers_scans_and_registers_again_after_a_database_reload() {
    let clamd = Clamd::start(&Signatures::new().eicar().daily(27001));
    let (url, mut conns) = broker().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn({
        let addr = clamd.addr();
        async move {
            run_worker(
                config(url),
                addr,
                "clamav",
                ClamdOptions {
                    version_check_interval: Duration::from_millis(100),
                    ..ClamdOptions::default()
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await
        }
    });

    let mut conn = accept(&mut conns).await;
    let first = register(&mut conn).await;
    assert_eq!(first.worker_name, "clamav-worker-test");
    let id = first.scanner.expect("Register carries the scanner");
    assert_eq!(id.scanner, "clamav");
    assert_eq!(id.engine, "clamav");
    assert_eq!(id.ruleset_version, "27001");
    assert!(!id.engine_version.is_empty());

    let result = scan(&mut conn, 1, EICAR).await;
    assert_eq!(result.result, VerdictResult::Malicious as i32, "{result:?}");
    assert_eq!(result.threat_name, "EICAR-Test-Sig.UNOFFICIAL");
    let result = scan(&mut conn, 2, b"nothing to see here").await;
    assert_eq!(result.result, VerdictResult::Clean as i32, "{result:?}");

    // A reload with a newer database: the worker leaves and comes back with the new version.
    clamd.set_signatures(&Signatures::new().eicar().daily(27002));
    until_closed(&mut conn).await;
    drop(conn);
    let mut again = accept(&mut conns).await;
    let id = register(&mut again).await.scanner.unwrap();
    assert_eq!(id.ruleset_version, "27002");
    let result = scan(&mut again, 3, EICAR).await;
    assert_eq!(result.result, VerdictResult::Malicious as i32, "{result:?}");

    stop.send(()).unwrap();
    // The worker half-closes; the broker ends its side, and run_worker returns.
    until_closed(&mut again).await;
    drop(again);
    let ended = tokio::time::timeout(STEP, worker)
        .await
        .expect("run_worker did not stop")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
}

#[tokio::test]
async fn a_missing_clamd_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _conns) = broker().await;
    let ended = tokio::time::timeout(
        STEP,
        run_worker(
            config(url),
            ClamdAddr::Unix(dir.path().join("clamd.sock")),
            "clamav",
            ClamdOptions::default(),
            std::future::pending(),
        ),
    )
    .await
    .expect("run_worker did not give up");
    assert!(
        matches!(ended, Err(ClamdWorkerError::Clamd(_))),
        "{ended:?}"
    );
}
