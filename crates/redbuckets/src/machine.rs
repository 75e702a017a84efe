//! The member as a state machine: [`MemberCore`] decides every store call, every ledger change
//! and every timer, and never waits, reads a clock or touches the network. Its shell
//! (`driver.rs`) reads the clocks once per input ([`Now`]), runs the calls it asks for, and
//! feeds back what happened; tests drive it the same way with made-up times and replies.
//!
//! # The contract
//! - [`MemberCore::next`] says what to do now: make one store call ([`Next::Call`], cut at its
//!   deadline), wait for an input until a time ([`Next::Wait`]), or stop ([`Next::Done`]). At
//!   most one call is in flight; its reply comes back as [`Input::Reply`] before anything else
//!   is asked (notices that came meanwhile first, as [`Input::Notice`]).
//! - [`MemberCore::step`] takes one input: a reply, a notice, a tick (a timer, a lease handle
//!   dropped, a handle that saw the deadline pass), the shutdown, or the abort.
//! - The ledger lives in the shared state (`shared.rs`) and changes only through
//!   `Shared::apply`, under the lock that also emits the events.
//!
//! # The phases
//! ```text
//!  Joining ──registered──▶ Running ◀──────────────┐
//!     │ refused / start timeout   │ counts show a grant on its way
//!     ▼                           ▼               │ it came, or the wait is over
//!   Done(Err)               AwaitingGrant ────────┘
//!                                 │ shutdown (from Running or AwaitingGrant)
//!                                 ▼
//!  Leaving: Draining ─▶ Releasing ─▶ Deregistering ─▶ Done(Ok / first error)
//! ```
//! The session (`session.rs`: `Registering` or `Live` with its deadline) runs inside these:
//! in `Running` a lost session registers again. Each turn of `Running` does what is due, in
//! order: the deadline passed → `lose`; the subscription is down and its retry is due →
//! subscribe; the session's call is due → heartbeat or registration; drained buckets →
//! release; a rebalance step is wanted → rebalance, whose reply's counts are compared with the
//! ledger (a mismatch means a lost reply: resync from the owner records, or revoke a release
//! the store expects).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::{Backoff, Jitter};
use crate::clock::{Deadline, Now};
use crate::config::Config;
use crate::error::Error;
use crate::event::LostReason;
use crate::ledger::Reconcile;
use crate::logs::{ErrorLog, Line};
use crate::session::Session;
use crate::shared::{ErrorHook, Shared};
use crate::store::{
    Action, Call, GroupKey, HeartbeatReply, Holdings, Notice, Notifications, RebalanceReply,
    RegisterRequest, Registration, Reply, SessionRef,
};

/// The spread of renewal intervals, drawn per renewal around the configured one (±5%), so a
/// fleet started together does not renew in bursts of n calls for as long as it runs, and
/// still renews once per interval on average.
const RENEW_JITTER: f64 = 0.1;
/// The longest a member waits for a grant notice that a reply's counts show is on its way,
/// before it reads its holdings from the store instead (a tenth of the heartbeat if shorter).
const GRANT_NOTICE_WAIT: Duration = Duration::from_millis(20);
/// The most buckets one rebalance step takes; bounds the time a script runs.
pub(crate) const MAX_TAKE: u32 = 4096;

/// What happened, for [`MemberCore::step`].
#[derive(Debug)]
pub(crate) enum Input {
    /// Nothing but time: a timer, a lease handle dropped, a handle that saw the deadline pass.
    Tick,
    /// The reply to the call in flight; `sent` holds the clocks read as it went out.
    Reply {
        sent: Now,
        result: Result<Reply, Error>,
    },
    /// A notice from the subscription; `None`: the subscription ended.
    Notice(Option<Notice>),
    /// Leave gracefully. A call in flight was dropped first and answered `Error::Shutdown`.
    Shutdown,
    /// Stop at once and tell nobody (the handle was dropped or aborted).
    Abort,
}

/// What the shell does next, from [`MemberCore::next`].
#[derive(Debug)]
pub(crate) enum Next {
    /// Make this call; cut it at `deadline` (`Error::Timeout`).
    Call { call: Call, deadline: Instant },
    /// Wait for an input until `wake`.
    Wait { wake: Instant },
    /// The member stopped with this result.
    Done(Result<(), Error>),
}

/// The change notices from the store.
#[derive(Debug)]
pub(crate) enum Subscription {
    Active(Notifications),
    /// Broken or never made: changes are learnt by polling until it is made again at `retry_at`.
    Down {
        retry_at: Instant,
    },
}

/// Where the member stands.
#[derive(Debug)]
enum Phase {
    /// The first registration, before `start` returns.
    Joining(Join),
    /// Registered, or registering again after a lost session.
    Running,
    /// A rebalance reply showed more held than the ledger: most likely a grant notice still on
    /// its way (published before the step ran, on another connection). Wait a little for it
    /// before a round trip to read the holdings.
    AwaitingGrant(Counts),
    /// The graceful leave.
    Leaving(Leave),
    /// Over; `Next::Done` gives the result once.
    Stopped(Option<Result<(), Error>>),
}

/// The join's progress.
#[derive(Debug)]
struct Join {
    /// The start fails with `StartTimeout` at this time.
    start_by: Instant,
    /// An id held by another session that would outlast this is not waited for.
    give_up: Instant,
    /// The first subscription was tried.
    subscribed: bool,
    /// When the next registration is due.
    retry_at: Instant,
    /// The last transient error, reported when the registration is tried again.
    failing: Option<Error>,
    /// The expiry of the session that held our id, the last time we saw it.
    waited: Option<Duration>,
}

/// A rebalance reply's counts, for the comparison with the ledger.
#[derive(Debug, Clone, Copy)]
struct Counts {
    store_held: usize,
    committed: usize,
    /// The end of the wait for a grant notice.
    until: Instant,
}

/// The graceful leave's progress.
#[derive(Debug)]
enum Leave {
    /// Revoked; waiting for the lease handles, until `until`.
    Draining { session: SessionRef, until: Instant },
    /// Releasing `buckets` and ending the session in one call.
    Releasing {
        session: SessionRef,
        buckets: Vec<u32>,
        retried: bool,
    },
    /// Ending the sessions left, one call each.
    Deregistering {
        sessions: Vec<SessionRef>,
        retried: bool,
        /// The leave's own session (logged when it ends), not a leftover.
        own: bool,
    },
}

