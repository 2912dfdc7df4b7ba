//! The black-box end-to-end tests: one binary (linking tonic, sqlx and the testkit once), a
//! module per subject. They start the real `fleetscan` binary (built by Cargo for them, being
//! targets of its package), real Postgres and clamd, mount filesystems of their own and create
//! network namespaces and cgroups; they need root.
//!
//! Tests run on parallel threads: each first takes its turn at the gate in [`common`], where
//! those with timing bounds or a whole fleet run alone. None changes process-wide state (the
//! environment, the current directory, signal dispositions, rlimits, a global subscriber): a
//! test that must is not a test of this binary.

mod common;

mod boundaries;
mod clamav;
mod conformance;
mod containers;
mod faults;
mod fleet;
mod single_host;
mod tenants;
