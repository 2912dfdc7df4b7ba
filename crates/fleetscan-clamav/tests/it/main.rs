//! The clamd scanner's integration tests, one binary (linking tonic once, not once per file):
//! `clamd` against real throw-away clamd processes, `fake` against a fake clamd on loopback
//! that misbehaves on purpose, `worker` through the SDK against a scripted broker.
//!
//! Nothing here changes process-wide state: each test starts its own clamd or fake on its own
//! socket. The time bounds (a hung clamd costs its timeout plus less than a second, a refused
//! or queued connect fails within 2 s) leave a second or more of slack for one other test
//! running beside them.

mod clamd;
mod fake;
mod worker;
