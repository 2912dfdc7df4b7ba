//! The verdict path: memory cache, then (once per content and pool identity, single-flight) the
//! store, then — once per content in the whole fleet, through a claim in the store
//! ([`super::fleet`]) — the content from one of the flight's sources and a job on the pool's
//! workers; the verdict is cached, and stored before the claim is released (else written
//! behind).
//!
//! Flights are keyed by the pool's interned identity, which is scoped: a tenant's own pool never
//! shares a flight (nor a verdict) with another tenant's. A scan, once started, runs to its own
//! end (bounded by `scan_deadline`) even when the request that started it has stopped waiting,
//! so that its verdict serves the next request.
//!
//! Must never: decide an access (the access layer does, from what this returns), write to the
//! store on the way to an answer except under a claim, await while holding a lock, or use a
//! verdict of any identity but the pool's current one.

use std::sync::Arc;

use fleetscan_core::{PoolKey, Sha256, Verdict, now_unix_ms};
use tracing::{debug, warn};

use super::Engine;
use super::cache::{IdentityId, InternedIdentity};
use super::content::ContentSource;
use super::fleet::{Skipped, Standing};
use super::flight::{Joined, Leader, Waiter};
use super::scheduler::{EnqueueError, JobPayload, RunOutcome};
use super::stats::bump;
use super::writer::WriteOp;
use crate::error::BrokerError;

/// What the engine found out about one content for one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A verdict of the pool's scanner (conclusive, or an error after the last try).
    Verdict(Arc<Verdict>),
    /// The content is larger than the policy's maximum and was not scanned.
    Oversize(u64),
    /// No verdict could be had; the reason says why.
    Failed(String),
}

pub(super) type FlightKey = (Sha256, IdentityId);

/// Content held for scans at once, in KiB (1 GiB): bounds the memory of uploads in progress.
/// A fetch waits for room, within its scan deadline.
pub(super) const CONTENT_BUDGET_KIB: u32 = 1024 * 1024;

/// A request for the verdict on one content from the fleet operator's pool `pool`, under the
/// fleet's policy (the scan service's).
pub struct Lookup {
    pub sha256: Sha256,
    pub size: u64,
    pub tenant: String,
    pub pool: &'static str,
    pub path_hint: String,
    /// Where the content can be had if it must be scanned.
    pub source: ContentSource,
}

/// A request for the verdict on one content from one pool, for one tenant.
pub struct PoolLookup {
    pub sha256: Sha256,
    pub size: u64,
    pub tenant: String,
    /// The pool, as [`PoolKey::key`].
    pub pool: String,
    /// The effective policy's maximum: larger content is not scanned.
    pub max_file_size: u64,
    pub path_hint: String,
    /// Where the content can be had if it must be scanned.
    pub source: ContentSource,
}

/// The answer to a [`Lookup`]: at once, or after a flight.
pub enum Pending {
    Ready(Resolution),
    Wait(Waiter<Resolution>),
}

/// What a flight scans.
struct Job {
    sha256: Sha256,
    size: u64,
    tenant: String,
    pool: String,
    max_file_size: u64,
    path_hint: String,
}

impl Engine {
    /// The cached verdict of the pool's current identity, if any: the cached decision path
    /// (one read lock for the identity, one shard lock for the verdict; no store, no await).
    pub fn cached_verdict(&self, sha256: &Sha256, pool: &PoolKey) -> Option<Arc<Verdict>> {
        let identity = self.registry.current_id(pool)?;
        self.cache.get(sha256, identity)
    }

    /// Resolves a content's verdict from a pool of the fleet operator under the fleet's policy.
    pub fn resolve(self: &Arc<Self>, lookup: Lookup) -> (Option<IdentityId>, Pending) {
        let max_file_size = self.policy(&lookup.tenant).max_file_size;
        self.resolve_in(PoolLookup {
            sha256: lookup.sha256,
            size: lookup.size,
            tenant: lookup.tenant,
            pool: lookup.pool.to_owned(),
            max_file_size,
            path_hint: lookup.path_hint,
            source: lookup.source,
        })
    }