/// What the call in flight is for, to take its reply.
#[derive(Debug)]
enum InFlight {
    Subscribe,
    Register,
    Heartbeat,
    Rebalance,
    /// The owner records, read to align the ledger; `then_revoke` after a rebalance step.
    Holdings {
        then_revoke: bool,
    },
    Release {
        buckets: Vec<u32>,
    },
    Leave,
    Deregister,
}

/// One backoff per kind of store call: a failing kind slows down without slowing the others,
/// and a success resets only its own.
#[derive(Debug)]
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
    /// `MemberCore::heartbeat_retry_at`). A resubscription starts at the heartbeat, as before,
    /// and may wait up to four: polling covers the gap, and each attempt may cost Redis a
    /// connection. A registration may wait up to half the ttl: no lease waits on it (a lost
    /// session's buckets go to the peers when it expires), and it is what a whole fleet retries
    /// at once after Redis comes back or when it starts together.
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

/// The member's decisions, without a clock or a store. See the module docs.
pub(crate) struct MemberCore {
    config: Arc<Config>,
    group: GroupKey,
    shared: Arc<Shared>,
    on_error: Option<ErrorHook>,
    phase: Phase,
    in_flight: Option<InFlight>,
    session: Session,
    /// When the next rebalance step is due; `None` while the member holds its share.
    rebalance: Option<Instant>,
    /// Paces the retries of a failed release.
    release_retry_at: Instant,
    subscription: Subscription,
    retries: Retries,
    /// Draws the retries' jitter; seeded per member so a simulation replays.
    jitter: Jitter,
    /// Store errors logged once per change, then summarized (`logs.rs`).
    error_log: ErrorLog,
    /// Since when a rebalance is under way (a notice, a registration, or a heartbeat asked
    /// for a step), for its duration metric; `None` while balanced.
    rebalancing_since: Option<Instant>,
    /// When the group's quarantine ends, from the last `Wait` step (`None` once granting).
    quarantine_until: Option<Instant>,
    /// A resync is wanted before anything else: the store's counts differ from the ledger's.
    /// `true`: then revoke what the store expects us to release (after a rebalance step).
    resync: Option<bool>,
    /// The leave's first error, returned when it ends.
    leave_error: Option<Error>,
    /// When the leave must be over.
    give_up: Instant,
    /// The live session has been renewed since it registered. One lost before that backs off
    /// its next registration (`session_gone`).
    renewed: bool,
}

impl std::fmt::Debug for MemberCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberCore")
            .field("phase", &self.phase)
            .field("in_flight", &self.in_flight)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// Unit tests only: what the model checker (`explore.rs`) needs to tell two cores apart.
#[cfg(test)]
impl MemberCore {
    /// Every field that can change a later decision of the core, as text: two cores with the
    /// same fingerprint (and the same shared ledger and deadline) answer every input alike.
    /// Left out: the configuration, group and error hook (fixed per member), the shared state
    /// (the checker reads it itself), and what only feeds logs and metrics (`error_log`,
    /// `rebalancing_since`).
    pub(crate) fn fingerprint(&self) -> String {
        // Every field named, so that a field added later must be placed here or left out on
        // purpose: the compiler asks.
        let MemberCore {
            config: _,
            group: _,
            shared: _,
            on_error: _,
            error_log: _,
            rebalancing_since: _,
            phase,
            in_flight,
            session,
            rebalance,
            release_retry_at,
            subscription,
            retries,
            jitter,
            quarantine_until,
            resync,
            leave_error,
            give_up,
            renewed,
        } = self;
        format!(
            "{phase:?}|{in_flight:?}|{session:?}|{rebalance:?}|{release_retry_at:?}|\
             {subscription:?}|{retries:?}|{jitter:?}|{quarantine_until:?}|{resync:?}|\
             {leave_error:?}|{give_up:?}|{renewed}"
        )
    }
}

/// Writes a line of [`ErrorLog`].
fn log_line(line: Line) {
    match line {
        Line::Began(l) | Line::Lasts(l) => tracing::warn!("{l}"),
        Line::Ended(l) => tracing::info!("{l}"),
    }
}

impl MemberCore {
    /// A member about to join at `now`.
    pub(crate) fn new(
        config: Arc<Config>,
        shared: Arc<Shared>,
        on_error: Option<ErrorHook>,
        now: &Now,
    ) -> Self {
        let now = now.at;
        let jitter = Jitter::new(Jitter::seed_from(&[
            &config.prefix,
            &config.group,
            &config.member_id,
        ]));
        MemberCore {
            retries: Retries::new(&config),
            jitter,
            error_log: ErrorLog::default(),
            group: GroupKey::new(config.prefix.clone(), config.group.clone()),
            phase: Phase::Joining(Join {
                start_by: now + config.start_timeout,
                give_up: now + config.ttl * 2,
                subscribed: false,
                retry_at: now,
                failing: None,
                waited: None,
            }),
            config,
            shared,
            on_error,
            in_flight: None,
            session: Session::new(now),
            rebalance: Some(now),
            release_retry_at: now,
            subscription: Subscription::Down { retry_at: now },
            rebalancing_since: None,
            quarantine_until: None,
            resync: None,
            leave_error: None,
            give_up: now,
            renewed: false,
        }
    }

    /// True until the first registration succeeded, or the join's failure was taken
    /// (`Next::Done`).
    pub(crate) fn joining(&self) -> bool {
        matches!(self.phase, Phase::Joining(_) | Phase::Stopped(Some(_)))
    }

    /// True once the graceful leave began (the shutdown no longer interrupts calls).
    pub(crate) fn leaving(&self) -> bool {
        matches!(self.phase, Phase::Leaving(_) | Phase::Stopped(_))
    }

