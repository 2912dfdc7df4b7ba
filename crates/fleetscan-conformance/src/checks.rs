//! The checks, each what worker.proto requires of a worker, judged from the broker's seat.
//!
//! - `register`: the first message is a Register naming scanner, engine, engine_version and
//!   ruleset_version (the broker keys verdicts by all four). Nothing but heartbeats may come
//!   before `Registered` (the kit holds it back for `quiet_wait`): a credit or a result before
//!   the broker confirmed is refused. Then at least one credit is granted.
//! - `clean-file`: 64 KiB of generated content is answered CLEAN for its job id, with a
//!   `scan_micros` above zero (a scan of 64 KiB takes more than a microsecond; zero means the
//!   field was not set) and no more than the time the kit waited.
//! - `eicar`: the 68-byte EICAR test file is answered MALICIOUS with a threat name.
//! - `chunked-large-file`: 5 MiB and a bit, in six 1 MiB chunks (offsets, `last` on the final
//!   one), is answered CLEAN for its job id within `check_timeout`. A worker whose
//!   `max_file_size` is smaller gets content of that size, if it still takes two chunks.
//!   Like the broker, the kit never sends more than a worker's `max_file_size`: a worker
//!   declaring 1 MiB or less fails the checks that need content in two chunks (this one,
//!   `cancel` and `credits`), saying so.
//! - `cancel`: a job cancelled after its first chunk (before `last`) gets no result within
//!   `quiet_wait`; since a cancelled job does not return its credit by itself (worker.proto),
//!   the worker grants one again; and the next job is answered.
//! - `credits`: the kit sends exactly as many jobs as were granted (after letting the initial
//!   grants settle; at most the broker's 1024), holding each open after its first chunk, so the
//!   worker holds all it granted. Then one complete job beyond the credits: worker.proto binds
//!   the broker, not the worker, here, so the worker may refuse it with a retryable ERROR (the
//!   SDK does: another worker can take it), take it, or ignore it; a non-retryable error or a
//!   broken stream fails. Then the held jobs are completed and every one must be answered
//!   CLEAN. No credit may come back before a result: credits granted again never exceed the
//!   results sent (a worker's capacity is what it granted; a slot comes back as a job leaves).
//!   Finally a credit must have come back for each answered job, and one more job is answered.
//! - `heartbeat`: with the kit silent, a heartbeat within `heartbeat_wait` of the
//!   registration and another within `heartbeat_wait` of the first (at least every 10 s, says
//!   worker.proto). Two, so that a worker heartbeating only once at attach time fails.
//! - `hash-mismatch`: content that does not hash to `Job.sha256` is answered ERROR, not
//!   retryable, with a detail naming the mismatch.
//! - `broker-restart`: the kit ends the stream, stops listening for half a second and listens
//!   again on the same port; the worker re-registers within `reconnect_wait` and answers a job.
//!
//! Every check also fails on a protocol breach seen along the way: a result for a job never
//! sent, two results for one job, a second Register on a stream. Garbage or unknown fields are
//! not sent: tolerating them is not required.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fleetscan_core::Sha256;
use fleetscan_proto::CHUNK_SIZE;
use fleetscan_proto::v1::worker_command::Msg as Command;
use fleetscan_proto::v1::worker_message::Msg as Message;
use fleetscan_proto::v1::{self, VerdictResult};
use tokio::time::Instant;
use tracing::info;

use crate::content::{EICAR_TEST_FILE, generated, run_seed};
use crate::harness::Harness;
use crate::report::{describe, human, verdict_name};
use crate::session::{Fail, JobSpec, Session, kind};
use crate::{CheckResult, ConformanceConfig, ConformanceError};

/// What a passing check observed.
type Outcome = Result<String, Fail>;

/// The clean file of `clean-file` and of the follow-up jobs.
const SMALL: usize = 64 * 1024;
/// The content of `chunked-large-file`: six chunks, the last one partial.
const LARGE: usize = 5 * CHUNK_SIZE + 4321;
/// The most jobs the broker has outstanding on one worker, whatever it grants.
const MAX_WORKER_JOBS: u64 = 1024;
/// How long initial grants may trickle in (some workers send Credit(1) n times).
const CREDIT_SETTLE: Duration = Duration::from_millis(500);
/// How long `broker-restart` keeps the port closed.
const RESTART_DOWN: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    Register,
    CleanFile,
    Eicar,
    ChunkedLargeFile,
    Cancel,
    Credits,
    Heartbeat,
    HashMismatch,
    BrokerRestart,
}

