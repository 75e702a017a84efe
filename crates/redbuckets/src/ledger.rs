//! The ledger: the buckets a member holds, each `Owned` or `Draining`, and the bookkeeping that
//! decides what changes and which events tell the user.
//!
//! Every method is pure: no clock (time comes in as a value), no store, no async. It changes the
//! ledger and returns the events to emit; the driver (`driver.rs`) makes the store calls and
//! emits what comes back. The ledger sits in the member's std mutex (`member::Local`), so the
//! user's handle reads the same bookkeeping the driver writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tokio::sync::Notify;

use crate::event::{Event, LostReason};

/// Where a held bucket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// The member owns the bucket: the user may work on it.
    Owned,
    /// Revoked (the user was told, its lease handles are cancelled): the member releases it
    /// once its handles are dropped, or at `until`, whichever comes first.
    Draining {
        /// The end of the drain time.
        until: Instant,
        /// When it was revoked (a drain extension counts from here).
        since: Instant,
    },
}

/// One bucket the member holds.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) token: u64,
    /// When the grant was seen (a subscriber's snapshot reports it as the `Acquired` time).
    pub(crate) since: Instant,
    pub(crate) hold: Hold,
    /// The drain a lease asked for (`Lease::extend_drain`), counted from the revoke; zero if
    /// none: the member's drain time applies.
    pub(crate) drain: Duration,
    /// Fired when ownership ends (revoke or loss); every lease handle of the grant watches it.
    pub(crate) cancel: CancellationToken,
    /// The lease handles given out for this grant; none alive once every one is dropped.
    pub(crate) guard: Weak<LeaseGuard>,
    /// A release of it was sent (in flight, or failed and maybe run unheard): a drain
    /// extension can no longer be kept, so none is promised.
    pub(crate) releasing: bool,
}

impl Held {
    fn new(token: u64, since: Instant) -> Self {
        Held {
            token,
            since,
            hold: Hold::Owned,
            drain: Duration::ZERO,
            cancel: CancellationToken::new(),
            guard: Weak::new(),
            releasing: false,
        }
    }

    /// Ends this grant of `bucket` at `now`: cancels its handles and returns the event that
    /// tells the user, `Released` when the store freed it, else `Lost { Disowned }`.
    fn end(self, bucket: u32, released: bool, now: Instant) -> Event {
        self.cancel.cancel();
        if released {
            Event::Released {
                bucket,
                token: self.token,
                at: now,
            }
        } else {
            Event::Lost {
                bucket,
                token: self.token,
                reason: LostReason::Disowned,
                at: now,
            }
        }
    }

    fn is_draining(&self) -> bool {
        matches!(self.hold, Hold::Draining { .. })
    }

    pub(crate) fn is_owned(&self) -> bool {
        self.hold == Hold::Owned
    }

    fn has_handles(&self) -> bool {
        self.guard.strong_count() > 0
    }
}

/// How the ledger compares with the store's counts after a rebalance step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reconcile {
    /// The counts agree.
    InSync,
    /// A grant or a release the member did not hear of: read the owner records (resync).
    Resync,
    /// The store decided a release the member did not hear of: revoke this many.
    Revoke(usize),
}

/// The member's held buckets.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    held: BTreeMap<u32, Held>,
    /// The highest token of any grant this member applied (granted or adopted): a grant
    /// notice with a token not above it is old news (a repeat, or one that came after the
    /// member released those buckets) and must not be applied.
    highest_token: u64,
}

impl Ledger {
    /// Whether a grant notice with `token` is news: above every token applied so far. Tokens
    /// only grow (S2), so a notice at or below it was applied, or its buckets were since
    /// released (a repeated or late notice), or a newer grant overtook it (the member's checks
    /// then find the difference and resync).
    pub(crate) fn is_new_grant(&self, token: u64) -> bool {
        token > self.highest_token
    }

    /// The highest token applied (see [`Ledger::is_new_grant`]): what a release tells the store
    /// this member knows of.
    pub(crate) fn highest_token(&self) -> u64 {
        self.highest_token
    }