    /// Resolves a content's verdict under the pool's current identity. Concurrent lookups of
    /// one content share one flight: one store look-up, one content upload, one job. Flights
    /// are keyed by the pool's interned identity, which is scoped: a tenant's own pool never
    /// shares a flight (nor a verdict) with another tenant's.
    pub fn resolve_in(self: &Arc<Self>, lookup: PoolLookup) -> (Option<IdentityId>, Pending) {
        let Some(identity) = self.registry.current(&lookup.pool) else {
            let resolution = if lookup.size > lookup.max_file_size {
                Resolution::Oversize(lookup.size)
            } else {
                Resolution::Failed("no live scanner".into())
            };
            return (None, Pending::Ready(resolution));
        };
        if let Some(v) = self.cache.get(&lookup.sha256, identity.id) {
            bump(&self.stats.cache_hits);
            return (Some(identity.id), Pending::Ready(Resolution::Verdict(v)));
        }
        let key = (lookup.sha256, identity.id);
        let id = identity.id;
        let pending = match self.flights.join(key, lookup.source) {
            Joined::Leader(leader) => {
                let waiter = leader.waiter();
                let engine = self.clone();
                let PoolLookup {
                    sha256,
                    size,
                    tenant,
                    pool,
                    max_file_size,
                    path_hint,
                    source: _,
                } = lookup;
                tokio::spawn(async move {
                    let job = Job {
                        sha256,
                        size,
                        tenant,
                        pool,
                        max_file_size,
                        path_hint,
                    };
                    engine.fly(leader, identity, job).await;
                });
                Pending::Wait(waiter)
            }
            Joined::Follower(waiter) => {
                bump(&self.stats.scans_deduplicated);
                Pending::Wait(waiter)
            }
        };
        (Some(id), pending)
    }

    /// Leads one flight to its end, bounded by `scan_deadline`, and publishes the result.
    async fn fly(
        self: Arc<Self>,
        leader: Leader<FlightKey, Resolution, ContentSource>,
        identity: Arc<InternedIdentity>,
        job: Job,
    ) {
        let resolution = match tokio::time::timeout(
            self.config.scan_deadline,
            self.resolve_miss(&leader, &identity, &job),
        )
        .await
        {
            Ok(resolution) => resolution,
            Err(_) => {
                bump(&self.stats.scan_errors);
                warn!(sha256 = %job.sha256, "scan deadline exceeded");
                Resolution::Failed("scan deadline exceeded".into())
            }
        };
        // The pool's identity may have changed while the flight ran (a worker with new rules
        // registered), or the job may have gone to a worker still running the old ones. A
        // verdict of any identity but the current one must decide nothing from now on: the
        // waiters get the fail mode (the verdict itself stays cached and stored under its own
        // identity).
        let resolution = match resolution {
            Resolution::Verdict(v)
                if self
                    .registry
                    .current(&job.pool)
                    .is_none_or(|current| current.identity != v.scanner) =>
            {
                warn!(sha256 = %job.sha256, scanner = %v.scanner.scanner, ruleset_version = %v.scanner.ruleset_version, "verdict of a superseded scanner identity not used");
                Resolution::Failed("verdict of a superseded scanner identity".into())
            }
            resolution => resolution,
        };
        // The filter of what a SQLite store holds knows only this broker's writes. When the scan
        // could not decide, the look-up it skipped is made after all: a verdict that something
        // else stored (another writer to the file) beats the fail mode.
        let resolution = match resolution {
            r @ (Resolution::Failed(_) | Resolution::Oversize(_))
                if identity.scope.is_empty() && self.stored_contents.is_some() =>
            {
                match self.find_stored(&identity, &job).await {
                    Some(v) => Resolution::Verdict(v),
                    None => r,
                }
            }
            resolution => resolution,
        };
        match &resolution {
            Resolution::Verdict(v) => {
                debug!(sha256 = %job.sha256, verdict = ?v.kind, "flight ended")
            }
            Resolution::Oversize(size) => {
                debug!(sha256 = %job.sha256, size, "flight ended: oversize")
            }
            Resolution::Failed(why) => debug!(sha256 = %job.sha256, why, "flight ended: failed"),
        }
        leader.complete(resolution);
    }

