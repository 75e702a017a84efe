//! Ownership events and the per-bucket lease handle the user holds while working on a bucket.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a member lost its buckets without releasing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// No heartbeat succeeded in time: the local lease deadline passed (S3).
    Deadline,
    /// The store no longer knows the session (it expired there, or the store lost its data).
    SessionExpired,
    /// The store no longer lists the bucket as this member's (its data was edited or lost).
    Disowned,
    /// A revoked bucket whose release the store did not confirm during the graceful leave (it
    /// did not answer in time). The store frees it with the session: at the deregistration, or
    /// when the session expires.
    Unreleased,
}

impl LostReason {
    /// A stable short name, for logs and machine-readable output: `"deadline"`,
    /// `"session_expired"`, `"disowned"` or `"unreleased"`. The [`Display`](std::fmt::Display) text is the
    /// sentence for people.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            LostReason::Deadline => "deadline",
            LostReason::SessionExpired => "session_expired",
            LostReason::Disowned => "disowned",
            LostReason::Unreleased => "unreleased",
        }
    }
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Deadline => "no heartbeat succeeded before the lease deadline",
            LostReason::SessionExpired => "the store no longer knows the session",
            LostReason::Disowned => "the store no longer lists the bucket as ours",
            LostReason::Unreleased => {
                "the store did not confirm the release; it frees the bucket with the session"
            }
        })
    }
}

/// A change of ownership seen by one member. `at` is tokio's clock; [`Event::at_system`] turns it
/// into wall-clock time.
///
/// A subscription ([`crate::MemberHandle::events`]) opens with an `Acquired` for every bucket
/// owned at that moment, then follows live: every grant it reports ends with `Revoked` (then
/// `Released`, or `Lost` if the release was not confirmed or the session was lost meanwhile)
/// or `Lost`; only an abort ([`crate::Member::abort`]) ends grants with nothing more. For
/// timelines, the end of ownership is `Revoked` or `Lost`: `Released` is when the store
/// confirmed the release, which can come after another member's `Acquired`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The member owns `bucket` from `at` on, with fencing token `token`.
    Acquired {
        /// Bucket id.
        bucket: u32,
        /// Fencing token; larger than every earlier grant of the bucket.
        token: u64,
        /// When the grant was seen (ownership begins).
        at: Instant,
    },
    /// The member gave the bucket up: from `at` on it no longer owns it; its lease handles are
    /// cancelled and it will release the bucket once they are dropped or the drain time is over.
    Revoked {
        /// Bucket id.
        bucket: u32,
        /// Token of the grant that ended.
        token: u64,
        /// When ownership ended.
        at: Instant,
    },
    /// The store freed the bucket for others. Ownership ended earlier, at the `Revoked`.
    Released {
        /// Bucket id.
        bucket: u32,
        /// Token of the grant that ended.
        token: u64,
        /// When the store confirmed the release: it can be after another member's `Acquired` of
        /// the bucket; ownership ended at the `Revoked`.
        at: Instant,
    },
    /// The member lost the bucket without releasing it. `at` is the local deadline at which the
    /// lease stopped being valid, which can be earlier than the moment the event is delivered.
    Lost {
        /// Bucket id.
        bucket: u32,
        /// Token of the grant that ended.
        token: u64,
        /// Why.
        reason: LostReason,
        /// When ownership ended.
        at: Instant,
    },
    /// The subscriber fell behind and `missed` events were dropped. What follows is a fresh
    /// snapshot: an `Acquired` for every bucket owned now (with its grant time). Forget what you
    /// believed was owned; buckets not in the snapshot are no longer owned.
    Lagged {
        /// How many events were dropped.
        missed: u64,
        /// When the lag was noticed.
        at: Instant,
    },
}

impl Event {
    /// The bucket the event is about (`None` for `Lagged`).
    #[must_use]
    pub fn bucket(&self) -> Option<u32> {
        match self {
            Event::Acquired { bucket, .. }
            | Event::Revoked { bucket, .. }
            | Event::Released { bucket, .. }
            | Event::Lost { bucket, .. } => Some(*bucket),
            Event::Lagged { .. } => None,
        }
    }

