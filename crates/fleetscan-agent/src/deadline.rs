//! The deadline enforcer's clock: a min-heap of (deadline, item) and a condition variable,
//! driven by a dedicated OS thread.
//!
//! It depends on nothing but the standard library and a mutex: not on the tokio runtime, not
//! on the network, not on the hashing threads. Whatever else is stuck, an item whose deadline
//! passes is handed to the expiry callback. It never answers anything itself: the agent's
//! callback tries the access's exactly-once gate (see `access.rs`), which is a no-op for an
//! access answered meanwhile.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// One scheduled item, ordered by its deadline (then by arrival, so that equal deadlines keep
/// their order and the item type needs no order of its own).
#[derive(Debug)]
struct Entry<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug)]
struct State<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
    stopped: bool,
}

#[derive(Debug)]
pub(crate) struct DeadlineQueue<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
}

impl<T> DeadlineQueue<T> {
    pub fn new() -> Self {
        DeadlineQueue {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                seq: 0,
                stopped: false,
            }),
            wake: Condvar::new(),
        }
    }

    /// Schedules `item` to expire at `at`. Items answered before their time stay in the heap
    /// until then and are skipped by the callback (the heap holds at most a deadline's worth).
    pub fn push(&self, at: Instant, item: T) {
        let mut s = self.state.lock();
        let earliest = s.heap.peek().is_none_or(|Reverse(e)| at < e.at);
        s.seq += 1;
        let seq = s.seq;
        s.heap.push(Reverse(Entry { at, seq, item }));
        drop(s);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Takes every item still scheduled, in no particular order (the agent's shutdown).
    pub fn drain(&self) -> Vec<T> {
        let heap = std::mem::take(&mut self.state.lock().heap);
        heap.into_iter().map(|Reverse(e)| e.item).collect()
    }

    /// Ends [`DeadlineQueue::run`].
    pub fn stop(&self) {
        self.state.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Calls `on_expire(item)` for every item whose deadline has passed, in deadline order,
    /// until [`DeadlineQueue::stop`]. The lock is not held during the callback.
    pub fn run(&self, mut on_expire: impl FnMut(T)) {
        let mut s = self.state.lock();
        loop {
            if s.stopped {
                return;
            }
            let now = Instant::now();
            match s.heap.peek().map(|Reverse(e)| e.at) {
                Some(at) if at <= now => {
                    let Some(Reverse(e)) = s.heap.pop() else {
                        continue;
                    };
                    drop(s);
                    on_expire(e.item);
                    s = self.state.lock();
                }
                Some(at) => {
                    self.wake.wait_until(&mut s, at);
                }
                None => self.wake.wait(&mut s),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn expires_in_deadline_order_on_time() {
        let q = Arc::new(DeadlineQueue::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = {
            let q = q.clone();
            std::thread::spawn(move || q.run(|id| tx.send((id, Instant::now())).unwrap()))
        };
        let start = Instant::now();
        // Pushed out of order, and a later push with an earlier deadline wakes the waiter.
        q.push(start + Duration::from_millis(300), 3);
        q.push(start + Duration::from_millis(100), 1);
        q.push(start + Duration::from_millis(200), 2);
        let got: Vec<_> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(2)).unwrap())
            .collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        for (i, (_, at)) in got.iter().enumerate() {
            let due = start + Duration::from_millis(100 * (i as u64 + 1));
            assert!(*at >= due, "not before the deadline");
            assert!(*at < due + Duration::from_millis(100), "promptly after it");
        }
        q.stop();
        t.join().unwrap();
    }

    #[test]
    fn equal_deadlines_keep_their_order_and_drain_takes_the_rest() {
        let q = DeadlineQueue::new();
        let at = Instant::now();
        for i in 0..5 {
            q.push(at, i);
        }
        q.push(at + Duration::from_secs(60), 9);
        let mut got = Vec::new();
        let stop = std::cell::Cell::new(false);
        // Stops from inside the callback once the due items are in.
        q.run(|i| {
            got.push(i);
            if got.len() == 5 && !stop.replace(true) {
                q.stop();
            }
        });
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(q.drain(), [9]);
        assert!(q.drain().is_empty());
    }
}