impl Check {
    pub(crate) const ALL: [Check; 9] = [
        Check::Register,
        Check::CleanFile,
        Check::Eicar,
        Check::ChunkedLargeFile,
        Check::Cancel,
        Check::Credits,
        Check::Heartbeat,
        Check::HashMismatch,
        Check::BrokerRestart,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Check::Register => "register",
            Check::CleanFile => "clean-file",
            Check::Eicar => "eicar",
            Check::ChunkedLargeFile => "chunked-large-file",
            Check::Cancel => "cancel",
            Check::Credits => "credits",
            Check::Heartbeat => "heartbeat",
            Check::HashMismatch => "hash-mismatch",
            Check::BrokerRestart => "broker-restart",
        }
    }

    fn run<'a>(self, h: &'a mut Harness<'_>) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        match self {
            Check::Register => Box::pin(register(h)),
            Check::CleanFile => Box::pin(clean_file(h)),
            Check::Eicar => Box::pin(eicar(h)),
            Check::ChunkedLargeFile => Box::pin(chunked_large_file(h)),
            Check::Cancel => Box::pin(cancel(h)),
            Check::Credits => Box::pin(credits(h)),
            Check::Heartbeat => Box::pin(heartbeat(h)),
            Check::HashMismatch => Box::pin(hash_mismatch(h)),
            Check::BrokerRestart => Box::pin(broker_restart(h)),
        }
    }
}

/// A backstop over a whole check: every wait inside is bounded already, so this only guards
/// against a kit bug turning into a hang.
fn backstop(config: &ConformanceConfig) -> Duration {
    config.check_timeout * 6
        + config.quiet_wait * 2
        + config.heartbeat_wait * 2
        + config.reconnect_wait
        + Duration::from_secs(10)
}

/// Runs one check against a fresh worker process.
pub(crate) async fn run_one(
    check: Check,
    config: &ConformanceConfig,
) -> Result<CheckResult, ConformanceError> {
    let started = std::time::Instant::now();
    let mut harness = Harness::start(config, run_seed()).await?;
    let outcome = match tokio::time::timeout(backstop(config), check.run(&mut harness)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "the check did not finish within {}",
            human(backstop(config))
        )),
    };
    let outcome = match outcome {
        Ok(observed) => Ok(observed),
        Err(fail) => Err(harness.explain(fail).await),
    };
    harness.stop().await;
    let elapsed = started.elapsed();
    let (passed, detail) = match outcome {
        Ok(observed) => (true, observed),
        Err(fail) => (false, fail),
    };
    info!(
        check = check.name(),
        passed,
        elapsed_ms = elapsed.as_millis() as u64,
        detail = %detail,
        "conformance check finished"
    );
    Ok(CheckResult {
        name: check.name(),
        passed,
        detail,
        elapsed,
    })
}

fn expect(result: &v1::ScanResult, want: VerdictResult) -> Result<(), Fail> {
    if result.result == want as i32 {
        Ok(())
    } else {
        Err(format!(
            "job {} was answered {}, expected {}",
            result.job_id,
            describe(result),
            verdict_name(want as i32)
        ))
    }
}

/// Sends a small clean job and expects CLEAN.
async fn clean_job(h: &Harness<'_>, s: &mut Session, salt: u64, what: &str) -> Result<(), Fail> {
    let job = s.job(generated(h.seed ^ salt, SMALL), "/conformance/clean.bin");
    let deadline = h.deadline();
    s.send_job(&job, deadline)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let (result, _) = s
        .await_result(job.job_id, deadline)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    expect(&result, VerdictResult::Clean).map_err(|e| format!("{what}: {e}"))
}

