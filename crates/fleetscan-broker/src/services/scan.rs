//! `ScanService`: voluntary scans for applications, decided by [`crate::access::scan`]. This
//! module reads the request (a stream's chunks too, hashing as they come and keeping no more
//! than the policy's maximum) and converts the answer. Must never: buffer past the maximum.

use std::sync::Arc;

use bytes::BytesMut;
use fleetscan_core::{Sha256, Sha256Hasher};
use fleetscan_proto::convert;
use fleetscan_proto::v1;
use tonic::{Request, Response, Status, Streaming};

use crate::access::scan::{self, Scanned};
use crate::engine::Engine;
use crate::error::BrokerError;

pub struct ScanSvc {
    engine: Arc<Engine>,
}

impl ScanSvc {
    pub fn new(engine: Arc<Engine>) -> ScanSvc {
        ScanSvc { engine }
    }
}

fn response(scanned: Scanned) -> v1::ScanResponse {
    v1::ScanResponse {
        sha256: scanned.sha256.to_hex(),
        action: convert::action_to_proto(scanned.action).into(),
        reason: scanned.reason,
        verdicts: scanned
            .verdict
            .map(|v| vec![v.as_ref().into()])
            .unwrap_or_default(),
        known: scanned.known,
    }
}

#[tonic::async_trait]
impl v1::scan_service_server::ScanService for ScanSvc {
    async fn scan_bytes(
        &self,
        request: Request<v1::ScanBytesRequest>,
    ) -> Result<Response<v1::ScanResponse>, Status> {
        let request = request.into_inner();
        let scanned = scan::scan_bytes(&self.engine, request.data, request.name).await;
        Ok(Response::new(response(scanned)))
    }

    async fn scan_stream(
        &self,
        request: Request<Streaming<v1::ScanStreamRequest>>,
    ) -> Result<Response<v1::ScanResponse>, Status> {
        let mut inbound = request.into_inner();
        let max = scan::max_size(&self.engine);
        let deadline = tokio::time::Instant::now() + self.engine.config().scan_deadline;
        let mut content = BytesMut::new();
        let mut hasher = Sha256Hasher::new();
        let mut size = 0u64;
        let mut name = String::new();
        loop {
            let message = tokio::time::timeout_at(deadline, inbound.message())
                .await
                .map_err(|_| {
                    BrokerError::Timeout("content not received within the scan deadline")
                })??;
            let Some(message) = message else { break };
            if name.is_empty() && !message.name.is_empty() {
                name = message.name;
            }
            size += message.data.len() as u64;
            hasher.update(&message.data);
            // Past the maximum only the digest is kept: memory stays bounded.
            if size <= max {
                content.extend_from_slice(&message.data);
            } else {
                content = BytesMut::new();
            }
        }
        let sha256 = hasher.finish();
        let scanned = if size > max {
            scan::oversize(&self.engine, sha256, size)
        } else {
            scan::scan(&self.engine, sha256, content.freeze(), name).await
        };
        Ok(Response::new(response(scanned)))
    }

    async fn lookup(
        &self,
        request: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::ScanResponse>, Status> {
        let sha256 = convert::sha256("sha256", &request.get_ref().sha256)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        Ok(Response::new(
            match scan::lookup(&self.engine, sha256).await? {
                Some(scanned) => response(scanned),
                None => unknown(sha256),
            },
        ))
    }
}

/// The answer to a look-up of content without a verdict of the current scanner.
fn unknown(sha256: Sha256) -> v1::ScanResponse {
    v1::ScanResponse {
        sha256: sha256.to_hex(),
        action: v1::Action::Unspecified.into(),
        reason: "no verdict of the current scanner".into(),
        verdicts: Vec::new(),
        known: false,
    }
}