    /// Raises the floor of [`Ledger::is_new_grant`] to `token`: a grant or adoption applied, or
    /// a registration's floor (`Registration::Registered::token`).
    pub(crate) fn seen_token(&mut self, token: u64) {
        self.highest_token = self.highest_token.max(token);
    }

    /// Buckets held: owned or draining (what the store lists as ours).
    pub(crate) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Every held bucket, in bucket order.
    pub(crate) fn buckets(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Owned buckets with their entries, in bucket order.
    pub(crate) fn owned(&self) -> impl Iterator<Item = (u32, &Held)> {
        self.held
            .iter()
            .filter(|(_, h)| h.is_owned())
            .map(|(b, h)| (*b, h))
    }

    /// The owned buckets, sorted.
    pub(crate) fn owned_buckets(&self) -> Vec<u32> {
        self.owned().map(|(b, _)| b).collect()
    }

    /// Number of owned buckets.
    pub(crate) fn owned_count(&self) -> usize {
        self.owned().count()
    }

    /// Number of draining buckets.
    pub(crate) fn draining_count(&self) -> usize {
        self.held.len() - self.owned_count()
    }

    /// The token of `bucket` if it is owned.
    pub(crate) fn owned_token(&self, bucket: u32) -> Option<u64> {
        self.held
            .get(&bucket)
            .filter(|h| h.is_owned())
            .map(|h| h.token)
    }

    fn owned_mut(&mut self, bucket: u32) -> Option<&mut Held> {
        self.held.get_mut(&bucket).filter(|h| h.is_owned())
    }

    /// Adds a grant of `buckets` with `token`. A bucket still draining was released (its reply
    /// lost) and granted back: that grant ends with `Released` first. A bucket still owned was
    /// freed and granted again without the member hearing of it: that grant ends with `Lost`.
    pub(crate) fn grant(&mut self, buckets: &[u32], token: u64, now: Instant) -> Vec<Event> {
        self.seen_token(token);
        let mut closed = Vec::new();
        let mut acquired = Vec::with_capacity(buckets.len());
        for &bucket in buckets {
            if let Some(old) = self.held.insert(bucket, Held::new(token, now)) {
                let draining = old.is_draining();
                closed.push(old.end(bucket, draining, now));
            }
            acquired.push(Event::Acquired {
                bucket,
                token,
                at: now,
            });
        }
        closed.extend(acquired);
        closed
    }

    /// Revokes `count` owned buckets (all if `None`), the most recently granted first: cancels
    /// their handles and lets them drain until `until`.
    pub(crate) fn revoke(
        &mut self,
        count: Option<usize>,
        until: Instant,
        now: Instant,
    ) -> Vec<Event> {
        let mut owned: Vec<(u64, u32)> = self.owned().map(|(b, h)| (h.token, b)).collect();
        owned.sort_unstable_by(|a, b| b.cmp(a));
        let count = count.unwrap_or(owned.len());
        let mut events = Vec::new();
        for (token, bucket) in owned.into_iter().take(count) {
            if let Some(held) = self.held.get_mut(&bucket) {
                // A lease may have asked for a longer drain (capped when it asked).
                let until = until.max(now + held.drain);
                held.hold = Hold::Draining { until, since: now };
                held.cancel.cancel();
                events.push(Event::Revoked {
                    bucket,
                    token,
                    at: now,
                });
            }
        }
        events
    }

    /// Picks the buckets the driver releases now — the releasable ones at `ready_at`, or every
    /// held bucket (the leave) — and marks them: the store call runs without the lock, and a
    /// drain extension meanwhile is refused, not promised time the bucket no longer has. Also
    /// after a failed release: a call that timed out may have run unheard, and the store may
    /// have given the bucket to another member already, whose work would not wait for it. The
    /// bucket drains on until a retried release frees it.
    pub(crate) fn begin_release(&mut self, ready_at: Option<Instant>) -> Vec<u32> {
        let buckets = match ready_at {
            Some(now) => self.releasable(now),
            None => self.buckets(),
        };
        for bucket in &buckets {
            if let Some(held) = self.held.get_mut(bucket) {
                held.releasing = true;
            }
        }
        buckets
    }

    /// How the drains of `buckets` end at `now`, for the ones whose first release this is: the
    /// time since the revoke, and whether lease handles were still alive (the drain time ran
    /// out) rather than all dropped. A retried release is not a second end.
    pub(crate) fn drain_ends(&self, buckets: &[u32], now: Instant) -> Vec<(Duration, bool)> {
        buckets
            .iter()
            .filter_map(|b| self.held.get(b))
            .filter_map(|h| match h.hold {
                Hold::Draining { since, .. } if !h.releasing => {
                    Some((now.saturating_duration_since(since), h.has_handles()))
                }
                _ => None,
            })
            .collect()
    }

    /// Draining buckets ready for their release: no live handle, or the drain time is over.
    pub(crate) fn releasable(&self, now: Instant) -> Vec<u32> {
        self.held
            .iter()
            .filter(|(_, h)| match h.hold {
                Hold::Owned => false,
                Hold::Draining { until, .. } => !h.has_handles() || now >= until,
            })
            .map(|(b, _)| *b)
            .collect()
    }

    /// When the next draining bucket becomes releasable (a bucket without handles: now), not
    /// before `not_before` (the release retry pacing).
    pub(crate) fn next_release(&self, not_before: Instant) -> Option<Instant> {
        self.held
            .values()
            .filter_map(|h| match h.hold {
                Hold::Owned => None,
                Hold::Draining { until, .. } if h.has_handles() => Some(until.max(not_before)),
                Hold::Draining { .. } => Some(not_before),
            })
            .min()
    }

    /// True while a draining bucket still has live handles (the leave waits for them).
    pub(crate) fn draining_has_handles(&self) -> bool {
        self.held.values().any(|h| !h.is_owned() && h.has_handles())
    }

    /// The store answered a release of `buckets` with `freed`. When it freed every one, each
    /// ends with `Released`. When it freed fewer, it no longer listed some as ours (an earlier
    /// release ran unheard, or the session or the data is gone), and a count cannot say which:
    /// none is claimed released, each ends with `Lost { Disowned }`.
    pub(crate) fn released(&mut self, buckets: &[u32], freed: u32, now: Instant) -> Vec<Event> {
        let all = freed as usize >= buckets.len();
        let mut events = Vec::new();
        for &bucket in buckets {
            if let Some(held) = self.held.remove(&bucket) {
                events.push(held.end(bucket, all, now));
            }
        }
        events
    }

    /// Compares the ledger with a rebalance reply: `store_held` buckets listed as ours (owned
    /// or committed for release), `committed` of them kept. A mismatch means a reply was lost:
    /// a grant or a release we did not hear of (resync), or a release decision (revoke).
    pub(crate) fn reconcile(&self, store_held: usize, committed: usize) -> Reconcile {
        let owned = self.owned_count();
        if self.held.len() != store_held || owned < committed {
            Reconcile::Resync
        } else if owned > committed {
            Reconcile::Revoke(self.surplus(committed))
        } else {
            Reconcile::InSync
        }
    }

    /// The owned surplus over `committed`, to revoke after a resync.
    pub(crate) fn surplus(&self, committed: usize) -> usize {
        self.owned_count().saturating_sub(committed)
    }

    /// Aligns the ledger with the store's owner records of this member (`stored`: bucket →
    /// token): a bucket the store no longer lists ends (`Released` if it was draining: a release
    /// that ran unheard; `Lost { Disowned }` if owned), and a bucket the store lists that we
    /// did not know is a grant whose reply was lost (`Acquired`).
    pub(crate) fn adopt(&mut self, stored: &BTreeMap<u32, u64>, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let gone: Vec<u32> = self
            .held
            .keys()
            .filter(|b| !stored.contains_key(b))
            .copied()
            .collect();
        for bucket in gone {
            if let Some(held) = self.held.remove(&bucket) {
                let draining = held.is_draining();
                events.push(held.end(bucket, draining, now));
            }
        }
        for (&bucket, &token) in stored {
            self.seen_token(token);
            if let std::collections::btree_map::Entry::Vacant(slot) = self.held.entry(bucket) {
                slot.insert(Held::new(token, now));
                events.push(Event::Acquired {
                    bucket,
                    token,
                    at: now,
                });
            }
        }
        events
    }

    /// Gives up everything without the store, at `at`: the deadline passed, the session is
    /// gone, or the leave's release failed. Every bucket ends with `Lost`: an owned one loses
    /// its ownership; a draining one (its ownership ended at `Revoked`) will not be released.
    pub(crate) fn lose_all(&mut self, reason: LostReason, at: Instant) -> Vec<Event> {
        std::mem::take(&mut self.held)
            .into_iter()
            .map(|(bucket, held)| {
                held.cancel.cancel();
                Event::Lost {
                    bucket,
                    token: held.token,
                    reason,
                    at,
                }
            })
            .collect()
    }

    /// Drops everything and tells nobody (an abort: a crash from the group's view); the
    /// handles are cancelled.
    pub(crate) fn drop_all(&mut self) {
        for held in std::mem::take(&mut self.held).into_values() {
            held.cancel.cancel();
        }
    }

    /// A lease of grant `token` of `bucket` asks for a drain of `drain` (capped by the caller)
    /// from its revoke; `base` is the member's drain time. Returns the grant's drain now, or
    /// `None` if the grant has ended or its release was sent (the time could not be kept).
    /// A draining bucket's release moves out; never in.
    pub(crate) fn extend_drain(
        &mut self,
        bucket: u32,
        token: u64,
        drain: Duration,
        base: Duration,
    ) -> Option<Duration> {
        let held = self
            .held
            .get_mut(&bucket)
            .filter(|h| h.token == token && !h.releasing)?;
        held.drain = held.drain.max(drain);
        match &mut held.hold {
            Hold::Owned => Some(held.drain.max(base)),
            Hold::Draining { until, since } => {
                *until = (*until).max(*since + held.drain);
                Some(until.saturating_duration_since(*since))
            }
        }
    }

    /// A lease guard for the owned `bucket`: the live one, or a new one.
    pub(crate) fn guard(
        &mut self,
        bucket: u32,
        make: impl FnOnce() -> LeaseGuard,
    ) -> Option<(u64, CancellationToken, Arc<LeaseGuard>)> {
        let held = self.owned_mut(bucket)?;
        let guard = held.guard.upgrade().unwrap_or_else(|| {
            let guard = Arc::new(make());
            held.guard = Arc::downgrade(&guard);
            guard
        });
        Some((held.token, held.cancel.clone(), guard))
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;

    impl Ledger {
        /// Every held bucket, owned or draining.
        fn len(&self) -> usize {
            self.held.len()
        }
    }

    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn kinds(events: &[Event]) -> Vec<(&'static str, u32, u64)> {
        events
            .iter()
            .map(|e| {
                let kind = match e {
                    Event::Acquired { .. } => "acquired",
                    Event::Revoked { .. } => "revoked",
                    Event::Released { .. } => "released",
                    Event::Lost { .. } => "lost",
                    Event::Lagged { .. } => "lagged",
                };
                (kind, e.bucket().unwrap_or(u32::MAX), e.token().unwrap_or(0))
            })
            .collect()
    }

    fn guard() -> LeaseGuard {
        LeaseGuard {
            dropped: Arc::new(Notify::new()),
        }
    }

    /// A grant notice is news only above every token applied, granted or adopted: a repeat, or
    /// one that comes after its buckets were released, is not applied again.
    #[test]
    fn a_grant_notice_is_new_only_above_every_applied_token() {
        let now = t0();
        let mut l = Ledger::default();
        assert!(l.is_new_grant(1));
        l.grant(&[1, 2], 10, now);
        assert!(!l.is_new_grant(10), "a repeat");
        assert!(!l.is_new_grant(9), "an older one");
        assert!(l.is_new_grant(11));
        l.revoke(None, now, now);
        l.released(&[1, 2], 2, now);
        assert!(!l.is_new_grant(10), "released since: must not come back");
        let stored: BTreeMap<u32, u64> = [(7, 30)].into_iter().collect();
        l.adopt(&stored, now);
        assert!(!l.is_new_grant(30), "adopted from the owner records");
        assert!(l.is_new_grant(31));
    }

    #[test]
    fn grant_then_revoke_the_newest_first() {
        let now = t0();
        let mut l = Ledger::default();
        assert_eq!(
            kinds(&l.grant(&[1, 2], 10, now)),
            [("acquired", 1, 10), ("acquired", 2, 10)]
        );
        l.grant(&[5], 20, now);
        let revoked = l.revoke(Some(2), now + ms(100), now);
        assert_eq!(kinds(&revoked), [("revoked", 5, 20), ("revoked", 2, 10)]);
        assert_eq!((l.owned_count(), l.draining_count()), (1, 2));
        // Without handles they are releasable at once; the owned one never is.
        assert_eq!(l.releasable(now), vec![2, 5]);
        assert_eq!(l.next_release(now + ms(5)), Some(now + ms(5)));
    }

    #[test]
    fn a_draining_bucket_with_a_handle_waits_for_it_or_the_drain_time() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[3], 7, now);
        let (token, cancel, handle) = l.guard(3, guard).expect("owned");
        assert_eq!(token, 7);
        l.revoke(None, now + ms(100), now);
        assert!(cancel.is_cancelled(), "revoking cancels the handles");
        assert!(l.guard(3, guard).is_none(), "no lease on a draining bucket");
        assert!(l.draining_has_handles());
        assert_eq!(l.releasable(now + ms(99)), Vec::<u32>::new());
        assert_eq!(l.releasable(now + ms(100)), vec![3]);
        assert_eq!(l.next_release(now), Some(now + ms(100)));
        drop(handle);
        assert_eq!(l.releasable(now + ms(1)), vec![3]);
        assert!(!l.draining_has_handles());
    }

