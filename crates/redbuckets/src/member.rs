//! The user's side: the builder, the `Member` (the owner, which ends the member), the cloneable
//! `MemberHandle` workers share, the `Events` and `Leases` streams, and the status snapshot.
//!
//! A member is a background task (the driver, `driver.rs`) that speaks the store protocol. The
//! handles read the member's local ledger under a std mutex; they never wait on the store. The
//! driver changes the ledger and emits under that same mutex (`Shared::apply`), which is what
//! lets a subscription begin with a snapshot and miss nothing after it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, ReusableBoxFuture, WaitForCancellationFutureOwned};

use crate::clock::Now;
use crate::config::Config;
use crate::driver::Driver;
use crate::error::Error;
use crate::event::Event;
use crate::shared::{ErrorHook, Lease, Local, Shared};
use crate::store::Store;

/// Builds a [`Member`]. Every setter documents its default; [`MemberBuilder::start`] validates.
#[must_use = "a builder does nothing until start() is called"]
pub struct MemberBuilder<S> {
    store: S,
    config: Config,
    on_error: Option<ErrorHook>,
}

impl<S> std::fmt::Debug for MemberBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: Store> MemberBuilder<S> {
    /// Member id, stable across restarts if you give one. Default: a random UUID.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.config.member_id = id.into();
        self
    }
    /// Bucket count of the group. Default 1024.
    pub fn buckets(mut self, buckets: u32) -> Self {
        self.config.buckets = buckets;
        self
    }
    /// Weight of this member. Default 1.
    pub fn weight(mut self, weight: u32) -> Self {
        self.config.weight = weight;
        self
    }
    /// Session ttl: how long the member's session, and with it every lease it holds, outlives
    /// its last successful renewal. Default 10 s; at least 3 × the heartbeat (so one lost
    /// heartbeat does not lose the leases), at most 24 h.
    ///
    /// Every member of a group must use the same ttl: the group stores the ttl of the member
    /// that created it, and [`MemberBuilder::start`] refuses another with
    /// [`Error::TtlMismatch`]. The reason: a group that is new, or re-created after Redis lost
    /// its data, grants nothing during its first ttl, which protects only members whose leases
    /// last no longer than that. A crashed member's buckets are owned again about a ttl after
    /// its last renewal, so a shorter ttl moves them sooner, at more renewals (one per half
    /// ttl by default, see [`MemberBuilder::renew_interval`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }
    /// Heartbeat period: retries, and polling while notifications are down. Default 1 s.
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.config.heartbeat = heartbeat;
        self
    }
    /// How often a healthy member renews its session. Default half the ttl; between the
    /// heartbeat and half the ttl. Shorter survives longer outages at more Redis work.
    pub fn renew_interval(mut self, every: Duration) -> Self {
        self.config.renew_interval = Some(every);
        self
    }
    /// Deadline of each store call. Default 3 s, capped at a third of the ttl.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }
    /// How long [`MemberBuilder::start`] retries its registration, with backoff, while the store
    /// times out or is unavailable. Default 30 s. Connecting is the store's, before: see
    /// [`crate::RedisOptions::connect_retry`] (also 30 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.config.start_timeout = timeout;
        self
    }
    /// Graceful shutdown budget: [`Member::shutdown`] returns within it, also when the store
    /// does not answer. Default 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }
    /// How long a revoked bucket waits for its lease handles. Default 1 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }
    /// The longest drain one lease may ask for with [`Lease::extend_drain`]. Default 10 s
    /// (never below the drain timeout).
    pub fn max_drain(mut self, max: Duration) -> Self {
        self.config.max_drain = max;
        self
    }
    /// How long the store keeps this member's buckets for its id after its session ends (a
    /// graceful shutdown, or a crash), so that the next session under the same id gets them
    /// back and nothing moves. Default zero: off. See [`Config::rejoin_grace`].
    pub fn rejoin_grace(mut self, grace: Duration) -> Self {
        self.config.rejoin_grace = grace;
        self
    }
    /// Key prefix. Default `red-buckets`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }
    /// Largest clock-rate error between this host and the store. Default 0.01.
    pub fn max_clock_drift(mut self, drift: f64) -> Self {
        self.config.max_clock_drift = drift;
        self
    }
    /// Replaces the whole configuration (the group name included).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }
    /// Called with every error met while running. Default: none (errors still go to `tracing`).
    pub fn on_error(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    /// Validates the configuration, joins the group and starts the member's task.
    ///
    /// Fails when the configuration is invalid, the store cannot be reached, or the group exists
    /// with another bucket count. While the store times out or is unavailable (a briefly busy
    /// or restarting Redis), the registration is retried with backoff and jitter for up to
    /// [`crate::Config::start_timeout`], then fails with [`Error::StartTimeout`]. When another session holds this member id (a crashed process
    /// of the same id whose session has not expired yet), `start` waits for it to expire, up to
    /// one ttl, logging that once at INFO; if that session is renewed meanwhile, another live
    /// process uses the id, and `start` fails with [`Error::IdInUse`] naming when it expires.
    pub async fn start(self) -> Result<Member, Error> {
        self.config.validate()?;
        let config = Arc::new(self.config);
        let shared = Shared::new(Arc::clone(&config), events_capacity(config.buckets));
        let abort = CancellationToken::new();
        // The abort's child: an abort interrupts whatever the shutdown would.
        let graceful = abort.child_token();
        #[cfg(feature = "testing")]
        let (freeze, frozen) = tokio::sync::mpsc::unbounded_channel();
        #[cfg(not(feature = "testing"))]
        let frozen = ();
        let mut driver = Driver::new(
            self.store,
            Arc::clone(&config),
            Arc::clone(&shared),
            self.on_error,
            graceful.clone(),
            abort.clone(),
            frozen,
        );
        driver.join().await?;
        let span =
            tracing::info_span!("redbuckets", group = %config.group, member = %config.member_id);
        // However the task ends, subscribers learn that nothing more comes.
        let stopped = shared.stopped.clone().drop_guard();
        let run = async move {
            let _stopped = stopped;
            driver.run().await
        };
        let task = tokio::spawn(tracing::Instrument::instrument(run, span));
        Ok(Member {
            handle: MemberHandle { shared },
            graceful,
            #[cfg(feature = "testing")]
            freeze,
            _abort: abort.drop_guard(),
            task: Some(task),
        })
    }
}

