//! What the member's task and the user's handles share: the ledger and the status under one
//! std mutex ([`Local`]), the event channel, the lease deadline's watch, and the per-bucket
//! [`Lease`] handles built on them. A std mutex, not a tokio one: nothing awaits while it is
//! held. Ledger changes go through [`Shared::apply`], which emits their events under the lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::{Deadline, Now};
use crate::config::Config;
use crate::error::Error;
use crate::event::Event;
use crate::ledger::{LeaseGuard, Ledger};
use crate::metrics::Metrics;

/// Called with every error the member meets while running (the `tracing` events carry them too).
pub type ErrorHook = Arc<dyn Fn(&Error) + Send + Sync>;

/// State shared between the handles and the driver.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) local: Mutex<Local>,
    /// Sent only under the `local` lock (see `apply`), so a subscriber's snapshot and its
    /// subscription, both taken under it, have nothing in between.
    pub(crate) events: broadcast::Sender<Event>,
    /// The live session's lease deadline, derived from the driver's session: the one value
    /// the handle and every lease handle read (`None` while not registered).
    pub(crate) valid_until: watch::Sender<Option<Deadline>>,
    /// The owned buckets, sorted, as the ledger has them.
    pub(crate) owned: watch::Sender<Vec<u32>>,
    pub(crate) dropped: Arc<Notify>,
    /// Cancelled when the member's task has ended (any way): streams end.
    pub(crate) stopped: CancellationToken,
    /// Set once any reader (a handle, a lease, the driver) has seen the session's deadline
    /// passed; cleared only when a new session registers. The check reads the wall clock, so a
    /// wall clock stepped forward and then back would otherwise show a deadline passed and
    /// then valid again (a lease valid, invalid, valid; a subscription in that window with an
    /// empty snapshot and nothing after).
    pub(crate) expired: AtomicBool,
    /// The member's metric handles (`metrics.rs`).
    pub(crate) metrics: Metrics,
}

impl Shared {
    /// The state of a member about to start: nothing owned, no session, an event channel of
    /// `events` slots.
    pub(crate) fn new(config: Arc<Config>, events: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(events);
        let (valid_until, _) = watch::channel(None);
        let (owned, _) = watch::channel(Vec::new());
        let metrics = Metrics::new(&config.group);
        Arc::new(Shared {
            config,
            local: Mutex::new(Local::default()),
            events,
            valid_until,
            owned,
            dropped: Arc::new(Notify::new()),
            stopped: CancellationToken::new(),
            expired: AtomicBool::new(false),
            metrics,
        })
    }