    #[test]
    fn a_release_ends_in_released_only_when_everything_was_freed() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[1, 2, 3], 10, now);
        l.revoke(None, now, now);
        let events = l.released(&[1, 2], 2, now);
        assert_eq!(kinds(&events), [("released", 1, 10), ("released", 2, 10)]);
        // The store freed one of two: which one is unknown, so neither is claimed released.
        l.grant(&[4], 11, now);
        l.revoke(None, now, now);
        let events = l.released(&[3, 4], 1, now);
        assert_eq!(kinds(&events), [("lost", 3, 10), ("lost", 4, 11)]);
        assert!(events.iter().all(|e| matches!(
            e,
            Event::Lost {
                reason: LostReason::Disowned,
                ..
            }
        )));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_regrant_closes_the_old_grant_first() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[1, 2], 10, now);
        l.revoke(Some(1), now, now); // bucket 2 (ties broken by bucket, newest first)
        let events = l.grant(&[1, 2], 30, now);
        assert_eq!(
            kinds(&events),
            [
                ("lost", 1, 10),
                ("released", 2, 10),
                ("acquired", 1, 30),
                ("acquired", 2, 30)
            ]
        );
    }

    #[test]
    fn reconcile_names_the_missing_reply() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[1, 2, 3], 10, now);
        assert_eq!(l.reconcile(3, 3), Reconcile::InSync);
        // The store lists a fourth: a grant we did not hear of.
        assert_eq!(l.reconcile(4, 3), Reconcile::Resync);
        // The store committed one for release we were not told of.
        assert_eq!(l.reconcile(3, 2), Reconcile::Revoke(1));
        l.revoke(Some(1), now, now);
        assert_eq!(l.reconcile(3, 2), Reconcile::InSync);
        // We count a draining bucket the store freed already (a release that ran unheard).
        assert_eq!(l.reconcile(2, 2), Reconcile::Resync);
        // The store counts more kept than we own.
        assert_eq!(l.reconcile(3, 3), Reconcile::Resync);
        assert_eq!(l.surplus(1), 1);
        assert_eq!(l.surplus(5), 0);
    }

    #[test]
    fn adopt_follows_the_owner_records() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[1, 2], 10, now);
        l.grant(&[3], 11, now);
        l.revoke(Some(1), now, now); // bucket 3
        let stored = BTreeMap::from([(2, 10), (7, 12)]);
        let events = l.adopt(&stored, now);
        assert_eq!(
            kinds(&events),
            [("lost", 1, 10), ("released", 3, 11), ("acquired", 7, 12)]
        );
        assert_eq!(l.owned_buckets(), vec![2, 7]);
        assert!(
            l.adopt(&stored, now).is_empty(),
            "adopting again changes nothing"
        );
    }

    #[test]
    fn lose_all_ends_every_bucket_and_cancels_everything() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[1, 2], 10, now);
        let (_, owned_cancel, _h1) = l.guard(1, guard).expect("owned");
        let (_, draining_cancel, _h2) = l.guard(2, guard).expect("owned");
        l.revoke(Some(1), now + ms(50), now);
        let at = now + ms(10);
        let events = l.lose_all(LostReason::Deadline, at);
        // The draining one too: it will never be released (issue 9, 4).
        assert_eq!(kinds(&events), [("lost", 1, 10), ("lost", 2, 10)]);
        assert!(events.iter().all(|e| e.at() == at));
        assert!(owned_cancel.is_cancelled() && draining_cancel.is_cancelled());
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn a_drain_extension_moves_the_release_out_up_to_what_was_asked() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[1, 2], 10, now);
        let (_, _, _h1) = l.guard(1, guard).expect("owned");
        let (_, _, _h2) = l.guard(2, guard).expect("owned");
        // Asked before the revoke: the revoke's drain becomes the larger of the two.
        assert_eq!(l.extend_drain(1, 10, ms(500), ms(100)), Some(ms(500)));
        assert_eq!(
            l.extend_drain(1, 99, ms(500), ms(100)),
            None,
            "another grant"
        );
        l.revoke(None, now + ms(100), now);
        assert_eq!(l.releasable(now + ms(100)), vec![2]);
        assert_eq!(l.releasable(now + ms(499)), vec![2]);
        assert_eq!(l.releasable(now + ms(500)), vec![1, 2]);
        // Asked after the revoke: counted from the revoke, and never shortens.
        assert_eq!(l.extend_drain(2, 10, ms(300), ms(100)), Some(ms(300)));
        assert_eq!(l.extend_drain(2, 10, ms(50), ms(100)), Some(ms(300)));
        assert_eq!(l.releasable(now + ms(299)), Vec::<u32>::new());
        assert_eq!(l.next_release(now), Some(now + ms(300)));
        // Once its release was sent, no extension is promised: not while it is in flight, nor
        // after it failed (it may have run unheard, and the bucket moved on).
        assert_eq!(l.begin_release(Some(now + ms(300))), vec![2]);
        assert_eq!(l.extend_drain(2, 10, ms(900), ms(100)), None);
        assert_eq!(l.begin_release(Some(now + ms(300))), vec![2], "retried");
        assert_eq!(l.extend_drain(2, 10, ms(900), ms(100)), None);
    }

    #[test]
    fn drop_all_tells_nobody_and_cancels_the_handles() {
        let now = t0();
        let mut l = Ledger::default();
        l.grant(&[4], 1, now);
        let (_, cancel, _h) = l.guard(4, guard).expect("owned");
        l.drop_all();
        assert!(cancel.is_cancelled());
        assert_eq!(l.len(), 0);
    }
}