/// How many events a subscriber may fall behind by before it gets [`Event::Lagged`]: the events
/// channel's capacity, `2 × buckets + 16` within [1,024, 16,384], which tokio's broadcast channel
/// rounds up to a power of two (so this does too, and the docs of
/// [`MemberHandle::events`] quote what it gives).
///
/// Bounded: a broadcast channel allocates every slot up front (about 100 bytes each); at 2 × B
/// for B = 65,536 that was 14 MiB per member (measured: 13.4 GiB for the 1,000 members of the
/// scale benchmark), most of a cold start's CPU. A lagging subscriber is told
/// (`Event::Lagged` and a fresh snapshot), so a bound costs no correctness.
fn events_capacity(buckets: u32) -> usize {
    const MAX: usize = 16_384;
    (buckets as usize * 2 + 16)
        .clamp(1024, MAX)
        .next_power_of_two()
}

/// One member of a group: the owner side, which ends it ([`Member::shutdown`],
/// [`Member::run_until`], [`Member::abort`]). Everything else is on the [`MemberHandle`] it
/// dereferences to; [`Member::handle`] gives workers a cheap clone of it.
///
/// Dropping a `Member` without [`Member::shutdown`] stops it like a crash: its buckets stay
/// owned in the store, and nobody works on them, until its session expires. It logs a WARN
/// saying so; [`Member::abort`] does the same on purpose, without the WARN.
pub struct Member {
    handle: MemberHandle,
    graceful: CancellationToken,
    #[cfg(feature = "testing")]
    freeze: tokio::sync::mpsc::UnboundedSender<Duration>,
    /// Dropping the member aborts the task (a crash, from the group's point of view).
    _abort: tokio_util::sync::DropGuard,
    /// `None` once shut down or aborted.
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("group", &self.handle.shared.config.group)
            .field("id", &self.handle.shared.config.member_id)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Member {
    type Target = MemberHandle;

    fn deref(&self) -> &MemberHandle {
        &self.handle
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.task.is_some() && !std::thread::panicking() {
            let held = self.handle.shared.lock().ledger.owned_count();
            tracing::warn!(
                group = %self.handle.shared.config.group,
                member = %self.handle.shared.config.member_id,
                held,
                "a Member was dropped without shutdown(): for the group this is a crash; its \
                 {held} buckets stay owned, and unworked, until its session expires (up to the \
                 ttl, {:?}). Call shutdown().await (or abort() to crash on purpose)",
                self.handle.shared.config.ttl
            );
        }
    }
}

impl Member {
    /// A builder for a member of `group` on `store`.
    pub fn builder<S: Store>(store: S, group: impl Into<String>) -> MemberBuilder<S> {
        MemberBuilder {
            store,
            config: Config::new(group),
            on_error: None,
        }
    }

