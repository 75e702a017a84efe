//! The member's task: heartbeats, rebalancing, drains, the local deadline, and the graceful leave.
//!
//! One loop, one store call at a time. Every call is cut off at the local lease deadline, so the
//! deadline (S3) is honoured even while the store hangs: the loop gives everything up the moment
//! it passes, before the store could expire the session and grant the buckets to anyone else.
//!
//! # The state, and how it moves
//! - [`Session`] (`session.rs`): `Registering { nonce, previous, retry_at }` or
//!   `Live { session, deadline, renew_at }`. The deadline lives there only; `publish` derives
//!   what the user's handle and the lease handles read from it.
//! - The ledger (`ledger.rs`, in the shared `Local`): each held bucket `Owned` or
//!   `Draining { until }`. Its methods decide and return the events; the driver applies them
//!   through `Shared::apply`, which emits them under the ledger lock.
//! - Timers: `rebalance` (`Some(at)` while a rebalance step is wanted), `release_retry_at`, and
//!   the subscription (`Active`, or `Down { retry_at }`).
//!
//! Each turn of [`Driver::run`] does, in order, what is due:
//! 1. the deadline passed → `lose` (`Live` → `Registering`, every owned bucket `Lost`);
//! 2. the subscription is down and its retry is due → `subscribe`;
//! 3. the session's call is due → `heartbeat` (`Live`) or `reregister` (`Registering`);
//! 4. draining buckets are ready → `release_drained`;
//! 5. a rebalance step is wanted and due → `rebalance`: one store step, `apply_step` carries out
//!    its action, and `reconcile` compares the store's counts with the ledger (a mismatch means
//!    a lost reply: `resync` reads the owner records, or the missed release is revoked);
//!
//! then sleeps until the next of these is due, a notice arrives, a lease handle is dropped, or
//! the user asks to shut down (`leave`) or aborts.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, Jitter};
use crate::config::Config;
use crate::error::Error;
use crate::event::{Deadline, LostReason, Sent};
use crate::ledger::Reconcile;
use crate::member::{ErrorHook, Shared};
use crate::metrics::Metrics;
use crate::session::Session;
use crate::store::{
    Action, Channel, GroupKey, Notice, Notifications, RegisterRequest, Registration, SessionRef,
    Store,
};

/// The spread of renewal intervals, drawn per renewal around the configured one (±5%), so a
/// fleet started together does not renew in bursts of n calls for as long as it runs, and
/// still renews once per interval on average.
const RENEW_JITTER: f64 = 0.1;
/// The longest a member waits for a grant notice that a reply's counts show is on its way,
/// before it reads its holdings from the store instead (a tenth of the heartbeat if shorter).
const GRANT_NOTICE_WAIT: Duration = Duration::from_millis(20);

/// The most buckets one rebalance step takes; bounds the time a script runs.
const MAX_TAKE: u32 = 4096;

/// The change notices from the store.
enum Subscription {
    Active(Notifications),
    /// Broken or never made: changes are learnt by polling until it is made again at `retry_at`.
    Down {
        retry_at: Instant,
    },
}

pub(crate) struct Driver<S> {
    store: S,
    config: Arc<Config>,
    group: GroupKey,
    shared: Arc<Shared>,
    on_error: Option<ErrorHook>,
    /// Cancelled by `shutdown()` (and by an abort: it is the abort's child). The running loop's
    /// store calls stop on it, so a shutdown never waits for a call in flight.
    graceful: CancellationToken,
    /// Cancelled by an abort (the handle dropped). The leave's calls stop only on this one.
    abort: CancellationToken,
    /// Simulations only: freezes the task, as a stopped process (see `Member::freeze`).
    freeze: tokio::sync::mpsc::UnboundedReceiver<Duration>,

    session: Session,
    /// When the next rebalance step is due; `None` while the member holds its share.
    rebalance: Option<Instant>,
    /// Paces the retries of a failed release.
    release_retry_at: Instant,
    subscription: Subscription,
    /// Paces the retries of failed calls, per kind of call (`backoff.rs`).
    retries: Retries,
    /// Draws the retries' jitter; seeded per member so a simulation replays.
    jitter: Jitter,
    /// Store errors logged once per change, then summarized (`logs.rs`). A std mutex:
    /// `report` takes `&self`, and nothing awaits while it is held.
    error_log: std::sync::Mutex<crate::logs::ErrorLog>,
    /// Since when a rebalance is under way (a notice, a registration, or a heartbeat asked
    /// for a step), for its duration metric; `None` while balanced.
    rebalancing_since: Option<Instant>,
    /// When the group's quarantine ends, from the last `Wait` step (`None` once granting).
    quarantine_until: Option<Instant>,
}

/// Writes a line of [`crate::logs::ErrorLog`].
fn log_line(line: crate::logs::Line) {
    match line {
        crate::logs::Line::Began(l) | crate::logs::Line::Lasts(l) => tracing::warn!("{l}"),
        crate::logs::Line::Ended(l) => tracing::info!("{l}"),
    }
}

/// One backoff per kind of store call: a failing kind slows down without slowing the others,
/// and a success resets only its own.
struct Retries {
    register: Backoff,
    heartbeat: Backoff,
    /// The rebalance step, and the resync it may need.
    rebalance: Backoff,
    release: Backoff,
    subscribe: Backoff,
}

impl Retries {
    /// The first retry comes a quarter heartbeat after a failure (the fixed delay this replaced)
    /// or later, and none later than a heartbeat: the pace polling keeps anyway, and what the
    /// lease deadline leaves time for (heartbeat retries are also cut by the deadline, see
    /// `Driver::heartbeat_retry_at`). A resubscription starts at the heartbeat, as before, and
    /// may wait up to four: polling covers the gap, and each attempt may cost Redis a connection.
    /// A registration may wait up to half the ttl: no lease waits on it (a lost session's
    /// buckets go to the peers when it expires), and it is what a whole fleet retries at once
    /// after Redis comes back or when it starts together.
    fn new(config: &Config) -> Self {
        let base = (config.heartbeat / 4).max(Duration::from_millis(5));
        let calls = Backoff::new(base, config.heartbeat);
        Retries {
            register: Backoff::new(base, (config.ttl / 2).max(config.heartbeat)),
            heartbeat: calls.clone(),
            rebalance: calls.clone(),
            release: calls,
            subscribe: Backoff::new(config.heartbeat, config.heartbeat * 4),
        }
    }
}

impl<S: Store> Driver<S> {
    pub(crate) fn new(
        store: S,
        config: Arc<Config>,
        shared: Arc<Shared>,
        on_error: Option<ErrorHook>,
        graceful: CancellationToken,
        abort: CancellationToken,
        freeze: tokio::sync::mpsc::UnboundedReceiver<Duration>,
    ) -> Self {
        let now = Instant::now();
        let jitter = Jitter::new(Jitter::seed_from(&[
            &config.prefix,
            &config.group,
            &config.member_id,
        ]));
        Driver {
            retries: Retries::new(&config),
            jitter,
            error_log: std::sync::Mutex::default(),
            store,
            group: GroupKey::new(config.prefix.clone(), config.group.clone()),
            config,
            shared,
            on_error,
            graceful,
            abort,
            freeze,
            session: Session::new(now),
            rebalance: Some(now),
            release_retry_at: now,
            subscription: Subscription::Down { retry_at: now },
            rebalancing_since: None,
            quarantine_until: None,
        }
    }

