//! `ScanService`: voluntary scans for applications, through the same cache, single-flight and
//! job path as agents' requests, bounded by `scan_deadline` and the policy's `max_file_size`.
//! Scans are made for the default tenant until callers are authenticated.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use fleetscan_core::{DEFAULT_TENANT, Sha256, Sha256Hasher};
use fleetscan_proto::convert;
use fleetscan_proto::v1;
use tonic::{Request, Response, Status, Streaming};

use crate::content::ContentSource;
use crate::decide::{self, Resolution};
use crate::engine::{DEFAULT_POOL, Engine, Lookup, Pending};
use crate::error::BrokerError;
use crate::stats::bump;

pub struct ScanSvc {
    pub engine: Arc<Engine>,
}

impl ScanSvc {
    async fn scan(&self, sha256: Sha256, content: Bytes, name: String) -> v1::ScanResponse {
        let engine = &self.engine;
        let (_, pending) = engine.resolve(Lookup {
            sha256,
            size: content.len() as u64,
            tenant: DEFAULT_TENANT.to_owned(),
            pool: DEFAULT_POOL,
            path_hint: name,
            source: ContentSource::Memory(content),
        });
        let resolution = match pending {
            Pending::Ready(resolution) => resolution,
            Pending::Wait(waiter) => {
                match tokio::time::timeout(engine.config.scan_deadline, waiter.wait()).await {
                    Ok(Some(resolution)) => resolution,
                    Ok(None) => Resolution::Failed("scan abandoned".into()),
                    Err(_) => Resolution::Failed("scan deadline exceeded".into()),
                }
            }
        };
        self.respond(sha256, &resolution)
    }

    fn respond(&self, sha256: Sha256, resolution: &Resolution) -> v1::ScanResponse {
        let decided = decide::decide(self.engine.policy(DEFAULT_TENANT), resolution);
        if decided.fail_mode {
            bump(&self.engine.stats.fail_mode_decisions);
        }
        if decided.oversize {
            bump(&self.engine.stats.oversize);
        }
        let (verdicts, known) = match resolution {
            Resolution::Verdict(v) => (vec![v.as_ref().into()], v.kind.is_conclusive()),
            _ => (Vec::new(), false),
        };
        v1::ScanResponse {
            sha256: sha256.to_hex(),
            action: convert::action_to_proto(decided.action).into(),
            reason: decided.reason,
            verdicts,
            known,
        }
    }
}

#[tonic::async_trait]
impl v1::scan_service_server::ScanService for ScanSvc {
    async fn scan_bytes(
        &self,
        request: Request<v1::ScanBytesRequest>,
    ) -> Result<Response<v1::ScanResponse>, Status> {
        let request = request.into_inner();
        let sha256 = Sha256::of(&request.data);
        let size = request.data.len() as u64;
        if size > self.engine.policy(DEFAULT_TENANT).max_file_size {
            return Ok(Response::new(
                self.respond(sha256, &Resolution::Oversize(size)),
            ));
        }
        Ok(Response::new(
            self.scan(sha256, request.data, request.name).await,
        ))
    }

    async fn scan_stream(
        &self,
        request: Request<Streaming<v1::ScanStreamRequest>>,
    ) -> Result<Response<v1::ScanResponse>, Status> {
        let mut inbound = request.into_inner();
        let max = self.engine.policy(DEFAULT_TENANT).max_file_size;
        let deadline = tokio::time::Instant::now() + self.engine.config.scan_deadline;
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
        if size > max {
            return Ok(Response::new(
                self.respond(sha256, &Resolution::Oversize(size)),
            ));
        }
        Ok(Response::new(
            self.scan(sha256, content.freeze(), name).await,
        ))
    }

    async fn lookup(
        &self,
        request: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::ScanResponse>, Status> {
        let sha256 = convert::sha256("sha256", &request.get_ref().sha256)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        let engine = &self.engine;
        let unknown = || v1::ScanResponse {
            sha256: sha256.to_hex(),
            action: v1::Action::Unspecified.into(),
            reason: "no verdict of the current scanner".into(),
            verdicts: Vec::new(),
            known: false,
        };
        let Some(identity) = engine.current(DEFAULT_POOL) else {
            return Ok(Response::new(unknown()));
        };
        let verdict = match engine.cache.get(&sha256, identity.id) {
            Some(v) => {
                bump(&engine.stats.cache_hits);
                Some(v)
            }
            None => engine
                .store
                .find_verdict(&sha256, &identity.identity)
                .await
                .map_err(BrokerError::from)?
                .filter(|v| v.kind.is_conclusive())
                .map(|v| {
                    bump(&engine.stats.store_hits);
                    let v = Arc::new(v);
                    engine.cache.insert(identity.id, v.clone());
                    v
                }),
        };
        Ok(Response::new(match verdict {
            Some(v) => self.respond(sha256, &Resolution::Verdict(v)),
            None => unknown(),
        }))
    }
}