    /// A cheap, cloneable handle for workers: everything but ending the member. Handles do not
    /// keep the member running; once it has stopped they report that it owns nothing.
    #[must_use]
    pub fn handle(&self) -> MemberHandle {
        self.handle.clone()
    }

    /// Leaves the group gracefully: revokes every bucket, waits for lease handles (up to the
    /// drain time), releases everything and deregisters.
    ///
    /// Returns within [`Config::shutdown_timeout`], also when the store does not answer: a
    /// store call in flight is dropped, and the release and the deregistration each take at
    /// most the call timeout. Every revoked bucket ends with `Released`, or with `Lost`
    /// ([`crate::LostReason::Unreleased`]) when the store did not confirm its release; the store
    /// then frees it when the session expires. An incomplete leave returns the first error.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let now = Instant::now();
        let budget = self.handle.shared.config.shutdown_timeout;
        // The member's task ends its leave a little before the budget, so that it is seen to
        // end within it: at least 20 ms (a leave that ended on time must not be reported as
        // this timeout because the task was scheduled late), and never half the budget.
        let margin = (budget / 10)
            .clamp(Duration::from_millis(20), Duration::from_millis(100))
            .min(budget / 2);
        self.handle.shared.lock().shutdown_by = Some(now + budget.saturating_sub(margin));
        self.graceful.cancel();
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout_at(now + budget, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(Error::Unavailable {
                detail: format!("member task failed: {join}"),
            }),
            Err(_) => Err(Error::Timeout {
                call: "shutdown",
                after: budget,
            }),
        }
    }

    /// Runs until `signal` completes, then leaves gracefully (see [`Member::shutdown`]).
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> Result<(), Error> {
        signal.await;
        self.shutdown().await
    }

    /// For simulations only (the unstable `testing` feature): the member's task does nothing
    /// for `duration`, as if its process were stopped (SIGSTOP) while the others go on.
    #[cfg(feature = "testing")]
    pub fn freeze(&self, duration: Duration) {
        let _ = self.freeze.send(duration);
    }

    /// Stops at once without releasing anything, as a crash would: the buckets are freed when
    /// the session expires. For tests and emergencies.
    pub fn abort(mut self) {
        // On purpose: no WARN from `drop`.
        self.task.take();
    }
}

/// A cheap, cloneable handle on a [`Member`] (an `Arc` inside), for workers. Every method
/// takes `&self` and reads the member's local state without waiting on the store. It does not
/// keep the member running: after the member stopped it reports that nothing is owned.
#[derive(Clone)]
pub struct MemberHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemberHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberHandle")
            .field("group", &self.shared.config.group)
            .field("id", &self.shared.config.member_id)
            .finish_non_exhaustive()
    }
}