async fn register(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.accept(h.config.check_timeout).await?;
    let register = s.register()?.clone();
    let Some(id) = register.scanner.clone() else {
        return Err("the Register carries no scanner identity".into());
    };
    let missing: Vec<&str> = [
        ("scanner", &id.scanner),
        ("engine", &id.engine),
        ("engine_version", &id.engine_version),
        ("ruleset_version", &id.ruleset_version),
    ]
    .into_iter()
    .filter(|(_, v)| v.trim().is_empty())
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the Register leaves {} empty: verdicts are kept per scanner, engine and versions",
            missing.join(", ")
        ));
    }
    // Registered is held back: a worker must wait for it before granting or answering.
    let hold_until = Instant::now() + h.config.quiet_wait;
    while let Some(msg) = s.pump(hold_until).await? {
        if !matches!(msg, Message::Heartbeat(_)) {
            return Err(format!(
                "the worker sent a {} before Registered: it must wait for the broker to \
                 confirm the registration (heartbeats excepted)",
                kind(&msg)
            ));
        }
    }
    s.establish(h.deadline(), true).await?;
    s.finish()?;
    Ok(format!(
        "scanner {:?}, engine {:?} {:?}, rules {:?}; quiet while Registered was held back {}; \
         granted {} credit(s)",
        id.scanner,
        id.engine,
        id.engine_version,
        id.ruleset_version,
        human(h.config.quiet_wait),
        s.granted
    ))
}

async fn clean_file(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.attach(true).await?;
    let job = s.job(generated(h.seed ^ 0xc1ea, SMALL), "/conformance/clean.bin");
    let deadline = h.deadline();
    let sent = Instant::now();
    s.send_job(&job, deadline).await?;
    let (result, at) = s.await_result(job.job_id, deadline).await?;
    expect(&result, VerdictResult::Clean)?;
    let waited = at.duration_since(sent);
    if result.scan_micros == 0 {
        return Err(
            "scan_micros is 0: a result says how long the scan took (64 KiB takes more than a \
             microsecond)"
                .into(),
        );
    }
    if u128::from(result.scan_micros) > waited.as_micros() {
        return Err(format!(
            "scan_micros is {} but the result came {} after the job was sent",
            result.scan_micros,
            human(waited)
        ));
    }
    s.finish()?;
    Ok(format!(
        "clean in {}, scan_micros {}",
        human(waited),
        result.scan_micros
    ))
}

async fn eicar(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.attach(true).await?;
    let job = s.job(EICAR_TEST_FILE.to_vec(), "/conformance/eicar.com");
    let deadline = h.deadline();
    s.send_job(&job, deadline).await?;
    let (result, _) = s.await_result(job.job_id, deadline).await?;
    expect(&result, VerdictResult::Malicious)
        .map_err(|e| format!("{e}: every worker must detect the EICAR test file"))?;
    if result.threat_name.trim().is_empty() {
        return Err("the EICAR test file was answered MALICIOUS without a threat name".into());
    }
    s.finish()?;
    Ok(format!("MALICIOUS, threat {:?}", result.threat_name))
}

/// Fails when the worker declared a `max_file_size` below `size`: the kit, like the broker,
/// never sends a worker more than it declared it takes.
fn fits(s: &Session, size: usize, why: &str) -> Result<(), Fail> {
    let limit = s.register()?.max_file_size;
    if limit != 0 && limit < size as u64 {
        return Err(format!(
            "the worker declares max_file_size {limit}, below the {size} bytes this check needs \
             ({why})"
        ));
    }
    Ok(())
}

async fn chunked_large_file(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.attach(true).await?;
    let limit = s.register()?.max_file_size;
    let size = if limit != 0 && limit < LARGE as u64 {
        // As large as the worker takes, if that still makes two chunks.
        fits(&s, CHUNK_SIZE + 1, "content in two chunks")?;
        limit as usize
    } else {
        LARGE
    };
    let job = s.job(generated(h.seed ^ 0x1a56e, size), "/conformance/large.bin");
    let deadline = h.deadline();
    let sent = Instant::now();
    s.send_job(&job, deadline).await?;
    let (result, at) = s.await_result(job.job_id, deadline).await?;
    expect(&result, VerdictResult::Clean)?;
    s.finish()?;
    Ok(format!(
        "{} bytes in {} chunks: clean in {}",
        size,
        job.chunks(),
        human(at.duration_since(sent))
    ))
}

