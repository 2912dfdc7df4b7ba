//! The broker's integration tests, one binary for all (tonic and sqlx are linked once, not once
//! per file): a real broker on loopback over a real store, scripted agents and workers, the
//! worker SDK, and several brokers over a throw-away Postgres cluster.
//!
//! The tests of one binary run in parallel threads, at most as many as the machine has cores
//! (two here), as those of each former binary did. None changes process-wide state: the tracing
//! subscriber is installed once with `try_init`, and the Postgres cluster of `fleet` is one per
//! process, shared through a `OnceLock` (the test that stops Postgres starts a cluster of its
//! own). The tests with timing bounds (`fleet`'s claim taken over within its expiry and a second,
//! decisions within 3 s with Postgres down) ran beside other Postgres tests before; beside the
//! in-process ones they are no worse off.

mod broker;
mod common;
mod fleet;
mod real_worker;
mod tenancy;