impl MemberHandle {
    /// This member's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.shared.config.member_id
    }

    /// The configuration it runs with.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The buckets this member owns now, sorted. A copy: nothing to unlock.
    #[must_use]
    pub fn buckets(&self) -> Vec<u32> {
        self.shared
            .lock_valid()
            .map(|local| local.ledger.owned_buckets())
            .unwrap_or_default()
    }

    /// True if this member owns `bucket` now (granted, not revoked, before the local deadline).
    #[must_use]
    pub fn owns(&self, bucket: u32) -> bool {
        self.token(bucket).is_some()
    }

    /// The fencing token of `bucket` if this member owns it now.
    #[must_use]
    pub fn token(&self, bucket: u32) -> Option<u64> {
        self.shared.lock_valid()?.ledger.owned_token(bucket)
    }

    /// A lease handle on `bucket` if this member owns it now. While any handle of a revoked
    /// bucket is alive, the member waits (up to the drain time) before releasing the bucket.
    /// To hold a handle from the moment ownership begins, take leases from
    /// [`MemberHandle::leases`] instead.
    #[must_use]
    pub fn lease(&self, bucket: u32) -> Option<Lease> {
        let mut local = self.shared.lock_valid()?;
        self.shared.lease_locked(&mut local.ledger, bucket)
    }

    /// A stream of leases: first one for every bucket owned at the call, then one for each new
    /// grant, made by the member at the grant itself. So a lease exists from the moment
    /// ownership begins: a bucket revoked before the worker reads its lease still waits (up to
    /// the drain time) for that lease to be read and dropped. Every grant yields its lease, even
    /// one that ended before it was read (its [`Lease::cancelled`] completes at once): a worker
    /// sees every grant. Drop the stream when you stop reading it: the leases queued in it
    /// hold their buckets' drains.
    #[must_use]
    pub fn leases(&self) -> Leases {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut local = self.shared.lock();
        if self.shared.is_valid(&Now::read()) {
            for bucket in local.ledger.owned_buckets() {
                if let Some(lease) = self.shared.lease_locked(&mut local.ledger, bucket) {
                    let _ = tx.send(lease);
                }
            }
        }
        local.leases.push(tx);
        Leases {
            rx,
            stopped: Box::pin(self.shared.stopped.clone().cancelled_owned()),
        }
    }

    /// A stream of ownership events. It opens with an `Acquired` for every bucket owned at the
    /// call (with its grant time), then follows live; the two are taken atomically, so no grant
    /// falls in between. A subscriber that falls behind by more events than the channel holds
    /// gets [`Event::Lagged`] followed by a fresh snapshot: never a silent gap. The channel
    /// holds `2 × buckets + 16` events, at least 1,024 and at most 16,384, rounded up to a
    /// power of two (tokio's broadcast channel does): 1,024 up to 504 buckets, 2,048 for 512
    /// buckets, 16,384 from 4,089 buckets on.
    /// The end of a grant that was not announced to this subscriber (revoked before it
    /// subscribed) is not reported.
    #[must_use]
    pub fn events(&self) -> Events {
        let local = self.shared.lock();
        let rx = self.shared.events.subscribe();
        let mut events = Events {
            shared: Arc::clone(&self.shared),
            rx: PollRecv::new(rx),
            stopped: Box::pin(self.shared.stopped.clone().cancelled_owned()),
            queue: VecDeque::new(),
            announced: HashMap::new(),
        };
        events.snapshot(&local);
        drop(local);
        events
    }

    /// The owned buckets (sorted), as a `watch` that changes whenever they do: `changed()` to
    /// wait for a change, `borrow()` to read. It follows the member's ledger: at the local
    /// deadline it empties when the member's task gives the buckets up
    /// ([`MemberHandle::buckets`] checks the deadline itself).
    #[must_use]
    pub fn owned_changed(&self) -> watch::Receiver<Vec<u32>> {
        self.shared.owned.subscribe()
    }

    /// Waits until this member owns `bucket`, and returns its fencing token. Fails with
    /// [`Error::Shutdown`] once the member has stopped. For tests and readiness probes; combine
    /// with a timeout.
    pub async fn wait_until_owned(&self, bucket: u32) -> Result<u64, Error> {
        let mut owned = self.shared.owned.subscribe();
        loop {
            if let Some(token) = self.token(bucket) {
                return Ok(token);
            }
            tokio::select! {
                changed = owned.changed() => {
                    if changed.is_err() {
                        return Err(Error::Shutdown);
                    }
                }
                () = self.shared.stopped.cancelled() => return Err(Error::Shutdown),
            }
        }
    }

    /// A snapshot of the member's state.
    #[must_use]
    pub fn status(&self) -> Status {
        let local = self.shared.lock();
        let clocks = Now::read();
        let now = clocks.at;
        // One read of the deadline for both fields.
        let valid_until = *self.shared.valid_until.borrow();
        let valid = valid_until.is_some_and(|until| !self.shared.deadline_passed(&until, &clocks));
        Status {
            group: self.shared.config.group.clone(),
            member: self.shared.config.member_id.clone(),
            session: local.session.clone(),
            share: local.share,
            held: if valid { local.ledger.owned_count() } else { 0 },
            draining: local.ledger.draining_count(),
            quarantine: local
                .grants_at
                .map(|at| at.saturating_duration_since(now))
                .filter(|d| !d.is_zero()),
            last_heartbeat: local.last_heartbeat,
            valid_until: valid_until.map(|d| d.at),
            version: local.version,
            errors: local.errors,
            last_error: local.last_error.clone(),
        }
    }
}