    async fn resolve_miss(
        self: &Arc<Self>,
        leader: &Leader<FlightKey, Resolution, ContentSource>,
        identity: &InternedIdentity,
        job: &Job,
    ) -> Resolution {
        // A flight that just ended may have cached the verdict after our caller looked.
        if let Some(v) = self.cache.get(&job.sha256, identity.id) {
            return Resolution::Verdict(v);
        }
        if job.size > job.max_file_size {
            if let Some(v) = self.stored(identity, job).await {
                return Resolution::Verdict(v);
            }
            return Resolution::Oversize(job.size);
        }
        // The store, then a claim on the scan: another broker may be scanning it right now.
        let mut waited = false;
        let claim = loop {
            if let Some(v) = self.stored(identity, job).await {
                return Resolution::Verdict(v);
            }
            match self.fleet.stand(&job.sha256, &identity.identity).await {
                // Another broker may have stored the verdict and released its claim between
                // our look-up and our claim: look once more before scanning again.
                Standing::Scan(Some(claim)) => match self.stored(identity, job).await {
                    Some(v) => {
                        claim.release().await;
                        return Resolution::Verdict(v);
                    }
                    None => break Some(claim),
                },
                Standing::Scan(None) => break None,
                Standing::Wait => {
                    if !waited {
                        waited = true;
                        bump(&self.stats.scans_deduplicated);
                        debug!(sha256 = %job.sha256, "another broker holds the scan's claim; waiting for its verdict");
                    }
                    self.fleet.wait_for_verdict(&job.sha256).await;
                }
            }
        };
        if !self.scheduler.is_live(&job.pool, &job.tenant, job.size) {
            if let Some(claim) = claim {
                claim.release().await;
            }
            return Resolution::Failed("no live scanner".into());
        }
        let mut last_error = String::from("no agent could provide it");
        // The budget is held until the scan ends: the content stays in memory until then.
        let (content, _budget) = loop {
            let Some(source) = leader.next_source() else {
                bump(&self.stats.scan_errors);
                return Resolution::Failed(format!("content unavailable: {last_error}"));
            };
            // Each source is held to the size it declared itself, not the leader's: one agent's
            // wrong size must not fail the honest uploads of the flight's other waiters.
            let size = source.size();
            if size > job.max_file_size {
                last_error = format!("declared size {size} over the maximum");
                continue;
            }
            let kib = u32::try_from(size.div_ceil(1024))
                .unwrap_or(u32::MAX)
                .clamp(1, CONTENT_BUDGET_KIB);
            let Ok(budget) = self.content_budget.clone().acquire_many_owned(kib).await else {
                return Resolution::Failed("broker shutting down".into());
            };
            match source.fetch(&job.sha256, self.config.job_deadline).await {
                Ok(content) => break (content, budget),
                Err(e) => {
                    warn!(sha256 = %job.sha256, error = %e, "content upload failed; trying another source");
                    last_error = e;
                }
            }
        };
        bump(&self.stats.scans_started);
        let payload = Arc::new(JobPayload {
            sha256: job.sha256,
            tenant: job.tenant.clone(),
            content,
            path_hint: job.path_hint.clone(),
        });
        match self
            .scheduler
            .run(
                &job.pool,
                payload,
                self.config.max_tries,
                self.config.job_deadline,
            )
            .await
        {
            RunOutcome::Report(report) => {
                let verdict = Arc::new(Verdict {
                    sha256: job.sha256,
                    scanner: report.identity,
                    kind: report.kind,
                    threat_name: report.threat_name,
                    detail: report.detail,
                    scanned_at_unix_ms: now_unix_ms(),
                    scan_micros: report.scan_micros,
                });
                if verdict.kind.is_conclusive() {
                    // A tenant's own pool's verdict is cached and stored within the tenant's
                    // scope only; the fleet's pools' are everyone's.
                    let scope = identity.scope.as_str();
                    let id = self.registry.intern(scope, &verdict.scanner).id;
                    self.cache.insert(id, verdict.clone());
                    if let Some(stored) = self.stored_contents.as_ref().filter(|_| scope.is_empty())
                    {
                        stored.add(&verdict.sha256);
                    }
                    // Brokers waiting on our claim read the verdict from the store when we
                    // release it, so it is written first, not behind; without a claim, or
                    // while the store is unreachable, the write-behind queue keeps it.
                    let stored = match &claim {
                        Some(_) if scope.is_empty() => self
                            .fleet
                            .guarded(self.store.put_verdict(&verdict))
                            .await
                            .is_ok(),
                        Some(_) => self
                            .fleet
                            .guarded(self.store.put_tenant_verdict(scope, &verdict))
                            .await
                            .is_ok(),
                        None => false,
                    };
                    if !stored {
                        self.writer.submit(if scope.is_empty() {
                            WriteOp::Verdict(verdict.clone())
                        } else {
                            WriteOp::TenantVerdict {
                                tenant: scope.to_owned(),
                                verdict: verdict.clone(),
                            }
                        });
                    }
                } else {
                    bump(&self.stats.scan_errors);
                }
                if let Some(claim) = claim {
                    claim.release().await;
                }
                Resolution::Verdict(verdict)
            }
            RunOutcome::Failed(why) => {
                bump(&self.stats.scan_errors);
                Resolution::Failed(why)
            }
            RunOutcome::Refused(e) => {
                if e == EnqueueError::QueueFull {
                    bump(&self.stats.queue_rejected);
                    warn!(sha256 = %job.sha256, "scan queue full; the fail mode decides");
                }
                Resolution::Failed(e.to_string())
            }
        }
    }

