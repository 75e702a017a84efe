//! The user's side: the builder, the `Member` handle, and the status snapshot.
//!
//! A `Member` is a cheap handle on a background task (the driver, `driver.rs`) that speaks the
//! store protocol. The handle reads the member's local ledger under a std mutex; it never waits
//! on the store.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::driver::Driver;
use crate::error::Error;
use crate::event::{Deadline, Event, Lease, LeaseGuard};
use crate::ledger::Ledger;
use crate::store::Store;

/// Called with every error the member meets while running (the `tracing` events carry them too).
pub type ErrorHook = Arc<dyn Fn(&Error) + Send + Sync>;

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
    /// Session ttl. Default 10 s.
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
    /// Graceful shutdown budget. Default 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }
    /// How long a revoked bucket waits for its lease handles. Default 1 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
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
    /// Fails when the configuration is invalid, the store cannot be reached, the group exists
    /// with another bucket count, or another live session keeps this member id for longer than
    /// two ttls.
    pub async fn start(self) -> Result<Member, Error> {
        self.config.validate()?;
        let config = Arc::new(self.config);
        let capacity = (config.buckets as usize * 2 + 16).max(1024);
        let (events, _) = broadcast::channel(capacity);
        let (valid_until, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            local: Mutex::new(Local::default()),
            events,
            valid_until,
            dropped: Arc::new(Notify::new()),
        });
        let graceful = CancellationToken::new();
        let abort = CancellationToken::new();
        let (freeze, frozen) = tokio::sync::mpsc::unbounded_channel();
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
        let task = tokio::spawn(tracing::Instrument::instrument(driver.run(), span));
        Ok(Member {
            config,
            shared,
            graceful,
            freeze,
            _abort: abort.drop_guard(),
            task: Some(task),
        })
    }
}

/// One member of a group. Dropping it without [`Member::shutdown`] stops it like a crash: its
/// buckets stay owned in the store until its session expires.
pub struct Member {
    config: Arc<Config>,
    shared: Arc<Shared>,
    graceful: CancellationToken,
    freeze: tokio::sync::mpsc::UnboundedSender<Duration>,
    /// Dropping the handle aborts the task (a crash, from the group's point of view).
    _abort: tokio_util::sync::DropGuard,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("group", &self.config.group)
            .field("id", &self.config.member_id)
            .finish_non_exhaustive()
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

    /// This member's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.config.member_id
    }

    /// The configuration it runs with.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The buckets this member owns now, sorted. A copy: nothing to unlock.
    #[must_use]
    pub fn buckets(&self) -> Vec<u32> {
        let local = self.shared.lock();
        if !self.shared.is_valid(Instant::now()) {
            return Vec::new();
        }
        local.ledger.owned().map(|(b, _)| b).collect()
    }

    /// True if this member owns `bucket` now (granted, not revoked, before the local deadline).
    #[must_use]
    pub fn owns(&self, bucket: u32) -> bool {
        self.token(bucket).is_some()
    }

    /// The fencing token of `bucket` if this member owns it now.
    #[must_use]
    pub fn token(&self, bucket: u32) -> Option<u64> {
        let local = self.shared.lock();
        if !self.shared.is_valid(Instant::now()) {
            return None;
        }
        local.ledger.owned_token(bucket)
    }

    /// A lease handle on `bucket` if this member owns it now. While any handle of a revoked
    /// bucket is alive, the member waits (up to the drain time) before releasing the bucket.
    #[must_use]
    pub fn lease(&self, bucket: u32) -> Option<Lease> {
        let mut local = self.shared.lock();
        if !self.shared.is_valid(Instant::now()) {
            return None;
        }
        let (token, cancel, guard) = local.ledger.guard(bucket, || LeaseGuard {
            dropped: Arc::clone(&self.shared.dropped),
        })?;
        Some(Lease {
            bucket,
            token,
            cancel,
            valid_until: self.shared.valid_until.subscribe(),
            _guard: guard,
        })
    }

    /// Subscribes to ownership events from now on. A receiver that falls behind by more than
    /// `2 × buckets` events gets `RecvError::Lagged` and should resynchronise from
    /// [`Member::buckets`].
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// A snapshot of the member's state.
    #[must_use]
    pub fn status(&self) -> Status {
        let local = self.shared.lock();
        let now = Instant::now();
        let valid_until = *self.shared.valid_until.borrow();
        let valid = valid_until.is_some_and(|until| !until.passed(now));
        Status {
            group: self.config.group.clone(),
            member: self.config.member_id.clone(),
            session: local.session.clone(),
            share: local.share,
            held: if valid { local.ledger.owned_count() } else { 0 },
            draining: local.ledger.draining_count(),
            last_heartbeat: local.last_heartbeat,
            valid_until: valid_until.map(|d| d.at),
            version: local.version,
            errors: local.errors,
            last_error: local.last_error.clone(),
        }
    }

    /// Leaves the group gracefully: revokes every bucket, waits for lease handles (up to the
    /// drain time), releases everything and deregisters, within the shutdown timeout.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.graceful.cancel();
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        let budget = self.config.shutdown_timeout + self.config.effective_call_timeout();
        match tokio::time::timeout(budget, task).await {
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

    /// For simulations only: the member's task does nothing for `duration`, as if its process
    /// were stopped (SIGSTOP) while the others go on.
    #[doc(hidden)]
    pub fn freeze(&self, duration: Duration) {
        let _ = self.freeze.send(duration);
    }

    /// Stops at once without releasing anything, as a crash would: the buckets are freed when
    /// the session expires. For tests and emergencies.
    pub fn abort(self) {
        drop(self);
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

/// State shared between the handle and the driver.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) local: Mutex<Local>,
    pub(crate) events: broadcast::Sender<Event>,
    /// The live session's lease deadline, derived from the driver's session: the one value
    /// the handle and every lease handle read (`None` while not registered).
    pub(crate) valid_until: watch::Sender<Option<Deadline>>,
    pub(crate) dropped: Arc<Notify>,
}

impl Shared {
    /// True while the live session's lease deadline has not passed.
    pub(crate) fn is_valid(&self, now: Instant) -> bool {
        self.valid_until
            .borrow()
            .is_some_and(|until| !until.passed(now))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Local> {
        // Nothing inside the lock can panic halfway through an update that matters more than
        // the panic; keep serving after one.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the handle reads: the ledger and the status fields.
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(crate) ledger: Ledger,
    /// The live session's nonce (derived from the driver's session).
    pub(crate) session: Option<String>,
    pub(crate) last_heartbeat: Option<Instant>,
    pub(crate) share: (u32, u32),
    pub(crate) version: u64,
    pub(crate) errors: u64,
    pub(crate) last_error: Option<String>,
}
