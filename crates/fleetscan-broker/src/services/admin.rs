//! `AdminService`: the admin views ([`crate::admin`]) over gRPC. Each handler finds who the call
//! acts for, converts the request, asks the views and converts the answer.
//!
//! Who acts: `ListEvents` acts for the tenant its `fleetscan-tenant` metadata names
//! ([`TENANT_HEADER`]; the fleet operator's when absent, refused when not a tenant name); every
//! other call for the fleet operator. Until callers are authenticated the header is trusted, as
//! the whole API is. Must never: write, or answer from anything but the views.

use fleetscan_core::AccessRecord;
use fleetscan_proto::{TENANT_HEADER, convert, v1};
use tonic::{Request, Response, Status};

use crate::admin::{Acting, Counters, EventQuery, Host, Views};
use crate::engine::scheduler::WorkerInfo;
use crate::error::BrokerError;

pub struct AdminSvc {
    views: Views,
}

impl AdminSvc {
    pub fn new(views: Views) -> AdminSvc {
        AdminSvc { views }
    }
}

/// The tenant a call acts for: its [`TENANT_HEADER`], else the fleet operator.
fn acting<T>(request: &Request<T>) -> Result<Acting, BrokerError> {
    let Some(v) = request.metadata().get(TENANT_HEADER) else {
        return Ok(Acting::operator());
    };
    let tenant = v
        .to_str()
        .map_err(|_| BrokerError::InvalidArgument(format!("{TENANT_HEADER} is not text")))?;
    Acting::tenant(tenant)
}

fn parse_sha256(s: &str) -> Result<fleetscan_core::Sha256, BrokerError> {
    convert::sha256("sha256", s).map_err(|e| BrokerError::InvalidArgument(e.to_string()))
}

#[tonic::async_trait]
impl v1::admin_service_server::AdminService for AdminSvc {
    async fn list_events(
        &self,
        request: Request<v1::ListEventsRequest>,
    ) -> Result<Response<v1::ListEventsResponse>, Status> {
        let acting = acting(&request)?;
        let r = request.into_inner();
        let query = EventQuery {
            node: (!r.node.is_empty()).then_some(r.node),
            action: convert::action_from_proto(r.action),
            sha256: if r.sha256.is_empty() {
                None
            } else {
                Some(parse_sha256(&r.sha256)?)
            },
            before_id: (r.before_id > 0).then_some(r.before_id),
            limit: r.limit,
        };
        let page = self.views.events(&acting, query).await?;
        Ok(Response::new(v1::ListEventsResponse {
            events: page.events.into_iter().map(event).collect(),
            next_before_id: page.next_before_id,
        }))
    }

    async fn get_verdicts(
        &self,
        request: Request<v1::GetVerdictsRequest>,
    ) -> Result<Response<v1::GetVerdictsResponse>, Status> {
        let sha256 = parse_sha256(&request.get_ref().sha256)?;
        let verdicts = self.views.verdicts(&Acting::operator(), &sha256).await?;
        Ok(Response::new(v1::GetVerdictsResponse {
            verdicts: verdicts.iter().map(Into::into).collect(),
        }))
    }

    async fn list_hosts(
        &self,
        _request: Request<v1::ListHostsRequest>,
    ) -> Result<Response<v1::ListHostsResponse>, Status> {
        let hosts = self.views.hosts(&Acting::operator()).await?;
        Ok(Response::new(v1::ListHostsResponse {
            hosts: hosts.into_iter().map(host).collect(),
        }))
    }

    async fn list_workers(
        &self,
        _request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let workers = self.views.workers(&Acting::operator());
        Ok(Response::new(v1::ListWorkersResponse {
            workers: workers.into_iter().map(worker).collect(),
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::Stats>, Status> {
        let counters = self.views.counters(&Acting::operator()).await;
        Ok(Response::new(stats(counters)))
    }
}

fn event((id, a): (i64, AccessRecord)) -> v1::AccessEvent {
    v1::AccessEvent {
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
    }
}

fn host(h: Host) -> v1::Host {
    let Host { record, connected } = h;
    v1::Host {
        connected,
        node: record.node,
        cluster: record.cluster,
        agent_version: record.agent_version,
        first_seen_unix_ms: record.first_seen_unix_ms,
        last_seen_unix_ms: record.last_seen_unix_ms,
        allowed_count: record.allowed_count,
        denied_count: record.denied_count,
    }
}

fn worker(w: WorkerInfo) -> v1::Worker {
    v1::Worker {
        worker_name: w.attach.name,
        scanner: Some((&w.attach.identity).into()),
        pool: w.attach.pool,
        tenants: w.attach.tenants,
        credits: w.credits,
        in_flight: w.in_flight,
        jobs_done: w.jobs_done,
        attached_at_unix_ms: w.attach.attached_at_unix_ms,
    }
}

fn stats(c: Counters) -> v1::Stats {
    v1::Stats {
        decisions: c.decisions,
        cache_hits: c.cache_hits,
        store_hits: c.store_hits,
        scans_started: c.scans_started,
        scans_deduplicated: c.scans_deduplicated,
        denied: c.denied,
        verdicts_stored: c.stored.verdicts,
        events_stored: c.stored.accesses,
        records_lost: c.records_lost,
        write_backlog: c.write_backlog,
        oversize: c.oversize,
        scan_errors: c.scan_errors,
        fail_mode_decisions: c.fail_mode_decisions,
        queue_rejected: c.queue_rejected,
        dropped_reports: c.dropped_reports,
    }
}
