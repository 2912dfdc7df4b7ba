//! What the admin API shows: recorded events, verdicts, hosts, workers and counters, as
//! protocol-free queries that the gRPC `AdminService` (and any later HTTP API) call alike.
//!
//! Every query takes who it acts for ([`Acting`]). Recorded events are that tenant's; hosts are
//! that tenant's; verdicts, workers and counters are the fleet's whoever acts. Until callers are
//! authenticated the services decide who acts: `AdminService` takes the tenant a `ListEvents`
//! call names in its metadata (`fleetscan-tenant`) and the fleet operator for every other call.
//! Must never: write, or show one tenant's events or hosts to another.

use std::collections::HashSet;
use std::sync::Arc;

use fleetscan_core::tenancy::check_name;
use fleetscan_core::{AccessRecord, Action, DEFAULT_TENANT, Sha256, Verdict};
use fleetscan_store::{AccessFilter, HostRecord, MAX_LIST_LIMIT, Store, StoredCounts};
use tracing::warn;

use crate::engine::Engine;
use crate::engine::scheduler::WorkerInfo;
use crate::engine::stats::get;
use crate::error::BrokerError;

/// Events per page when the query does not say.
const DEFAULT_PAGE: u32 = 100;

/// Who an admin query acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acting {
    tenant: String,
}

impl Acting {
    /// The fleet operator.
    pub fn operator() -> Acting {
        Acting {
            tenant: DEFAULT_TENANT.to_owned(),
        }
    }

    /// A tenant by name; a name the tenancy could never hold is refused.
    pub fn tenant(name: &str) -> Result<Acting, BrokerError> {
        check_name("tenant", name).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        Ok(Acting {
            tenant: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.tenant
    }
}

/// Which events to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    pub node: Option<String>,
    pub action: Option<Action>,
    pub sha256: Option<Sha256>,
    /// Only events older than this one: the cursor of the next page.
    pub before_id: Option<i64>,
    /// Events per page; 0 for the default, at most [`MAX_LIST_LIMIT`].
    pub limit: u32,
}

/// One page of events, newest first, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsPage {
    pub events: Vec<(i64, AccessRecord)>,
    /// The cursor of the next page; 0 when this is the last.
    pub next_before_id: i64,
}

/// A host, and whether its agent is connected to this broker now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub record: HostRecord,
    pub connected: bool,
}

/// The broker's counters, and the store's totals (zero while the store cannot be read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub decisions: u64,
    pub cache_hits: u64,
    pub store_hits: u64,
    pub scans_started: u64,
    pub scans_deduplicated: u64,
    pub denied: u64,
    pub stored: StoredCounts,
    pub records_lost: u64,
    pub write_backlog: u64,
    pub oversize: u64,
    pub scan_errors: u64,
    pub fail_mode_decisions: u64,
    pub queue_rejected: u64,
    pub dropped_reports: u64,
}

/// The admin queries over one broker and its store.
pub struct Views {
    engine: Arc<Engine>,
    store: Store,
}

impl Views {
    pub fn new(engine: Arc<Engine>, store: Store) -> Views {
        Views { engine, store }
    }

    /// The acting tenant's recorded events.
    pub async fn events(
        &self,
        acting: &Acting,
        query: EventQuery,
    ) -> Result<EventsPage, BrokerError> {
        let limit = if query.limit == 0 {
            DEFAULT_PAGE
        } else {
            query.limit.min(MAX_LIST_LIMIT)
        };
        let filter = AccessFilter {
            tenant: acting.tenant.clone(),
            node: query.node,
            action: query.action,
            sha256: query.sha256,
            before_id: query.before_id,
            limit,
        };
        let events = self.store.list_accesses(&filter).await?;
        let next_before_id = if events.len() == limit as usize {
            events.last().map_or(0, |(id, _)| *id)
        } else {
            0
        };
        Ok(EventsPage {
            events,
            next_before_id,
        })
    }

    /// Every stored fleet-wide verdict on a content.
    pub async fn verdicts(
        &self,
        _acting: &Acting,
        sha256: &Sha256,
    ) -> Result<Vec<Verdict>, BrokerError> {
        Ok(self.store.verdicts_for(sha256).await?)
    }

    /// The acting tenant's hosts.
    pub async fn hosts(&self, acting: &Acting) -> Result<Vec<Host>, BrokerError> {
        let hosts = self.store.list_hosts(&acting.tenant).await?;
        let connected: HashSet<String> = self
            .engine
            .connected_nodes(&acting.tenant)
            .into_iter()
            .collect();
        Ok(hosts
            .into_iter()
            .map(|record| Host {
                connected: connected.contains(&record.node),
                record,
            })
            .collect())
    }

    /// The workers attached to this broker.
    pub fn workers(&self, _acting: &Acting) -> Vec<WorkerInfo> {
        self.engine.workers()
    }

    /// This broker's counters. They stay useful while the store is down: its totals then read
    /// as zero.
    pub async fn counters(&self, _acting: &Acting) -> Counters {
        let stored = match self.store.counts().await {
            Ok(counts) => counts,
            Err(e) => {
                warn!(error = %e, "stored counts unavailable");
                StoredCounts::default()
            }
        };
        let s = self.engine.stats();
        Counters {
            decisions: get(&s.decisions),
            cache_hits: get(&s.cache_hits),
            store_hits: get(&s.store_hits),
            scans_started: get(&s.scans_started),
            scans_deduplicated: get(&s.scans_deduplicated),
            denied: get(&s.denied),
            stored,
            records_lost: self.engine.records_lost(),
            write_backlog: self.engine.write_backlog(),
            oversize: get(&s.oversize),
            scan_errors: get(&s.scan_errors),
            fail_mode_decisions: get(&s.fail_mode_decisions),
            queue_rejected: get(&s.queue_rejected),
            dropped_reports: get(&s.dropped_reports),
        }
    }
}