    /// Whether the notices that came during the call in flight go in before its reply: yes for
    /// a heartbeat and a rebalance step, whose counts include the grants published before the
    /// call ran (a grant notice can come after the reply, on another connection); no for a
    /// holdings read, whose owner records would undo a grant published after it ran.
    pub(crate) fn notices_before_reply(&self) -> bool {
        matches!(
            self.in_flight,
            Some(InFlight::Heartbeat | InFlight::Rebalance)
        )
    }

    /// The subscription, for the shell to listen on while it waits.
    pub(crate) fn notifications(&mut self) -> Option<&mut Notifications> {
        match &mut self.subscription {
            Subscription::Active(n) => Some(n),
            Subscription::Down { .. } => None,
        }
    }

    /// What to do now. Call it after every input; while a call is in flight it must not be
    /// called (the call's reply is the next input).
    pub(crate) fn next(&mut self, now: &Now) -> Next {
        debug_assert!(self.in_flight.is_none(), "next() with a call in flight");
        match &mut self.phase {
            Phase::Stopped(result) => {
                return Next::Done(result.take().unwrap_or(Ok(())));
            }
            Phase::Joining(_) => return self.next_joining(now),
            Phase::Leaving(_) => return self.next_leaving(now),
            Phase::AwaitingGrant(counts) => {
                if now.at < counts.until {
                    return Next::Wait { wake: counts.until };
                }
                let counts = *counts;
                self.end_grant_wait(counts, true, now);
            }
            Phase::Running => {}
        }
        if self.deadline_passed(now) {
            // `lose` dates it at the deadline.
            self.lose(LostReason::Deadline, now.at);
        }
        if let Some(then_revoke) = self.resync.take() {
            if let Some(session) = self.session.live().cloned() {
                let call = Call::Holdings {
                    group: self.group.clone(),
                    session,
                };
                return self.ask(
                    InFlight::Holdings { then_revoke },
                    call,
                    self.call_deadline(now),
                );
            }
        }
        if matches!(self.subscription, Subscription::Down { retry_at } if now.at >= retry_at) {
            return self.ask(
                InFlight::Subscribe,
                self.subscribe_call(),
                self.call_deadline(now),
            );
        }
        if now.at >= self.session.due() {
            if let Some(session) = self.session.live().cloned() {
                return self.ask(
                    InFlight::Heartbeat,
                    self.heartbeat_call(session),
                    self.call_deadline(now),
                );
            }
            if let Some(call) = self.register_call() {
                return self.ask(InFlight::Register, call, self.call_deadline(now));
            }
        }
        if let Some(next) = self.release_drained(now) {
            return next;
        }
        if let Some(session) = self.session.live().cloned() {
            if self.rebalance.is_some_and(|at| now.at >= at) {
                // This step answers every request so far; a notice heard from now on asks
                // again (one taken in right after the reply is not overwritten by the step's
                // action).
                self.rebalance = None;
                let call = Call::Rebalance {
                    group: self.group.clone(),
                    session,
                    max_take: MAX_TAKE,
                };
                return self.ask(InFlight::Rebalance, call, self.call_deadline(now));
            }
        }
        self.observe(now.at);
        Next::Wait {
            wake: self.next_wake(now),
        }
    }

    /// Takes one input.
    pub(crate) fn step(&mut self, input: Input, now: &Now) {
        match input {
            Input::Tick => {}
            // A leaving member takes nothing more: what the store grants it now is freed with
            // its session at the end of the leave.
            Input::Notice(_) if self.leaving() => {}
            Input::Notice(notice) => {
                self.on_notice(notice, now);
                if let Phase::AwaitingGrant(counts) = self.phase {
                    self.end_grant_wait(counts, false, now);
                }
            }
            Input::Reply { sent, result } => {
                let Some(what) = self.in_flight.take() else {
                    tracing::debug!("a reply without a call in flight");
                    return;
                };
                self.on_reply(what, sent, result, now);
            }
            Input::Shutdown => self.shutdown(now),
            Input::Abort => {
                self.in_flight = None;
                self.drop_local();
                self.phase = Phase::Stopped(Some(Ok(())));
            }
        }
    }

    /// Sends `call` (`what` it is for), cut at `deadline`.
    fn ask(&mut self, what: InFlight, call: Call, deadline: Instant) -> Next {
        self.in_flight = Some(what);
        Next::Call { call, deadline }
    }

    fn subscribe_call(&self) -> Call {
        Call::Subscribe {
            group: self.group.clone(),
            member: Some(self.config.member_id.clone()),
        }
    }

    fn heartbeat_call(&self, session: SessionRef) -> Call {
        Call::Heartbeat {
            group: self.group.clone(),
            session,
            ttl: self.config.ttl,
            watch: self.watch(),
        }
    }

    /// The pending registration, `None` while live.
    fn register_call(&self) -> Option<Call> {
        let (session, previous) = self.session.request(&self.config.member_id)?;
        let mut req = RegisterRequest::new(
            session,
            self.config.weight,
            self.config.buckets,
            self.config.ttl,
        );
        req.replaces = previous;
        req.grace = self.config.rejoin_grace;
        Some(Call::Register {
            group: self.group.clone(),
            req,
        })
    }

    /// The join: subscribe once, then register until it succeeds, waiting once for another
    /// session of our id to expire (a crashed process restarted). A timeout or an unavailable
    /// store is retried with backoff until the start timeout, then fails with `StartTimeout`
    /// and the last error; other errors fail at once. A session of our id renewed while we
    /// waited (a live duplicate), or one that would outlast two ttls, fails with `IdInUse`.
    fn next_joining(&mut self, now: &Now) -> Next {
        let Phase::Joining(join) = &mut self.phase else {
            unreachable!("next_joining outside the join");
        };
        let start_by = join.start_by;
        if !join.subscribed {
            join.subscribed = true;
            let deadline = self.call_deadline(now).min(start_by);
            return self.ask(InFlight::Subscribe, self.subscribe_call(), deadline);
        }
        if now.at >= start_by {
            if let Some(last) = join.failing.take() {
                self.stop(Err(Error::StartTimeout {
                    after: self.config.start_timeout,
                    last: Box::new(last),
                }));
                return self.next(now);
            }
        }
        if now.at < join.retry_at {
            return Next::Wait {
                wake: join.retry_at.min(start_by),
            };
        }
        if let Some(e) = join.failing.take() {
            self.report(e, now);
        }
        let Some(call) = self.register_call() else {
            unreachable!("a live session while joining");
        };
        let deadline = self.call_deadline(now).min(start_by);
        self.ask(InFlight::Register, call, deadline)
    }

