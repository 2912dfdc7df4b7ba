//! The requests one session sent and has not seen decided: a map from request id to the access
//! and what was hashed of it, which only the session's task edits. Hashing threads hand
//! accesses over through the [`Link`]; the map takes them before it looks anything up, so a
//! decision always finds its access.
//!
//! A decision answers only an access whose request went out on this session: another session's
//! broker never sees this map. When the session ends, by any path (its future dropped at
//! shutdown too), the map's drop closes the link and answers everything it still has with the
//! fail mode at once; nothing waits for a broker that is gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fleetscan_proto::{convert, v1};
use tracing::{debug, info};

use super::link::{InFlight, Link, SessionSlot};
use crate::access::{self, Access, BrokerDecision, Failure};
use crate::cache::FileKey;
use crate::interceptor::Interceptor;
use crate::stats::bump;

/// Entries answered meanwhile (by the deadline) are swept out once the map has grown to twice
/// what it held after the last sweep, and at least this many.
const SWEEP_MIN: usize = 1024;

/// See the module header.
pub(super) struct Requests<'a> {
    ic: &'a Interceptor,
    slot: &'a SessionSlot,
    link: Arc<Link>,
    map: HashMap<u64, InFlight>,
    sweep_at: usize,
}

impl<'a> Requests<'a> {
    pub fn new(ic: &'a Interceptor, slot: &'a SessionSlot, link: Arc<Link>) -> Self {
        Requests {
            ic,
            slot,
            link,
            map: HashMap::new(),
            sweep_at: SWEEP_MIN,
        }
    }

    /// Takes what the hashing threads handed over, and lets go of accesses answered meanwhile
    /// (their decisions, if any come, are late) once there are many.
    pub fn take_handed(&mut self) {
        for f in self.link.take_handed() {
            self.map.insert(f.id, f);
        }
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, f| !f.access.is_answered());
            self.sweep_at = (self.map.len() * 2).max(SWEEP_MIN);
        }
    }

    /// Applies a broker decision to the access it is about, exactly once; a decision for an
    /// access already answered (the deadline), or unknown to this session, is only counted.
    pub fn decide(&mut self, d: v1::Decision) {
        self.take_handed();
        let id = d.request_id;
        let Some(f) = self.map.remove(&id) else {
            self.late(id);
            return;
        };
        let Some(action) = convert::action_from_proto(d.action) else {
            if !access::fail(self.ic, &f.access, Failure::MalformedDecision) {
                self.late(id);
            }
            return;
        };
        // Judged by the result alone: a blocking verdict with some other field malformed (so
        // that it would not convert) must still keep the file from an ignore mark.
        let blocking = d
            .verdicts
            .iter()
            .find(|v| convert::verdict_kind_from_proto(v.result).blocks())
            .map(|v| v.threat_name.clone());
        let decision = BrokerDecision {
            action,
            reason: d.reason,
            cacheable: d.cacheable,
            ttl_seconds: d.ttl_seconds,
            blocking,
        };
        if access::decided(self.ic, &f.access, &f.hashed, decision) {
            debug!(id, action = action.as_str(), "broker decision applied");
        } else {
            self.late(id);
        }
    }

    fn late(&self, id: u64) {
        bump(&self.ic.counters.late_decisions);
        debug!(id, "late decision ignored");
    }

    /// The access behind a content request, with the length and identity of what was hashed,
    /// while it waits.
    pub fn for_upload(&mut self, id: u64) -> Option<(Arc<Access>, u64, FileKey)> {
        self.take_handed();
        let f = self.map.get(&id)?;
        (!f.access.is_answered()).then(|| (f.access.clone(), f.hashed.len, f.hashed.key))
    }
}