    /// The stored verdict of this identity (within its scope), if the store has one and
    /// answers in time.
    async fn stored(&self, identity: &InternedIdentity, job: &Job) -> Option<Arc<Verdict>> {
        if identity.scope.is_empty()
            && let Some(stored) = &self.stored_contents
            && !stored.may_hold(&job.sha256)
        {
            bump(&self.stats.store_lookups_skipped);
            return None;
        }
        self.find_stored(identity, job).await
    }

    /// [`Engine::stored`] without the filter of what the store holds.
    async fn find_stored(&self, identity: &InternedIdentity, job: &Job) -> Option<Arc<Verdict>> {
        match self.find_in_store(identity, &job.sha256).await {
            Ok(Some(v)) => {
                bump(&self.stats.store_hits);
                let v = Arc::new(v);
                self.cache.insert(identity.id, v.clone());
                Some(v)
            }
            Ok(None) => None,
            // The store being down must not stop scanning: carry on as for unknown content.
            Err(e) => {
                warn!(error = %e, sha256 = %job.sha256, "verdict look-up failed");
                None
            }
        }
    }

    /// The one way the verdict path reads a verdict from the store: within the identity's
    /// scope, through the store-health guard (skipped while the store is down, bounded).
    async fn find_in_store(
        &self,
        identity: &InternedIdentity,
        sha256: &Sha256,
    ) -> Result<Option<Verdict>, Skipped> {
        if identity.scope.is_empty() {
            self.fleet
                .guarded(self.store.find_verdict(sha256, &identity.identity))
                .await
        } else {
            self.fleet
                .guarded(self.store.find_tenant_verdict(
                    &identity.scope,
                    sha256,
                    &identity.identity,
                ))
                .await
        }
    }

    /// The conclusive verdict of the pool's current identity on a content, if the broker knows
    /// one already (memory, then the store through its health guard); never scans. For
    /// `ScanService.Lookup`.
    pub async fn lookup_known(
        &self,
        sha256: &Sha256,
        pool: &str,
    ) -> Result<Option<Arc<Verdict>>, BrokerError> {
        let Some(identity) = self.registry.current(pool) else {
            return Ok(None);
        };
        if let Some(v) = self.cache.get(sha256, identity.id) {
            bump(&self.stats.cache_hits);
            return Ok(Some(v));
        }
        let found = match self.find_in_store(&identity, sha256).await {
            Ok(found) => found,
            Err(Skipped::Failed(e)) => return Err(e.into()),
            Err(skipped) => return Err(BrokerError::Unavailable(skipped.to_string())),
        };
        Ok(found.filter(|v| v.kind.is_conclusive()).map(|v| {
            bump(&self.stats.store_hits);
            let v = Arc::new(v);
            self.cache.insert(identity.id, v.clone());
            v
        }))
    }
}
