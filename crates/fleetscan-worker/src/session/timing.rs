//! The timing of the worker's side of the protocol: how long it waits for a broker, how often
//! it speaks, how long it drains. Operators need not tune it.
//!
//! Constants only; it must never read a clock.

use std::time::Duration;

/// The timing of the worker's side of the protocol. Operators need not tune it; tests shrink
/// it to exercise timeouts in milliseconds.
#[derive(Clone, Debug)]
pub(crate) struct Timing {
    /// Reconnect delays: quick enough to notice a broker restart at once, capped so a long
    /// outage costs one attempt every few seconds.
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    /// TCP connect plus HTTP/2 handshake.
    pub(crate) connect: Duration,
    /// From opening the stream to `Registered`: a broker that accepts but never answers is as
    /// good as gone.
    pub(crate) register: Duration,
    /// The protocol's heartbeat period and silence limit (worker.proto).
    pub(crate) heartbeat: Duration,
    pub(crate) peer_silence: Duration,
    /// How long shutdown waits for in-flight scans before abandoning them to the broker's
    /// re-queue. Scans outliving this are the broker's job deadline's problem.
    pub(crate) drain: Duration,
    /// After half-closing, how long to wait for the broker to end its side, which tells the
    /// worker that every result it sent was read.
    pub(crate) close: Duration,
    /// The deadline of a job that does not state one (`deadline_ms` 0).
    pub(crate) default_job_deadline: Duration,
    /// Granularity of job deadlines, the silence check and the drain deadline.
    pub(crate) housekeeping: Duration,
}

impl Timing {
    pub(crate) const PROTOCOL: Timing = Timing {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        connect: Duration::from_secs(5),
        register: Duration::from_secs(10),
        heartbeat: Duration::from_secs(10),
        peer_silence: Duration::from_secs(30),
        drain: Duration::from_secs(30),
        close: Duration::from_secs(2),
        default_job_deadline: Duration::from_secs(30),
        housekeeping: Duration::from_millis(200),
    };
}
