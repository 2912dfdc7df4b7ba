//! Reconnect backoff: doubling delays between a floor and a ceiling, with jitter so that a
//! fleet of workers does not reconnect in lockstep when a broker restarts.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay before the next attempt: the current step less up to a quarter of it, so a
    /// delay never exceeds `max` and never falls below three quarters of `initial`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        // RandomState is seeded randomly per instance: good enough for jitter, no extra crate.
        let random = RandomState::new().hash_one(0u8);
        let quarter = step / 4;
        let jitter = quarter.mul_f64((random % 1024) as f64 / 1024.0);
        step - jitter
    }

    /// Back to the floor, after a connection that worked.
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(initial, max);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for d in &delays {
            assert!(*d >= initial * 3 / 4 && *d <= max, "{d:?}");
        }
        assert!(delays[0] <= initial);
        // The ceiling is reached (less jitter) and held.
        assert!(delays[11] >= max * 3 / 4, "{delays:?}");
        assert!(delays[5] > delays[0]);
        b.reset();
        assert!(b.next_delay() <= initial);
    }
}
