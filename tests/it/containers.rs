//! Attribution in containers, end to end against the real kernel: the real `fleetscan agent`
//! protects a tmpfs of the test's own that holds the layers of simulated pods
//! ([`fleetscan_testkit::container`]: cgroups named as containerd and CRI-O name them, new
//! mount and pid namespaces, an overlayfs root), and an in-process broker records exactly what
//! the agent sends. Needs root and cgroup v2.
//!
//! Kubernetes namespace and tenant come from pod metadata (another part of issue 4) and are not
//! checked here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetscan_proto::v1;
use fleetscan_proto::v1::agent_message::Msg as AgentMsg;
use fleetscan_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleetscan_proto::v1::broker_message::Msg as BrokerMsg;
use fleetscan_testkit::container::{Container, ContainerSpec, Runtime};
use tonic::codegen::tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::common::*;

/// What the agent sent.
#[derive(Default)]
struct Recorded {
    accesses: Mutex<Vec<v1::AccessRequest>>,
}

/// A broker that allows everything (not cacheable, so that every open is asked about) and
/// records every access request.
struct Recorder(Arc<Recorded>);

#[tonic::async_trait]
impl AgentService for Recorder {
    type SessionStream = ReceiverStream<Result<v1::BrokerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let rec = self.0.clone();
        tokio::spawn(async move {
            let Ok(Some(_hello)) = inbound.message().await else {
                return;
            };
            let accepted = v1::BrokerMessage {
                msg: Some(BrokerMsg::Accepted(v1::SessionAccepted {
                    broker_id: "recorder".into(),
                    policy: Some(v1::Policy {
                        version: 1,
                        fail_mode: v1::FailMode::Open.into(),
                        decision_deadline_ms: 5000,
                        max_file_size: 64 * 1024 * 1024,
                        oversize_action: v1::Action::Allow.into(),
                        audit_only: false,
                    }),
                    verdict_generation: 1,
                })),
            };
            if tx.send(Ok(accepted)).await.is_err() {
                return;
            }
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(AgentMsg::Access(a)) = m.msg {
                    let decision = v1::BrokerMessage {
                        msg: Some(BrokerMsg::Decision(v1::Decision {
                            request_id: a.request_id,
                            action: v1::Action::Allow.into(),
                            reason: "recorded".into(),
                            cacheable: false,
                            ttl_seconds: 0,
                            verdicts: Vec::new(),
                        })),
                    };
                    rec.accesses.lock().unwrap().push(a);
                    let _ = tx.send(Ok(decision)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Broker {
    url: String,
    recorded: Arc<Recorded>,
}

/// Starts the recording broker on a runtime of its own thread (it lives until the test ends).
fn recording_broker() -> Broker {
    let recorded = Arc::new(Recorded::default());
    let rec = recorded.clone();
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(Recorder(rec)))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("recording broker listening");
    Broker {
        url: format!("http://{addr}"),
        recorded,
    }
}

impl Broker {
    /// The first access request for `path` (as the opener sees it) from the cgroup `cgroup`
    /// (any when empty), waiting up to 20 s.
    fn access(&self, path: &str, cgroup: &str) -> v1::AccessRequest {
        let start = Instant::now();
        loop {
            if let Some(a) = self.recorded.accesses.lock().unwrap().iter().find(|a| {
                a.path == path
                    && (cgroup.is_empty() || a.subject.as_ref().is_some_and(|s| s.cgroup == cgroup))
            }) {
                return a.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no access to {path} recorded; recorded: {:#?}",
                self.recorded.accesses.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every access request recorded for `path`.
    fn accesses_of(&self, path: &str) -> Vec<v1::AccessRequest> {
        let all = self.recorded.accesses.lock().unwrap();
        all.iter().filter(|a| a.path == path).cloned().collect()
    }
}

fn subject(a: &v1::AccessRequest) -> &v1::Subject {
    a.subject.as_ref().expect("a subject")
}

fn ok_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command in container failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sandbox with the recording broker and an agent protecting the layers' tmpfs.
fn setup() -> (Sandbox, Broker, std::path::PathBuf) {
    let mut sandbox = sandbox();
    let layers = sandbox.tmpfs("layers");
    let broker = recording_broker();
    sandbox.agent("node-a", &[&broker.url], &[&layers], &[]);
    (sandbox, broker, layers)
}

#[test]
fn an_access_in_a_container_is_attributed_to_its_container_pod_pid_and_paths() {
    let _turn = shared_blocking();
    let (_sandbox, broker, layers) = setup();
    let volume = layers.join("volume-src");
    std::fs::create_dir_all(&volume).unwrap();
    write(&volume.join("v.txt"), b"from a volume\n");
    let spec = |rt| {
        ContainerSpec::new(rt)
            .file("/data/hello.txt", b"hello from the image\n")
            .volume(&volume, "/vol")
    };
    let containerd = Container::start(&layers, spec(Runtime::Containerd));
    let crio = Container::start(&layers, spec(Runtime::Crio));

    for c in [&containerd, &crio] {
        // A file of the image: the overlay hands the open to its layer file on the protected
        // tmpfs, which the host sees under the lower directory.
        let out = c.exec(&["cat", "/data/hello.txt"]);
        assert_eq!(ok_stdout(&out), "hello from the image\n");
        let a = broker.access("/data/hello.txt", &c.cgroup);
        let s = subject(&a);
        assert_eq!(s.container_id, c.id, "{a:#?}");
        assert_eq!(s.pod_uid, c.pod_uid, "{a:#?}");
        assert_eq!(s.cgroup, c.cgroup);
        assert!(s.exe.ends_with("/cat"), "{a:#?}");
        // Its own pid namespace: pid 1 is the init, the command is a later one; the host's pid
        // is another number.
        assert!(s.ns_pid > 1, "{a:#?}");
        assert_ne!(s.ns_pid, s.pid, "{a:#?}");
        assert_eq!(
            a.host_path,
            c.lower.join("data/hello.txt").display().to_string(),
            "{a:#?}"
        );

        // A pod volume: the container's path, and the host's through the agent's mounts.
        let out = c.exec(&["cat", "/vol/v.txt"]);
        assert_eq!(ok_stdout(&out), "from a volume\n");
        let a = broker.access("/vol/v.txt", &c.cgroup);
        assert_eq!(subject(&a).container_id, c.id);
        assert_eq!(
            a.host_path,
            volume.join("v.txt").display().to_string(),
            "{a:#?}"
        );
    }

    // Written by the container: the file lands in the upper layer, and is reported there.
    let out = containerd.exec(&["sh", "-c", "echo new > /data/new.txt && cat /data/new.txt"]);
    assert_eq!(ok_stdout(&out), "new\n");
    let a = broker.access("/data/new.txt", &containerd.cgroup);
    assert_eq!(subject(&a).container_id, containerd.id);
    assert_eq!(
        a.host_path,
        containerd.upper.join("data/new.txt").display().to_string(),
        "{a:#?}"
    );

    // A host process: no container, the host's path only.
    let host_file = layers.join("host.txt");
    write(&host_file, b"on the host\n");
    let out = std::process::Command::new("cat")
        .arg(&host_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let host_path = host_file.display().to_string();
    let a = broker.access(&host_path, "");
    let s = subject(&a);
    assert_eq!(s.container_id, "", "{a:#?}");
    assert_eq!(s.pod_uid, "", "{a:#?}");
    assert_eq!(s.ns_pid, s.pid, "{a:#?}");
    assert_eq!(a.host_path, "", "the same as the path: {a:#?}");
}

#[test]
fn a_reused_pid_is_never_attributed_to_the_process_that_had_it() {
    // Alone: each try needs the next pid the kernel hands out, which a fork or a new thread of
    // any other test would take first (see `common::GATE`).
    let _turn = alone_blocking();
    let (_sandbox, broker, layers) = setup();
    const TRIES: usize = 60;
    let old = Container::start(
        &layers,
        ContainerSpec::new(Runtime::Containerd).file("/data/old.txt", b"old\n"),
    );
    let mut spec = ContainerSpec::new(Runtime::Crio);
    for i in 0..TRIES {
        spec = spec.file(&format!("/data/new-{i}.txt"), b"new\n");
    }
    let new = Container::start(&layers, spec);

    // The old process: attributed to its container, then gone (exited and reaped).
    let out = old.exec(&["cat", "/data/old.txt"]);
    assert_eq!(ok_stdout(&out), "old\n");
    let a = broker.access("/data/old.txt", &old.cgroup);
    assert_eq!(subject(&a).container_id, old.id);
    let pid = subject(&a).pid;
    assert!(
        !old.pids().contains(&pid),
        "the old process has exited: {pid}"
    );

    // A process of another container takes the same host pid (the kernel is asked for it; a
    // fork elsewhere on the machine can get there first, hence the tries). Each try opens a
    // file of its own, so each is a fresh event.
    let mut reused = None;
    for i in 0..TRIES {
        let path = format!("/data/new-{i}.txt");
        let out = new.exec_as_host_pid(pid, &["cat", &path]);
        assert_eq!(ok_stdout(&out), "new\n");
        let a = broker.access(&path, "");
        let s = subject(&a);
        // Whatever pid it got, it is never the old process's.
        assert_ne!(s.container_id, old.id, "{a:#?}");
        assert_ne!(s.pod_uid, old.pod_uid, "{a:#?}");
        assert_eq!(s.container_id, new.id, "{a:#?}");
        assert_eq!(s.pod_uid, new.pod_uid, "{a:#?}");
        assert_eq!(s.cgroup, new.cgroup, "{a:#?}");
        if s.pid == pid {
            reused = Some(a);
            break;
        }
    }
    let a = reused.unwrap_or_else(|| {
        panic!("pid {pid} was never handed out again in {TRIES} tries (other forks won)")
    });
    // The old file was only ever attributed to the old container.
    for a in broker.accesses_of("/data/old.txt") {
        assert_eq!(subject(&a).container_id, old.id, "{a:#?}");
    }
    assert_ne!(subject(&a).ns_pid, pid, "its own pid namespace: {a:#?}");
}