    /// The graceful leave's next call, or the wait for the drain.
    fn next_leaving(&mut self, now: &Now) -> Next {
        let deadline = (now.at + self.config.effective_call_timeout()).min(self.give_up);
        let Phase::Leaving(leave) = &mut self.phase else {
            unreachable!("next_leaving outside the leave");
        };
        match leave {
            Leave::Draining { session, until } => {
                let waiting = self.shared.lock().ledger.draining_has_handles();
                if waiting && now.at < *until {
                    return Next::Wait { wake: *until };
                }
                let session = session.clone();
                let buckets = {
                    let mut local = self.shared.lock();
                    for (took, timed_out) in
                        local.ledger.drain_ends(&local.ledger.buckets(), now.at)
                    {
                        self.shared.metrics.drained(took, timed_out);
                    }
                    local.ledger.begin_release(None)
                };
                if buckets.is_empty() {
                    self.phase = Phase::Leaving(Leave::Deregistering {
                        sessions: vec![session],
                        retried: false,
                        own: true,
                    });
                } else {
                    self.phase = Phase::Leaving(Leave::Releasing {
                        session,
                        buckets,
                        retried: false,
                    });
                }
                self.next_leaving(now)
            }
            // Release and deregistration in one step: the members that take the buckets are
            // woken with the membership after the leave, a round trip sooner. If a first
            // attempt ran unheard, the second frees nothing and the buckets end
            // `Lost { Disowned }` instead of `Released`.
            Leave::Releasing {
                session, buckets, ..
            } => {
                let call = Call::Leave {
                    group: self.group.clone(),
                    session: session.clone(),
                    buckets: buckets.clone(),
                };
                self.ask(InFlight::Leave, call, deadline)
            }
            Leave::Deregistering { sessions, .. } => match sessions.first() {
                Some(session) => {
                    let call = Call::Deregister {
                        group: self.group.clone(),
                        session: session.clone(),
                    };
                    self.ask(InFlight::Deregister, call, deadline)
                }
                None => {
                    self.drop_local();
                    let result = self.leave_result(now);
                    self.stop(result);
                    self.next(now)
                }
            },
        }
    }

    /// Ends the member with `result`.
    fn stop(&mut self, result: Result<(), Error>) {
        self.phase = Phase::Stopped(Some(result));
    }

    /// The reply to the call made for `what`.
    fn on_reply(&mut self, what: InFlight, sent: Now, result: Result<Reply, Error>, now: &Now) {
        match what {
            InFlight::Subscribe => match expect(result, "subscribe") {
                Ok(notifications) => {
                    self.retries.subscribe.reset();
                    self.subscription = Subscription::Active(notifications);
                }
                Err(e) => {
                    self.report(e, now);
                    let delay = self.retries.subscribe.next(&mut self.jitter);
                    self.subscription = Subscription::Down {
                        retry_at: now.at + self.on_my_clock(delay),
                    };
                    self.poll_soon(now);
                }
            },
            InFlight::Register => {
                let result = expect(result, "register");
                self.on_registration(result, sent, now);
            }
            InFlight::Heartbeat => {
                let result = expect(result, "heartbeat");
                self.on_heartbeat(result, sent, now);
            }
            InFlight::Rebalance => {
                let result = expect(result, "rebalance");
                self.on_rebalance(result, now);
            }
            InFlight::Holdings { then_revoke } => {
                let result = expect(result, "holdings");
                self.on_holdings(result, then_revoke, now);
            }
            InFlight::Release { buckets } => {
                let result = expect(result, "release");
                self.on_release(&buckets, result, now);
            }
            InFlight::Leave => {
                let result = expect(result, "leave");
                self.on_leave(result, now);
            }
            InFlight::Deregister => {
                let result = expect(result, "deregister");
                self.on_deregister(result, now);
            }
        }
    }

    /// A registration's reply, in the join or after a lost session.
    fn on_registration(&mut self, result: Result<Registration, Error>, sent: Now, now: &Now) {
        if let Phase::Joining(join) = &mut self.phase {
            if result.is_ok() {
                self.retries.register.reset();
            }
            match result {
                Ok(Registration::Registered { version, token }) => {
                    self.phase = Phase::Running;
                    self.registered(version, token, sent, now);
                }
                Ok(Registration::InUse { expires_in }) => {
                    // After waiting out the expiry we saw, a session still there with more
                    // than clock-drift slack left was renewed: a live process holds the id.
                    // Fail now rather than wait for a session that will not end.
                    let slack = (self.config.heartbeat / 4).max(Duration::from_millis(5));
                    let drift = 2.0 * self.config.max_clock_drift;
                    let renewed = join
                        .waited
                        .is_some_and(|w| expires_in > w.mul_f64(drift) + slack);
                    if renewed || now.at + expires_in > join.give_up {
                        let err = self.id_in_use(expires_in);
                        self.stop(Err(err));
                        return;
                    }
                    if join.waited.is_none() {
                        // Not an error yet (a restart after a crash looks like this): one line.
                        tracing::info!(
                            ?expires_in,
                            "member id held by an earlier session; waiting for it to expire"
                        );
                    }
                    join.waited = Some(expires_in);
                    join.retry_at = now.at + expires_in + Duration::from_millis(1);
                }
                // It may have run: retry with the same nonce, which finds it instead of
                // leaving a session nobody heartbeats behind.
                Err(e) if e.is_transient() => {
                    join.retry_at = now.at + self.retries.register.next(&mut self.jitter);
                    join.failing = Some(e);
                }
                Err(e) => self.stop(Err(e)),
            }
            return;
        }
        match result {
            Ok(Registration::Registered { version, token }) => {
                self.registered(version, token, sent, now);
            }
            Ok(Registration::InUse { expires_in }) => {
                self.report(self.id_in_use(expires_in), now);
                self.session.retry_at(
                    now.at + expires_in.min(self.config.heartbeat) + Duration::from_millis(1),
                );
            }
            Err(e) => {
                self.report(e, now);
                let delay = self.retries.register.next(&mut self.jitter);
                self.session.retry_at(now.at + delay);
            }
        }
    }