    /// The first registration, done before `start` returns so configuration and connection
    /// errors reach the caller. A timeout or an unavailable store (a briefly busy Redis, a
    /// thousand members starting at once) is retried with backoff until the start timeout,
    /// then fails with `StartTimeout` and the last error; other errors fail at once. Waits once
    /// for another session of the same id to expire (a crashed process restarted); fails if
    /// that session was renewed meanwhile (a live duplicate), or would outlast two ttls.
    pub(crate) async fn join(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        let start_by = started + self.config.start_timeout;
        let give_up = started + self.config.ttl * 2;
        // Cut at the start timeout: a subscription not made here is retried by the loop.
        let _ = tokio::time::timeout_at(start_by, self.subscribe()).await;
        let mut waited = None;
        loop {
            let deadline = self.call_deadline().min(start_by);
            let outcome = match self.register(deadline).await {
                Ok(outcome) => outcome,
                // It may have run: retry with the same nonce, which finds it instead of leaving
                // a session nobody heartbeats behind.
                Err(e) if e.is_transient() => {
                    let retry_at = Instant::now() + self.retries.register.next(&mut self.jitter);
                    tokio::time::sleep_until(retry_at.min(start_by)).await;
                    if Instant::now() >= start_by {
                        return Err(Error::StartTimeout {
                            after: self.config.start_timeout,
                            last: Box::new(e),
                        });
                    }
                    self.report(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.retries.register.reset();
            match outcome {
                None => return Ok(()),
                Some(expires_in) => {
                    let err = self.id_in_use(expires_in);
                    // After waiting out the expiry we saw, a session still there with more than
                    // clock-drift slack left was renewed: a live process holds the id. Fail
                    // now rather than wait for a session that will not end.
                    let renewed = waited.is_some_and(|w: Duration| {
                        expires_in
                            > w.mul_f64(2.0 * self.config.max_clock_drift) + self.retry_delay()
                    });
                    if renewed || Instant::now() + expires_in > give_up {
                        return Err(err);
                    }
                    if waited.is_none() {
                        // Not an error yet (a restart after a crash looks like this): one line.
                        tracing::info!(
                            ?expires_in,
                            "member id held by an earlier session; waiting for it to expire"
                        );
                    }
                    waited = Some(expires_in);
                    tokio::time::sleep(expires_in + Duration::from_millis(1)).await;
                }
            }
        }
    }

    /// Another live session holds our id; it expires in `expires_in`.
    fn id_in_use(&self, expires_in: Duration) -> Error {
        Error::IdInUse {
            group: self.config.group.clone(),
            member: self.config.member_id.clone(),
            expires_in,
        }
    }

    /// Whether the live session's lease deadline has passed at `now` (sticky once seen, see
    /// `Shared::deadline_passed`). False while registering.
    fn deadline_passed(&self, now: Instant) -> bool {
        self.session
            .deadline()
            .is_some_and(|until| self.shared.deadline_passed(&until, now))
    }

    pub(crate) async fn run(mut self) -> Result<(), Error> {
        loop {
            let now = Instant::now();
            if self.deadline_passed(now) {
                // `lose` dates it at the deadline.
                self.lose(LostReason::Deadline, now);
            }
            if matches!(self.subscription, Subscription::Down { retry_at } if now >= retry_at) {
                self.subscribe().await;
            }
            if now >= self.session.due() {
                if self.session.live().is_some() {
                    self.heartbeat().await;
                } else {
                    self.reregister().await;
                }
            }
            self.release_drained().await;
            if self.session.live().is_some()
                && self.rebalance.is_some_and(|at| Instant::now() >= at)
            {
                self.rebalance().await;
            }
            self.observe();

            let wake = self.next_wake();
            let dropped = Arc::clone(&self.shared.dropped);
            tokio::select! {
                biased;
                () = self.abort.cancelled() => {
                    self.drop_local();
                    return Ok(());
                }
                () = self.graceful.cancelled() => return self.leave().await,
                Some(frozen) = self.freeze.recv() => {
                    // Before the timers, which may always be due: a freeze is never starved.
                    // Nothing runs, not even the deadline check: a stopped process. The user's
                    // side still checks the deadline itself.
                    tokio::select! {
                        () = self.abort.cancelled() => {
                            self.drop_local();
                            return Ok(());
                        }
                        () = tokio::time::sleep(frozen) => {}
                    }
                }
                notice = next_notice(&mut self.subscription) => self.on_notice(notice),
                () = dropped.notified() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// The metrics read at the end of each turn of the loop: the time left to the deadline
    /// and in the quarantine, and the end of a rebalance (no step wanted, nothing draining).
    fn observe(&mut self) {
        let now = Instant::now();
        let lease = self.session.deadline().map_or(Duration::ZERO, |until| {
            until.at.saturating_duration_since(now)
        });
        let quarantine = self
            .quarantine_until
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        self.shared.metrics.remaining(lease, quarantine);
        let Some(since) = self.rebalancing_since else {
            return;
        };
        if self.session.live().is_none() {
            // Lost: the next registration starts another.
            self.rebalancing_since = None;
        } else if self.rebalance.is_none() && self.shared.lock().ledger.draining_count() == 0 {
            self.shared
                .metrics
                .rebalanced(now.saturating_duration_since(since));
            self.rebalancing_since = None;
        }
    }

    /// A rebalance begins now, unless one is under way (for its duration metric).
    fn rebalancing(&mut self, now: Instant) {
        // Nothing balances before grants begin: the quarantine has its own gauge.
        if self.quarantine_until.is_some_and(|at| at > now) {
            return;
        }
        self.rebalancing_since.get_or_insert(now);
    }

    /// A notice from the subscription (`None`: it ended): a grant is applied if it is ours
    /// ([`Driver::granted`]); anything else, or a grant that is not, asks for a rebalance step.
    fn on_notice(&mut self, notice: Option<Notice>) {
        let now = Instant::now();
        let applied = match &notice {
            Some(Notice::Granted {
                session,
                token,
                buckets,
            }) => self.granted(session, *token, buckets, now),
            _ => false,
        };
        self.rebalancing(now);
        if !applied {
            self.rebalance = Some(self.rebalance.map_or(now, |at| at.min(now)));
        }
        if notice.is_none() {
            // The subscription broke: notices may be lost, so resync and resubscribe.
            tracing::debug!("notification stream ended; resubscribing");
            self.subscription = Subscription::Down {
                retry_at: now + self.retry_delay(),
            };
            self.poll_soon();
        }
    }

    /// Takes in the notices that have already come (without waiting): a reply can come before
    /// a grant notice that was published before the call ran (another connection), and its
    /// counts include that grant.
    fn absorb_notices(&mut self) {
        while let Subscription::Active(n) = &mut self.subscription {
            match n.next().now_or_never() {
                Some(notice) => self.on_notice(notice),
                None => return,
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = self.session.due();
        if let Some(until) = self.session.deadline() {
            wake = wake.min(until.wake_at(now));
        }
        if let (Some(_), Some(at)) = (self.session.live(), self.rebalance) {
            wake = wake.min(at);
        }
        if let Subscription::Down { retry_at } = self.subscription {
            wake = wake.min(retry_at);
        }
        if let Some(at) = self
            .shared
            .lock()
            .ledger
            .next_release(self.release_retry_at)
        {
            wake = wake.min(at);
        }
        wake
    }

    /// When to call the store after a successful heartbeat sent at `sent`: a renewal interval
    /// (± [`RENEW_JITTER`] / 2) after its reply, or the heartbeat while notifications
    /// are down (polling), or just after the earliest expiry of the sessions this member
    /// watches (`next_expiry` after the store's now, which came after `sent`, stretched by the
    /// clock-drift allowance so it lands after it) when the renewal would come more than a
    /// heartbeat after it. A crashed peer is purged at that check or that renewal, so its
    /// buckets move within a heartbeat of its session ending (L1), while a healthy group sees
    /// one call per member per renewal interval, spread out: members started together (pods of
    /// one deployment) would otherwise renew together, in bursts of n calls, for as long as
    /// they run.
    fn next_check(&mut self, sent: Instant, next_expiry: Option<Duration>) -> Instant {
        let period = match self.subscription {
            Subscription::Active(_) => self.config.effective_renew_interval(),
            Subscription::Down { .. } => self.config.heartbeat,
        };
        let period = period.mul_f64(1.0 + RENEW_JITTER * (self.jitter.fraction() - 0.5));
        // Paced from the reply, not the send: a Redis that answers slowly is called less often
        // (closed loop), down to the latest renewal that still leaves a retry before the lease
        // deadline, which counts from the send.
        let latest = sent + self.on_my_clock(self.config.latest_renewal().max(period));
        let mut at = (Instant::now() + self.on_my_clock(period)).min(latest);
        if let Some(d) = next_expiry {
            // Measured on our clock, which may run fast by up to the drift: wait that much
            // longer so the check lands after the expiry.
            let wait = d.mul_f64(1.0 + self.config.max_clock_drift) + Duration::from_millis(1);
            let check = Instant::now() + self.on_my_clock(wait);
            // A renewal due within a heartbeat after that expiry purges it too (L1 allows a
            // heartbeat): no extra call. A peer whose renewal a slow Redis delayed past our
            // renewal is the common case of an "early" expiry, and checking it would add calls
            // exactly when Redis can least take them.
            if at > check + self.on_my_clock(self.config.heartbeat) {
                at = check;
            }
        }
        at
    }

    /// How far ahead a heartbeat looks for the expiry of the sessions this member watches: a
    /// watched session that ends later than this ends when `next_check` would not check it
    /// anyway (the renewal, at most a period (+ jitter) away, comes within a heartbeat of it),
    /// so the store need not look them up (a healthy group's steady state). The renewal
    /// interval, never shorter than the heartbeat (the polling period while notifications are
    /// down, which may happen during the call), is the longer period.
    fn watch(&self) -> Duration {
        let period = self
            .config
            .effective_renew_interval()
            .mul_f64(1.0 + RENEW_JITTER / 2.0);
        period.saturating_sub(self.config.heartbeat)
    }

    /// Without notifications, changes are learnt by polling: the next call comes within a
    /// heartbeat (and `next_check` keeps that pace until the stream is back).
    fn poll_soon(&mut self) {
        let poll = Instant::now() + self.on_my_clock(self.config.heartbeat);
        self.session.due_by(poll);
    }

    /// A rebalance step is wanted: now, unless one is already planned.
    fn want_rebalance(&mut self) {
        let now = Instant::now();
        self.rebalance.get_or_insert(now);
        self.rebalancing(now);
    }

    /// Real time that `d` of this member's clock takes (see `Config::clock_rate`).
    fn on_my_clock(&self, d: Duration) -> Duration {
        d.div_f64(self.config.clock_rate)
    }

    /// A quarter heartbeat: the first resubscription after the stream broke (not a failed
    /// call: failed calls are paced by `retries`), and the slack of the id-in-use check.
    fn retry_delay(&self) -> Duration {
        (self.config.heartbeat / 4).max(Duration::from_millis(5))
    }

    /// The deadline of a store call starting now: the call timeout, and never past the local
    /// lease deadline.
    fn call_deadline(&self) -> Instant {
        let now = Instant::now();
        let deadline = now + self.config.effective_call_timeout();
        match self.session.deadline() {
            Some(until) => deadline.min(until.wake_at(now)),
            None => deadline,
        }
    }

    fn report(&self, error: Error) {
        if self.abort.is_cancelled() || matches!(error, Error::Shutdown) {
            // Aborted, or a call dropped on purpose for the shutdown (`call` returns
            // `Error::Shutdown`): nobody waits for it any more. Not an error to report.
            tracing::debug!(error = %error, "after the abort");
            return;
        }
        let lines = self
            .error_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed(&error, Instant::now());
        for line in lines {
            log_line(line);
        }
        tracing::debug!(error = %error, "store call failed");
        {
            let mut local = self.shared.lock();
            local.errors += 1;
            local.last_error = Some(error.to_string());
        }
        if let Some(hook) = &self.on_error {
            hook(&error);
        }
    }

    /// Derives what the handles read from the session: the deadline (which lease handles
    /// watch), and the session nonce for the status. `renewed` is the send time and the
    /// membership version of the heartbeat or registration that just succeeded, if one did.
    fn publish(&self, renewed: Option<(Instant, u64)>) {
        // The deadline first: a reader that sees the ledger and a deadline sees a deadline at
        // least as old as the ledger's session.
        self.shared
            .valid_until
            .send_replace(self.session.deadline());
        if renewed.is_some() {
            let ended = self
                .error_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .succeeded(Instant::now());
            if let Some(line) = ended {
                log_line(line);
            }
        }
        let mut local = self.shared.lock();
        local.session = self.session.live().map(|s| s.session.clone());
        if let Some((sent, version)) = renewed {
            local.last_heartbeat = Some(sent);
            local.version = version;
        }
    }

    /// The lease deadline after a successful heartbeat or registration sent at `sent`.
    fn deadline_after(&self, sent: Sent) -> Deadline {
        Deadline::after(sent, self.on_my_clock(self.config.lease_validity()))
    }

    async fn subscribe(&mut self) {
        match call(
            &self.graceful,
            &self.shared.metrics,
            self.call_deadline(),
            "subscribe",
            self.store
                .subscribe(&self.group, Channel::Member(&self.config.member_id)),
        )
        .await
        {
            Ok(notifications) => {
                self.retries.subscribe.reset();
                self.subscription = Subscription::Active(notifications);
            }
            Err(e) => {
                self.report(e);
                let delay = self.retries.subscribe.next(&mut self.jitter);
                self.subscription = Subscription::Down {
                    retry_at: Instant::now() + self.on_my_clock(delay),
                };
                self.poll_soon();
            }
        }
    }

    /// One registration attempt: `Ok(None)` when registered, `Ok(Some(expires_in))` when another
    /// live session holds the id.
    async fn register(&mut self, deadline: Instant) -> Result<Option<Duration>, Error> {
        let Some((session, previous)) = self.session.request(&self.config.member_id) else {
            return Ok(None);
        };
        let mut req = RegisterRequest::new(
            session.clone(),
            self.config.weight,
            self.config.buckets,
            self.config.ttl,
        );
        req.replaces = previous;
        // Every clock is read as the request goes out (S3 under host suspend, `Sent`).
        let sent = Sent::now();
        match call(
            &self.graceful,
            &self.shared.metrics,
            deadline,
            "register",
            self.store.register(&self.group, &req),
        )
        .await?
        {
            Registration::Registered { version, token } => {
                tracing::info!(session = %session.session, "registered");
                // Grant notices at or below the group's token at this registration were for an
                // earlier session under this nonce: never ours.
                self.shared.lock().ledger.seen_token(token);
                // The first heartbeat comes soon: it learns when the peers' sessions expire.
                let renew_at = sent.at + self.on_my_clock(self.config.heartbeat);
                let deadline = self.deadline_after(sent);
                self.session
                    .registered(&self.config.member_id, deadline, renew_at);
                self.shared.forget_expiry();
                self.publish(Some((sent.at, version)));
                self.rebalance = Some(Instant::now());
                self.rebalancing(Instant::now());
                Ok(None)
            }
            Registration::InUse { expires_in } => Ok(Some(expires_in)),
        }
    }

    /// Registration after a lost session, from the loop: errors are reported and retried.
    async fn reregister(&mut self) {
        let result = self.register(self.call_deadline()).await;
        if result.is_ok() {
            self.retries.register.reset();
        }
        match result {
            Ok(None) => {}
            Ok(Some(expires_in)) => {
                self.report(self.id_in_use(expires_in));
                self.session.retry_at(
                    Instant::now()
                        + expires_in.min(self.config.heartbeat)
                        + Duration::from_millis(1),
                );
            }
            Err(e) => {
                self.report(e);
                let delay = self.retries.register.next(&mut self.jitter);
                self.session.retry_at(Instant::now() + delay);
            }
        }
    }

    async fn heartbeat(&mut self) {
        let Some(session) = self.session.live().cloned() else {
            return;
        };
        // Every clock is read as the request goes out (S3 under host suspend, `Sent`).
        let sent = Sent::now();
        let result = call(
            &self.graceful,
            &self.shared.metrics,
            self.call_deadline(),
            "heartbeat",
            self.store
                .heartbeat(&self.group, &session, self.config.ttl, self.watch()),
        )
        .await;
        let now = Instant::now();
        if result.is_ok() {
            self.retries.heartbeat.reset();
        }
        match result {
            Ok(reply) if reply.alive && self.deadline_passed(now) => {
                // The session is alive, but the reply came after our deadline: the leases have
                // ended already (handles were told), and must not come back to life.
                let until = self.session.deadline().map_or(sent.at, |u| u.at);
                self.lose(LostReason::Deadline, until);
                self.session.retry_at(Instant::now());
            }
            Ok(reply) if reply.alive => {
                self.shared.metrics.seen(None, reply.members);
                let until = self.deadline_after(sent);
                let next = self.next_check(sent.at, reply.next_expiry);
                self.session.renewed(until, next);
                self.publish(Some((sent.at, reply.version)));
                self.absorb_notices();
                // The safety net under the wake-ups (the store wakes only the members that must
                // act, and a wake-up can be lost): free buckets to take, or counts that say the
                // store committed a release for us (a join) that we have not made.
                let counts = self
                    .shared
                    .lock()
                    .ledger
                    .reconcile(reply.held as usize, reply.committed as usize);
                if reply.free > 0 || counts != Reconcile::InSync {
                    self.want_rebalance();
                }
            }
            Ok(_) => {
                tracing::warn!("the store no longer knows our session");
                self.session_gone(now);
            }
            Err(e) => {
                self.report(e);
                let at = self.heartbeat_retry_at(Instant::now());
                self.session.retry_at(at);
            }
        }
    }

    /// When to retry a failed heartbeat: after the backoff, but never so late that no full call
    /// fits before the lease deadline (S3 keeps its retries). Within that last call timeout,
    /// at the backoff's base pace: each call there is cut at the deadline anyway.
    fn heartbeat_retry_at(&mut self, now: Instant) -> Instant {
        let at = now + self.retries.heartbeat.next(&mut self.jitter);
        let Some(until) = self.session.deadline() else {
            return at;
        };
        let latest = until
            .wake_at(now)
            .checked_sub(self.config.effective_call_timeout())
            .filter(|&latest| latest > now)
            .unwrap_or(now + self.retries.heartbeat.base());
        at.min(latest)
    }

    /// The store no longer knows the session: everything is lost; register again at once.
    fn session_gone(&mut self, now: Instant) {
        self.lose(LostReason::SessionExpired, now);
        self.session.retry_at(now);
    }

    /// One rebalance step: the store call, then its action (`apply_step`), then the count check
    /// (`reconcile`).
    async fn rebalance(&mut self) {
        let Some(session) = self.session.live().cloned() else {
            return;
        };
        // This step answers every request so far; a notice heard from now on asks again (one
        // taken in right after the reply, below, is not overwritten by the step's action).
        self.rebalance = None;
        let result = call(
            &self.graceful,
            &self.shared.metrics,
            self.call_deadline(),
            "rebalance",
            self.store.rebalance(&self.group, &session, MAX_TAKE),
        )
        .await;
        let reply = match result {
            Ok(reply) => {
                self.retries.rebalance.reset();
                reply
            }
            Err(e) => {
                self.report(e);
                self.rebalance =
                    Some(Instant::now() + self.retries.rebalance.next(&mut self.jitter));
                return;
            }
        };
        if reply.action != Action::SessionLost {
            self.shared.metrics.seen(Some(reply.share.1), reply.members);
        }
        {
            let mut local = self.shared.lock();
            local.share = reply.share;
            local.version = reply.version;
        }
        // Grants published before this step ran are in its counts: take them in first.
        self.absorb_notices();
        let now = Instant::now();
        // After a grant in the reply, a grant notice published before the step has a lower
        // token and would be dropped: no use waiting for one.
        let wait = !matches!(reply.action, Action::Acquired { .. });
        if self.apply_step(reply.action, now) {
            self.reconcile(reply.held as usize, reply.committed as usize, now, wait)
                .await;
        }
    }

    /// Carries out a rebalance step's action. Returns whether the session is still live, so
    /// that the store's counts can be compared with the ledger.
    fn apply_step(&mut self, action: Action, now: Instant) -> bool {
        if !matches!(action, Action::SessionLost)
            && (self.session.live().is_none() || self.deadline_passed(now))
        {
            // The reply came back after our deadline (a slow store, or this task ran late): the
            // session may be gone already, and our leases ended at the deadline. Claim nothing
            // (a new session frees any grant here when it replaces this one), and revoke nothing
            // now: a revoke dated after the deadline would claim ownership we no longer had.
            self.lose(LostReason::Deadline, now);
            return false;
        }
        match action {
            Action::Acquired { buckets, token } => {
                self.quarantine_until = None;
                // A step takes all the rule allows, up to MAX_TAKE: step again only when that
                // cap cut it short. Otherwise the member is at its share or took every free
                // bucket; a later change that lets it take more wakes it (or its heartbeat sees
                // free buckets). One call per taker, not a second one that answers Stay.
                if buckets.len() >= MAX_TAKE as usize {
                    self.want_rebalance();
                }
                self.shared.apply(|l| l.grant(&buckets, token, now));
            }
            Action::Release(count) => {
                self.quarantine_until = None;
                self.revoke(Some(count as usize), now + self.config.drain_timeout);
            }
            Action::Stay => self.quarantine_until = None,
            // Capped: a store clock stepped backwards must not stall grants for longer.
            Action::Wait(wait) => {
                let at = now + wait.min(self.config.ttl);
                self.rebalance = Some(at);
                self.quarantine_until = Some(at);
                self.rebalancing_since = None;
                // The status tells why nothing is owned yet.
                self.shared.lock().grants_at = Some(at);
            }
            Action::SessionLost => {
                self.session_gone(now);
                return false;
            }
        }
        true
    }

    /// A grant the store made when it freed buckets ([`Notice::Granted`]): applied when it
    /// names our live session, our deadline has not passed, and its token is above every token
    /// we applied (a repeated or late notice is not: its buckets may have been released since).
    /// Returns false otherwise, and the caller takes a rebalance step, whose reply shows any
    /// difference (a grant we dropped because a newer one overtook it is then found and resynced).
    fn granted(&mut self, session: &str, token: u64, buckets: &[u32], now: Instant) -> bool {
        let ours = self.session.live().is_some_and(|s| s.session == session);
        if !ours || self.deadline_passed(now) || !self.shared.lock().ledger.is_new_grant(token) {
            return false;
        }
        // Odd contents (a bucket out of range, one named twice: not from our scripts) are not
        // applied either; the step that follows finds what the store holds.
        let mut sorted = buckets.to_vec();
        sorted.sort_unstable();
        let distinct = sorted.windows(2).all(|w| w[0] < w[1]);
        if !distinct || sorted.last().is_some_and(|b| *b >= self.config.buckets) {
            return false;
        }
        self.shared.apply(|l| l.grant(buckets, token, now));
        true
    }

    /// The store's count of what we hold and keep must match ours; if not, an earlier reply was
    /// lost: a release decision we never heard of (revoke now), or a grant or a release (resync).
    async fn reconcile(&mut self, store_held: usize, committed: usize, now: Instant, wait: bool) {
        let mut verdict = self.shared.lock().ledger.reconcile(store_held, committed);
        // More held than we know: most likely a grant notice still on its way (published
        // before the step ran, on another connection). Wait a little for it before a round
        // trip to read our holdings.
        let until = Instant::now() + (self.config.heartbeat / 10).min(GRANT_NOTICE_WAIT);
        while wait
            && verdict == Reconcile::Resync
            && self.shared.lock().ledger.held_count() < store_held
            && matches!(self.subscription, Subscription::Active(_))
        {
            match tokio::time::timeout_at(until, next_notice(&mut self.subscription)).await {
                Ok(notice) => self.on_notice(notice),
                Err(_) => break,
            }
            verdict = self.shared.lock().ledger.reconcile(store_held, committed);
        }
        let now = now.max(Instant::now());
        let surplus = match verdict {
            Reconcile::InSync => 0,
            Reconcile::Revoke(n) => n,
            Reconcile::Resync => {
                tracing::info!(store_held, "holdings differ from the store's; resyncing");
                // The committed count read with the holdings, not the reply's: the store may
                // have granted us more since the reply (a grant notice not yet heard), or a join
                // may have lowered it, and the holdings' owner records are as of then too.
                let Some(committed) = self.resync().await else {
                    return;
                };
                if self.session.live().is_none() {
                    return;
                }
                self.shared.lock().ledger.surplus(committed)
            }
        };
        if surplus > 0 {
            tracing::info!(surplus, committed, "the store expects a release we missed");
            self.revoke(Some(surplus), now + self.config.drain_timeout);
        }
    }

    /// Aligns the ledger with the store's owner records after a lost reply: adopts grants we did
    /// not hear of (they are ours, and our deadline has not passed), and drops buckets the store
    /// no longer lists as ours (a release that ran, or foreign edits). Returns the store's
    /// committed count of ours, read with the same records, when the ledger was aligned. It
    /// reads only our own buckets ([`Store::holdings`]), not the group's snapshot.
    async fn resync(&mut self) -> Option<usize> {
        let session = self.session.live().cloned()?;
        let holdings = match call(
            &self.graceful,
            &self.shared.metrics,
            self.call_deadline(),
            "holdings",
            self.store.holdings(&self.group, &session),
        )
        .await
        {
            Ok(Some(holdings)) => holdings,
            // The session ended in the store, or the group is gone or stale (written by another
            // Redis process: its owners may be out of date, and the next registration
            // re-creates it).
            Ok(None) => {
                self.session_gone(Instant::now());
                return None;
            }
            Err(e) => {
                // Try again: the next rebalance reply shows the mismatch again.
                self.report(e);
                self.rebalance =
                    Some(Instant::now() + self.retries.rebalance.next(&mut self.jitter));
                return None;
            }
        };
        let now = Instant::now();
        if self.session.live().is_none() || self.deadline_passed(now) {
            return None;
        }
        self.shared.apply(|l| l.adopt(&holdings.owned, now));
        self.want_rebalance();
        Some(holdings.committed as usize)
    }

    /// Revokes `count` owned buckets (all if `None`): the most recently granted first.
    fn revoke(&mut self, count: Option<usize>, drain_until: Instant) {
        let now = Instant::now();
        self.shared.apply(|l| l.revoke(count, drain_until, now));
    }

    /// Releases revoked buckets whose handles are gone or whose drain time is over.
    async fn release_drained(&mut self) {
        let now = Instant::now();
        if now < self.release_retry_at {
            return;
        }
        let Some(session) = self.session.live().cloned() else {
            return;
        };
        let (buckets, known) = {
            let mut local = self.shared.lock();
            let buckets = local.ledger.releasable(now);
            for (took, timed_out) in local.ledger.drain_ends(&buckets, now) {
                self.shared.metrics.drained(took, timed_out);
            }
            (
                local.ledger.begin_release(Some(now)),
                local.ledger.highest_token(),
            )
        };
        if buckets.is_empty() {
            return;
        }
        match call(
            &self.graceful,
            &self.shared.metrics,
            self.call_deadline(),
            "release",
            self.store.release(&self.group, &session, &buckets, known),
        )
        .await
        {
            Ok(freed) => {
                self.retries.release.reset();
                self.shared
                    .apply(|l| l.released(&buckets, freed, Instant::now()));
                if (freed as usize) < buckets.len() {
                    // Some were no longer ours: an earlier release ran unheard. Lost replies can
                    // offset each other in the counts the rebalance check compares (a grant we
                    // never heard of hidden by this release), so compare the buckets themselves.
                    let asked = buckets.len();
                    tracing::info!(asked, freed, "a release freed fewer than asked; resyncing");
                    self.resync().await;
                }
            }
            Err(e) => {
                // No drain extension from now on (`Ledger::begin_release`): the release may
                // have run unheard.
                self.report(e);
                self.release_retry_at =
                    Instant::now() + self.retries.release.next(&mut self.jitter);
            }
        }
    }

    /// Gives up every lease at `at` without the store: the deadline passed or the session is gone.
    /// `Live` → `Registering`.
    fn lose(&mut self, reason: LostReason, at: Instant) {
        // Ownership ended at the lease deadline at the latest (S3). A reply handled after it
        // (the store said the session is gone, but this task ran late, e.g. on a starved CPU)
        // must not date the end later: a timeline built from the events would show two owners.
        let at = self.session.deadline().map_or(at, |until| at.min(until.at));
        let ended = self.session.end();
        self.publish(None);
        let count = self.shared.apply(|l| l.lose_all(reason, at));
        if ended.is_some() {
            tracing::warn!(%reason, buckets = count, "lost the session");
        }
        self.want_rebalance();
    }

    /// On abort: cancel every handle, tell nobody (it is a crash from the group's view).
    fn drop_local(&mut self) {
        self.session.end();
        self.publish(None);
        self.shared.apply(|l| {
            l.drop_all();
            Vec::new()
        });
    }

    /// The graceful leave: revoke all, drain, release, deregister. It ends by the shutdown's
    /// budget (`Local::shutdown_by`, which `Member::shutdown` waits for) even when the store does
    /// not answer: the drain is cut at the budget and the lease deadline, and the release and the
    /// deregistration each take at most the call timeout. Every revoked bucket ends: `Released`
    /// for what the store freed, `Lost` for the rest.
    async fn leave(mut self) -> Result<(), Error> {
        let now = Instant::now();
        let give_up = self
            .shared
            .lock()
            .shutdown_by
            .unwrap_or(now + self.config.shutdown_timeout);
        if self.deadline_passed(now) {
            self.lose(LostReason::Deadline, now);
        }
        let Some(session) = self.session.live().cloned() else {
            self.drop_local();
            return self.deregister_leftovers(give_up).await;
        };
        // The drain ends early enough to leave the release and the deregistration their call
        // timeouts within the budget: a short budget shortens the drain, not the calls (a
        // release cut to nothing ends every bucket `Lost` and leaves them idle for a ttl).
        let calls = self.config.effective_call_timeout() * 2;
        let mut drain_until = (now + self.config.drain_timeout)
            .min(give_up.checked_sub(calls).unwrap_or(now))
            .max(now);
        if let Some(until) = self.session.deadline() {
            drain_until = drain_until.min(until.wake_at(now));
        }
        self.revoke(None, drain_until);
        let dropped = Arc::clone(&self.shared.dropped);
        loop {
            let waiting = self.shared.lock().ledger.draining_has_handles();
            if !waiting || Instant::now() >= drain_until {
                break;
            }
            tokio::select! {
                () = self.abort.cancelled() => {
                    self.drop_local();
                    return Ok(());
                }
                () = dropped.notified() => {}
                () = tokio::time::sleep_until(drain_until) => {}
            }
        }
        let mut first_error = None;
        let buckets = {
            let mut local = self.shared.lock();
            let now = Instant::now();
            for (took, timed_out) in local.ledger.drain_ends(&local.ledger.buckets(), now) {
                self.shared.metrics.drained(took, timed_out);
            }
            local.ledger.begin_release(None)
        };
        if !buckets.is_empty() {
            // Release and deregistration in one step: the members that take the buckets are
            // woken with the membership after the leave, a round trip sooner.
            // If a first attempt ran unheard, the second frees nothing and the buckets end
            // `Lost { Disowned }` instead of `Released`.
            let (store, group) = (&self.store, &self.group);
            let timeout = self.config.effective_call_timeout();
            let result = leave_call(
                &self.abort,
                &self.shared.metrics,
                timeout,
                give_up,
                "leave",
                || store.leave(group, &session, &buckets),
            )
            .await;
            match result {
                Ok(freed) => {
                    // Released only what the store freed (issue 8, bug 6).
                    self.shared
                        .apply(|l| l.released(&buckets, freed, Instant::now()));
                    tracing::info!("left the group");
                    self.drop_local();
                    return Ok(());
                }
                Err(Error::Shutdown) => {
                    self.drop_local();
                    return Ok(());
                }
                Err(e) => {
                    // Not confirmed: the store frees them with the session (at the
                    // deregistration below, or when it expires).
                    self.shared
                        .apply(|l| l.lose_all(LostReason::Unreleased, Instant::now()));
                    first_error = Some(e);
                }
            }
        }
        match self.deregister_within(&session, give_up).await {
            Ok(()) => tracing::info!("left the group"),
            Err(Error::Shutdown) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        self.drop_local();
        self.leave_result(first_error)
    }

    /// A leave without a live session: the session ended (its deadline passed, or the store
    /// lost it), or a registration is pending, which may have run (one in flight when the
    /// shutdown dropped it). Without a deregistration the store keeps such a session until it
    /// expires: its buckets idle up to a ttl, it counts in everyone's share, and a restart under
    /// the same id waits for it. So both are deregistered within the budget; deregistering a
    /// session the store does not have does nothing.
    async fn deregister_leftovers(&mut self, give_up: Instant) -> Result<(), Error> {
        let Some((pending, previous)) = self.session.request(&self.config.member_id) else {
            return Ok(());
        };
        let ended = previous.map(|session| SessionRef {
            member: pending.member.clone(),
            session,
        });
        let mut first_error = None;
        for session in ended.iter().chain([&pending]) {
            match self.deregister_within(session, give_up).await {
                Ok(()) => {}
                Err(Error::Shutdown) => return Ok(()),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.leave_result(first_error)
    }

    /// Ends `session` in the store, within the leave's budget; the abort interrupts it. `&mut`
    /// because the driver is not `Sync`: a shared borrow held across the call would make the
    /// task's future not `Send`.
    async fn deregister_within(
        &mut self,
        session: &SessionRef,
        give_up: Instant,
    ) -> Result<(), Error> {
        let (store, group) = (&self.store, &self.group);
        let timeout = self.config.effective_call_timeout();
        leave_call(
            &self.abort,
            &self.shared.metrics,
            timeout,
            give_up,
            "deregister",
            || store.deregister(group, session),
        )
        .await
    }

    /// The leave's outcome: its first error, also reported, or success.
    fn leave_result(&self, first_error: Option<Error>) -> Result<(), Error> {
        match first_error {
            Some(e) => {
                self.report(Error::Unavailable {
                    detail: format!("graceful leave incomplete: {e}"),
                });
                Err(e)
            }
            None => Ok(()),
        }
    }
}

/// Runs one store call until `deadline`; `stop` (the shutdown or the abort) interrupts it with
/// `Error::Shutdown`. A free function so the driver's futures borrow single fields, not the whole
/// (non-`Sync`) driver.
async fn call<T>(
    stop: &CancellationToken,
    metrics: &Metrics,
    deadline: Instant,
    name: &'static str,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let started = Instant::now();
    let result = tokio::select! {
        biased;
        () = stop.cancelled() => Err(Error::Shutdown),
        result = tokio::time::timeout_at(deadline, fut) => match result {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout { call: name, after: deadline.saturating_duration_since(started) }),
        }
    };
    metrics.call(name, started.elapsed(), result.as_ref().err());
    result
}

/// One call of the graceful leave: each attempt within the call timeout and the shutdown budget
/// (`give_up`); `abort` interrupts it. A connection that died while the member was idle (a Redis
/// restart, `CLIENT KILL`) fails the first call at once and reconnects on the next, so an
/// immediate `Unavailable` is tried once more: every call of the leave is safe to repeat.
async fn leave_call<T, Fut>(
    abort: &CancellationToken,
    metrics: &Metrics,
    timeout: Duration,
    give_up: Instant,
    name: &'static str,
    make: impl Fn() -> Fut,
) -> Result<T, Error>
where
    Fut: Future<Output = Result<T, Error>>,
{
    let deadline = || (Instant::now() + timeout).min(give_up);
    let result = call(abort, metrics, deadline(), name, make()).await;
    if !matches!(result, Err(Error::Unavailable { .. })) || Instant::now() >= give_up {
        return result;
    }
    call(abort, metrics, deadline(), name, make()).await
}

async fn next_notice(subscription: &mut Subscription) -> Option<Notice> {
    match subscription {
        Subscription::Active(n) => n.next().await,
        Subscription::Down { .. } => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::event::suspend;
    use crate::store::{HeartbeatReply, Holdings, RebalanceReply};
    use crate::{Event, GroupSnapshot, Member, MemoryStore};

    /// A `MemoryStore` with two faults: a host suspend right after a heartbeat ran in the store
    /// (before its reply is handled), and a store that stops answering (every call hangs).
    #[derive(Clone, Default)]
    struct TestStore {
        inner: MemoryStore,
        /// After the next heartbeat ran: the host sleeps this long, and the store stops
        /// answering.
        suspend_after_heartbeat: Arc<Mutex<Option<Duration>>>,
        /// When the suspended heartbeat was sent, on tokio's clock.
        suspended_heartbeat_sent: Arc<Mutex<Option<Instant>>>,
        hang: Arc<AtomicBool>,
        /// The next release frees its first bucket in a call of its own first, whose reply is
        /// lost: a release that ran unheard. The release itself then frees one fewer.
        release_unheard: Arc<AtomicBool>,
        /// The next release runs in the store, and its reply is lost (an error).
        release_reply_lost: Arc<AtomicBool>,
        /// Calls waiting on the hung store.
        hanging: Arc<AtomicUsize>,
        /// Every call takes this long (ms), as over a network.
        latency_ms: Arc<AtomicUsize>,
        /// Registrations run in the store, then never answer (their reply is lost).
        register_unheard: Arc<AtomicBool>,
        /// Registrations that ran with `register_unheard`.
        registered_unheard: Arc<AtomicUsize>,
        /// Release calls made (counted as they are sent).
        releases_sent: Arc<AtomicUsize>,
        /// The next this many registrations hang (time out), then registrations answer.
        register_hangs: Arc<AtomicUsize>,
        /// Registration calls made (counted as they are sent).
        registers_sent: Arc<AtomicUsize>,
        /// Heartbeat calls made, and when (counted as they are sent).
        heartbeats_sent: Arc<Mutex<Vec<Instant>>>,
        /// The next this many leave calls fail at once, without running (a connection that
        /// died while idle: broken pipe).
        leave_fails: Arc<AtomicUsize>,
    }

    impl TestStore {
        async fn gate(&self) {
            let latency = self.latency_ms.load(Ordering::SeqCst);
            if latency > 0 {
                tokio::time::sleep(Duration::from_millis(latency as u64)).await;
            }
            if self.hang.load(Ordering::SeqCst) {
                self.hanging.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
        }
    }

    impl Store for TestStore {
        async fn register(
            &self,
            group: &GroupKey,
            req: &RegisterRequest,
        ) -> Result<Registration, Error> {
            self.registers_sent.fetch_add(1, Ordering::SeqCst);
            let hang = self
                .register_hangs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if hang {
                std::future::pending::<()>().await;
            }
            self.gate().await;
            if self.register_unheard.load(Ordering::SeqCst) {
                self.inner.register(group, req).await?;
                self.registered_unheard.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            self.inner.register(group, req).await
        }
        async fn heartbeat(
            &self,
            group: &GroupKey,
            session: &SessionRef,
            ttl: Duration,
            watch: Duration,
        ) -> Result<HeartbeatReply, Error> {
            self.heartbeats_sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
            self.gate().await;
            let sent = Instant::now();
            let reply = self.inner.heartbeat(group, session, ttl, watch).await;
            let suspend = self
                .suspend_after_heartbeat
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(d) = suspend {
                *self
                    .suspended_heartbeat_sent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(sent);
                suspend::host_suspends(d);
                self.hang.store(true, Ordering::SeqCst);
            }
            reply
        }
        async fn rebalance(
            &self,
            group: &GroupKey,
            session: &SessionRef,
            max_take: u32,
        ) -> Result<RebalanceReply, Error> {
            self.gate().await;
            self.inner.rebalance(group, session, max_take).await
        }
        async fn release(
            &self,
            group: &GroupKey,
            session: &SessionRef,
            buckets: &[u32],
            known: u64,
        ) -> Result<u32, Error> {
            self.releases_sent.fetch_add(1, Ordering::SeqCst);
            self.gate().await;
            if self.release_unheard.swap(false, Ordering::SeqCst) {
                self.inner
                    .release(group, session, &buckets[..1], known)
                    .await?;
            }
            let freed = self.inner.release(group, session, buckets, known).await;
            if self.release_reply_lost.swap(false, Ordering::SeqCst) {
                return Err(Error::Unavailable {
                    detail: "test: reply lost".into(),
                });
            }
            freed
        }
        async fn leave(
            &self,
            group: &GroupKey,
            session: &SessionRef,
            buckets: &[u32],
        ) -> Result<u32, Error> {
            self.gate().await;
            let failing = self.leave_fails.load(Ordering::SeqCst);
            if failing > 0 {
                self.leave_fails.store(failing - 1, Ordering::SeqCst);
                return Err(Error::Unavailable {
                    detail: "broken pipe".into(),
                });
            }
            // As the trait's default: the release's own knobs apply.
            let freed = self.release(group, session, buckets, u64::MAX).await?;
            self.deregister(group, session).await?;
            Ok(freed)
        }
        async fn deregister(&self, group: &GroupKey, session: &SessionRef) -> Result<(), Error> {
            self.gate().await;
            self.inner.deregister(group, session).await
        }
        async fn snapshot(&self, group: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
            self.gate().await;
            self.inner.snapshot(group).await
        }
        async fn holdings(
            &self,
            group: &GroupKey,
            session: &SessionRef,
        ) -> Result<Option<Holdings>, Error> {
            self.gate().await;
            self.inner.holdings(group, session).await
        }
        async fn subscribe(
            &self,
            group: &GroupKey,
            channel: Channel<'_>,
        ) -> Result<Notifications, Error> {
            self.gate().await;
            self.inner.subscribe(group, channel).await
        }
    }

    const TTL: Duration = Duration::from_secs(3);

    /// Member `id` of the 4-bucket group "g", heartbeat 100 ms, ttl [`TTL`].
    fn builder(store: &TestStore, id: &str) -> crate::MemberBuilder<TestStore> {
        Member::builder(store.clone(), "g")
            .id(id)
            .buckets(4)
            .heartbeat(Duration::from_millis(100))
            .ttl(TTL)
    }

    /// Starts `builder`'s member and waits until it owns all 4 buckets, past the new group's
    /// quarantine.
    async fn owner_from(builder: crate::MemberBuilder<TestStore>) -> Member {
        let member = builder.start().await.expect("start");
        tokio::time::sleep(TTL + Duration::from_secs(1)).await;
        assert_eq!(member.buckets().len(), 4);
        member
    }

    /// Member "a" owning all 4 buckets of a group, past the new group's quarantine.
    async fn owner(store: &TestStore) -> Member {
        owner_from(builder(store, "a")).await
    }

    /// How many of `events` are of the kind `kind` matches.
    fn count(events: &[Event], kind: fn(&Event) -> bool) -> usize {
        events.iter().filter(|e| kind(e)).count()
    }

    fn drain(events: &mut crate::Events) -> Vec<Event> {
        std::iter::from_fn(|| events.try_next()).collect()
    }

    /// The buckets revoked among the events waiting in `events`; at least one.
    fn revoked_buckets(events: &mut crate::Events) -> Vec<u32> {
        let revoked: Vec<u32> = drain(events)
            .into_iter()
            .filter_map(|e| match e {
                Event::Revoked { bucket, .. } => Some(bucket),
                _ => None,
            })
            .collect();
        assert!(!revoked.is_empty(), "nothing revoked");
        revoked
    }

    /// Regression (issue 8, bug 1; S3 under host suspend): the store renews the session, then
    /// the host sleeps 1.2 s before the reply is handled, and wakes to a store that no longer
    /// answers. The session expires in the store 3 s after the send, 1.2 s of which the host
    /// slept through: on tokio's clock, which stood still meanwhile, 1.8 s after the send. The
    /// member must stop owning by then. Before the fix the deadline's real-time anchors were
    /// read when the reply was handled, after the suspend, and the member kept its buckets until
    /// 2.97 s after the send: 1.2 s past the store's expiry.
    #[tokio::test(start_paused = true)]
    async fn a_host_suspend_between_send_and_reply_counts_against_the_lease() {
        let store = TestStore::default();
        let member = owner(&store).await;
        let mut events = member.events();
        let suspend = Duration::from_millis(1200);
        *store
            .suspend_after_heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(suspend);
        tokio::time::sleep(TTL * 2).await;
        let sent = store
            .suspended_heartbeat_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expect("no heartbeat ran");
        let expiry = sent + TTL - suspend;
        let lost: Vec<Instant> = drain(&mut events)
            .into_iter()
            .filter_map(|e| match e {
                Event::Lost {
                    reason: LostReason::Deadline,
                    at,
                    ..
                } => Some(at),
                _ => None,
            })
            .collect();
        assert_eq!(lost.len(), 4, "the member never lost its buckets");
        for at in lost {
            assert!(
                at <= expiry,
                "owned until {:?} after the send; the store's session ended {:?} after it",
                at - sent,
                expiry - sent
            );
        }
        assert!(member.buckets().is_empty());
    }

    /// Regression (issue 8, bug 5; issue 9, 6): aborting a member whose store call hangs
    /// dropped the call with `Error::Shutdown`, which was reported, a WARN and an `on_error`
    /// call, as if the store had failed.
    #[tokio::test(start_paused = true)]
    async fn an_abort_during_a_store_call_reports_no_error() {
        let store = TestStore::default();
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&errors);
        let member = owner_from(builder(&store, "a").on_error(move |e| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e.to_string())
        }))
        .await;
        store.hang.store(true, Ordering::SeqCst);
        // Until the member's next call (its renewal) hangs in the store.
        while store.hanging.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        member.abort();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(after, before, "errors reported after the abort");
    }

    /// Regression (CI, session 4): the first call after the member's connection was killed
    /// while idle (`CLIENT KILL`) fails at once with a broken pipe; when that call was the
    /// leave, the shutdown failed and the buckets idled until the session expired. The leave is
    /// tried once more (the connection reconnects on the next call).
    #[tokio::test(start_paused = true)]
    async fn a_leave_survives_a_connection_that_died_while_idle() {
        let store = TestStore::default();
        let member = owner(&store).await;
        let mut events = member.events();
        store.leave_fails.store(1, Ordering::SeqCst);
        let result = member.shutdown().await;
        assert!(result.is_ok(), "{result:?}");
        let events = drain(&mut events);
        assert_eq!(
            count(&events, |e| matches!(e, Event::Released { .. })),
            4,
            "{events:?}"
        );
        assert_store_left_empty(&store).await;
    }

    /// Regression (issue 8, bug 6): the leave's release freed 3 of 4 buckets (the fourth was
    /// released by an earlier call whose reply was lost), and the leave emitted `Released` for
    /// all 4. It must claim no release the store did not confirm, and still end every revoked
    /// bucket.
    #[tokio::test(start_paused = true)]
    async fn a_leave_claims_released_only_what_the_store_freed() {
        let store = TestStore::default();
        let member = owner(&store).await;
        let mut events = member.events();
        store.release_unheard.store(true, Ordering::SeqCst);
        member.shutdown().await.expect("shutdown");
        let events = drain(&mut events);
        assert_eq!(
            count(&events, |e| matches!(e, Event::Revoked { .. })),
            4,
            "{events:?}"
        );
        let released = count(&events, |e| matches!(e, Event::Released { .. }));
        assert!(
            released <= 3,
            "{released} Released, the store freed 3: {events:?}"
        );
        assert_eq!(
            released + count(&events, |e| matches!(e, Event::Lost { .. })),
            4,
            "every revoked bucket ends: {events:?}"
        );
    }

    /// The store holds no member and no owned bucket of group `g`: the leave completed.
    async fn assert_store_left_empty(store: &TestStore) {
        let group = GroupKey::new(crate::config::DEFAULT_PREFIX, "g");
        let snapshot = store.inner.snapshot(&group).await.expect("snapshot");
        assert!(
            snapshot.is_some_and(|s| s.members.is_empty() && s.owners.iter().all(Option::is_none)),
            "the store still holds the member or its buckets"
        );
    }

    /// All 4 buckets were revoked, and each revoke ended.
    fn assert_all_revoked_and_ended(events: &[Event]) {
        assert_eq!(
            count(events, |e| matches!(e, Event::Revoked { .. })),
            4,
            "{events:?}"
        );
        assert_every_revoke_ends(events);
    }

    /// Every `Revoked` bucket is followed by its `Released` or `Lost`.
    fn assert_every_revoke_ends(events: &[Event]) {
        for (i, e) in events.iter().enumerate() {
            if let Event::Revoked { bucket, token, .. } = e {
                let ended = events[i..].iter().any(|later| {
                    matches!(later, Event::Released { .. } | Event::Lost { .. })
                        && later.bucket() == Some(*bucket)
                        && later.token() == Some(*token)
                });
                assert!(
                    ended,
                    "bucket {bucket} revoked, never released or lost: {events:?}"
                );
            }
        }
    }

    /// Regression (issue 9, 4): with the store down, a shutdown at ttl 1 s blocked for its
    /// whole budget (the release waited for all that was left of it, past the 333 ms call
    /// timeout), and the revoked buckets never ended: 4 `Revoked`, no `Released` or `Lost`.
    /// Now: the drain (cut at the lease deadline), then the release and the deregistration,
    /// each within the call timeout.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_with_the_store_down_ends_in_time_and_ends_every_bucket() {
        let store = TestStore::default();
        let member = builder(&store, "a")
            .ttl(Duration::from_secs(1))
            .start()
            .await
            .expect("start");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(member.buckets().len(), 4);
        let config = member.config().clone();
        // Held through the drain: the leave waits the drain time (cut at the deadline).
        let lease = member.lease(0).expect("owned");
        let mut events = member.events();
        store.hang.store(true, Ordering::SeqCst);
        let began = Instant::now();
        let result = member.shutdown().await;
        let took = began.elapsed();
        drop(lease);
        assert!(result.is_err(), "the leave cannot be complete: {result:?}");
        let bound =
            config.drain_timeout.min(config.lease_validity()) + config.effective_call_timeout() * 2;
        assert!(
            took <= bound && took < config.shutdown_timeout,
            "shutdown took {took:?}; drain and two calls take at most {bound:?}"
        );
        assert_all_revoked_and_ended(&drain(&mut events));
    }

    /// Regression (issue 9, 4): a shutdown asked while a store call hangs waited for that call
    /// (up to the call timeout, 1 s here) before the leave even began, past a 200 ms budget.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_does_not_wait_for_a_call_in_flight() {
        let store = TestStore::default();
        let member =
            owner_from(builder(&store, "a").shutdown_timeout(Duration::from_millis(200))).await;
        let mut events = member.events();
        store.hang.store(true, Ordering::SeqCst);
        while store.hanging.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let began = Instant::now();
        let result = member.shutdown().await;
        let took = began.elapsed();
        // `Member::shutdown` times out at the budget by itself: the leave must have ended
        // before that (its calls cut at the budget less the margin), not been cut by it.
        assert!(
            !matches!(
                result,
                Err(Error::Timeout {
                    call: "shutdown",
                    ..
                })
            ),
            "the leave did not end within the budget: {result:?}"
        );
        assert!(
            took <= Duration::from_millis(180),
            "shutdown took {took:?} ({result:?})"
        );
        assert_all_revoked_and_ended(&drain(&mut events));
    }

    /// Regression (review, 1): the drain could use the whole shutdown budget. With a 200 ms
    /// budget, the default 1 s drain and a lease held, the drain ran to the budget and the
    /// release and the deregistration had no time left: every bucket ended `Lost(Unreleased)`,
    /// the shutdown failed, and the store kept the buckets for a ttl. The drain now leaves
    /// the two calls their time.
    #[tokio::test(start_paused = true)]
    async fn a_short_shutdown_budget_shortens_the_drain_not_the_release() {
        let store = TestStore::default();
        let member =
            owner_from(builder(&store, "a").shutdown_timeout(Duration::from_millis(200))).await;
        store.latency_ms.store(5, Ordering::SeqCst);
        let lease = member.lease(0).expect("owned");
        let mut events = member.events();
        let result = member.shutdown().await;
        drop(lease);
        assert!(result.is_ok(), "{result:?}");
        let events = drain(&mut events);
        assert_eq!(
            count(&events, |e| matches!(e, Event::Revoked { .. })),
            4,
            "{events:?}"
        );
        assert_eq!(
            count(&events, |e| matches!(e, Event::Released { .. })),
            4,
            "{events:?}"
        );
        assert_store_left_empty(&store).await;
    }

    /// Regression (review, 3): a leave without a live session returned without deregistering.
    /// Here the session was lost (the store stopped answering past the deadline), and the
    /// re-registration ran in the store but its reply never came; the shutdown dropped it. The
    /// store kept that session, owning nothing but counted in everyone's share, until it
    /// expired a ttl later. The leave now deregisters it.
    #[tokio::test(start_paused = true)]
    async fn a_leave_while_registering_deregisters_the_pending_session() {
        let store = TestStore::default();
        let member = owner(&store).await;
        store.hang.store(true, Ordering::SeqCst);
        while !member.buckets().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store.register_unheard.store(true, Ordering::SeqCst);
        store.hang.store(false, Ordering::SeqCst);
        while store.registered_unheard.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let group = GroupKey::new(crate::config::DEFAULT_PREFIX, "g");
        let members = |s: Option<GroupSnapshot>| s.map(|s| s.members.len()).unwrap_or_default();
        assert_eq!(
            members(store.inner.snapshot(&group).await.expect("snapshot")),
            1,
            "the re-registration ran"
        );
        let result = member.shutdown().await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            members(store.inner.snapshot(&group).await.expect("snapshot")),
            0,
            "the session the shutdown dropped is still in the store"
        );
    }

    /// Regression (review, 2): the release of drained buckets picks them under the lock and
    /// calls the store without it; a lease extending its drain meanwhile was promised the
    /// time (`Some`) while the bucket was being released. It is now refused (`None`).
    #[tokio::test(start_paused = true)]
    async fn a_drain_extension_during_the_release_is_refused() {
        let store = TestStore::default();
        let member = owner(&store).await;
        let leases: Vec<_> = (0..4).map(|b| member.lease(b).expect("owned")).collect();
        let mut events = member.events();
        store.latency_ms.store(50, Ordering::SeqCst);
        let other = builder(&store, "b").start().await.expect("start b");
        // The revoked buckets keep their leases: released at the end of the drain time.
        while store.releases_sent.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let revoked = revoked_buckets(&mut events);
        for bucket in &revoked {
            let lease = &leases[*bucket as usize];
            assert_eq!(
                lease.extend_drain(Duration::from_secs(5)),
                None,
                "bucket {bucket}: a drain promised while its release is in flight"
            );
        }
        drop(leases);
        other.abort();
        member.abort();
    }

    /// Regression (review, session 5): after a release whose reply was lost, a lease asking
    /// for more drain was promised it, while the store had freed the bucket and granted it to
    /// another member, whose work would not wait. Once a release was sent, none is promised.
    #[tokio::test(start_paused = true)]
    async fn a_drain_extension_after_a_failed_release_is_refused() {
        let store = TestStore::default();
        let member = owner(&store).await;
        let leases: Vec<_> = (0..4).map(|b| member.lease(b).expect("owned")).collect();
        let mut events = member.events();
        store.release_reply_lost.store(true, Ordering::SeqCst);
        let other = builder(&store, "b").start().await.expect("start b");
        while store.release_reply_lost.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The failed call's error is taken in; its retry comes after a backoff.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(store.releases_sent.load(Ordering::SeqCst), 1);
        let revoked = revoked_buckets(&mut events);
        for bucket in &revoked {
            assert_eq!(
                leases[*bucket as usize].extend_drain(Duration::from_secs(5)),
                None,
                "bucket {bucket}: a drain promised after its release may have run"
            );
        }
        drop(leases);
        other.abort();
        member.abort();
    }

    /// Regression (review, 5): the deadline check reads the wall clock, so a wall clock
    /// stepped forward then back showed a lease valid, then invalid, then valid again, and the
    /// member's task, which had not run meanwhile, never lost the session. Once anyone sees
    /// the deadline passed it stays passed, and the member loses the session.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_seen_passed_stays_passed_when_the_wall_clock_steps_back() {
        let store = TestStore::default();
        let member = owner(&store).await;
        let mut events = member.events();
        drain(&mut events);
        let lease = member.lease(0).expect("owned");
        assert!(lease.is_valid());
        suspend::host_suspends(TTL * 2);
        assert!(!lease.is_valid(), "the deadline passed on the wall clock");
        suspend::wall_clock_steps_back(TTL * 2);
        assert!(!lease.is_valid(), "a lease seen expired came back to life");
        assert!(member.buckets().is_empty(), "{:?}", member.buckets());
        assert_eq!(member.status().held, 0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let lost = drain(&mut events)
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Lost {
                        reason: LostReason::Deadline,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(lost, 4, "the member's task did not lose the session");
        // A new session owns again, valid.
        let token = tokio::time::timeout(TTL * 4, member.wait_until_owned(0))
            .await
            .expect("owned again")
            .expect("running");
        let lease = member.lease(0).expect("owned");
        assert_eq!(lease.token(), token);
        assert!(lease.is_valid());
    }

    /// Issue 10, 2: a start against a briefly busy store. Before, `start` gave up after two
    /// register timeouts; now it retries (same nonce) with backoff until the start timeout.
    #[tokio::test(start_paused = true)]
    async fn a_start_retries_registrations_that_time_out() {
        let store = TestStore::default();
        store.register_hangs.store(5, Ordering::SeqCst);
        let began = Instant::now();
        let member = builder(&store, "a")
            .call_timeout(Duration::from_millis(500))
            .start()
            .await
            .expect("start survives five register timeouts");
        assert_eq!(store.registers_sent.load(Ordering::SeqCst), 6);
        // Five timeouts of 500 ms, and five growing backoffs (heartbeat 100 ms: 25..=50 ms,
        // 50..=100, 100..=200, 200..=400, 400..=800; capped at half the ttl).
        let took = began.elapsed();
        assert!(
            took >= Duration::from_millis(3275) && took <= Duration::from_millis(4050),
            "{took:?}"
        );
        assert_eq!(member.status().errors, 5);
        tokio::time::sleep(TTL + Duration::from_secs(1)).await;
        assert_eq!(member.buckets().len(), 4);
        let group = GroupKey::new(crate::config::DEFAULT_PREFIX, "g");
        let snapshot = store.inner.snapshot(&group).await.expect("snapshot");
        assert_eq!(
            snapshot.map(|s| s.members.len()),
            Some(1),
            "one session: every retry used the same nonce"
        );
    }

    /// Issue 10, 2: a store that never answers fails the start at the start timeout, naming it
    /// and the last error.
    #[tokio::test(start_paused = true)]
    async fn a_start_against_a_store_that_never_answers_fails_at_the_start_timeout() {
        let store = TestStore::default();
        store.hang.store(true, Ordering::SeqCst);
        let began = Instant::now();
        let err = builder(&store, "a")
            .start_timeout(Duration::from_secs(5))
            .start()
            .await
            .expect_err("the store never answers");
        assert_eq!(began.elapsed(), Duration::from_secs(5));
        match &err {
            Error::StartTimeout { after, last } => {
                assert_eq!(*after, Duration::from_secs(5));
                assert!(
                    matches!(
                        **last,
                        Error::Timeout {
                            call: "register",
                            ..
                        }
                    ),
                    "{last}"
                );
            }
            other => panic!("{other}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("start timeout of 5s") && message.contains("register timed out"),
            "{message}"
        );
        // Calls of 1 s (a third of the ttl) with backoff between them: a handful, not a storm.
        let attempts = store.registers_sent.load(Ordering::SeqCst);
        assert!((4..=5).contains(&attempts), "{attempts} registrations");
    }

    /// Errors a retry cannot cure fail the start at once.
    #[tokio::test(start_paused = true)]
    async fn a_start_does_not_retry_a_group_of_another_shape() {
        let store = TestStore::default();
        let _first = builder(&store, "a").start().await.expect("start");
        let began = Instant::now();
        let err = builder(&store, "b")
            .buckets(8)
            .start()
            .await
            .expect_err("another bucket count");
        assert!(matches!(err, Error::GroupMismatch { .. }), "{err}");
        assert_eq!(began.elapsed(), Duration::ZERO);
    }

    /// Issue 10, 3: failed heartbeats back off (fewer calls than the fixed quarter-heartbeat
    /// retry made), and the last retry still comes a call timeout before the lease deadline.
    #[tokio::test(start_paused = true)]
    async fn failed_heartbeats_back_off_within_the_lease_deadline() {
        let store = TestStore::default();
        let member = owner_from(
            builder(&store, "a")
                .heartbeat(Duration::from_millis(400))
                .call_timeout(Duration::from_millis(100)),
        )
        .await;
        let config = member.config().clone();
        let sent = |store: &TestStore| {
            store
                .heartbeats_sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        let last_ok = *sent(&store).last().expect("heartbeats ran");
        store.hang.store(true, Ordering::SeqCst);
        let deadline = last_ok + config.lease_validity();
        while Instant::now() < deadline + Duration::from_millis(1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(member.buckets().is_empty(), "the deadline passed");
        let failed: Vec<Instant> = sent(&store)
            .into_iter()
            .filter(|&t| t > last_ok && t < deadline)
            .collect();
        // The first failure comes at the renewal (1.5 s after the last success); the 100 ms
        // timeouts and the old fixed 100 ms retry made a call every 200 ms until the deadline,
        // about 7; the backoff (100..=400 ms) makes fewer.
        let fixed = (deadline - failed[0]).as_millis() / 200 + 1;
        assert!(
            failed.len() >= 2 && (failed.len() as u128) < fixed,
            "{} heartbeats after the last success, {fixed} with the fixed retry",
            failed.len()
        );
        let last = *failed.last().expect("failed heartbeats");
        assert!(
            deadline - last >= config.effective_call_timeout()
                || deadline - last <= Duration::from_millis(100),
            "the last retry came {:?} before the deadline",
            deadline - last
        );
        // After a call timeout before the deadline, nothing waits past it: a retry was sent
        // within the last call timeout plus the backoff base before the deadline.
        assert!(
            failed
                .iter()
                .any(|&t| deadline - t
                    <= config.effective_call_timeout() + Duration::from_millis(100)),
            "no retry in the last stretch before the deadline: {:?}",
            failed.iter().map(|&t| deadline - t).collect::<Vec<_>>()
        );
        member.abort();
    }
}