/// Ownership events of one member, from [`MemberHandle::events`]: first an `Acquired` for every
/// bucket owned at the subscription, then live events; after a lag, [`Event::Lagged`] and a
/// fresh snapshot. A [`Stream`] (use `StreamExt`'s combinators), which ends once the member has
/// stopped and every event was read; [`Events::next`] and [`Events::try_next`] read it without
/// importing a trait, as [`Leases`] does.
pub struct Events {
    shared: Arc<Shared>,
    rx: PollRecv,
    /// Completes when the member's task has ended.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The snapshot (and a `Lagged`) not yet read.
    queue: VecDeque<Event>,
    /// The grants this subscriber was told of (bucket → token): the end of any other is not
    /// news to it.
    announced: HashMap<u32, u64>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("group", &self.shared.config.group)
            .field("member", &self.shared.config.member_id)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

/// A broadcast receiver that can be polled (tokio's has only `recv().await`): the receive future
/// owns the receiver and hands it back with the result, in one reused allocation.
struct PollRecv {
    next: ReusableBoxFuture<'static, (Result<Event, RecvError>, broadcast::Receiver<Event>)>,
}

impl PollRecv {
    fn new(rx: broadcast::Receiver<Event>) -> Self {
        PollRecv {
            next: ReusableBoxFuture::new(Self::recv(rx)),
        }
    }

    async fn recv(
        mut rx: broadcast::Receiver<Event>,
    ) -> (Result<Event, RecvError>, broadcast::Receiver<Event>) {
        let received = rx.recv().await;
        (received, rx)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, RecvError>> {
        let (received, rx) = std::task::ready!(self.next.poll(cx));
        self.next.set(Self::recv(rx));
        Poll::Ready(received)
    }
}

impl Events {
    /// The next event; `None` once the member has stopped and every event was read.
    /// The same as `StreamExt::next`.
    pub async fn next(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        // Unconstrained: tokio's cooperative budget would otherwise make a broadcast receive
        // look pending after 128 of them in one task poll, and a loop of `try_next` stop early.
        futures_util::FutureExt::now_or_never(tokio::task::unconstrained(self.next())).flatten()
    }

    /// Keeps what this subscriber should see: the end of a grant it was not told of is dropped.
    fn accept(&mut self, event: Event) -> Option<Event> {
        match &event {
            Event::Acquired { bucket, token, .. } => {
                self.announced.insert(*bucket, *token);
            }
            Event::Revoked { bucket, token, .. } => {
                if self.announced.get(bucket) != Some(token) {
                    return None;
                }
            }
            Event::Released { bucket, token, .. } | Event::Lost { bucket, token, .. } => {
                if self.announced.get(bucket) != Some(token) {
                    return None;
                }
                self.announced.remove(bucket);
            }
            Event::Lagged { .. } => {}
        }
        Some(event)
    }

    /// The receiver fell behind: start again from a fresh snapshot, taken with a new receiver
    /// under the ledger lock (the driver emits under it too, so nothing falls in between).
    fn lagged(&mut self, missed: u64) {
        let now = Instant::now();
        let shared = Arc::clone(&self.shared);
        let local = shared.lock();
        self.rx = PollRecv::new(shared.events.subscribe());
        self.queue.clear();
        self.queue.push_back(Event::Lagged { missed, at: now });
        self.snapshot(&local);
    }