    /// A registration sent at `sent` succeeded.
    fn registered(&mut self, version: u64, token: u64, sent: Now, now: &Now) {
        // Grant notices at or below the group's token at this registration were for an
        // earlier session under this nonce: never ours.
        self.shared.lock().ledger.seen_token(token);
        // The first heartbeat comes soon: it learns when the peers' sessions expire.
        let renew_at = sent.at + self.on_my_clock(self.config.heartbeat);
        let deadline = self.deadline_after(sent);
        if let Some(session) = self
            .session
            .registered(&self.config.member_id, deadline, renew_at)
        {
            tracing::info!(session = %session.session, "registered");
        }
        self.renewed = false;
        self.shared.forget_expiry();
        self.publish((sent.at, version), now);
        self.rebalance = Some(now.at);
        self.rebalancing(now.at);
    }

    /// Another live session holds our id; it expires in `expires_in`.
    fn id_in_use(&self, expires_in: Duration) -> Error {
        Error::IdInUse {
            group: self.config.group.clone(),
            member: self.config.member_id.clone(),
            expires_in,
        }
    }

    fn on_heartbeat(&mut self, result: Result<HeartbeatReply, Error>, sent: Now, now: &Now) {
        if self.session.live().is_none() {
            return;
        }
        if result.is_ok() {
            self.retries.heartbeat.reset();
        }
        match result {
            Ok(reply) if reply.alive && self.deadline_passed(now) => {
                // The session is alive, but the reply came after our deadline: the leases have
                // ended already (handles were told), and must not come back to life.
                let until = self.session.deadline().map_or(sent.at, |u| u.at);
                self.lose(LostReason::Deadline, until);
                self.session.retry_at(now.at);
            }
            Ok(reply) if reply.alive => {
                // The store keeps the session: a registration after it starts from no backoff.
                self.renewed = true;
                self.retries.register.reset();
                self.shared.metrics.seen(None, reply.members);
                let until = self.deadline_after(sent);
                let next = self.next_check(sent.at, reply.next_expiry, now);
                self.session.renewed(until, next);
                self.publish((sent.at, reply.version), now);
                // The safety net under the wake-ups (the store wakes only the members that must
                // act, and a wake-up can be lost): free buckets to take, or counts that say the
                // store committed a release for us (a join) that we have not made.
                let counts = self
                    .shared
                    .lock()
                    .ledger
                    .reconcile(reply.held as usize, reply.committed as usize);
                if reply.free > 0 || counts != Reconcile::InSync {
                    self.want_rebalance(now.at);
                }
            }
            Ok(_) => {
                tracing::warn!("the store no longer knows our session");
                self.session_gone(now.at);
            }
            Err(e) => {
                self.report(e, now);
                let at = self.heartbeat_retry_at(now);
                self.session.retry_at(at);
            }
        }
    }

    /// When to retry a failed heartbeat: after the backoff, but never so late that no full call
    /// fits before the lease deadline (S3 keeps its retries). Within that last call timeout,
    /// at the backoff's base pace: each call there is cut at the deadline anyway.
    fn heartbeat_retry_at(&mut self, now: &Now) -> Instant {
        let at = now.at + self.retries.heartbeat.next(&mut self.jitter);
        let Some(until) = self.session.deadline() else {
            return at;
        };
        let latest = until
            .wake_at(now)
            .checked_sub(self.config.effective_call_timeout())
            .filter(|&latest| latest > now.at)
            .unwrap_or(now.at + self.retries.heartbeat.base());
        at.min(latest)
    }

    /// The store no longer knows the session: everything is lost; register again at once. A
    /// session that was never renewed registers again after the registration backoff instead: a
    /// store that loses every new session (a proxy spreading calls over servers that share no
    /// data, a replica that drops writes) was otherwise asked to register in a busy loop, as
    /// fast as it answered.
    fn session_gone(&mut self, now: Instant) {
        self.lose(LostReason::SessionExpired, now);
        let retry = if self.renewed {
            Duration::ZERO
        } else {
            self.retries.register.next(&mut self.jitter)
        };
        self.session.retry_at(now + retry);
    }

