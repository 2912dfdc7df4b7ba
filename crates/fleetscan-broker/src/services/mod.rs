//! The gRPC services: the only broker code that sees `fleetscan_proto::v1` types.
//!
//! Each handler converts the request at the edge (with `fleetscan_proto::convert` wherever a
//! conversion is the protocol's own), calls the layer below — [`crate::access`] for agents'
//! accesses and applications' scans, [`crate::admin`] for the admin views, the
//! [`Engine`](crate::engine::Engine) for workers — and converts the answer. The stream
//! mechanics of long-lived sessions (hello, batching, heartbeats, ordering) live here too, and
//! nowhere below. Errors become statuses in one place, [`crate::error`].
//!
//! Must never: decide an access, query the store, or reach into the engine's state.

pub mod admin;
pub mod agent;
pub mod scan;
pub mod stream;
pub mod worker;
