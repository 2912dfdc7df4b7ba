//! The timeouts of the session, with the timing shrunk to milliseconds. The protocol's
//! behaviour at its real timing is covered by `tests/run.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleetscan_core::{ScannerIdentity, Sha256};
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use fleetscan_proto::v1::{self, WorkerCommand, WorkerMessage};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::run::run_with_timing;
use super::timing::Timing;
use crate::{ScanOutcome, Scanner, WorkerConfig, WorkerError};

const STEP: Duration = Duration::from_secs(10);

type Conn = (
    Streaming<WorkerMessage>,
    mpsc::Sender<Result<WorkerCommand, Status>>,
);

struct Scripted(mpsc::Sender<Conn>);

#[tonic::async_trait]
impl WorkerService for Scripted {
    type AttachStream = ReceiverStream<Result<WorkerCommand, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        self.0
            .send((request.into_inner(), tx))
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn server() -> (String, mpsc::Receiver<Conn>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Scripted(tx)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, rx)
}

async fn accept(conns: &mut mpsc::Receiver<Conn>) -> Conn {
    tokio::time::timeout(STEP, conns.recv())
        .await
        .expect("no attach in time")
        .expect("server gone")
}

async fn recv(conn: &mut Conn) -> Option<Message> {
    match tokio::time::timeout(STEP, conn.0.next()).await {
        Ok(Some(Ok(msg))) => msg.msg,
        Ok(None) => None,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn register(conn: &mut Conn) {
    assert!(matches!(recv(conn).await, Some(Message::Register(_))));
    conn.1
        .send(Ok(WorkerCommand {
            msg: Some(Command::Registered(v1::Registered::default())),
        }))
        .await
        .unwrap();
    assert!(matches!(recv(conn).await, Some(Message::Credit(_))));
}

/// Holds every scan until released.
struct Held(Mutex<std::sync::mpsc::Receiver<()>>);

impl Scanner for Held {
    fn identity(&self) -> ScannerIdentity {
        ScannerIdentity::default()
    }

    fn scan(&self, _content: &[u8]) -> ScanOutcome {
        let _ = self.0.lock().unwrap().recv();
        ScanOutcome::clean()
    }
}

fn fast() -> Timing {
    Timing {
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        connect: Duration::from_secs(2),
        register: Duration::from_millis(300),
        heartbeat: Duration::from_millis(100),
        peer_silence: Duration::from_millis(600),
        drain: Duration::from_millis(300),
        close: Duration::from_millis(200),
        default_job_deadline: Duration::from_secs(5),
        housekeeping: Duration::from_millis(20),
    }
}

struct Started {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), WorkerError>>,
    release: std::sync::mpsc::Sender<()>,
}

fn start(url: String) -> Started {
    let (release, held) = std::sync::mpsc::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let config = WorkerConfig {
        brokers: vec![url],
        credits: 1,
        ..WorkerConfig::default()
    };
    let scanner = Arc::new(Held(Mutex::new(held)));
    let task = tokio::spawn(run_with_timing(
        config,
        scanner,
        async move {
            let _ = stopped.await;
        },
        fast(),
    ));
    Started {
        stop,
        task,
        release,
    }
}

#[tokio::test]
async fn heartbeats_flow_and_a_silent_broker_is_left() {
    let (url, mut conns) = server().await;
    let worker = start(url);
    let mut conn = accept(&mut conns).await;
    register(&mut conn).await;
    let registered = Instant::now();
    let mut beats = 0;
    // The broker stays silent: the worker heartbeats, then gives the stream up.
    while let Some(msg) = recv(&mut conn).await {
        assert!(matches!(msg, Message::Heartbeat(_)), "{msg:?}");
        beats += 1;
    }
    let left_after = registered.elapsed();
    assert!(beats >= 3, "only {beats} heartbeats");
    assert!(
        left_after >= fast().peer_silence,
        "left after {left_after:?}"
    );
    let mut again = accept(&mut conns).await;
    register(&mut again).await;
    worker.task.abort();
}

#[tokio::test]
async fn a_broker_that_heartbeats_is_kept() {
    let (url, mut conns) = server().await;
    let worker = start(url);
    let mut conn = accept(&mut conns).await;
    register(&mut conn).await;
    let beat = WorkerCommand {
        msg: Some(Command::Heartbeat(v1::Heartbeat::default())),
    };
    let until = Instant::now() + fast().peer_silence * 3;
    while Instant::now() < until {
        conn.1.send(Ok(beat.clone())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(conns.try_recv().is_err(), "the worker reattached");
    worker.task.abort();
}

#[tokio::test]
async fn a_broker_that_never_confirms_the_registration_is_left() {
    let (url, mut conns) = server().await;
    let worker = start(url);
    let mut conn = accept(&mut conns).await;
    let opened = Instant::now();
    assert!(matches!(recv(&mut conn).await, Some(Message::Register(_))));
    let mut again = accept(&mut conns).await;
    assert!(opened.elapsed() >= fast().register);
    register(&mut again).await;
    worker.task.abort();
}

#[tokio::test]
async fn the_drain_gives_up_on_a_hung_scan_at_its_timeout() {
    let (url, mut conns) = server().await;
    let worker = start(url);
    let mut conn = accept(&mut conns).await;
    register(&mut conn).await;
    let content = Bytes::from_static(b"hangs");
    for msg in [
        Command::Job(v1::Job {
            job_id: 1,
            sha256: Sha256::of(&content).to_hex(),
            size: content.len() as u64,
            ..v1::Job::default()
        }),
        Command::Chunk(v1::JobChunk {
            job_id: 1,
            offset: 0,
            data: content,
            last: true,
        }),
    ] {
        conn.1
            .send(Ok(WorkerCommand { msg: Some(msg) }))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    worker.stop.send(()).unwrap();
    // No result: the scan never ends; the worker closes its side at the drain timeout.
    loop {
        match recv(&mut conn).await {
            Some(Message::Heartbeat(_)) => continue,
            None => break,
            Some(other) => panic!("expected the stream to end, got {other:?}"),
        }
    }
    drop(conn);
    let result = tokio::time::timeout(STEP, worker.task)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    let took = asked.elapsed();
    assert!(took >= fast().drain, "drained in {took:?}");
    assert!(took < fast().drain + fast().close + Duration::from_secs(1));
    let _ = worker.release.send(());
}