impl Drop for Requests<'_> {
    /// Ends the session on every path out: closes the link first (no hand-off succeeds from
    /// here on, and what was handed over is taken in the same step), then answers every access
    /// it had — unless the agent is stopping, which allows them itself.
    fn drop(&mut self) {
        let handed = self.link.close();
        self.slot.clear(&self.link);
        if self.ic.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let mut answered = 0usize;
        for f in self.map.drain().map(|(_, f)| f).chain(handed) {
            if access::fail(self.ic, &f.access, Failure::SessionLost) {
                answered += 1;
            }
        }
        if answered > 0 {
            info!(
                count = answered,
                "answered the accesses of the lost session"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::sync::atomic::Ordering::Relaxed;

    use fleetscan_core::{AccessKind, Policy, Subject};
    use tokio::sync::mpsc;

    use super::*;
    use crate::access::Event;
    use crate::paths::AccessPaths;
    use crate::session::Unsent;
    use crate::session::link::tests::hashed;

    fn waiting(ic: &Interceptor) -> Arc<Access> {
        let ev = Event {
            file: File::open("/proc/self/stat").unwrap(),
            pidfd: None,
            pid: 1,
            kind: AccessKind::Open,
        };
        let scope = crate::scope::Policies::new(Policy::default()).single();
        Access::wait(ic, ev, FileKey::test(0), String::new(), None, scope)
    }

    fn send(link: &Link, a: &Arc<Access>) -> Result<u64, Unsent> {
        link.send(a, hashed(), AccessPaths::default(), Subject::default())
    }

    fn allow(id: u64) -> v1::Decision {
        v1::Decision {
            request_id: id,
            action: v1::Action::Allow.into(),
            reason: "clean".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_decision_answers_only_an_access_asked_about_on_its_own_session() {
        let ic = Interceptor::for_tests();
        let slot = SessionSlot::default();
        let (tx, _rx) = mpsc::channel(16);
        let first = slot.open(tx.clone());
        let mut asked = Requests::new(&ic, &slot, first.clone());
        let a = waiting(&ic);
        let id = send(&first, &a).unwrap();
        let mut other = Requests::new(&ic, &slot, slot.open(tx));
        other.decide(allow(id));
        assert!(!a.is_answered(), "decided by another session's broker");
        assert_eq!(ic.counters.late_decisions.load(Relaxed), 1);
        asked.decide(allow(id));
        assert!(a.is_answered());
        assert_eq!(ic.counters.broker_decisions.load(Relaxed), 1);
        asked.decide(allow(id));
        assert_eq!(ic.counters.late_decisions.load(Relaxed), 2, "answered once");
        assert_eq!(ic.waiting(), 0);
    }

    #[test]
    fn the_end_of_a_session_answers_what_it_was_asked_at_once() {
        let ic = Interceptor::for_tests();
        let slot = SessionSlot::default();
        let (tx, _rx) = mpsc::channel(16);
        let link = slot.open(tx);
        let mut requests = Requests::new(&ic, &slot, link.clone());
        let (taken, handed) = (waiting(&ic), waiting(&ic));
        send(&link, &taken).unwrap();
        requests.take_handed();
        // Still with the link when the session ends.
        send(&link, &handed).unwrap();
        drop(requests);
        assert!(taken.is_answered() && handed.is_answered());
        assert_eq!(ic.counters.no_broker.load(Relaxed), 2);
        assert!(!slot.is_up());
        let after = waiting(&ic);
        assert_eq!(send(&link, &after), Err(Unsent::SessionLost));
        assert!(
            !after.is_answered(),
            "left to the hashing thread that holds it"
        );
    }

    #[test]
    fn a_session_ended_by_the_shutdown_leaves_its_accesses_to_the_agent() {
        let ic = Interceptor::for_tests();
        ic.shutting_down.store(true, Ordering::SeqCst);
        let slot = SessionSlot::default();
        let (tx, _rx) = mpsc::channel(16);
        let link = slot.open(tx);
        let requests = Requests::new(&ic, &slot, link.clone());
        let a = waiting(&ic);
        send(&link, &a).unwrap();
        drop(requests);
        assert!(!a.is_answered(), "the shutdown allows it");
        assert_eq!(ic.waiting(), 1);
    }
}