async fn cancel(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.attach(true).await?;
    let size = 2 * CHUNK_SIZE + 1;
    fits(&s, size, "a job cancelled between its chunks")?;
    let job: JobSpec = s.job(
        generated(h.seed ^ 0xca9c, size),
        "/conformance/cancelled.bin",
    );
    s.send_job_partly(&job, 1, h.deadline()).await?;
    let granted_before = s.granted;
    s.send(Command::Cancel(v1::CancelJob {
        job_id: job.job_id,
        reason: "conformance: cancelled before its last chunk".into(),
    }))
    .await?;
    let cancelled = Instant::now();
    let answered = |s: &Session| {
        s.result_for(job.job_id).map(|r| {
            format!(
                "the cancelled job {} was answered {}: a cancelled job gets no result",
                job.job_id,
                describe(r)
            )
        })
    };
    s.idle(cancelled + h.config.quiet_wait).await?;
    if let Some(fail) = answered(&s) {
        return Err(fail);
    }
    s.wait_for(
        h.deadline(),
        "credit granted again for the cancelled job",
        |s| s.granted > granted_before,
    )
    .await
    .map_err(|e| {
        format!(
            "{e}: a cancelled job does not return its credit by itself (worker.proto), so the \
             worker must grant it again"
        )
    })?;
    clean_job(h, &mut s, 0xa11e, "the job after the cancelled one").await?;
    if let Some(fail) = answered(&s) {
        return Err(fail);
    }
    s.finish()?;
    Ok(format!(
        "no result for the cancelled job in {}; its credit granted again; the next job answered",
        human(h.config.quiet_wait)
    ))
}

async fn credits(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.attach(true).await?;
    s.idle(Instant::now() + CREDIT_SETTLE).await?;
    let initial = s.granted;
    // Credits granted again never exceed the results sent: checked after every message.
    let within_grant = |s: &Session| -> Result<(), Fail> {
        let again = s.granted - initial;
        let results = s.results.len() as u64;
        if again > results {
            Err(format!(
                "the worker granted {again} credit(s) again after only {results} result(s): a \
                 credit comes back only as a job leaves the worker, so that it never holds more \
                 than the {initial} it granted"
            ))
        } else {
            Ok(())
        }
    };
    let n = initial.min(MAX_WORKER_JOBS);
    let deadline = h.deadline();
    // Every granted credit is taken by a job held open (its last chunk not yet sent), so the
    // worker has no credit left, whatever its speed, when the job beyond them comes.
    let size = CHUNK_SIZE + 2048;
    fits(&s, size, "jobs held open between their chunks")?;
    let template = s.job(generated(h.seed ^ 0xc0de, size), "/conformance/credit.bin");
    let mut held = Vec::new();
    for _ in 0..n {
        let job = s.job_like(&template);
        s.send_job_partly(&job, 1, deadline).await?;
        held.push(job);
    }
    let extra = if n == initial {
        let job = s.job(generated(h.seed ^ 0xe8e8, 2048), "/conformance/beyond.bin");
        s.send_job_beyond_credits(&job).await?;
        let until = Instant::now() + h.config.quiet_wait;
        while s.result_for(job.job_id).is_none() && s.pump(until).await?.is_some() {
            within_grant(&s)?;
        }
        Some(job.job_id)
    } else {
        None
    };
    for job in &held {
        s.send_remaining_chunks(job, 1).await?;
    }
    let ids: Vec<u64> = held.iter().map(|j| j.job_id).collect();
    let all_answered = |s: &Session| ids.iter().all(|id| s.result_for(*id).is_some());
    let deadline = h.deadline();
    while !all_answered(&s) {
        within_grant(&s)?;
        if s.pump(deadline).await?.is_none() {
            let missing = ids.iter().filter(|id| s.result_for(**id).is_none()).count();
            return Err(format!(
                "{missing} of the {n} jobs sent within the {initial} credits granted had no \
                 result within {}",
                human(h.config.check_timeout)
            ));
        }
    }
    within_grant(&s)?;
    for id in &ids {
        let result = s.result_for(*id).expect("all answered");
        expect(result, VerdictResult::Clean).map_err(|e| {
            format!("{e}: a worker takes as many jobs at once as it granted credits ({initial})")
        })?;
    }
    let deadline = h.deadline();
    while s.granted - initial < n {
        within_grant(&s)?;
        if s.pump(deadline).await?.is_none() {
            return Err(format!(
                "after answering {n} jobs the worker granted only {} credit(s) again within {}: \
                 a finished job does not return its credit by itself (worker.proto), so the \
                 worker stops getting work",
                s.granted - initial,
                human(h.config.check_timeout)
            ));
        }
    }
    within_grant(&s)?;
    clean_job(h, &mut s, 0xf1a1, "the job after the credits check").await?;
    within_grant(&s)?;
    // Judged last, so that a late answer to it counts too.
    let beyond = match extra.map(|id| s.result_for(id)) {
        None => "no job beyond them (more than the broker ever sends)".to_owned(),
        Some(None) => "the job beyond them ignored".to_owned(),
        Some(Some(r)) if r.result == VerdictResult::Error as i32 && r.retryable => {
            format!("the job beyond them refused: {}", describe(r))
        }
        Some(Some(r)) if r.result == VerdictResult::Clean as i32 => {
            "the job beyond them taken and answered CLEAN".to_owned()
        }
        Some(Some(r)) => {
            return Err(format!(
                "the job sent beyond the credits was answered {}: refuse it with a retryable \
                 ERROR (another worker may take it), answer it, or ignore it",
                describe(r)
            ));
        }
    };
    s.finish()?;
    Ok(format!(
        "granted {initial}; {n} jobs held at once and answered; {beyond}; {} credit(s) granted \
         again, none before a result",
        s.granted - initial
    ))
}

