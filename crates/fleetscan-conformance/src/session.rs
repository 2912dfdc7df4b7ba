//! The kit's side of one `Attach` stream: what it sends (Registered, jobs and their chunks,
//! cancellations, heartbeats) and a log of what the worker sent (credits, results, heartbeats).
//!
//! Every wait here has a deadline and every send a timeout, so a worker that hangs fails its
//! check instead of hanging the kit. The session counts credits and never sends a job beyond
//! them unless a check asks for exactly that ([`Session::send_job_beyond_credits`]). It records
//! protocol breaches that any check must fail on (a result for a job never sent, two results
//! for one job, a second Register), and [`Session::finish`] reports them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fleetscan_core::{Sha256, now_unix_ms};
use fleetscan_proto::CHUNK_SIZE;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::{self, WorkerCommand};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tonic::{Status, Streaming};

use crate::report::human;
use crate::server::Attached;

/// The broker's heartbeat period (worker.proto: at least every 10 s).
const KIT_HEARTBEAT: Duration = Duration::from_secs(10);
/// The broker id the kit registers workers with.
pub(crate) const KIT_BROKER_ID: &str = "fleetscan-conformance";

/// A check's failure, as its detail.
pub(crate) type Fail = String;

/// One job as the kit sends it.
pub(crate) struct JobSpec {
    pub(crate) job_id: u64,
    /// Shared, so that many jobs of one content cost its memory once.
    pub(crate) content: Arc<[u8]>,
    /// What the Job claims the content hashes to (normally its real digest).
    pub(crate) sha256: String,
    pub(crate) deadline_ms: u32,
    pub(crate) path_hint: String,
}

impl JobSpec {
    pub(crate) fn chunks(&self) -> usize {
        self.content.len().div_ceil(CHUNK_SIZE).max(1)
    }
}

pub(crate) struct Session {
    first: Message,
    inbound: Streaming<v1::WorkerMessage>,
    tx: mpsc::Sender<Result<WorkerCommand, Status>>,
    heartbeats_out: Option<JoinHandle<()>>,
    send_timeout: Duration,
    job_deadline_ms: u32,
    next_job_id: u64,
    pub(crate) attached_at: Instant,
    pub(crate) registered_at: Option<Instant>,
    /// Credits granted on this stream, in all.
    pub(crate) granted: u64,
    /// Jobs sent, in all (including any sent beyond the credits).
    pub(crate) jobs_sent: u64,
    pub(crate) heartbeats: Vec<Instant>,
    pub(crate) results: Vec<(Instant, v1::ScanResult)>,
    sent_ids: HashSet<u64>,
    answered: HashSet<u64>,
    breaches: Vec<String>,
}

impl Session {
    /// Takes over an attach. `job_timeout` becomes every job's `deadline_ms` and bounds each
    /// send.
    pub(crate) fn new(attached: Attached, job_timeout: Duration) -> Result<Session, Fail> {
        let Some(first) = attached.first.msg else {
            return Err("the first message on the stream was empty (no oneof set)".into());
        };
        Ok(Session {
            first,
            inbound: attached.inbound,
            tx: attached.tx,
            heartbeats_out: None,
            send_timeout: job_timeout,
            job_deadline_ms: u32::try_from(job_timeout.as_millis()).unwrap_or(u32::MAX),
            // Ids far from 0 and 1, so a worker that answers a default or made-up id is caught.
            next_job_id: 1_000,
            attached_at: Instant::now(),
            registered_at: None,
            granted: 0,
            jobs_sent: 0,
            heartbeats: Vec::new(),
            results: Vec::new(),
            sent_ids: HashSet::new(),
            answered: HashSet::new(),
            breaches: Vec::new(),
        })
    }

    /// The Register the stream opened with, or why it did not open with one.
    pub(crate) fn register(&self) -> Result<&v1::Register, Fail> {
        match &self.first {
            Message::Register(register) => Ok(register),
            other => Err(format!(
                "the first message was a {}, not a Register",
                kind(other)
            )),
        }
    }

    /// Credits granted and not yet used by a job.
    pub(crate) fn available(&self) -> u64 {
        self.granted.saturating_sub(self.jobs_sent)
    }

