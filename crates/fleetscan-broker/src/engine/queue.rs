//! A bounded job queue with one lane per tenant, served round-robin, so that one tenant's burst
//! cannot starve another's jobs. Pure code: no I/O, no locks (the scheduler owns it).
//!
//! When full, [`FairQueue::push`] refuses the item and hands it back: the caller answers with the
//! fail mode at once rather than queueing without bound.

use std::collections::{HashMap, VecDeque};

pub struct FairQueue<T> {
    lanes: HashMap<String, VecDeque<T>>,
    /// Tenants with a non-empty lane, in the order they are served next.
    ring: VecDeque<String>,
    len: usize,
    capacity: usize,
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> Self {
        FairQueue {
            lanes: HashMap::new(),
            ring: VecDeque::new(),
            len: 0,
            capacity,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends to the tenant's lane; `Err(item)` when the queue is full.
    pub fn push(&mut self, tenant: &str, item: T) -> Result<(), T> {
        if self.len >= self.capacity {
            return Err(item);
        }
        self.lane(tenant).push_back(item);
        self.len += 1;
        Ok(())
    }

    /// Puts an item back at the head of its lane (it was taken but could not be handed out).
    /// Never refused: the item was counted before.
    pub fn push_front(&mut self, tenant: &str, item: T) {
        self.lane(tenant).push_front(item);
        self.len += 1;
    }

    fn lane(&mut self, tenant: &str) -> &mut VecDeque<T> {
        if self.lanes.get(tenant).is_none_or(VecDeque::is_empty) {
            self.ring.push_back(tenant.to_owned());
        }
        self.lanes.entry(tenant.to_owned()).or_default()
    }

    /// Takes the head of the next lane, in round-robin order, whose head `eligible` accepts.
    /// The lane served goes to the back of the ring.
    pub fn pop_where(&mut self, mut eligible: impl FnMut(&str, &T) -> bool) -> Option<(String, T)> {
        let position = self.ring.iter().position(|tenant| {
            self.lanes
                .get(tenant)
                .and_then(VecDeque::front)
                .is_some_and(|head| eligible(tenant, head))
        })?;
        let tenant = self.ring.remove(position)?;
        let lane = self.lanes.get_mut(&tenant)?;
        let item = lane.pop_front()?;
        self.len -= 1;
        if lane.is_empty() {
            self.lanes.remove(&tenant);
        } else {
            self.ring.push_back(tenant.clone());
        }
        Some((tenant, item))
    }

    /// Removes the first item of the tenant's lane that matches, wherever it is.
    pub fn remove(&mut self, tenant: &str, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let lane = self.lanes.get_mut(tenant)?;
        let index = lane.iter().position(&mut matches)?;
        let item = lane.remove(index)?;
        self.len -= 1;
        if lane.is_empty() {
            self.lanes.remove(tenant);
            self.ring.retain(|t| t != tenant);
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut FairQueue<u32>) -> Vec<(String, u32)> {
        std::iter::from_fn(|| q.pop_where(|_, _| true)).collect()
    }

    #[test]
    fn tenants_are_served_round_robin() {
        let mut q = FairQueue::new(100);
        for i in 0..5 {
            q.push("busy", i).unwrap();
        }
        q.push("quiet", 100).unwrap();
        q.push("other", 200).unwrap();
        let order: Vec<_> = drain(&mut q).into_iter().map(|(_, i)| i).collect();
        // The quiet tenants' jobs do not wait behind the whole burst.
        assert_eq!(order, vec![0, 100, 200, 1, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn each_lane_is_fifo() {
        let mut q = FairQueue::new(100);
        for i in 0..3 {
            q.push("a", i).unwrap();
            q.push("b", 10 + i).unwrap();
        }
        let got = drain(&mut q);
        let a: Vec<_> = got
            .iter()
            .filter(|(t, _)| t == "a")
            .map(|(_, i)| *i)
            .collect();
        let b: Vec<_> = got
            .iter()
            .filter(|(t, _)| t == "b")
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(b, vec![10, 11, 12]);
    }

    #[test]
    fn full_queue_refuses_and_returns_the_item() {
        let mut q = FairQueue::new(2);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        assert_eq!(q.push("c", 3), Err(3));
        assert_eq!(q.len(), 2);
        q.pop_where(|_, _| true).unwrap();
        q.push("c", 3).unwrap();
    }

    #[test]
    fn ineligible_lanes_are_skipped_not_lost() {
        let mut q = FairQueue::new(10);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        assert_eq!(q.pop_where(|t, _| t == "b"), Some(("b".into(), 2)));
        assert_eq!(q.pop_where(|t, _| t == "b"), None);
        assert_eq!(q.pop_where(|_, _| true), Some(("a".into(), 1)));
    }

    #[test]
    fn remove_and_push_front_keep_counts_right() {
        let mut q = FairQueue::new(10);
        q.push("a", 1).unwrap();
        q.push("a", 2).unwrap();
        q.push("b", 3).unwrap();
        assert_eq!(q.remove("a", |i| *i == 2), Some(2));
        assert_eq!(q.remove("a", |i| *i == 9), None);
        assert_eq!(q.remove("b", |i| *i == 3), Some(3));
        assert_eq!(q.len(), 1);
        let (tenant, item) = q.pop_where(|_, _| true).unwrap();
        q.push_front(&tenant, item);
        assert_eq!(drain(&mut q), vec![("a".into(), 1)]);
        assert!(q.is_empty());
    }
}