async fn heartbeat(h: &mut Harness<'_>) -> Outcome {
    // The kit stays silent here (no heartbeats of its own).
    let mut s = h.attach(false).await?;
    let wait = h.config.heartbeat_wait;
    let registered = s.registered_at.expect("established");
    let after = |s: &Session, t: Instant| s.heartbeats.iter().copied().find(|b| *b > t);
    // Heartbeats that came with the first credit count: `registered` is before them.
    let mut first = after(&s, registered);
    while first.is_none() {
        if s.pump(registered + wait).await?.is_none() {
            return Err(format!(
                "no heartbeat within {} of the registration, the kit silent: a worker \
                 heartbeats at least every 10 s",
                human(wait)
            ));
        }
        first = after(&s, registered);
    }
    let first = first.expect("loop ends with one");
    let mut second = after(&s, first);
    while second.is_none() {
        if s.pump(first + wait).await?.is_none() {
            return Err(format!(
                "no heartbeat within {} after the first one ({} after the registration), the \
                 kit silent: a worker heartbeats at least every 10 s",
                human(wait),
                human(first.duration_since(registered))
            ));
        }
        second = after(&s, first);
    }
    let second = second.expect("loop ends with one");
    s.finish()?;
    Ok(format!(
        "heartbeats {} and {} after the registration",
        human(first.duration_since(registered)),
        human(second.duration_since(registered))
    ))
}

async fn hash_mismatch(h: &mut Harness<'_>) -> Outcome {
    let mut s = h.attach(true).await?;
    let content = generated(h.seed ^ 0x4a54, 8 * 1024);
    let mut other = content.clone();
    other[0] ^= 0xff;
    let mut job = s.job(content, "/conformance/mismatch.bin");
    job.sha256 = Sha256::of(&other).to_hex();
    let deadline = h.deadline();
    s.send_job(&job, deadline).await?;
    let (result, _) = s.await_result(job.job_id, deadline).await?;
    expect(&result, VerdictResult::Error).map_err(|e| {
        format!("{e}: the content does not hash to Job.sha256, which a worker must check")
    })?;
    if result.retryable {
        return Err(format!(
            "a SHA-256 mismatch was answered {}: it must not be retryable",
            describe(&result)
        ));
    }
    if !result.detail.to_ascii_lowercase().contains("mismatch") {
        return Err(format!(
            "a SHA-256 mismatch was answered {}: the detail must say \"sha256 mismatch\"",
            describe(&result)
        ));
    }
    s.finish()?;
    Ok(describe(&result))
}

async fn broker_restart(h: &mut Harness<'_>) -> Outcome {
    let s = h.attach(true).await?;
    s.finish()?;
    // The worker sees its stream end and the broker's port closed, as on a broker restart.
    drop(s);
    let listening = h.restart_server(RESTART_DOWN).await?;
    let mut s = h
        .accept(h.config.reconnect_wait)
        .await
        .map_err(|e| format!("after the broker restart: {e}"))?;
    let back_after = s.attached_at.duration_since(listening);
    s.register()
        .map_err(|e| format!("after the broker restart: {e}"))?;
    s.establish(h.deadline(), true)
        .await
        .map_err(|e| format!("after the broker restart: {e}"))?;
    clean_job(h, &mut s, 0x4e57, "after the broker restart").await?;
    s.finish()?;
    Ok(format!(
        "re-registered {} after the broker listened again; a job answered",
        human(back_after)
    ))
}