    /// A rebalance step's reply: its action (`apply_step`), then the count check.
    fn on_rebalance(&mut self, result: Result<RebalanceReply, Error>, now: &Now) {
        let reply = match result {
            Ok(reply) => {
                self.retries.rebalance.reset();
                reply
            }
            Err(e) => {
                self.report(e, now);
                self.rebalance = Some(now.at + self.retries.rebalance.next(&mut self.jitter));
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
        // After a grant in the reply, a grant notice published before the step has a lower
        // token and would be dropped: no use waiting for one.
        let wait = !matches!(reply.action, Action::Acquired { .. });
        if !self.apply_step(reply.action, now) {
            return;
        }
        let (store_held, committed) = (reply.held as usize, reply.committed as usize);
        // The store's count of what we hold and keep must match ours; if not, an earlier
        // reply was lost: a release decision we never heard of (revoke now), or a grant or a
        // release (resync).
        let verdict = self.shared.lock().ledger.reconcile(store_held, committed);
        if wait && self.awaits_grant(verdict, store_held) {
            let until = now.at + (self.config.heartbeat / 10).min(GRANT_NOTICE_WAIT);
            self.phase = Phase::AwaitingGrant(Counts {
                store_held,
                committed,
                until,
            });
            return;
        }
        self.settle(verdict, now);
    }

    /// Compares the counts with the ledger again, during the wait for a grant notice: back to
    /// `Running` and acting on the comparison once the notice came (nothing more awaited) or
    /// the wait is `over`.
    fn end_grant_wait(&mut self, counts: Counts, over: bool, now: &Now) {
        let verdict = self
            .shared
            .lock()
            .ledger
            .reconcile(counts.store_held, counts.committed);
        if over || !self.awaits_grant(verdict, counts.store_held) {
            self.phase = Phase::Running;
            self.settle(verdict, now);
        }
    }

    /// Whether a mismatch may be a grant notice still on its way: more held than we know, and
    /// notices come.
    fn awaits_grant(&self, verdict: Reconcile, store_held: usize) -> bool {
        verdict == Reconcile::Resync
            && self.shared.lock().ledger.held_count() < store_held
            && matches!(self.subscription, Subscription::Active(_))
    }

    /// Acts on the comparison of the store's counts with the ledger.
    fn settle(&mut self, verdict: Reconcile, now: &Now) {
        match verdict {
            Reconcile::InSync => {}
            Reconcile::Revoke(surplus) => self.revoke_surplus(surplus, now),
            Reconcile::Resync => {
                tracing::info!("holdings differ from the store's; resyncing");
                // The committed count read with the holdings, not the reply's: the store may
                // have granted us more since the reply (a grant notice not yet heard), or a
                // join may have lowered it, and the holdings' owner records are as of then too.
                self.resync = Some(true);
            }
        }
    }

    fn revoke_surplus(&mut self, surplus: usize, now: &Now) {
        if surplus > 0 {
            tracing::info!(surplus, "the store expects a release we missed");
            self.revoke(Some(surplus), now.at + self.config.drain_timeout, now.at);
        }
    }

    /// Carries out a rebalance step's action. Returns whether the session is still live, so
    /// that the store's counts can be compared with the ledger.
    fn apply_step(&mut self, action: Action, now: &Now) -> bool {
        if !matches!(action, Action::SessionLost)
            && (self.session.live().is_none() || self.deadline_passed(now))
        {
            // The reply came back after our deadline (a slow store, or this task ran late): the
            // session may be gone already, and our leases ended at the deadline. Claim nothing
            // (a new session frees any grant here when it replaces this one), and revoke nothing
            // now: a revoke dated after the deadline would claim ownership we no longer had.
            self.lose(LostReason::Deadline, now.at);
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
                    self.want_rebalance(now.at);
                }
                self.shared.apply(|l| l.grant(&buckets, token, now.at));
            }
            Action::Release(count) => {
                self.quarantine_until = None;
                self.revoke(
                    Some(count as usize),
                    now.at + self.config.drain_timeout,
                    now.at,
                );
            }
            Action::Stay => self.quarantine_until = None,
            // Capped: a store clock stepped backwards must not stall grants for longer.
            Action::Wait(wait) => {
                let at = now.at + wait.min(self.config.ttl);
                self.rebalance = Some(at);
                self.quarantine_until = Some(at);
                self.rebalancing_since = None;
                // The status tells why nothing is owned yet.
                self.shared.lock().grants_at = Some(at);
            }
            Action::SessionLost => {
                self.session_gone(now.at);
                return false;
            }
        }
        true
    }

    /// The owner records read after a lost reply: adopts grants we did not hear of (they are
    /// ours, and our deadline has not passed), and drops buckets the store no longer lists as
    /// ours (a release that ran, or foreign edits). After a rebalance step (`then_revoke`),
    /// revokes what the store's committed count, read with the same records, says we must
    /// release. It reads only our own buckets ([`crate::Store::holdings`]).
    fn on_holdings(
        &mut self,
        result: Result<Option<Holdings>, Error>,
        then_revoke: bool,
        now: &Now,
    ) {
        let holdings = match result {
            Ok(Some(holdings)) => holdings,
            // The session ended in the store, or the group is gone or stale (written by another
            // Redis process: its owners may be out of date, and the next registration
            // re-creates it).
            Ok(None) => {
                self.session_gone(now.at);
                return;
            }
            Err(e) => {
                // Try again: the next rebalance reply shows the mismatch again.
                self.report(e, now);
                self.rebalance = Some(now.at + self.retries.rebalance.next(&mut self.jitter));
                return;
            }
        };
        if self.session.live().is_none() || self.deadline_passed(now) {
            return;
        }
        self.shared.apply(|l| l.adopt(&holdings.owned, now.at));
        self.want_rebalance(now.at);
        if then_revoke {
            let surplus = self
                .shared
                .lock()
                .ledger
                .surplus(holdings.committed as usize);
            self.revoke_surplus(surplus, now);
        }
    }

    /// Releases revoked buckets whose handles are gone or whose drain time is over.
    fn release_drained(&mut self, now: &Now) -> Option<Next> {
        if now.at < self.release_retry_at {
            return None;
        }
        let session = self.session.live().cloned()?;
        let (buckets, known) = {
            let mut local = self.shared.lock();
            let buckets = local.ledger.releasable(now.at);
            for (took, timed_out) in local.ledger.drain_ends(&buckets, now.at) {
                self.shared.metrics.drained(took, timed_out);
            }
            (
                local.ledger.begin_release(Some(now.at)),
                local.ledger.highest_token(),
            )
        };
        if buckets.is_empty() {
            return None;
        }
        let call = Call::Release {
            group: self.group.clone(),
            session,
            buckets: buckets.clone(),
            known,
        };
        Some(self.ask(InFlight::Release { buckets }, call, self.call_deadline(now)))
    }

    fn on_release(&mut self, buckets: &[u32], result: Result<u32, Error>, now: &Now) {
        match result {
            Ok(freed) => {
                self.retries.release.reset();
                self.shared.apply(|l| l.released(buckets, freed, now.at));
                if (freed as usize) < buckets.len() {
                    // Some were no longer ours: an earlier release ran unheard. Lost replies can
                    // offset each other in the counts the rebalance check compares (a grant we
                    // never heard of hidden by this release), so compare the buckets themselves.
                    let asked = buckets.len();
                    tracing::info!(asked, freed, "a release freed fewer than asked; resyncing");
                    self.resync.get_or_insert(false);
                }
            }
            Err(e) => {
                // No drain extension from now on (`Ledger::begin_release`): the release may
                // have run unheard.
                self.report(e, now);
                self.release_retry_at = now.at + self.retries.release.next(&mut self.jitter);
            }
        }
    }

