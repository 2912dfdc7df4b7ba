//! Retry delays for every reconnecting or retrying loop of fleetscan (agent sessions, worker
//! sessions, the broker's store writer): doubling between a floor and a ceiling, with jitter so
//! that a fleet does not retry in lockstep when a broker or the store comes back, and back to
//! the floor once an attempt has worked for a while.
//!
//! Pure: it computes delays and never sleeps; the caller waits with its own clock.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Doubling delays with jitter; see the module header.
#[derive(Clone, Debug)]
pub struct Backoff {
    floor: Duration,
    ceiling: Duration,
    /// How long an attempt must have worked for the next failure to start from the floor again.
    healthy_after: Duration,
    step: Duration,
}

impl Backoff {
    /// Delays from `floor` doubling to `ceiling`; an attempt that worked for at least
    /// `healthy_after` resets them (see [`Backoff::worked_for`]).
    pub fn new(floor: Duration, ceiling: Duration, healthy_after: Duration) -> Backoff {
        let ceiling = ceiling.max(floor);
        Backoff {
            floor,
            ceiling,
            healthy_after,
            step: floor,
        }
    }

    /// The delay before the next attempt: the current step less a random part of up to a
    /// quarter of it, so that a delay never exceeds the ceiling and never falls below three
    /// quarters of the floor. The step then doubles, up to the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.ceiling);
        step - (step / 4).mul_f64(unit_random())
    }

    /// An attempt ended after working for `lived` (a session that was accepted, a write that
    /// went through): once it worked for `healthy_after`, the next delay starts from the floor
    /// again. An attempt that failed at once keeps the delays growing, so that a peer that
    /// accepts and then fails at once is not hammered.
    pub fn worked_for(&mut self, lived: Duration) {
        if lived >= self.healthy_after {
            self.reset();
        }
    }

    /// Back to the floor.
    pub fn reset(&mut self) {
        self.step = self.floor;
    }
}

/// A number in [0, 1): `RandomState` is seeded randomly per instance, which is random enough
/// for jitter and needs no generator crate.
fn unit_random() -> f64 {
    (RandomState::new().hash_one(0u8) % 1024) as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_millis(100);
    const CEILING: Duration = Duration::from_secs(2);
    const HEALTHY: Duration = Duration::from_secs(1);

    #[test]
    fn delays_double_to_the_ceiling_within_their_jitter() {
        let mut b = Backoff::new(FLOOR, CEILING, HEALTHY);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for d in &delays {
            assert!(*d >= FLOOR * 3 / 4 && *d <= CEILING, "{d:?}");
        }
        assert!(delays[0] <= FLOOR);
        assert!(delays[3] >= FLOOR * 8 * 3 / 4, "{delays:?}");
        assert!(delays[9] >= CEILING * 3 / 4, "{delays:?}");
    }

    #[test]
    fn delays_are_jittered() {
        // Two hundred agents reconnecting after the same broker crash must not all wait the
        // same time.
        let first: std::collections::HashSet<Duration> = (0..200)
            .map(|_| Backoff::new(FLOOR, CEILING, HEALTHY).next_delay())
            .collect();
        assert!(first.len() > 20, "only {} distinct delays", first.len());
    }

    #[test]
    fn an_attempt_that_worked_for_a_while_resets_and_one_that_failed_at_once_does_not() {
        let mut b = Backoff::new(FLOOR, CEILING, HEALTHY);
        for _ in 0..6 {
            b.next_delay();
        }
        b.worked_for(Duration::from_millis(10));
        assert!(
            b.next_delay() >= CEILING * 3 / 4,
            "a crash loop keeps backing off"
        );
        b.worked_for(HEALTHY);
        assert!(
            b.next_delay() <= FLOOR,
            "a session that worked starts again quickly"
        );
        b.next_delay();
        b.reset();
        assert!(b.next_delay() <= FLOOR);
    }
}