    /// The ledger, locked, while the lease deadline has not passed; `None` after it.
    pub(crate) fn lock_valid(&self) -> Option<MutexGuard<'_, Local>> {
        let local = self.lock();
        self.is_valid(&Now::read()).then_some(local)
    }

    /// A new session: the old one's deadline, seen passed, no longer counts.
    pub(crate) fn forget_expiry(&self) {
        self.expired.store(false, Ordering::SeqCst);
    }

    /// True while the live session's lease deadline has not passed.
    pub(crate) fn is_valid(&self, now: &Now) -> bool {
        let until = *self.valid_until.borrow();
        until.is_some_and(|until| !self.deadline_passed(&until, now))
    }

    /// Whether the session's deadline `until` has passed at `now`: sticky once anyone saw it
    /// (see `expired`). The first to see it wakes the driver, which then loses the session.
    pub(crate) fn deadline_passed(&self, until: &Deadline, now: &Now) -> bool {
        if self.expired.load(Ordering::SeqCst) {
            return true;
        }
        if !until.passed(now) {
            return false;
        }
        if !self.expired.swap(true, Ordering::SeqCst) {
            self.dropped.notify_one();
        }
        true
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Local> {
        // Nothing inside the lock can panic halfway through an update that matters more than
        // the panic; keep serving after one.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the ledger and tells everyone: under the lock, the lease subscribers get a
    /// lease for each new grant (so its guard exists from the moment ownership begins) and the
    /// event subscribers get the events (`events()` and `leases()` take their snapshot under
    /// the lock, so nothing falls in between). The owned-set watch is updated after the lock is
    /// released: a user holding `owned_changed().borrow()` while calling `buckets()` would
    /// otherwise deadlock against the driver. Only the driver calls this, so the watch's
    /// updates keep their order. Every ledger change that emits events goes through here.
    /// Returns how many events the change emitted.
    pub(crate) fn apply(self: &Arc<Self>, change: impl FnOnce(&mut Ledger) -> Vec<Event>) -> usize {
        let mut guard = self.lock();
        let local = &mut *guard;
        let before = local.ledger.owned_count();
        let events = change(&mut local.ledger);
        let count = events.len();
        if !local.leases.is_empty() {
            local.leases.retain(|tx| !tx.is_closed());
            for event in &events {
                let Event::Acquired { bucket, .. } = *event else {
                    continue;
                };
                if let Some(lease) = self.lease_locked(&mut local.ledger, bucket) {
                    for tx in &local.leases {
                        let _ = tx.send(lease.clone());
                    }
                }
            }
        }
        let owned = local.ledger.owned_buckets();
        self.metrics.ownership(&events, before, owned.len());
        for event in events {
            tracing::debug!(?event, "ownership change");
            // No receiver is fine: events are for whoever listens.
            let _ = self.events.send(event);
        }
        drop(guard);
        self.owned.send_if_modified(|now| {
            let changed = *now != owned;
            if changed {
                *now = owned;
            }
            changed
        });
        count
    }

    /// A lease on the owned `bucket`, under the lock.
    pub(crate) fn lease_locked(
        self: &Arc<Self>,
        ledger: &mut Ledger,
        bucket: u32,
    ) -> Option<Lease> {
        let (token, cancel, guard) = ledger.guard(bucket, || LeaseGuard {
            dropped: Arc::clone(&self.dropped),
        })?;
        Some(Lease {
            bucket,
            token,
            cancel,
            valid_until: self.valid_until.subscribe(),
            _guard: guard,
            shared: Arc::downgrade(self),
        })
    }

    /// See [`Lease::extend_drain`].
    pub(crate) fn extend_drain(
        &self,
        bucket: u32,
        token: u64,
        drain: Duration,
    ) -> Option<Duration> {
        let drain = drain.min(self.config.effective_max_drain());
        self.lock()
            .ledger
            .extend_drain(bucket, token, drain, self.config.drain_timeout)
    }
}

/// What the handles read: the ledger and the status fields.
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(crate) ledger: Ledger,
    /// The live lease subscribers (`MemberHandle::leases`); closed ones are pruned.
    pub(crate) leases: Vec<mpsc::UnboundedSender<Lease>>,
    /// The live session's nonce (derived from the driver's session).
    pub(crate) session: Option<String>,
    /// When the graceful leave must be over (set by `Member::shutdown`).
    pub(crate) shutdown_by: Option<Instant>,
    pub(crate) last_heartbeat: Option<Instant>,
    pub(crate) share: (u32, u32),
    /// When the group's grants begin, from the store's last `Wait` (a new group's quarantine).
    pub(crate) grants_at: Option<Instant>,
    pub(crate) version: u64,
    pub(crate) errors: u64,
    pub(crate) last_error: Option<String>,
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
    pub(crate) shared: Weak<Shared>,
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
        let now = Now::read();
        if self.passed(&until, &now) {
            return Some(Duration::ZERO);
        }
        Some(until.remaining(&now))
    }

    /// Whether `until` has passed: through the member's sticky check while it exists.
    fn passed(&self, until: &Deadline, now: &Now) -> bool {
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
            let now = Now::read();
            if self.passed(&until, &now) || self.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep_until(until.wake_at(&now)) => {}
                changed = valid_until.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