    /// The token of the grant the event is about (`None` for `Lagged`).
    #[must_use]
    pub fn token(&self) -> Option<u64> {
        match self {
            Event::Acquired { token, .. }
            | Event::Revoked { token, .. }
            | Event::Released { token, .. }
            | Event::Lost { token, .. } => Some(*token),
            Event::Lagged { .. } => None,
        }
    }

    /// When ownership began (`Acquired`) or ended (`Revoked`, `Lost`), when the release was
    /// confirmed (`Released`), or when the lag was noticed (`Lagged`).
    #[must_use]
    pub fn at(&self) -> Instant {
        match self {
            Event::Acquired { at, .. }
            | Event::Revoked { at, .. }
            | Event::Released { at, .. }
            | Event::Lost { at, .. }
            | Event::Lagged { at, .. } => *at,
        }
    }

    /// [`Event::at`] as wall-clock time.
    #[must_use]
    pub fn at_system(&self) -> SystemTime {
        instant_to_system(self.at())
    }
}

/// Converts a tokio instant to wall-clock time, through the present.
#[must_use]
pub fn instant_to_system(at: Instant) -> SystemTime {
    let now = Instant::now();
    let wall = SystemTime::now();
    if at <= now {
        wall.checked_sub(now - at).unwrap_or(wall)
    } else {
        wall.checked_add(at - now).unwrap_or(wall)
    }
}

/// The clocks read when a heartbeat (or a registration) is sent. Every anchor of the deadline
/// it earns is taken then: a host that suspends after the store renewed the session but before
/// the reply is handled must count that suspension against the lease, so no clock may be read
/// when the reply comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// tokio's clock: what the deadline is measured on.
    pub(crate) at: Instant,
    /// The real monotonic clock, which stops while the host is suspended.
    real: std::time::Instant,
    /// The wall clock, which does not.
    wall: SystemTime,
}

impl Sent {
    /// Reads the three clocks now, as the call is sent.
    pub(crate) fn now() -> Self {
        Sent {
            at: Instant::now(),
            real: std::time::Instant::now(),
            wall: wall_now(),
        }
    }

    /// Given readings, for tests.
    #[cfg(test)]
    pub(crate) fn from_parts(at: Instant, real: std::time::Instant, wall: SystemTime) -> Self {
        Sent { at, real, wall }
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
    sent: Sent,
}

/// Smaller gaps between the wall clock and the monotonic clock are read jitter, not a suspend.
const SUSPEND_MIN: Duration = Duration::from_millis(20);

impl Deadline {
    /// The deadline `validity` after a heartbeat sent at `sent` (every clock read at the send).
    pub(crate) fn after(sent: Sent, validity: Duration) -> Self {
        Deadline {
            at: sent.at + validity,
            sent,
        }
    }

    /// Time the host spent suspended between the send and the readings `real` and `wall`.
    fn suspended_at(&self, real: std::time::Instant, wall: SystemTime) -> Duration {
        let wall = wall
            .duration_since(self.sent.wall)
            .unwrap_or(Duration::ZERO);
        let gap = wall.saturating_sub(real.saturating_duration_since(self.sent.real));
        if gap < SUSPEND_MIN {
            Duration::ZERO
        } else {
            gap
        }
    }

    /// True once the deadline has passed.
    pub(crate) fn passed(&self, now: Instant) -> bool {
        self.remaining(now).is_zero()
    }

    /// Time left.
    pub(crate) fn remaining(&self, now: Instant) -> Duration {
        self.remaining_at(now, std::time::Instant::now(), wall_now())
    }

    /// Time left at tokio's `now`, with the real clocks reading `real` and `wall`: pure.
    fn remaining_at(&self, now: Instant, real: std::time::Instant, wall: SystemTime) -> Duration {
        self.at
            .saturating_duration_since(now)
            .saturating_sub(self.suspended_at(real, wall))
    }

