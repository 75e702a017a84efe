//! Time as values: [`Now`], the three clocks read once, and the local lease [`Deadline`] measured
//! on them. Only the shell (`driver.rs`) and the user's handles read the clocks
//! ([`Now::read`]); the member's core (`machine.rs`) is handed the readings.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// The three clocks, read at one moment. Read as a store call is sent, it anchors the deadline
/// the call earns: a host that suspends after the store renewed the session but before the
/// reply is handled must count that suspension against the lease, so no clock may be read
/// when the reply comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Now {
    /// tokio's clock: what the deadline is measured on.
    pub(crate) at: Instant,
    /// The real monotonic clock, which stops while the host is suspended.
    real: std::time::Instant,
    /// The wall clock, which does not.
    wall: SystemTime,
}

impl Now {
    /// Reads the three clocks.
    pub(crate) fn read() -> Self {
        Now {
            at: Instant::now(),
            real: std::time::Instant::now(),
            wall: wall_now(),
        }
    }

    /// Given readings, for tests.
    #[cfg(test)]
    pub(crate) fn from_parts(at: Instant, real: std::time::Instant, wall: SystemTime) -> Self {
        Now { at, real, wall }
    }

    /// The same readings `d` later on every clock (as if no time was suspended): for tests
    /// that step a member's core.
    #[cfg(test)]
    pub(crate) fn plus(self, d: Duration) -> Self {
        Now {
            at: self.at + d,
            real: self.real + d,
            wall: self.wall + d,
        }
    }
}

/// The wall clock. Unit tests can step it forward, as a host suspend does (`suspend`).
#[cfg(not(test))]
fn wall_now() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
fn wall_now() -> SystemTime {
    SystemTime::now() + suspend::SKEW.with(std::cell::Cell::get)
}

/// Unit tests only: a host suspend on this thread, seen as the wall clock jumping forward while
/// the monotonic clocks (tokio's and the real one) stand still.
#[cfg(test)]
pub(crate) mod suspend {
    use std::cell::Cell;
    use std::time::Duration;

    thread_local! {
        pub(crate) static SKEW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    /// The host sleeps for `d`.
    pub(crate) fn host_suspends(d: Duration) {
        SKEW.with(|s| s.set(s.get() + d));
    }

    /// The wall clock is stepped back by `d` (after a step forward: an NTP correction).
    pub(crate) fn wall_clock_steps_back(d: Duration) {
        SKEW.with(|s| s.set(s.get().saturating_sub(d)));
    }
}

/// The local lease deadline (S3). It runs on tokio's clock, which is monotonic and stops while
/// the host is suspended; time the host spent suspended since the heartbeat was sent (the wall
/// clock running ahead of the real monotonic clock) is subtracted, so a host that wakes up does
/// not believe it still owns its buckets. A wall clock stepped forward counts as suspended time
/// too, which only ends leases early. Both real clocks advance together under tokio's paused
/// clock, so simulations stay deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    sent: Now,
}

/// Smaller gaps between the wall clock and the monotonic clock are read jitter, not a suspend.
const SUSPEND_MIN: Duration = Duration::from_millis(20);

impl Deadline {
    /// The deadline `validity` after a call sent at `sent` (every clock read at the send).
    pub(crate) fn after(sent: Now, validity: Duration) -> Self {
        Deadline {
            at: sent.at + validity,
            sent,
        }
    }

    /// Time the host spent suspended between the send and `now`.
    fn suspended_at(&self, now: &Now) -> Duration {
        let wall = now
            .wall
            .duration_since(self.sent.wall)
            .unwrap_or(Duration::ZERO);
        let gap = wall.saturating_sub(now.real.saturating_duration_since(self.sent.real));
        if gap < SUSPEND_MIN {
            Duration::ZERO
        } else {
            gap
        }
    }

    /// True once the deadline has passed at `now`.
    pub(crate) fn passed(&self, now: &Now) -> bool {
        self.remaining(now).is_zero()
    }

    /// Time left at `now`.
    pub(crate) fn remaining(&self, now: &Now) -> Duration {
        self.at
            .saturating_duration_since(now.at)
            .saturating_sub(self.suspended_at(now))
    }

    /// The tokio instant at which, seen from `now`, the deadline passes: the time to wake.
    pub(crate) fn wake_at(&self, now: &Now) -> Instant {
        now.at + self.remaining(now)
    }

    /// The later of two deadlines.
    pub(crate) fn max(self, other: Deadline) -> Deadline {
        if other.at > self.at {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// S3 under host suspend, as values: the heartbeat is sent at (t, r, w); the store renews
    /// the session; the host sleeps 5 s before the reply is handled (10 ms of monotonic time,
    /// 5.01 s of wall time). The deadline counts the 5 s against the lease.
    #[test]
    fn a_suspend_after_the_send_shortens_the_lease() {
        let (t, r, w) = (Instant::now(), std::time::Instant::now(), SystemTime::now());
        let sent = Now::from_parts(t, r, w);
        let until = Deadline::after(sent, ms(9000));
        let (t1, r1, w1) = (t + ms(10), r + ms(10), w + ms(5010));
        assert_eq!(until.remaining(&Now::from_parts(t1, r1, w1)), ms(3990));
        // Read jitter below 20 ms is not a suspend.
        assert_eq!(
            until.remaining(&Now::from_parts(t1, r1, w + ms(25))),
            ms(8990)
        );
        // A suspend longer than the lease ends it.
        assert_eq!(
            until.remaining(&Now::from_parts(t1, r1, w + ms(9100))),
            Duration::ZERO
        );
        // Anchored at the reply instead (the bug), the same suspend went unnoticed.
        let late = Deadline::after(Now::from_parts(t, r1, w1), ms(9000));
        assert_eq!(late.remaining(&Now::from_parts(t1, r1, w1)), ms(8990));
    }
}
