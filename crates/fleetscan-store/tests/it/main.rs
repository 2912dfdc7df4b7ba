//! The store's integration tests, one binary (linking sqlx once, not once per file): every
//! module runs its bodies on a fresh SQLite file and on a fresh database of the one Postgres
//! cluster this test process shares (`common`).
//!
//! Nothing here changes process-wide state or needs a quiet machine: each test has its own
//! database, and the one time bound (a refused connection reported within 2 s) holds under
//! load.

#[macro_use]
mod common;

mod fleet;
mod put_verdicts;
mod store;
mod tenant_verdicts;
