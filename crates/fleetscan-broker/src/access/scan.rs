//! Voluntary scans (`ScanService`): content an application hands in, or a digest it asks about,
//! decided under the fleet's policy through the same cache, single-flight and job path as
//! agents' accesses, bounded by `scan_deadline` and the policy's `max_file_size`.
//!
//! Scans are made for the fleet operator's tenant, in its default pool, until callers are
//! authenticated. Must never: buffer content past the policy's maximum, or record anything (a
//! voluntary scan is not an access).

use std::sync::Arc;

use bytes::Bytes;
use fleetscan_core::{Action, DEFAULT_TENANT, Sha256, Verdict};

use super::decide;
use crate::engine::content::ContentSource;
use crate::engine::stats::bump;
use crate::engine::{DEFAULT_POOL, Engine, Lookup, Pending, Resolution};
use crate::error::BrokerError;

/// The answer to a voluntary scan or look-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub sha256: Sha256,
    pub action: Action,
    pub reason: String,
    /// The verdict the decision rests on, if there is one.
    pub verdict: Option<Arc<Verdict>>,
    /// Whether the verdict is conclusive.
    pub known: bool,
}

/// The largest content scanned; larger content is decided as oversize from its digest alone.
pub fn max_size(engine: &Engine) -> u64 {
    engine.policy(DEFAULT_TENANT).max_file_size
}

/// Scans content in hand (hashing it first).
pub async fn scan_bytes(engine: &Arc<Engine>, content: Bytes, name: String) -> Scanned {
    let sha256 = Sha256::of(&content);
    let size = content.len() as u64;
    if size > max_size(engine) {
        return oversize(engine, sha256, size);
    }
    scan(engine, sha256, content, name).await
}

/// The answer for content over [`max_size`], which is not scanned.
pub fn oversize(engine: &Engine, sha256: Sha256, size: u64) -> Scanned {
    answer(engine, sha256, &Resolution::Oversize(size))
}

/// Scans content whose digest is `sha256`, within `scan_deadline`.
pub async fn scan(engine: &Arc<Engine>, sha256: Sha256, content: Bytes, name: String) -> Scanned {
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
            match tokio::time::timeout(engine.config().scan_deadline, waiter.wait()).await {
                Ok(Some(resolution)) => resolution,
                Ok(None) => Resolution::Failed("scan abandoned".into()),
                Err(_) => Resolution::Failed("scan deadline exceeded".into()),
            }
        }
    };
    answer(engine, sha256, &resolution)
}

/// The answer from a conclusive verdict of the default pool's current scanner that the broker
/// already knows (memory, then the store); `None` when there is none. Never scans.
pub async fn lookup(engine: &Engine, sha256: Sha256) -> Result<Option<Scanned>, BrokerError> {
    let verdict = engine.lookup_known(&sha256, DEFAULT_POOL).await?;
    Ok(verdict.map(|v| answer(engine, sha256, &Resolution::Verdict(v))))
}

fn answer(engine: &Engine, sha256: Sha256, resolution: &Resolution) -> Scanned {
    let decided = decide::decide(engine.policy(DEFAULT_TENANT), resolution);
    let stats = engine.stats();
    if decided.fail_mode {
        bump(&stats.fail_mode_decisions);
    }
    if decided.oversize {
        bump(&stats.oversize);
    }
    let (verdict, known) = match resolution {
        Resolution::Verdict(v) => (Some(v.clone()), v.kind.is_conclusive()),
        _ => (None, false),
    };
    Scanned {
        sha256,
        action: decided.action,
        reason: decided.reason,
        verdict,
        known,
    }
}
