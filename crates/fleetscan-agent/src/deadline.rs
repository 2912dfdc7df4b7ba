//! The deadline enforcer's clock: a min-heap of (deadline, event id) and a condition variable,
//! driven by a dedicated OS thread.
//!
//! It depends on nothing but the standard library and a mutex: not on the tokio runtime, not
//! on the network, not on the hashing threads. Whatever else is stuck, an event whose deadline
//! passes is handed to the expiry callback. It never answers anything itself: the callback takes
//! the event out of the pending map (the exactly-once gate) and answers it if still there.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    stopped: bool,
}

#[derive(Debug, Default)]
pub(crate) struct DeadlineQueue {
    state: Mutex<State>,
    wake: Condvar,
}

impl DeadlineQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `id` to expire at `at`. Answered events stay in the heap until their time and
    /// are then skipped by the callback (the heap holds at most a deadline's worth of events).
    pub fn push(&self, at: Instant, id: u64) {
        let mut s = self.state.lock();
        let earliest = s.heap.peek().is_none_or(|Reverse((t, _))| at < *t);
        s.heap.push(Reverse((at, id)));
        drop(s);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Ends [`DeadlineQueue::run`].
    pub fn stop(&self) {
        self.state.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Calls `on_expire(id)` for every id whose deadline has passed, in deadline order, until
    /// [`DeadlineQueue::stop`]. The lock is not held during the callback.
    pub fn run(&self, mut on_expire: impl FnMut(u64)) {
        let mut s = self.state.lock();
        loop {
            if s.stopped {
                return;
            }
            let now = Instant::now();
            match s.heap.peek().copied() {
                Some(Reverse((at, id))) if at <= now => {
                    s.heap.pop();
                    drop(s);
                    on_expire(id);
                    s = self.state.lock();
                }
                Some(Reverse((at, _))) => {
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
}
