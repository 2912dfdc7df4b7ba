//! The agent against the real kernel (a tmpfs each test mounts) and a scripted broker on
//! loopback, in one test binary. Files are opened by child processes. Needs root.
//!
//! Each test names the invariant it guards; each would fail if that invariant broke. Tests run
//! in parallel, except those that take the machine alone (see `support`).

mod broker;
mod cache;
mod deadlines;
mod fd_limit;
mod protection;
mod rewrite_race;
mod support;
