//! What goes into the access layer and what comes out: an agent's [`Hello`], an [`Access`] with
//! its [`Subject`], and the [`Decision`] with the [`Verdicts`] behind it and its [`Tally`].
//! Plain data: the services fill and read these at the edge.

use std::sync::Arc;
use std::time::Duration;

use fleetscan_core::{AccessContext, AccessKind, AccessRecord, Action, Sha256, Verdict};
use tokio::sync::OwnedSemaphorePermit;

use crate::engine::Resolution;

/// An agent as it introduced itself.
#[derive(Clone, Debug, Default)]
pub struct Hello {
    pub node: String,
    /// The tenant whose agent it is; empty for the fleet operator's.
    pub tenant: String,
    pub cluster: String,
    pub agent_version: String,
    /// It keys its cached decisions by tenant and namespace policy, and sets kernel ignore
    /// marks only for decisions that hold for every policy. Without that, when more than one
    /// policy is in force, no decision may be cached: a file allowed for one namespace
    /// (audit-only, another tenant's clean verdict) could otherwise be allowed from the cache
    /// for another that must deny it.
    pub scoped_cache: bool,
}

/// One access to decide, as the agent described it.
#[derive(Debug)]
pub struct Access {
    /// Unique within the agent's session; its upload, if one is needed, comes under it.
    pub request_id: u64,
    /// The content's digest, or why the request did not carry a valid one.
    pub sha256: Result<Sha256, String>,
    pub size: u64,
    /// `None` when the agent sent a kind this broker does not know (or none).
    pub kind: Option<AccessKind>,
    /// The path as the opening process sees it.
    pub path: String,
    /// The path as the host sees it, where it differs.
    pub host_path: String,
    /// How long the agent waits for the decision; `None`: the policy's deadline.
    pub deadline: Option<Duration>,
    pub subject: Subject,
}

impl Access {
    /// The path the access is known by: the agent's view, the host's when the agent gave none.
    pub(super) fn path(&self) -> &str {
        if self.path.is_empty() {
            &self.host_path
        } else {
            &self.path
        }
    }
}

/// Who made an access, as the agent attributed it (everything empty or zero when unknown).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    /// In the host's pid namespace.
    pub pid: u32,
    pub uid: u32,
    pub exe: String,
    /// The tenant the agent read from the namespace's label; the broker's mapping wins.
    pub labelled_tenant: String,
    /// Namespace, image, container, pod, cgroup and pid in its own namespace; its `host_path`
    /// is left empty (the access's own is kept beside it).
    pub context: AccessContext,
}

/// A decision for one access: what the agent is sent, and what is settled afterwards.
#[derive(Debug)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
    pub cacheable: bool,
    pub ttl_seconds: u32,
    /// The verdicts it rests on.
    pub verdicts: Verdicts,
    /// What the agent's `settle` counts and records once the decision is sent.
    pub tally: Tally,
}

/// The verdicts a decision rests on, as the engine found them.
#[derive(Debug)]
pub enum Verdicts {
    None,
    /// The one pool's cached verdict (the cached path).
    One(Arc<Verdict>),
    /// Every required pool's resolution, in the policy's order: the verdicts among them.
    Of(Vec<Resolution>),
}

impl Verdicts {
    /// The verdicts, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Verdict>> {
        let (one, of) = match self {
            Verdicts::None => (None, &[][..]),
            Verdicts::One(v) => (Some(v), &[][..]),
            Verdicts::Of(resolutions) => (None, resolutions.as_slice()),
        };
        one.into_iter().chain(of.iter().filter_map(|r| match r {
            Resolution::Verdict(v) => Some(v),
            _ => None,
        }))
    }
}

/// What is counted and recorded of a decision once it is sent (never before: the agent's
/// answer comes first). Holds the access's place among the agent's pending requests until then.
#[derive(Debug)]
#[must_use = "a decision is settled once it is sent"]
pub struct Tally {
    pub(super) action: Action,
    pub(super) fail_mode: bool,
    pub(super) oversize: bool,
    pub(super) record: Option<Box<AccessRecord>>,
    pub(super) _pending: Option<OwnedSemaphorePermit>,
}
