//! `AdminService`: read-only views of recorded events, verdicts, hosts, workers and counters.
//! Recorded events are those of the tenant the call names in its `fleetscan-tenant` metadata
//! ([`TENANT_HEADER`]; the fleet operator's when absent); everything else is the operator's.
//! Until callers are authenticated the header is trusted, as the whole API is. Never writes.

use std::collections::HashSet;
use std::sync::Arc;

use fleetscan_core::{DEFAULT_TENANT, Sha256};
use fleetscan_proto::{convert, v1};
use fleetscan_store::{AccessFilter, MAX_LIST_LIMIT};
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::engine::Engine;
use crate::error::BrokerError;
use crate::stats::get;

/// The gRPC metadata key naming the tenant a call acts for.
pub use fleetscan_proto::TENANT_HEADER;

/// The tenant a call acts for: its [`TENANT_HEADER`], else the fleet operator's.
fn acting_tenant<T>(request: &Request<T>) -> Result<String, BrokerError> {
    let Some(v) = request.metadata().get(TENANT_HEADER) else {
        return Ok(DEFAULT_TENANT.to_owned());
    };
    let t = v
        .to_str()
        .map_err(|_| BrokerError::InvalidArgument(format!("{TENANT_HEADER} is not text")))?;
    fleetscan_core::tenancy::check_name("tenant", t)
        .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
    Ok(t.to_owned())
}

/// Events per page when the request does not say.
const DEFAULT_PAGE: u32 = 100;

pub struct AdminSvc {
    pub engine: Arc<Engine>,
}

fn parse_sha256(s: &str) -> Result<Sha256, BrokerError> {
    convert::sha256("sha256", s).map_err(|e| BrokerError::InvalidArgument(e.to_string()))
}

#[tonic::async_trait]
impl v1::admin_service_server::AdminService for AdminSvc {
    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        let tenant = acting_tenant(&request)?;
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            DEFAULT_PAGE
        } else {
            r.limit.min(MAX_LIST_LIMIT)
        };
        let filter = AccessFilter {
            tenant,
            node: (!r.node.is_empty()).then_some(r.node),
            action: convert::action_from_proto(r.action),
            sha256: if r.sha256.is_empty() {
                None
            } else {
                Some(parse_sha256(&r.sha256)?)
            },
            before_id: (r.before_id > 0).then_some(r.before_id),
            limit,
        };
        let rows = self
            .engine
            .store
            .list_accesses(&filter)
            .await
            .map_err(BrokerError::from)?;
        let next_before_id = if rows.len() == limit as usize {
            rows.last().map_or(0, |(id, _)| *id)
        } else {
            0
        };
        let events = rows
            .into_iter()
            .map(|(id, a)| v1::AccessEvent {
                id,
                at_unix_ms: a.at_unix_ms,
                node: a.node,
                path: a.path,
                kind: convert::access_kind_to_proto(a.kind).into(),
                action: convert::action_to_proto(a.action).into(),
                reason: a.reason,
                sha256: a.sha256.map(|s| s.to_hex()).unwrap_or_default(),
                threat_name: a.threat_name.unwrap_or_default(),
                pid: a.pid,
                uid: a.uid,
                exe: a.exe,
                decided_by: a.decided_by.as_str().to_owned(),
                tenant: a.tenant,
                ns_pid: a.context.ns_pid,
                cgroup: a.context.cgroup,
                container_id: a.context.container_id,
                pod_uid: a.context.pod_uid,
                k8s_namespace: a.context.namespace,
                image: a.context.image,
                host_path: a.context.host_path,
            })
            .collect();
        Ok(Response::new(v1::ListEventsResponse {
            events,
            next_before_id,
        }))
    }

    async fn get_verdicts(
        &self,
        request: Request<v1::GetVerdictsRequest>,
    ) -> Result<Response<v1::GetVerdictsResponse>, Status> {
        let sha256 = parse_sha256(&request.get_ref().sha256)?;
        let verdicts = self
            .engine
            .store
            .verdicts_for(&sha256)
            .await
            .map_err(BrokerError::from)?;
        Ok(Response::new(v1::GetVerdictsResponse {
            verdicts: verdicts.iter().map(Into::into).collect(),
        }))
    }

    async fn list_hosts(
        &self,
        _request: Request<v1::ListHostsRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        let hosts = self
            .engine
            .store
            .list_hosts(DEFAULT_TENANT)
            .await
            .map_err(BrokerError::from)?;
        let connected: HashSet<String> = self
            .engine
            .connected_nodes(DEFAULT_TENANT)
            .into_iter()
            .collect();
        Ok(Response::new(v1::ListHostsResponse {
            hosts: hosts
                .into_iter()
                .map(|h| v1::Host {
                    connected: connected.contains(&h.node),
                    node: h.node,
                    cluster: h.cluster,
                    agent_version: h.agent_version,
                    first_seen_unix_ms: h.first_seen_unix_ms,
                    last_seen_unix_ms: h.last_seen_unix_ms,
                    allowed_count: h.allowed_count,
                    denied_count: h.denied_count,
                })
                .collect(),
        }))
    }

    async fn list_workers(
        &self,
        _request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let workers = self
            .engine
            .scheduler
            .workers()
            .into_iter()
            .map(|w| v1::Worker {
                worker_name: w.attach.name,
                scanner: Some((&w.attach.identity).into()),
                pool: w.attach.pool,
                tenants: w.attach.tenants,
                credits: w.credits,
                in_flight: w.in_flight,
                jobs_done: w.jobs_done,
                attached_at_unix_ms: w.attach.attached_at_unix_ms,
            })
            .collect();
        Ok(Response::new(v1::ListWorkersResponse { workers }))
    }

    async fn get_stats(
        &self,
        _request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::Stats>, Status> {
        let engine = &self.engine;
        // Counters stay useful while the store is down: stored totals then read as zero.
        let stored = match engine.store.counts().await {
            Ok(counts) => counts,
            Err(e) => {
                warn!(error = %e, "stored counts unavailable");
                Default::default()
            }
        };
        let s = &engine.stats;
        Ok(Response::new(v1::Stats {
            decisions: get(&s.decisions),
            cache_hits: get(&s.cache_hits),
            store_hits: get(&s.store_hits),
            scans_started: get(&s.scans_started),
            scans_deduplicated: get(&s.scans_deduplicated),
            denied: get(&s.denied),
            verdicts_stored: stored.verdicts,
            events_stored: stored.accesses,
            records_lost: engine.writer.records_lost(),
            write_backlog: engine.writer.backlog(),
            oversize: get(&s.oversize),
            scan_errors: get(&s.scan_errors),
            fail_mode_decisions: get(&s.fail_mode_decisions),
            queue_rejected: get(&s.queue_rejected),
            dropped_reports: get(&s.dropped_reports),
        }))
    }
}