    /// A notice from the subscription (`None`: it ended): a grant is applied if it is ours
    /// ([`MemberCore::granted`]); anything else, or a grant that is not, asks for a rebalance
    /// step.
    fn on_notice(&mut self, notice: Option<Notice>, now: &Now) {
        let applied = match &notice {
            Some(Notice::Granted {
                session,
                token,
                buckets,
            }) => self.granted(session, *token, buckets, now),
            _ => false,
        };
        self.rebalancing(now.at);
        if !applied {
            self.rebalance = Some(self.rebalance.map_or(now.at, |at| at.min(now.at)));
        }
        if notice.is_none() {
            // The subscription broke: notices may be lost, so resync and resubscribe.
            tracing::debug!("notification stream ended; resubscribing");
            self.subscription = Subscription::Down {
                retry_at: now.at + self.retry_delay(),
            };
            self.poll_soon(now);
        }
    }

    /// A grant the store made when it freed buckets ([`Notice::Granted`]): applied when it
    /// names our live session, our deadline has not passed, and its token is above every token
    /// we applied (a repeated or late notice is not: its buckets may have been released since).
    /// Returns false otherwise, and the caller takes a rebalance step, whose reply shows any
    /// difference (a grant we dropped because a newer one overtook it is then found and
    /// resynced).
    fn granted(&mut self, session: &str, token: u64, buckets: &[u32], now: &Now) -> bool {
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
        self.shared.apply(|l| l.grant(buckets, token, now.at));
        true
    }

    /// The graceful leave begins: revoke all, drain, release, deregister. It ends by the
    /// shutdown's budget (`Local::shutdown_by`, which `Member::shutdown` waits for) even when
    /// the store does not answer: the drain is cut at the budget and the lease deadline, and
    /// the release and the deregistration each take at most the call timeout. Every revoked
    /// bucket ends: `Released` for what the store freed, `Lost` for the rest.
    fn shutdown(&mut self, now: &Now) {
        if !matches!(self.phase, Phase::Running | Phase::AwaitingGrant(_)) {
            return;
        }
        self.give_up = self
            .shared
            .lock()
            .shutdown_by
            .unwrap_or(now.at + self.config.shutdown_timeout);
        if self.deadline_passed(now) {
            self.lose(LostReason::Deadline, now.at);
        }
        let Some(session) = self.session.live().cloned() else {
            // No live session: the session ended (its deadline passed, or the store lost it),
            // or a registration is pending, which may have run (one in flight when the
            // shutdown dropped it). Without a deregistration the store keeps such a session
            // until it expires: its buckets idle up to a ttl, it counts in everyone's share,
            // and a restart under the same id waits for it. So both are deregistered within
            // the budget; deregistering a session the store does not have does nothing.
            self.drop_local();
            let mut sessions = Vec::new();
            if let Some((pending, previous)) = self.session.request(&self.config.member_id) {
                if let Some(previous) = previous {
                    sessions.push(SessionRef {
                        member: pending.member.clone(),
                        session: previous,
                    });
                }
                sessions.push(pending);
            }
            self.phase = Phase::Leaving(Leave::Deregistering {
                sessions,
                retried: false,
                own: false,
            });
            return;
        };
        // The drain ends early enough to leave the release and the deregistration their call
        // timeouts within the budget: a short budget shortens the drain, not the calls (a
        // release cut to nothing ends every bucket `Lost` and leaves them idle for a ttl).
        let calls = self.config.effective_call_timeout() * 2;
        let mut until = (now.at + self.config.drain_timeout)
            .min(self.give_up.checked_sub(calls).unwrap_or(now.at))
            .max(now.at);
        if let Some(deadline) = self.session.deadline() {
            until = until.min(deadline.wake_at(now));
        }
        self.revoke(None, until, now.at);
        self.phase = Phase::Leaving(Leave::Draining { session, until });
    }

    fn on_leave(&mut self, result: Result<u32, Error>, now: &Now) {
        let Phase::Leaving(Leave::Releasing {
            session,
            buckets,
            retried,
        }) = &mut self.phase
        else {
            return;
        };
        match result {
            Ok(freed) => {
                // Released only what the store freed (issue 8, bug 6).
                let buckets = std::mem::take(buckets);
                self.shared.apply(|l| l.released(&buckets, freed, now.at));
                tracing::info!("left the group");
                self.drop_local();
                self.stop(Ok(()));
            }
            Err(Error::Shutdown) => {
                self.drop_local();
                self.stop(Ok(()));
            }
            // A connection that died while the member was idle (a Redis restart, `CLIENT
            // KILL`) fails the first call at once and reconnects on the next: every call of
            // the leave is safe to repeat, so it is tried once more.
            Err(Error::Unavailable { .. }) if !*retried && now.at < self.give_up => {
                *retried = true;
            }
            Err(e) => {
                // Not confirmed: the store frees them with the session (at the
                // deregistration, or when it expires).
                let session = session.clone();
                self.shared
                    .apply(|l| l.lose_all(LostReason::Unreleased, now.at));
                self.leave_error = Some(e);
                self.phase = Phase::Leaving(Leave::Deregistering {
                    sessions: vec![session],
                    retried: false,
                    own: true,
                });
            }
        }
    }

    fn on_deregister(&mut self, result: Result<(), Error>, now: &Now) {
        let Phase::Leaving(Leave::Deregistering {
            sessions,
            retried,
            own,
        }) = &mut self.phase
        else {
            return;
        };
        match result {
            Ok(()) => {
                if *own {
                    tracing::info!("left the group");
                }
                sessions.remove(0);
                *retried = false;
            }
            Err(Error::Shutdown) => sessions.clear(),
            Err(Error::Unavailable { .. }) if !*retried && now.at < self.give_up => {
                *retried = true;
            }
            Err(e) => {
                self.leave_error.get_or_insert(e);
                sessions.remove(0);
                *retried = false;
            }
        }
    }

