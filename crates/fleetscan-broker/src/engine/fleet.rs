//! This broker's part in a fleet of brokers that share nothing but the store.
//!
//! - **Claims.** On Postgres, a broker about to scan new content claims the scan in the store;
//!   a broker that finds the claim held waits for the verdict (woken by `LISTEN`, checking the
//!   store on a short period in case a notice is lost) and takes the claim over once it expires
//!   — its owner died or hung. The owner renews its claim while the scan runs. So brokers asked
//!   for the same new content at once cause one scan.
//! - **Fleet state.** Each pool's current scanner identity and the verdict generation are the
//!   store's ([`fleetscan_store::FleetState`]); a broker applies them at start, when notified,
//!   and on a period, so every broker hands agents the same generation.
//! - **Store health.** The first *unavailable* error marks the store down; until a probe
//!   succeeds again the decision path does not touch it (no verdict look-ups, no claims): it
//!   decides from memory and from workers, and the write-behind queue keeps what must be
//!   written. Every store call on the decision path (and of `ScanService`'s look-ups) goes
//!   through [`Fleet::guarded`], bounded by [`STORE_CALL_TIMEOUT`].
//!
//! Must never: hold a lock across an await, or let a store that hangs stall a decision longer
//! than its bound.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fleetscan_core::{ScannerIdentity, Sha256, now_unix_ms};
use fleetscan_store::{Claim, Notice, Store, StoreError};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::shutdown::Shutdown;

/// The longest a store call on the decision path may take before the broker goes on without it.
pub const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a broker waiting on another's claim looks at the store even without a notice.
const CLAIM_POLL: Duration = Duration::from_millis(250);
/// How often a store marked down is probed.
const PROBE_PERIOD: Duration = Duration::from_millis(500);
/// How often the fleet state is read even without a notice.
pub const SYNC_PERIOD: Duration = Duration::from_secs(2);

/// Why a guarded store call produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum Skipped {
    #[error("store marked unavailable")]
    Down,
    #[error("store call timed out")]
    TimedOut,
    #[error(transparent)]
    Failed(#[from] StoreError),
}

/// How a broker stands with a content's scan.
pub enum Standing {
    /// It holds the claim (or there is nobody to share with): it scans. Dropping the guard
    /// releases the claim.
    Scan(Option<ClaimGuard>),
    /// Another broker holds the claim until its expiry.
    Wait,
}

pub struct Fleet {
    store: Store,
    /// Names this broker's claims: the broker id, pid and start time, so that two replicas
    /// misconfigured with one id still never share a claim.
    owner: String,
    /// Claims are made only where brokers can share a store (Postgres).
    claims: bool,
    pub claim_ttl: Duration,
    healthy: AtomicBool,
    /// Flights waiting on another broker's claim, by content.
    waiting: Mutex<HashMap<Sha256, Arc<Notify>>>,
    /// Wakes the fleet task to read the fleet state now.
    pub sync_now: Notify,
    /// Numbers this broker's claims, so that a late release of an old claim never removes a
    /// newer one on the same content.
    claim_counter: AtomicU64,
}

impl Fleet {
    pub fn new(store: Store, broker_id: &str, claim_ttl: Duration) -> Fleet {
        let claims = store.backend() == fleetscan_store::Backend::Postgres;
        Fleet {
            store,
            owner: format!("{broker_id}/{}-{}", std::process::id(), now_unix_ms()),
            claims,
            claim_ttl,
            healthy: AtomicBool::new(true),
            waiting: Mutex::new(HashMap::new()),
            sync_now: Notify::new(),
            claim_counter: AtomicU64::new(0),
        }
    }

    /// Whether the store is believed to answer now.
    pub fn store_ok(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Runs a store call on the decision path: skipped while the store is marked down, bounded
    /// by [`STORE_CALL_TIMEOUT`]; an unavailable error or a timeout marks the store down.
    pub async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, Skipped> {
        if !self.store_ok() {
            return Err(Skipped::Down);
        }
        match tokio::time::timeout(STORE_CALL_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_unavailable() {
                    self.mark_down(&e.to_string());
                }
                Err(Skipped::Failed(e))
            }
            Err(_) => {
                self.mark_down("store call timed out");
                Err(Skipped::TimedOut)
            }
        }
    }