    pub(crate) fn result_for(&self, job_id: u64) -> Option<&v1::ScanResult> {
        self.results
            .iter()
            .find(|(_, r)| r.job_id == job_id)
            .map(|(_, r)| r)
    }

    /// Reads the next message before `deadline` and logs it; Ok(None) when the deadline came
    /// first. The stream ending or failing is a failure: no check expects it.
    pub(crate) async fn pump(&mut self, deadline: Instant) -> Result<Option<Message>, Fail> {
        loop {
            match timeout_at(deadline, self.inbound.message()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(v1::WorkerMessage { msg: Some(msg) }))) => {
                    self.record(&msg);
                    return Ok(Some(msg));
                }
                // A message of a newer protocol revision: nothing to check.
                Ok(Ok(Some(v1::WorkerMessage { msg: None }))) => continue,
                Ok(Ok(None)) => return Err("the worker ended its Attach stream".into()),
                Ok(Err(status)) => {
                    return Err(format!("the worker's Attach stream failed: {status}"));
                }
            }
        }
    }

    fn record(&mut self, msg: &Message) {
        let now = Instant::now();
        match msg {
            Message::Credit(credit) => self.granted += u64::from(credit.credits),
            Message::Heartbeat(_) => self.heartbeats.push(now),
            Message::Result(result) => {
                let id = result.job_id;
                if !self.sent_ids.contains(&id) {
                    self.breaches
                        .push(format!("a result for job {id}, which the kit never sent"));
                } else if !self.answered.insert(id) {
                    self.breaches.push(format!("a second result for job {id}"));
                }
                self.results.push((now, result.clone()));
            }
            Message::Register(_) => self
                .breaches
                .push("a second Register on the same stream".into()),
        }
    }

    /// Reads until `done` holds; fails with "no {what} within …" at the deadline.
    pub(crate) async fn wait_for(
        &mut self,
        deadline: Instant,
        what: &str,
        done: impl Fn(&Session) -> bool,
    ) -> Result<(), Fail> {
        let since = Instant::now();
        while !done(self) {
            if self.pump(deadline).await?.is_none() {
                return Err(format!(
                    "no {what} within {}",
                    human(deadline.saturating_duration_since(since))
                ));
            }
        }
        Ok(())
    }

    /// Reads for the whole of `until`, logging; returns early only on a failure.
    pub(crate) async fn idle(&mut self, until: Instant) -> Result<(), Fail> {
        while self.pump(until).await?.is_some() {}
        Ok(())
    }

    pub(crate) async fn send(&mut self, msg: Command) -> Result<(), Fail> {
        match timeout(
            self.send_timeout,
            self.tx.send(Ok(WorkerCommand { msg: Some(msg) })),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the worker's stream is closed".into()),
            Err(_) => Err(format!(
                "the kit could not send for {}: the worker is not reading its stream",
                human(self.send_timeout)
            )),
        }
    }

    /// Confirms the registration and waits for the first credit. With `heartbeats`, the kit
    /// then heartbeats every 10 s as the broker does.
    pub(crate) async fn establish(
        &mut self,
        deadline: Instant,
        heartbeats: bool,
    ) -> Result<(), Fail> {
        self.send(Command::Registered(v1::Registered {
            broker_id: KIT_BROKER_ID.into(),
            chunk_size: CHUNK_SIZE as u32,
        }))
        .await?;
        self.registered_at = Some(Instant::now());
        if heartbeats {
            let tx = self.tx.clone();
            self.heartbeats_out = Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(KIT_HEARTBEAT).await;
                    let beat = WorkerCommand {
                        msg: Some(Command::Heartbeat(v1::Heartbeat {
                            sent_at_unix_ms: now_unix_ms(),
                        })),
                    };
                    if tx.send(Ok(beat)).await.is_err() {
                        return;
                    }
                }
            }));
        }
        self.wait_for(deadline, "credit after Registered", |s| s.granted > 0)
            .await
    }

    /// A job for `content` with the next job id and the content's real digest.
    pub(crate) fn job(&mut self, content: Vec<u8>, path_hint: &str) -> JobSpec {
        JobSpec {
            job_id: self.next_id(),
            sha256: Sha256::of(&content).to_hex(),
            content: content.into(),
            deadline_ms: self.job_deadline_ms,
            path_hint: path_hint.into(),
        }
    }

    /// Another job of the same content (and claimed digest), with the next job id.
    pub(crate) fn job_like(&mut self, template: &JobSpec) -> JobSpec {
        JobSpec {
            job_id: self.next_id(),
            sha256: template.sha256.clone(),
            content: template.content.clone(),
            deadline_ms: template.deadline_ms,
            path_hint: template.path_hint.clone(),
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_job_id;
        self.next_job_id += 1;
        id
    }

    /// Sends a job within the credits, waiting (until `deadline`) for one when none is left.
    pub(crate) async fn send_job(&mut self, job: &JobSpec, deadline: Instant) -> Result<(), Fail> {
        self.wait_for(deadline, "credit for the next job", |s| s.available() > 0)
            .await?;
        self.send_chunks(job, job.chunks()).await
    }

    /// Sends a job and only its first `chunks` chunks.
    pub(crate) async fn send_job_partly(
        &mut self,
        job: &JobSpec,
        chunks: usize,
        deadline: Instant,
    ) -> Result<(), Fail> {
        self.wait_for(deadline, "credit for the next job", |s| s.available() > 0)
            .await?;
        self.send_chunks(job, chunks).await
    }

    /// Sends a job although no credit is left: only the `credits` check does, on purpose.
    pub(crate) async fn send_job_beyond_credits(&mut self, job: &JobSpec) -> Result<(), Fail> {
        self.send_chunks(job, job.chunks()).await
    }

    async fn send_chunks(&mut self, job: &JobSpec, chunks: usize) -> Result<(), Fail> {
        self.jobs_sent += 1;
        self.sent_ids.insert(job.job_id);
        self.send(Command::Job(v1::Job {
            job_id: job.job_id,
            sha256: job.sha256.clone(),
            size: job.content.len() as u64,
            tenant: fleetscan_core::DEFAULT_TENANT.into(),
            deadline_ms: job.deadline_ms,
            attempt: 1,
            path_hint: job.path_hint.clone(),
        }))
        .await?;
        self.send_chunk_range(job, 0..chunks).await
    }

    /// Sends the chunks of a job from `from` on (the job itself was sent partly before).
    pub(crate) async fn send_remaining_chunks(
        &mut self,
        job: &JobSpec,
        from: usize,
    ) -> Result<(), Fail> {
        self.send_chunk_range(job, from..job.chunks()).await
    }

    /// Chunks of `CHUNK_SIZE` bytes as the broker sends them; one (empty) chunk even for empty
    /// content, so that `last` is always sent.
    async fn send_chunk_range(
        &mut self,
        job: &JobSpec,
        range: std::ops::Range<usize>,
    ) -> Result<(), Fail> {
        let total = job.chunks();
        for index in range.start..range.end.min(total) {
            let start = (index * CHUNK_SIZE).min(job.content.len());
            let end = (start + CHUNK_SIZE).min(job.content.len());
            self.send(Command::Chunk(v1::JobChunk {
                job_id: job.job_id,
                offset: start as u64,
                data: job.content[start..end].to_vec().into(),
                last: index + 1 == total,
            }))
            .await?;
        }
        Ok(())
    }

    /// Waits for the result of `job_id`, returning it and when it arrived.
    pub(crate) async fn await_result(
        &mut self,
        job_id: u64,
        deadline: Instant,
    ) -> Result<(v1::ScanResult, Instant), Fail> {
        self.wait_for(deadline, &format!("result for job {job_id}"), |s| {
            s.result_for(job_id).is_some()
        })
        .await?;
        let (at, result) = self
            .results
            .iter()
            .find(|(_, r)| r.job_id == job_id)
            .expect("waited for");
        Ok((result.clone(), *at))
    }

    /// The end of a check that went well so far: any protocol breach seen fails it.
    pub(crate) fn finish(&self) -> Result<(), Fail> {
        if self.breaches.is_empty() {
            Ok(())
        } else {
            Err(format!("the worker sent {}", self.breaches.join("; ")))
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeats_out.take() {
            task.abort();
        }
    }
}

/// A message's kind, for details.
pub(crate) fn kind(msg: &Message) -> &'static str {
    match msg {
        Message::Register(_) => "Register",
        Message::Credit(_) => "Credit",
        Message::Result(_) => "ScanResult",
        Message::Heartbeat(_) => "Heartbeat",
    }
}