    /// The tokio instant at which, seen from `now`, the deadline passes: the time to wake.
    pub(crate) fn wake_at(&self, now: Instant) -> Instant {
        now + self.remaining(now)
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

/// A handle on one owned bucket: its token, and a cancellation to `select!` on.
///
/// Ownership ends when the member revokes the bucket (rebalance, shutdown) or loses it (its local
/// deadline passed). [`Lease::cancelled`] completes at that moment even if the member's own task
/// is stuck, because it also watches the deadline itself. While a revoked bucket has live handles,
/// the member waits (up to the drain time, or longer if asked with [`Lease::extend_drain`])
/// before releasing it: drop the handle when done.
#[derive(Debug, Clone)]
pub struct Lease {
    pub(crate) bucket: u32,
    pub(crate) token: u64,
    pub(crate) cancel: CancellationToken,
    pub(crate) valid_until: watch::Receiver<Option<Deadline>>,
    pub(crate) _guard: Arc<LeaseGuard>,
    /// For `extend_drain`: weak, so a lease does not keep the member's state alive.
    pub(crate) shared: Weak<crate::member::Shared>,
}

/// Tells the member when the last handle of a bucket is dropped.
#[derive(Debug)]
pub(crate) struct LeaseGuard {
    pub(crate) dropped: Arc<Notify>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.dropped.notify_one();
    }
}

impl Lease {
    /// The bucket.
    #[must_use]
    pub fn bucket(&self) -> u32 {
        self.bucket
    }

    /// The fencing token of this grant; pass it to downstream stores so they can refuse writes
    /// from an older owner.
    #[must_use]
    pub fn token(&self) -> u64 {
        self.token
    }

    /// True while the bucket is still owned: not revoked and before the local deadline.
    #[must_use]
    pub fn is_valid(&self) -> bool {
        !self.cancel.is_cancelled() && self.remaining().is_some_and(|d| !d.is_zero())
    }

    /// Time left until the local lease deadline, if the member has one.
    #[must_use]
    pub fn remaining(&self) -> Option<Duration> {
        let until = (*self.valid_until.borrow())?;
        let now = Instant::now();
        if self.passed(&until, now) {
            return Some(Duration::ZERO);
        }
        Some(until.remaining(now))
    }

    /// Whether `until` has passed: through the member's sticky check while it exists.
    fn passed(&self, until: &Deadline, now: Instant) -> bool {
        match self.shared.upgrade() {
            Some(shared) => shared.deadline_passed(until, now),
            None => until.passed(now),
        }
    }

    /// Asks for up to `drain` (counted from the revoke) before the member releases this bucket
    /// once it is revoked, for in-flight work longer than the member's drain time. Capped at the
    /// member's `max_drain`; never shortens the drain. Callable before or after the revoke.
    /// Returns the drain this grant now has, or `None` if the grant has ended (released, lost),
    /// its release was sent already (also when that call failed: it may have run unheard, and
    /// the bucket moved on), or the member has stopped. A graceful shutdown does
    /// not wait for extensions: its drain stays the drain time, within the shutdown timeout.
    ///
    /// Ownership still ends at the revoke (the lease is cancelled then): the extension only
    /// delays the release, so the bucket's next owner waits for this work to finish.
    pub fn extend_drain(&self, drain: Duration) -> Option<Duration> {
        self.shared
            .upgrade()?
            .extend_drain(self.bucket, self.token, drain)
    }

    /// Completes when ownership ends: revoked, lost, or the local deadline passed.
    pub async fn cancelled(&self) {
        let mut valid_until = self.valid_until.clone();
        loop {
            let until = *valid_until.borrow_and_update();
            let Some(until) = until else { return };
            let now = Instant::now();
            if self.passed(&until, now) || self.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep_until(until.wake_at(now)) => {}
                changed = valid_until.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
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
        let sent = Sent::from_parts(t, r, w);
        let until = Deadline::after(sent, ms(9000));
        let (t1, r1, w1) = (t + ms(10), r + ms(10), w + ms(5010));
        assert_eq!(until.remaining_at(t1, r1, w1), ms(3990));
        // Read jitter below 20 ms is not a suspend.
        assert_eq!(until.remaining_at(t1, r1, w + ms(25)), ms(8990));
        // A suspend longer than the lease ends it.
        assert_eq!(until.remaining_at(t1, r1, w + ms(9100)), Duration::ZERO);
        // Anchored at the reply instead (the bug), the same suspend went unnoticed.
        let late = Deadline::after(Sent::from_parts(t, r1, w1), ms(9000));
        assert_eq!(late.remaining_at(t1, r1, w1), ms(8990));
    }
}
