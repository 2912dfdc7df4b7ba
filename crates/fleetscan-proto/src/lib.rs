//! The fleetscan.v1 wire protocol: types and service stubs generated from `proto/`.
//!
//! Only the gRPC edges of the other crates use these types; domain logic works on
//! `fleetscan-core` types and converts at the edge.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("fleetscan.v1");
}

/// The encoded `FileDescriptorSet` of the protocol, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleetscan_descriptor.bin"));

/// Largest content chunk carried in one message, in bytes.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// Largest gRPC message any fleetscan server or client accepts, in bytes: a chunk plus room for
/// the envelope. Anything larger is refused by tonic (with `OUT_OF_RANGE`; `RESOURCE_EXHAUSTED`
/// for compressed messages) and the connection carries on.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// `AgentHello.capabilities`: the agent keys its cached decisions by policy scope (tenant and
/// namespace overrides), so the broker may send cacheable decisions while several policies are
/// in force.
pub const CAPABILITY_SCOPED_CACHE: &str = "scoped-cache";

/// The gRPC metadata key naming the tenant an `AdminService` call acts for (the fleet
/// operator's when absent).
pub const TENANT_HEADER: &str = "fleetscan-tenant";

pub mod convert;