    /// Queues an `Acquired` for every bucket owned now; called under the ledger lock.
    fn snapshot(&mut self, local: &Local) {
        self.announced.clear();
        if !self.shared.is_valid(&Now::read()) {
            return;
        }
        for (bucket, held) in local.ledger.owned() {
            self.announced.insert(bucket, held.token);
            self.queue.push_back(Event::Acquired {
                bucket,
                token: held.token,
                at: held.since,
            });
        }
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.queue.pop_front() {
                return Poll::Ready(Some(event));
            }
            let received = match this.rx.poll(cx) {
                Poll::Ready(received) => received,
                Poll::Pending => {
                    if this.stopped.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The task ended after emitting its last events: read what is buffered
                    // (the poll above may have come just before the last ones), then end.
                    match this.rx.poll(cx) {
                        Poll::Ready(received) => received,
                        Poll::Pending => return Poll::Ready(None),
                    }
                }
            };
            match received {
                Ok(event) => {
                    if let Some(event) = this.accept(event) {
                        return Poll::Ready(Some(event));
                    }
                }
                Err(RecvError::Lagged(missed)) => this.lagged(missed),
                Err(RecvError::Closed) => return Poll::Ready(None),
            }
        }
    }
}

/// Leases of one member, from [`MemberHandle::leases`]: one for every bucket owned at the
/// subscription, then one per new grant, each made at the grant (so its guard holds the drain
/// from the moment ownership begins). A [`Stream`] (use `StreamExt`'s combinators), which ends
/// once the member has stopped and every lease was read; [`Leases::next`] and
/// [`Leases::try_next`] read it without importing a trait, as [`Events`] does.
pub struct Leases {
    rx: mpsc::UnboundedReceiver<Lease>,
    /// Completes when the member's task has ended.
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("queued", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl Leases {
    /// The next lease, in grant order; `None` once the member has stopped and every lease was
    /// read. A lease whose grant has ended already is yielded too (check
    /// [`Lease::is_valid`], or let [`Lease::cancelled`] complete at once): dropping it ends its
    /// drain. The same as `StreamExt::next`.
    pub async fn next(&mut self) -> Option<Lease> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// The next lease if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Lease> {
        self.rx.try_recv().ok()
    }
}

impl Stream for Leases {
    type Item = Lease;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Lease>> {
        let this = self.get_mut();
        if let Poll::Ready(lease) = this.rx.poll_recv(cx) {
            return Poll::Ready(lease);
        }
        match this.stopped.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(this.rx.try_recv().ok()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A snapshot of one member's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Group name.
    pub group: String,
    /// Member id.
    pub member: String,
    /// Current session nonce, `None` while not registered.
    pub session: Option<String>,
    /// The share the store last reported: `(min, max)` buckets.
    pub share: (u32, u32),
    /// Buckets owned now.
    pub held: usize,
    /// Buckets revoked and waiting for their release.
    pub draining: usize,
    /// While the group grants nothing (it was just created, or re-created after the store lost
    /// its data: see the README's guarantees), the time until grants begin ("grants begin in
    /// 7.2 s"): why a registered member owns nothing yet. `None` otherwise.
    pub quarantine: Option<Duration>,
    /// Send time of the last successful heartbeat (or registration).
    pub last_heartbeat: Option<Instant>,
    /// Local lease deadline.
    pub valid_until: Option<Instant>,
    /// Membership version last seen.
    pub version: u64,
    /// Errors met so far.
    pub errors: u64,
    /// The last error, as text.
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::events_capacity;

    /// What `MemberHandle::events` documents as the lag threshold.
    #[test]
    fn events_capacity_is_what_the_docs_say() {
        assert_eq!(events_capacity(1), 1024);
        assert_eq!(events_capacity(504), 1024);
        assert_eq!(events_capacity(505), 2048);
        assert_eq!(events_capacity(512), 2048);
        assert_eq!(events_capacity(4088), 8192);
        assert_eq!(events_capacity(4089), 16_384);
        assert_eq!(events_capacity(65_536), 16_384);
    }

    /// The channel holds exactly that many: one more send and a subscriber lags.
    #[test]
    fn the_channel_lags_past_that_capacity() {
        let (tx, mut rx) = tokio::sync::broadcast::channel::<u32>(events_capacity(512));
        for i in 0..2048 {
            let _ = tx.send(i);
        }
        assert_eq!(rx.try_recv(), Ok(0));
        let (tx, mut rx) = tokio::sync::broadcast::channel::<u32>(events_capacity(512));
        for i in 0..2049 {
            let _ = tx.send(i);
        }
        assert!(rx.try_recv().is_err(), "lagged");
    }
}