    fn mark_down(&self, why: &str) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            warn!(
                error = why,
                "store unavailable; deciding from memory and workers until it returns"
            );
        }
    }

    /// Claims the scan of a content, or learns that another broker holds it.
    pub async fn stand(self: &Arc<Self>, sha256: &Sha256, identity: &ScannerIdentity) -> Standing {
        if !self.claims {
            return Standing::Scan(None);
        }
        let token = format!(
            "{}#{}",
            self.owner,
            self.claim_counter.fetch_add(1, Ordering::Relaxed)
        );
        let claimed = self
            .guarded(
                self.store
                    .claim_scan(sha256, identity, &token, self.claim_ttl),
            )
            .await;
        match claimed {
            Ok(Claim::Won) => Standing::Scan(Some(ClaimGuard::new(
                self.clone(),
                *sha256,
                identity,
                token,
            ))),
            Ok(Claim::Held { .. }) => Standing::Wait,
            // No store, no sharing: scanning here is better than not deciding.
            Err(_) => Standing::Scan(None),
        }
    }

    /// Waits until a verdict on the content may have been stored (a notice), or a short poll
    /// period passed. The caller looks at the store and the claim again afterwards.
    pub async fn wait_for_verdict(&self, sha256: &Sha256) {
        let notify = self
            .waiting
            .lock()
            .entry(*sha256)
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        let leave = Leave {
            fleet: self,
            sha256: *sha256,
            notify,
        };
        let _ = tokio::time::timeout(CLAIM_POLL, leave.notify.notified()).await;
    }

    fn wake(&self, sha256: &Sha256) {
        if let Some(notify) = self.waiting.lock().get(sha256) {
            notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for notify in self.waiting.lock().values() {
            notify.notify_waiters();
        }
    }

    /// Keeps the fleet state applied and the store's health known until the broker stops:
    /// listens for notices (Postgres), reads the fleet state on a period and when woken, and
    /// probes a store marked down.
    pub fn spawn(
        self: &Arc<Self>,
        apply: impl Fn(fleetscan_store::FleetState) + Send + Sync + 'static,
        mut shutdown: Shutdown,
    ) -> JoinHandle<()> {
        let fleet = self.clone();
        tokio::spawn(async move {
            let apply = Arc::new(apply);
            let listener = tokio::spawn(fleet.clone().listen());
            let mut sync = tokio::time::interval(SYNC_PERIOD);
            sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut probe = tokio::time::interval(PROBE_PERIOD);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.recv() => break,
                    _ = sync.tick() => {}
                    () = fleet.sync_now.notified() => {}
                    _ = probe.tick() => {
                        if fleet.store_ok() {
                            continue;
                        }
                        let up = tokio::time::timeout(STORE_CALL_TIMEOUT, fleet.store.ping()).await;
                        if !matches!(up, Ok(Ok(()))) {
                            continue;
                        }
                        fleet.healthy.store(true, Ordering::Relaxed);
                        info!("store available again");
                        fleet.wake_all();
                    }
                }
                if !fleet.store_ok() {
                    continue;
                }
                match fleet.guarded(fleet.store.fleet_state()).await {
                    Ok(state) => apply(state),
                    Err(e) => warn!(error = %e, "reading the fleet state failed"),
                }
            }
            listener.abort();
        })
    }

    /// Hears other brokers' notices (Postgres); reconnects after losing the connection.
    async fn listen(self: Arc<Self>) {
        let mut listener = loop {
            match self.store.listen().await {
                Ok(Some(listener)) => break listener,
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %e, "cannot listen for fleet notices; retrying");
                    tokio::time::sleep(PROBE_PERIOD).await;
                }
            }
        };
        loop {
            match listener.recv().await {
                Ok(Notice::Verdict(sha256)) => self.wake(&sha256),
                Ok(Notice::Fleet) => self.sync_now.notify_one(),
                Ok(Notice::Lost) => {
                    // Notices may have been missed: everything they would have said is read
                    // again.
                    self.sync_now.notify_one();
                    self.wake_all();
                }
                Err(_) => tokio::time::sleep(PROBE_PERIOD).await,
            }
        }
    }
}

/// A waiter on another broker's claim; forgets the content's entry when the last waiter
/// leaves, also when its wait is cut short.
struct Leave<'a> {
    fleet: &'a Fleet,
    sha256: Sha256,
    notify: Arc<Notify>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut waiting = self.fleet.waiting.lock();
        // The map's reference and ours: nobody else waits.
        if Arc::strong_count(&self.notify) <= 2 {
            waiting.remove(&self.sha256);
        }
    }
}

/// A claim this broker holds: renewed while held, released (with a notice to waiters) when
/// dropped or [`ClaimGuard::release`]d.
pub struct ClaimGuard {
    fleet: Arc<Fleet>,
    sha256: Sha256,
    identity: ScannerIdentity,
    /// The owner name this claim was made under, unique to it.
    token: String,
    renew: JoinHandle<()>,
    released: bool,
}

impl ClaimGuard {
    fn new(
        fleet: Arc<Fleet>,
        sha256: Sha256,
        identity: &ScannerIdentity,
        token: String,
    ) -> ClaimGuard {
        let renew = {
            let fleet = fleet.clone();
            let identity = identity.clone();
            let token = token.clone();
            tokio::spawn(async move {
                // A zero or tiny ttl must not make this a busy loop.
                let period = (fleet.claim_ttl / 3).max(Duration::from_millis(50));
                loop {
                    tokio::time::sleep(period).await;
                    let renewed = fleet
                        .guarded(fleet.store.claim_scan(
                            &sha256,
                            &identity,
                            &token,
                            fleet.claim_ttl,
                        ))
                        .await;
                    if let Ok(Claim::Held { owner, .. }) = renewed {
                        // It expired before we renewed (a stall) and someone took it over: both
                        // scan; the verdicts are the same.
                        warn!(sha256 = %sha256, owner, "scan claim lost to another broker");
                        return;
                    }
                }
            })
        };
        ClaimGuard {
            fleet,
            sha256,
            identity: identity.clone(),
            token,
            renew,
            released: false,
        }
    }

    /// Releases the claim now and tells waiting brokers to look for the verdict.
    pub async fn release(mut self) {
        self.released = true;
        self.renew.abort();
        let fleet = self.fleet.clone();
        if let Err(e) = fleet
            .guarded(
                fleet
                    .store
                    .release_claim(&self.sha256, &self.identity, &self.token),
            )
            .await
        {
            // Waiters take it over when it expires.
            warn!(sha256 = %self.sha256, error = %e, "releasing a scan claim failed");
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.renew.abort();
        if self.released {
            return;
        }
        // Dropped without a release (the flight was cut short): release in the background.
        let (fleet, sha256, identity) = (self.fleet.clone(), self.sha256, self.identity.clone());
        let token = std::mem::take(&mut self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = fleet
                    .guarded(fleet.store.release_claim(&sha256, &identity, &token))
                    .await;
            });
        }
    }
}