    /// The leave's outcome: its first error, also reported, or success.
    fn leave_result(&mut self, now: &Now) -> Result<(), Error> {
        match self.leave_error.take() {
            Some(e) => {
                self.report(
                    Error::Unavailable {
                        detail: format!("graceful leave incomplete: {e}"),
                    },
                    now,
                );
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Revokes `count` owned buckets (all if `None`): the most recently granted first.
    fn revoke(&mut self, count: Option<usize>, drain_until: Instant, now: Instant) {
        self.shared.apply(|l| l.revoke(count, drain_until, now));
    }

    /// Gives up every lease at `at` without the store: the deadline passed or the session is
    /// gone. `Live` → `Registering`.
    fn lose(&mut self, reason: LostReason, at: Instant) {
        // Ownership ended at the lease deadline at the latest (S3). A reply handled after it
        // (the store said the session is gone, but this task ran late, e.g. on a starved CPU)
        // must not date the end later: a timeline built from the events would show two owners.
        let at = self.session.deadline().map_or(at, |until| at.min(until.at));
        let ended = self.session.end();
        self.publish_deadline();
        let count = self.shared.apply(|l| l.lose_all(reason, at));
        if ended.is_some() {
            tracing::warn!(%reason, buckets = count, "lost the session");
        }
        self.want_rebalance(at);
    }

    /// On abort, and at the end of a leave: cancel every handle, tell nobody.
    fn drop_local(&mut self) {
        self.session.end();
        self.publish_deadline();
        self.shared.apply(|l| {
            l.drop_all();
            Vec::new()
        });
    }

    /// Whether the live session's lease deadline has passed at `now` (sticky once seen, see
    /// `Shared::deadline_passed`). False while registering.
    fn deadline_passed(&self, now: &Now) -> bool {
        self.session
            .deadline()
            .is_some_and(|until| self.shared.deadline_passed(&until, now))
    }

    /// The lease deadline after a successful heartbeat or registration sent at `sent`.
    fn deadline_after(&self, sent: Now) -> Deadline {
        Deadline::after(sent, self.on_my_clock(self.config.lease_validity()))
    }

    /// The deadline of a store call starting now: the call timeout, and never past the local
    /// lease deadline.
    fn call_deadline(&self, now: &Now) -> Instant {
        let deadline = now.at + self.config.effective_call_timeout();
        match self.session.deadline() {
            Some(until) => deadline.min(until.wake_at(now)),
            None => deadline,
        }
    }

    /// When the next timer is due.
    fn next_wake(&self, now: &Now) -> Instant {
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
    fn next_check(&mut self, sent: Instant, next_expiry: Option<Duration>, now: &Now) -> Instant {
        let period = match self.subscription {
            Subscription::Active(_) => self.config.effective_renew_interval(),
            Subscription::Down { .. } => self.config.heartbeat,
        };
        let period = period.mul_f64(1.0 + RENEW_JITTER * (self.jitter.fraction() - 0.5));
        // Paced from the reply, not the send: a Redis that answers slowly is called less often
        // (closed loop), down to the latest renewal that still leaves a retry before the lease
        // deadline, which counts from the send.
        let latest = sent + self.on_my_clock(self.config.latest_renewal().max(period));
        let mut at = (now.at + self.on_my_clock(period)).min(latest);
        if let Some(d) = next_expiry {
            // Measured on our clock, which may run fast by up to the drift: wait that much
            // longer so the check lands after the expiry.
            let wait = d.mul_f64(1.0 + self.config.max_clock_drift) + Duration::from_millis(1);
            let check = now.at + self.on_my_clock(wait);
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
    fn poll_soon(&mut self, now: &Now) {
        let poll = now.at + self.on_my_clock(self.config.heartbeat);
        self.session.due_by(poll);
    }

    /// A rebalance step is wanted: now, unless one is already planned.
    fn want_rebalance(&mut self, now: Instant) {
        self.rebalance.get_or_insert(now);
        self.rebalancing(now);
    }

    /// A rebalance begins now, unless one is under way (for its duration metric).
    fn rebalancing(&mut self, now: Instant) {
        // Nothing balances before grants begin: the quarantine has its own gauge.
        if self.quarantine_until.is_some_and(|at| at > now) {
            return;
        }
        self.rebalancing_since.get_or_insert(now);
    }

    /// Real time that `d` of this member's clock takes (see `Config::clock_rate`).
    fn on_my_clock(&self, d: Duration) -> Duration {
        d.div_f64(self.config.clock_rate)
    }

    /// A quarter heartbeat: the first resubscription after the stream broke (not a failed
    /// call: failed calls are paced by `retries`).
    fn retry_delay(&self) -> Duration {
        (self.config.heartbeat / 4).max(Duration::from_millis(5))
    }

    /// The metrics read at the end of each turn: the time left to the deadline and in the
    /// quarantine, and the end of a rebalance (no step wanted, nothing draining).
    fn observe(&mut self, now: Instant) {
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

    fn report(&mut self, error: Error, now: &Now) {
        if matches!(error, Error::Shutdown) {
            // A call dropped on purpose for the shutdown: nobody waits for it any more. Not an
            // error to report.
            tracing::debug!(error = %error, "after the shutdown");
            return;
        }
        for line in self.error_log.failed(&error, now.at) {
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

    /// What the handles read of the session: its deadline (which lease handles watch; `None`
    /// while not live) and its nonce (for the status).
    fn publish_deadline(&self) {
        // The deadline first: a reader that sees the ledger and a deadline sees a deadline at
        // least as old as the ledger's session.
        self.shared
            .valid_until
            .send_replace(self.session.deadline());
        self.shared.lock().session = self.session.live().map(|s| s.session.clone());
    }

    /// Derives what the handles read from the session after a heartbeat or registration that
    /// just succeeded: the deadline (which lease handles watch), the session nonce, and `sent`
    /// and the membership version of that call.
    fn publish(&mut self, renewed: (Instant, u64), now: &Now) {
        self.publish_deadline();
        if let Some(line) = self.error_log.succeeded(now.at) {
            log_line(line);
        }
        let (sent, version) = renewed;
        let mut local = self.shared.lock();
        local.last_heartbeat = Some(sent);
        local.version = version;
    }
}

/// The reply of a call, as the type the call returns: another call's reply (a store that broke
/// the protocol) is an error.
fn expect<T: TryFrom<Reply, Error = Reply>>(
    result: Result<Reply, Error>,
    call: &'static str,
) -> Result<T, Error> {
    T::try_from(result?).map_err(|other| Error::Unavailable {
        detail: format!("the store answered a {call} call with {other:?}"),
    })
}

#[cfg(test)]
mod tests;
