//! Single-flight: concurrent requests for the same key share one piece of work.
//!
//! The first caller for a key becomes the leader and does the work; every later caller waits for
//! the leader's result. Callers may also contribute a *source* (here: a way to obtain the
//! content) that the leader can fall back on when its own fails. The key is removed before the
//! result is published, so a caller arriving afterwards starts a fresh flight instead of reading
//! a finished one; a leader that is dropped without a result wakes its waiters with `None`.
//! No I/O and no await while the map's lock is held.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

struct Flight<V, S> {
    result: watch::Sender<Option<V>>,
    sources: Mutex<VecDeque<S>>,
}

type FlightMap<K, V, S> = Mutex<HashMap<K, Arc<Flight<V, S>>>>;

/// A map of flights in progress.
pub struct SingleFlight<K, V, S> {
    flights: Arc<FlightMap<K, V, S>>,
}

impl<K, V, S> Default for SingleFlight<K, V, S> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// What [`SingleFlight::join`] made of the caller.
pub enum Joined<K: Hash + Eq, V, S> {
    /// The caller does the work and must call [`Leader::complete`].
    Leader(Leader<K, V, S>),
    /// Someone else does the work; wait for it.
    Follower(Waiter<V>),
}

impl<K, V, S> SingleFlight<K, V, S>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// Joins the flight for `key`, starting it when none is in progress. `source` is queued for
    /// the leader: the leader's own first, then the followers' in arrival order.
    pub fn join(&self, key: K, source: S) -> Joined<K, V, S> {
        let mut flights = self.flights.lock();
        if let Some(flight) = flights.get(&key) {
            flight.sources.lock().push_back(source);
            return Joined::Follower(Waiter {
                rx: flight.result.subscribe(),
            });
        }
        let (result, _) = watch::channel(None);
        let flight = Arc::new(Flight {
            result,
            sources: Mutex::new(VecDeque::from([source])),
        });
        flights.insert(key.clone(), flight.clone());
        Joined::Leader(Leader {
            flights: self.flights.clone(),
            key,
            flight,
            done: false,
        })
    }

    /// Number of flights in progress.
    pub fn len(&self) -> usize {
        self.flights.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The caller that does the work of a flight.
pub struct Leader<K: Hash + Eq, V, S> {
    flights: Arc<FlightMap<K, V, S>>,
    key: K,
    flight: Arc<Flight<V, S>>,
    done: bool,
}

impl<K: Hash + Eq, V: Clone, S> Leader<K, V, S> {
    /// The next content source to try, if any caller left one.
    pub fn next_source(&self) -> Option<S> {
        self.flight.sources.lock().pop_front()
    }

    /// A waiter for this flight's result, e.g. for the leader's own caller.
    pub fn waiter(&self) -> Waiter<V> {
        Waiter {
            rx: self.flight.result.subscribe(),
        }
    }

    /// Publishes the result to every waiter and ends the flight.
    pub fn complete(mut self, value: V) {
        self.remove();
        self.done = true;
        self.flight.result.send_replace(Some(value));
    }

    fn remove(&self) {
        let mut flights = self.flights.lock();
        // Only remove our own flight: the key may already belong to a newer one.
        if flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.key);
        }
    }
}

impl<K: Hash + Eq, V, S> Drop for Leader<K, V, S> {
    fn drop(&mut self) {
        if !self.done {
            let mut flights = self.flights.lock();
            if flights
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                flights.remove(&self.key);
            }
            // Dropping the last reference to the flight closes the channel: waiters get `None`.
        }
    }
}

/// Waits for a flight's result.
pub struct Waiter<V> {
    rx: watch::Receiver<Option<V>>,
}

impl<V: Clone> Waiter<V> {
    /// The result, or `None` when the leader gave up without one.
    pub async fn wait(mut self) -> Option<V> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(value) => value.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_piece_of_work() {
        let flights: Arc<SingleFlight<&'static str, u32, usize>> = Arc::default();
        let work_done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for caller in 0..50 {
            let flights = flights.clone();
            let work_done = work_done.clone();
            tasks.push(tokio::spawn(async move {
                match flights.join("content", caller) {
                    Joined::Leader(leader) => {
                        let waiter = leader.waiter();
                        tokio::spawn(async move {
                            // Give every other caller time to join while the "scan" runs.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            work_done.fetch_add(1, Ordering::SeqCst);
                            leader.complete(7);
                        });
                        waiter.wait().await
                    }
                    Joined::Follower(waiter) => waiter.wait().await,
                }
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), Some(7));
        }
        assert_eq!(work_done.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[test]
    fn sources_are_offered_in_arrival_order() {
        let flights: SingleFlight<u8, u8, &'static str> = SingleFlight::default();
        let Joined::Leader(leader) = flights.join(1, "first") else {
            panic!("first caller must lead")
        };
        assert!(matches!(flights.join(1, "second"), Joined::Follower(_)));
        assert!(matches!(flights.join(1, "third"), Joined::Follower(_)));
        assert_eq!(leader.next_source(), Some("first"));
        assert_eq!(leader.next_source(), Some("second"));
        assert_eq!(leader.next_source(), Some("third"));
        assert_eq!(leader.next_source(), None);
        // A source that arrives later is still offered.
        assert!(matches!(flights.join(1, "late"), Joined::Follower(_)));
        assert_eq!(leader.next_source(), Some("late"));
    }

    #[tokio::test]
    async fn dropped_leader_wakes_waiters_with_none_and_frees_the_key() {
        let flights: SingleFlight<u8, u8, ()> = SingleFlight::default();
        let Joined::Leader(leader) = flights.join(1, ()) else {
            panic!("first caller must lead")
        };
        let Joined::Follower(waiter) = flights.join(1, ()) else {
            panic!("second caller must follow")
        };
        drop(leader);
        assert_eq!(waiter.wait().await, None);
        assert!(matches!(flights.join(1, ()), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_caller_after_completion_starts_a_new_flight() {
        let flights: SingleFlight<u8, u8, ()> = SingleFlight::default();
        let Joined::Leader(leader) = flights.join(1, ()) else {
            panic!("first caller must lead")
        };
        let waiter = leader.waiter();
        leader.complete(3);
        assert_eq!(waiter.wait().await, Some(3));
        assert!(matches!(flights.join(1, ()), Joined::Leader(_)));
    }
}
