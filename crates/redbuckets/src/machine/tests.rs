//! The member's core driven by hand, as its shell would drive it: made-up clock readings
//! ([`Now`]), replies from the pure protocol model (`store::model`), and each fault a value the
//! test picks per call ([`Fate`]). No runtime, no task, no sleep: a test reads as the sequence
//! of calls and inputs it describes, and runs in microseconds.
//!
//! The tests that need the shell itself (a call dropped by the shutdown or the abort, a start
//! against a store that never answers) are integration tests (`tests/memory_member.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Input, MemberCore, Next, Subscription};
use crate::clock::{suspend, Deadline, Now};
use crate::config::Config;
use crate::error::Error;
use crate::event::{Event, LostReason};
use crate::shared::{ErrorHook, Lease, Shared};
use crate::store::model::{Model, Outcome, To};
use crate::store::{
    Call, GroupKey, HeartbeatReply, Notice, Notifications, RebalanceReply, RegisterRequest, Reply,
    SessionRef,
};

const TTL: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_millis(100);
/// The store's clock (µs since the Unix epoch) when a harness starts: any fixed value.
const STORE_EPOCH_US: u64 = 1_700_000_000_000_000;
/// A bound on the turns of one run: a core that asks for calls without letting time pass
/// (a busy loop) ends the run there, and the test sees the calls it made.
const MAX_TURNS: usize = 10_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Member "a" of the 4-bucket group "g", heartbeat 100 ms, ttl [`TTL`] (call timeout 1 s,
/// renewal every 1.5 s, lease validity 2.965 s).
fn config() -> Config {
    let mut config = Config::new("g");
    config.member_id = "a".into();
    config.buckets = 4;
    config.heartbeat = HEARTBEAT;
    config.ttl = TTL;
    config
}

/// What the store does with one call.
enum Fate {
    /// Runs it, and answers after the harness's latency.
    Answer,
    /// Answers this at once, without running anything.
    Reply(Result<Reply, Error>),
    /// Never answers: the shell cuts the call at its deadline (`Error::Timeout`).
    Hang,
}

fn answer(_: &Call) -> Fate {
    Fate::Answer
}

fn hang(_: &Call) -> Fate {
    Fate::Hang
}

fn unavailable(detail: &str) -> Error {
    Error::Unavailable {
        detail: detail.into(),
    }
}

fn is_release(call: &Call) -> bool {
    matches!(call, Call::Release { .. })
}

fn is_leave(call: &Call) -> bool {
    matches!(call, Call::Leave { .. })
}

/// One member's core, its shared state, and a model store, on a made-up clock.
struct Harness {
    core: MemberCore,
    shared: Arc<Shared>,
    events: broadcast::Receiver<Event>,
    model: Model,
    group: GroupKey,
    member: String,
    /// The three clocks at the start (tokio's, the real monotonic one, the wall clock).
    base: (Instant, std::time::Instant, SystemTime),
    /// Time since the start, on the monotonic clocks.
    elapsed: Duration,
    /// How far the wall clock runs ahead of the monotonic ones: time the host slept.
    wall_ahead: Duration,
    /// How long an answered call takes.
    latency: Duration,
    /// Notices published on the member's channel, not yet handed to the core.
    notices: VecDeque<Notice>,
    /// Every call the core asked for: its name and when it was sent.
    sent: Vec<(&'static str, Instant)>,
    /// What the error hook saw.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    fn new(config: Config) -> Self {
        config.validate().expect("a valid configuration");
        let config = Arc::new(config);
        let shared = Shared::new(Arc::clone(&config), 1024);
        let events = shared.events.subscribe();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&errors);
        let hook: ErrorHook = Arc::new(move |e: &Error| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e.to_string());
        });
        let base = (Instant::now(), std::time::Instant::now(), SystemTime::now());
        let start = Now::from_parts(base.0, base.1, base.2);
        let core = MemberCore::new(Arc::clone(&config), Arc::clone(&shared), Some(hook), &start);
        Harness {
            core,
            shared,
            events,
            model: Model::new(),
            group: GroupKey::new(config.prefix.clone(), config.group.clone()),
            member: config.member_id.clone(),
            base,
            elapsed: Duration::ZERO,
            wall_ahead: Duration::ZERO,
            latency: Duration::ZERO,
            notices: VecDeque::new(),
            sent: Vec::new(),
            errors,
        }
    }

    /// A member that owns all 4 buckets, past the new group's quarantine; its events so far
    /// are taken.
    fn owner(config: Config) -> Self {
        let mut h = Harness::new(config);
        h.run_for(TTL + Duration::from_secs(1), answer);
        assert_eq!(h.owned(), vec![0, 1, 2, 3]);
        h.events();
        h
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The clocks now.
    fn now(&self) -> Now {
        let (at, real, wall) = self.base;
        Now::from_parts(at, real, wall + self.wall_ahead).plus(self.elapsed)
    }

    fn at(&self) -> Instant {
        self.base.0 + self.elapsed
    }

    /// Time passes until `t` (never backwards).
    fn advance_to(&mut self, t: Instant) {
        self.elapsed = self.elapsed.max(t.saturating_duration_since(self.base.0));
    }

    /// The host sleeps for `d`: the wall clock jumps, the monotonic clocks stand still.
    fn suspend(&mut self, d: Duration) {
        self.wall_ahead += d;
    }

    /// The wall clock is stepped back by `d` (an NTP correction).
    fn wall_clock_steps_back(&mut self, d: Duration) {
        self.wall_ahead = self.wall_ahead.saturating_sub(d);
    }

    /// The store's clock, which runs with the monotonic ones.
    fn store_now(&self) -> u64 {
        STORE_EPOCH_US + u64::try_from(self.elapsed.as_micros()).expect("a short test")
    }

    fn step(&mut self, input: Input) {
        let now = self.now();
        self.core.step(input, &now);
    }

    fn next(&mut self) -> Next {
        let now = self.now();
        self.core.next(&now)
    }

    /// What `Member::shutdown` does: sets the leave's budget, and asks for the leave.
    fn shutdown(&mut self) {
        let budget = self.config().shutdown_timeout;
        let margin = (budget / 10).clamp(ms(20), ms(100)).min(budget / 2);
        self.shared.lock().shutdown_by = Some(self.at() + budget.saturating_sub(margin));
        self.step(Input::Shutdown);
    }

    /// Runs `call` on the model store now; what it publishes on the member's channel is queued
    /// for the core (while it is subscribed).
    fn run(&mut self, call: Call) -> Result<Reply, Error> {
        let now = self.store_now();
        let Some(Outcome { reply, notices }) = self.model.call(call, now) else {
            let never = futures_util::stream::pending();
            return Ok(Reply::Subscribe(Notifications::new(never)));
        };
        self.publish(notices);
        reply
    }

    fn publish(&mut self, notices: Vec<(To, Notice)>) {
        if !matches!(self.core.subscription, Subscription::Active(_)) {
            return;
        }
        for (to, notice) in notices {
            if to == To::Member(self.member.clone()) {
                self.notices.push_back(notice);
            }
        }
    }

    /// Hands the reply of the call sent at `sent` to the core, after the notices that came
    /// meanwhile if the core wants them first (as the shell does).
    fn reply(&mut self, sent: Now, result: Result<Reply, Error>) {
        if self.core.notices_before_reply() {
            while let Some(notice) = self.notices.pop_front() {
                self.step(Input::Notice(Some(notice)));
            }
        }
        self.step(Input::Reply { sent, result });
    }

    /// Does what the core asked (`next`), as the shell would, with `fate` for a call; a wait
    /// that lasts past `end` ends at `end` without an input. The result once the core stopped.
    fn carry_out(
        &mut self,
        next: Next,
        fate: &mut impl FnMut(&Call) -> Fate,
        end: Instant,
    ) -> Option<Result<(), Error>> {
        match next {
            Next::Done(result) => return Some(result),
            Next::Call { call, deadline } => {
                let sent = self.now();
                self.sent.push((call.name(), sent.at));
                let cut = Error::Timeout {
                    call: call.name(),
                    after: deadline.saturating_duration_since(sent.at),
                };
                let result = match fate(&call) {
                    Fate::Answer => {
                        let reply = self.run(call);
                        self.advance_to(sent.at + self.latency);
                        reply
                    }
                    Fate::Reply(reply) => reply,
                    Fate::Hang => {
                        self.advance_to(deadline);
                        Err(cut)
                    }
                };
                self.reply(sent, result);
            }
            Next::Wait { wake } => {
                if let Some(notice) = self.notices.pop_front() {
                    self.step(Input::Notice(Some(notice)));
                } else if wake > end {
                    self.advance_to(end);
                } else {
                    self.advance_to(wake);
                    self.step(Input::Tick);
                }
            }
        }
        None
    }

    /// Runs the member until `stop` holds, `within` has passed, or it stopped (its result).
    fn run_until(
        &mut self,
        within: Duration,
        mut stop: impl FnMut(&Self) -> bool,
        mut fate: impl FnMut(&Call) -> Fate,
    ) -> Option<Result<(), Error>> {
        let end = self.at() + within;
        for _ in 0..MAX_TURNS {
            if stop(self) || self.at() >= end {
                return None;
            }
            let next = self.next();
            if let Some(result) = self.carry_out(next, &mut fate, end) {
                return Some(result);
            }
        }
        None
    }

    /// Runs the member for `d` (or until it stopped).
    fn run_for(&mut self, d: Duration, fate: impl FnMut(&Call) -> Fate) {
        assert!(self.run_until(d, |_| false, fate).is_none(), "stopped");
    }

    /// Runs the member until it stops, within `within`.
    fn run_to_end(
        &mut self,
        within: Duration,
        fate: impl FnMut(&Call) -> Fate,
    ) -> Result<(), Error> {
        self.run_until(within, |_| false, fate)
            .expect("the member did not stop in time")
    }

    /// Runs the member until it asks for a call that `which` picks, and returns that call
    /// unanswered with the clocks at its send: the test answers it ([`Harness::reply`]).
    fn until_call(
        &mut self,
        within: Duration,
        which: impl Fn(&Call) -> bool,
        mut fate: impl FnMut(&Call) -> Fate,
    ) -> (Call, Now) {
        let end = self.at() + within;
        for _ in 0..MAX_TURNS {
            assert!(self.at() < end, "no such call within {within:?}");
            match self.next() {
                Next::Call { call, .. } if which(&call) => {
                    self.sent.push((call.name(), self.at()));
                    return (call, self.now());
                }
                next => {
                    if let Some(result) = self.carry_out(next, &mut fate, end) {
                        panic!("stopped: {result:?}");
                    }
                }
            }
        }
        panic!("no such call in {MAX_TURNS} turns");
    }

    /// Another member registers (in the model), its notices published.
    fn join_peer(&mut self, id: &str, buckets: u32) -> Result<(), Error> {
        let session = SessionRef {
            member: id.into(),
            session: format!("{id}-session"),
        };
        let req = RegisterRequest::new(session, 1, buckets, TTL);
        let outcome = self.model.register(&self.group, &req, self.store_now());
        self.publish(outcome.notices);
        outcome.reply.map(|_| ())
    }

    /// The events since the last call.
    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    fn owned(&self) -> Vec<u32> {
        self.shared.lock().ledger.owned_buckets()
    }

    /// A lease handle on the owned `bucket`.
    fn lease(&self, bucket: u32) -> Lease {
        let mut local = self.shared.lock();
        self.shared
            .lease_locked(&mut local.ledger, bucket)
            .expect("owned")
    }

    fn session(&self) -> SessionRef {
        self.core.session.live().cloned().expect("a live session")
    }

    /// When the calls named `name` were sent, from `from` on.
    fn sent_since(&self, name: &str, from: Instant) -> Vec<Instant> {
        self.sent
            .iter()
            .filter(|(n, at)| *n == name && *at >= from)
            .map(|(_, at)| *at)
            .collect()
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model holds no member and no owned bucket of the group: the leave completed.
    fn assert_store_left_empty(&self) {
        let group = self.model.group(&self.group).expect("the group");
        assert!(
            group.members().is_empty(),
            "the store still holds the member"
        );
        assert_eq!(group.free().len(), 4, "the store still holds buckets");
    }
}

/// How many of `events` are of the kind `kind` matches.
fn count(events: &[Event], kind: fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| kind(e)).count()
}

fn revoked(events: &[Event]) -> Vec<(u32, Instant)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Revoked { bucket, at, .. } => Some((*bucket, *at)),
            _ => None,
        })
        .collect()
}

/// All 4 buckets were revoked, and every revoke ended with its `Released` or `Lost`.
fn assert_all_revoked_and_ended(events: &[Event]) {
    assert_eq!(
        count(events, |e| matches!(e, Event::Revoked { .. })),
        4,
        "{events:?}"
    );
    for (i, e) in events.iter().enumerate() {
        if let Event::Revoked { bucket, token, .. } = e {
            let ended = events[i..].iter().any(|later| {
                matches!(later, Event::Released { .. } | Event::Lost { .. })
                    && later.bucket() == Some(*bucket)
                    && later.token() == Some(*token)
            });
            assert!(ended, "bucket {bucket} revoked, never ended: {events:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lease deadline (S3)
// ---------------------------------------------------------------------------------------------

/// Regression (issue 8, bug 1; S3 under host suspend): the store renews the session, then the
/// host sleeps 1.2 s before the reply is handled, and wakes to a store that no longer answers.
/// The session expires in the store 3 s after the send, 1.2 s of which the host slept through:
/// on tokio's clock, which stood still meanwhile, 1.8 s after the send. The member must stop
/// owning by then. Anchored at the reply (the bug), the deadline ran 1.2 s past the expiry.
#[test]
fn a_host_suspend_between_send_and_reply_counts_against_the_lease() {
    let mut h = Harness::owner(config());
    let suspend = ms(1200);
    let (call, sent) = h.until_call(TTL, |c| matches!(c, Call::Heartbeat { .. }), answer);
    let reply = h.run(call);
    assert!(
        matches!(&reply, Ok(Reply::Heartbeat(r)) if r.alive),
        "{reply:?}"
    );
    h.suspend(suspend);
    h.reply(sent, reply);
    h.run_for(TTL * 2, hang);
    let expiry = sent.at + TTL - suspend;
    let lost: Vec<Instant> = h
        .events()
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
            at - sent.at,
            expiry - sent.at
        );
    }
    assert!(h.owned().is_empty());
}

/// Regression (review, 5): the deadline check reads the wall clock, so a wall clock stepped
/// forward then back showed a lease valid, then invalid, then valid again, and the member's
/// task, which had not run meanwhile, never lost the session. Once anyone sees the deadline
/// passed it stays passed, and the member loses the session.
#[test]
fn a_deadline_seen_passed_stays_passed_when_the_wall_clock_steps_back() {
    let mut h = Harness::owner(config());
    let lease = h.lease(0);
    assert!(h.shared.is_valid(&h.now()));
    h.suspend(TTL * 2);
    assert!(
        !h.shared.is_valid(&h.now()),
        "the deadline passed on the wall clock"
    );
    h.wall_clock_steps_back(TTL * 2);
    assert!(
        !h.shared.is_valid(&h.now()),
        "a deadline seen passed came back to life"
    );
    // The lease and the handle's reads (on the real clocks) see it passed too: it is sticky.
    assert!(!lease.is_valid(), "a lease seen expired came back to life");
    assert!(h.shared.lock_valid().is_none());
    // The first reader to see it wakes the member's task (`Shared::dropped`): a tick.
    h.step(Input::Tick);
    h.run_for(ms(1), answer);
    let lost = h
        .events()
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
    assert_eq!(lost, 4, "the member did not lose the session");
    // A new session owns again, valid.
    h.run_until(TTL * 4, |h| h.owned().contains(&0), answer);
    assert!(h.owned().contains(&0), "not owned again");
    assert!(h.shared.is_valid(&h.now()));
    let lease = h.lease(0);
    assert_eq!(Some(lease.token()), h.shared.lock().ledger.owned_token(0));
}

/// The handles' half of the test above, on the clocks they read themselves (`Now::read`, whose
/// wall clock `clock::suspend` moves on this thread): a lease seen expired after the wall clock
/// jumped stays expired when it steps back, before the member's task has run at all.
#[test]
fn a_lease_seen_expired_stays_expired_when_the_wall_clock_steps_back() {
    let shared = Shared::new(Arc::new(config()), 16);
    shared.apply(|l| l.grant(&[0], 1, Instant::now()));
    let validity = shared.config.lease_validity();
    shared
        .valid_until
        .send_replace(Some(Deadline::after(Now::read(), validity)));
    let lease = {
        let mut local = shared.lock();
        shared.lease_locked(&mut local.ledger, 0).expect("owned")
    };
    assert!(lease.is_valid());
    suspend::host_suspends(TTL * 2);
    assert!(!lease.is_valid(), "the deadline passed on the wall clock");
    suspend::wall_clock_steps_back(TTL * 2);
    assert!(!lease.is_valid(), "a lease seen expired came back to life");
    assert!(
        shared.lock_valid().is_none(),
        "the handle still sees it owned"
    );
}

/// Issue 10, 3: failed heartbeats back off (fewer calls than the fixed quarter-heartbeat retry
/// made), and the last retry still comes a call timeout before the lease deadline.
#[test]
fn failed_heartbeats_back_off_within_the_lease_deadline() {
    let mut config = config();
    config.heartbeat = ms(400);
    config.call_timeout = ms(100);
    let mut h = Harness::owner(config);
    let start = h.base.0;
    let last_ok = *h
        .sent_since("heartbeat", start)
        .last()
        .expect("heartbeats ran");
    let deadline = last_ok + h.config().lease_validity();
    let call_timeout = h.config().effective_call_timeout();
    h.run_for(deadline + ms(1) - h.at(), hang);
    assert!(h.owned().is_empty(), "the deadline passed");
    let failed: Vec<Instant> = h
        .sent_since("heartbeat", last_ok + ms(1))
        .into_iter()
        .filter(|&t| t < deadline)
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
        deadline - last >= call_timeout || deadline - last <= ms(100),
        "the last retry came {:?} before the deadline",
        deadline - last
    );
    // After a call timeout before the deadline, nothing waits past it: a retry was sent within
    // the last call timeout plus the backoff base before the deadline.
    assert!(
        failed
            .iter()
            .any(|&t| deadline - t <= call_timeout + ms(100)),
        "no retry in the last stretch before the deadline: {:?}",
        failed.iter().map(|&t| deadline - t).collect::<Vec<_>>()
    );
}

/// A grant notice handled after the lease deadline passed (the task ran late: a starved CPU, or
/// a host that slept) is not applied: that ownership would begin after the session's leases
/// ended, while the store may have given the buckets to another member (S3). The same notice in
/// time is applied. Kills the mutant that applies a grant without the deadline check (issue
/// 19, 8), which survived every other test and a 10,000-seed soak.
#[test]
fn a_grant_notice_handled_after_the_deadline_is_not_applied() {
    enum Late {
        InTime,
        Starved,
        Slept,
    }
    for late in [Late::InTime, Late::Starved, Late::Slept] {
        let mut h = Harness::new(config());
        // Registered, in the new group's quarantine: live, owning nothing.
        h.run_for(ms(500), answer);
        assert!(h.owned().is_empty());
        h.events();
        let deadline = h.core.session.deadline().expect("live");
        match late {
            Late::InTime => {}
            // The task wakes after the deadline, to a notice: no input came in between.
            Late::Starved => h.advance_to(deadline.at + ms(1)),
            Late::Slept => h.suspend(deadline.remaining(&h.now()) + ms(1)),
        }
        let token = h.shared.lock().ledger.highest_token() + 1;
        h.step(Input::Notice(Some(Notice::Granted {
            session: h.session().session,
            token,
            buckets: vec![0, 1],
        })));
        let acquired = count(&h.events(), |e| matches!(e, Event::Acquired { .. }));
        if let Late::InTime = late {
            assert_eq!(acquired, 2, "a grant in time is applied");
            assert_eq!(h.owned(), vec![0, 1]);
        } else {
            assert_eq!(acquired, 0, "a grant applied after the lease deadline");
            assert!(h.shared.lock().ledger.buckets().is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Drains and releases
// ---------------------------------------------------------------------------------------------

/// Two of the owner's buckets are revoked when "b" joins (the store commits their release and
/// wakes "a"). Returns the harness, a lease on each of the 4 buckets (taken before), and the
/// revoked buckets with their revoke time.
fn owner_revoking_two() -> (Harness, Vec<Lease>, Vec<(u32, Instant)>) {
    let mut h = Harness::owner(config());
    let leases: Vec<Lease> = (0..4).map(|b| h.lease(b)).collect();
    h.join_peer("b", 4).expect("b joins");
    h.run_until(ms(100), |h| h.owned().len() == 2, answer);
    let revoked = revoked(&h.events());
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    (h, leases, revoked)
}

/// A revoked bucket whose lease handle lives is released when its drain time is over, not
/// before (the next owner would start while a worker still works on it); one whose handle was
/// dropped is released at once. Kills the mutants that release before the drain ends (issue
/// 19, 8: `Ledger::releasable` ignoring the drain time), which only ledger unit tests caught.
#[test]
fn a_revoked_bucket_is_released_when_its_handles_are_dropped_or_its_drain_is_over() {
    let (mut h, mut leases, revoked) = owner_revoking_two();
    let drain = h.config().drain_timeout;
    let (first, revoked_at) = revoked[0];
    let (second, _) = revoked[1];
    // The first one's handle is dropped: released at once, alone.
    drop(leases.remove(first as usize));
    h.step(Input::Tick);
    let (call, sent) = h.until_call(drain, is_release, answer);
    let Call::Release { buckets, .. } = &call else {
        unreachable!()
    };
    assert_eq!(buckets, &vec![first], "released with its handle dropped");
    assert_eq!(sent.at, revoked_at, "not released at once");
    let reply = h.run(call);
    h.reply(sent, reply);
    // The second one's handle lives on: released at the end of its drain.
    let (call, sent) = h.until_call(drain * 2, is_release, answer);
    let Call::Release { buckets, .. } = &call else {
        unreachable!()
    };
    assert_eq!(buckets, &vec![second]);
    assert_eq!(
        sent.at,
        revoked_at + drain,
        "released {:?} after the revoke; its drain is {drain:?}",
        sent.at - revoked_at
    );
    drop(leases);
}

/// The graceful leave waits for the lease handles of what it revoked, up to the drain time,
/// before it releases: at once without handles, at the end of the drain with one. Kills the
/// mutant whose leave ignores the drain's end (`Leave::Draining { until }`).
#[test]
fn the_leave_releases_when_the_handles_are_dropped_or_the_drain_is_over() {
    for held in [false, true] {
        let mut h = Harness::owner(config());
        let lease = held.then(|| h.lease(0));
        let began = h.at();
        let remaining = h.core.session.deadline().expect("live").remaining(&h.now());
        h.shutdown();
        let (call, sent) = h.until_call(TTL, is_leave, answer);
        let drain = if held {
            h.config().drain_timeout.min(remaining)
        } else {
            Duration::ZERO
        };
        assert_eq!(
            sent.at - began,
            drain,
            "the leave released {:?} after the revoke (a handle held: {held})",
            sent.at - began
        );
        let reply = h.run(call);
        h.reply(sent, reply);
        assert!(h.run_to_end(TTL, answer).is_ok());
        drop(lease);
    }
}

/// Regression (review, 2): the release of drained buckets picks them under the lock and calls
/// the store without it; a lease extending its drain meanwhile was promised the time (`Some`)
/// while the bucket was being released. It is now refused (`None`).
#[test]
fn a_drain_extension_during_the_release_is_refused() {
    let (mut h, leases, revoked) = owner_revoking_two();
    let (_call, _sent) = h.until_call(TTL, is_release, answer);
    for (bucket, _) in &revoked {
        assert_eq!(
            leases[*bucket as usize].extend_drain(Duration::from_secs(5)),
            None,
            "bucket {bucket}: a drain promised while its release is in flight"
        );
    }
    // A bucket still owned may ask: the refusal is the release's.
    let kept = h.owned()[0];
    assert!(leases[kept as usize]
        .extend_drain(Duration::from_secs(5))
        .is_some());
}

/// Regression (review, session 5): after a release whose reply was lost, a lease asking for
/// more drain was promised it, while the store had freed the bucket and granted it to another
/// member, whose work would not wait. Once a release was sent, none is promised.
#[test]
fn a_drain_extension_after_a_failed_release_is_refused() {
    let (mut h, leases, revoked) = owner_revoking_two();
    let from = h.at();
    let (call, sent) = h.until_call(TTL, is_release, answer);
    // It ran in the store; its reply is lost.
    let _ = h.run(call);
    h.reply(sent, Err(unavailable("reply lost")));
    assert_eq!(h.sent_since("release", from).len(), 1);
    for (bucket, _) in &revoked {
        assert_eq!(
            leases[*bucket as usize].extend_drain(Duration::from_secs(5)),
            None,
            "bucket {bucket}: a drain promised after its release may have run"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The graceful leave
// ---------------------------------------------------------------------------------------------

/// Regression (CI, session 4): the first call after the member's connection was killed while
/// idle (`CLIENT KILL`) fails at once with a broken pipe; when that call was the leave, the
/// shutdown failed and the buckets idled until the session expired. The leave is tried once
/// more (the connection reconnects on the next call).
#[test]
fn a_leave_survives_a_connection_that_died_while_idle() {
    let mut h = Harness::owner(config());
    h.shutdown();
    let mut broken = false;
    let result = h.run_to_end(TTL, |call| {
        if is_leave(call) && !broken {
            broken = true;
            return Fate::Reply(Err(unavailable("broken pipe")));
        }
        Fate::Answer
    });
    assert!(result.is_ok(), "{result:?}");
    let events = h.events();
    assert_eq!(
        count(&events, |e| matches!(e, Event::Released { .. })),
        4,
        "{events:?}"
    );
    h.assert_store_left_empty();
}

/// Regression (issue 8, bug 6): the leave's release freed 3 of 4 buckets (the fourth was
/// released by an earlier call whose reply was lost), and the leave emitted `Released` for all
/// 4. It must claim no release the store did not confirm, and still end every revoked bucket.
#[test]
fn a_leave_claims_released_only_what_the_store_freed() {
    let mut h = Harness::owner(config());
    h.shutdown();
    let (call, sent) = h.until_call(TTL, is_leave, answer);
    let Call::Leave {
        group,
        session,
        buckets,
    } = &call
    else {
        unreachable!()
    };
    // An earlier release of the first bucket ran unheard.
    let now = h.store_now();
    let freed = h
        .model
        .release(group, session, &buckets[..1], u64::MAX, now);
    assert_eq!(freed.reply, 1);
    let reply = h.run(call);
    assert!(matches!(reply, Ok(Reply::Release(3))), "{reply:?}");
    h.reply(sent, reply);
    assert!(h.run_to_end(TTL, answer).is_ok());
    let events = h.events();
    let released = count(&events, |e| matches!(e, Event::Released { .. }));
    assert!(
        released <= 3,
        "{released} Released, the store freed 3: {events:?}"
    );
    assert_all_revoked_and_ended(&events);
}

/// Regression (issue 9, 4): with the store down, a shutdown at ttl 1 s blocked for its whole
/// budget (the release waited for all that was left of it, past the 333 ms call timeout), and
/// the revoked buckets never ended. Now: the drain (cut at the lease deadline), then the
/// release and the deregistration, each within the call timeout.
#[test]
fn a_shutdown_with_the_store_down_ends_in_time_and_ends_every_bucket() {
    let mut config = config();
    config.ttl = Duration::from_secs(1);
    let mut h = Harness::new(config);
    h.run_for(Duration::from_secs(2), answer);
    assert_eq!(h.owned().len(), 4);
    // Held through the drain: the leave waits the drain time (cut at the deadline).
    let lease = h.lease(0);
    h.events();
    let began = h.at();
    h.shutdown();
    let result = h.run_to_end(Duration::from_secs(10), hang);
    let took = h.at() - began;
    drop(lease);
    assert!(result.is_err(), "the leave cannot be complete: {result:?}");
    let c = h.config();
    let bound = c.drain_timeout.min(c.lease_validity()) + c.effective_call_timeout() * 2;
    assert!(
        took <= bound && took < c.shutdown_timeout,
        "shutdown took {took:?}; drain and two calls take at most {bound:?}"
    );
    assert_all_revoked_and_ended(&h.events());
}

/// Regression (review, 1): the drain could use the whole shutdown budget. With a 200 ms budget,
/// the default 1 s drain and a lease held, the drain ran to the budget and the release and the
/// deregistration had no time left: every bucket ended `Lost(Unreleased)`, the shutdown failed,
/// and the store kept the buckets for a ttl. The drain now leaves the two calls their time.
#[test]
fn a_short_shutdown_budget_shortens_the_drain_not_the_release() {
    let mut config = config();
    config.shutdown_timeout = ms(200);
    let mut h = Harness::owner(config);
    h.latency = ms(5);
    let lease = h.lease(0);
    let began = h.at();
    h.shutdown();
    let result = h.run_to_end(ms(200), answer);
    drop(lease);
    assert!(result.is_ok(), "{result:?}");
    assert!(h.at() - began <= ms(180), "took {:?}", h.at() - began);
    let events = h.events();
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
    h.assert_store_left_empty();
}

/// Regression (review, 3): a leave without a live session returned without deregistering. Here
/// the session was lost (the store stopped answering past the deadline), and the
/// re-registration ran in the store but its reply never came: the shutdown dropped it. The
/// store kept that session, owning nothing but counted in everyone's share, until it expired a
/// ttl later. The leave now deregisters it.
#[test]
fn a_leave_while_registering_deregisters_the_pending_session() {
    let mut h = Harness::owner(config());
    h.run_until(TTL * 2, |h| h.owned().is_empty(), hang);
    assert!(h.owned().is_empty(), "the deadline passed");
    let (call, sent) = h.until_call(TTL, |c| matches!(c, Call::Register { .. }), hang);
    let _ = h.run(call);
    let members = |h: &Harness| h.model.group(&h.group).map_or(0, |g| g.members().len());
    assert_eq!(members(&h), 1, "the re-registration ran");
    // The shutdown drops the call in flight (it answers `Shutdown`), then begins the leave.
    h.reply(sent, Err(Error::Shutdown));
    h.shutdown();
    let result = h.run_to_end(TTL, answer);
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        members(&h),
        0,
        "the session the shutdown dropped is still in the store"
    );
}

/// The core's half of "a shutdown does not wait for a call in flight" (issue 9, 4; the other
/// half, the drop itself, is `tests/memory_member.rs`): the dropped call answers
/// `Error::Shutdown`, which is no error to report, and the leave's first call comes at once.
#[test]
fn a_call_dropped_for_the_shutdown_is_no_error_and_the_leave_begins_at_once() {
    let mut h = Harness::owner(config());
    let (_renewal, sent) = h.until_call(TTL, |_| true, answer);
    h.reply(sent, Err(Error::Shutdown));
    let began = h.at();
    h.shutdown();
    let (call, sent) = h.until_call(ms(1), is_leave, answer);
    assert_eq!(sent.at, began);
    let reply = h.run(call);
    h.reply(sent, reply);
    assert!(h.run_to_end(TTL, answer).is_ok());
    assert!(h.errors().is_empty(), "{:?}", h.errors());
    assert_eq!(h.shared.lock().errors, 0);
    assert_all_revoked_and_ended(&h.events());
    h.assert_store_left_empty();
}

/// Regression (issue 8, bug 5; issue 9, 6): aborting a member whose store call hangs dropped the
/// call with `Error::Shutdown`, which was reported, a WARN and an `on_error` call, as if the
/// store had failed. The core's half: the dropped call's `Shutdown`, then the abort, report
/// nothing and tell nobody (the shell's half is in `tests/memory_member.rs`).
#[test]
fn an_abort_during_a_store_call_reports_no_error() {
    let mut h = Harness::owner(config());
    let (_renewal, sent) = h.until_call(TTL, |_| true, answer);
    h.reply(sent, Err(Error::Shutdown));
    h.step(Input::Abort);
    assert!(matches!(h.next(), Next::Done(Ok(()))));
    assert!(h.errors().is_empty(), "{:?}", h.errors());
    assert_eq!(h.shared.lock().errors, 0);
    assert!(h.events().is_empty(), "an abort tells nobody");
    assert!(h.owned().is_empty());
}

// ---------------------------------------------------------------------------------------------
// The join, and registering again
// ---------------------------------------------------------------------------------------------

/// Issue 10, 2: a start against a briefly busy store. Before, `start` gave up after two
/// register timeouts; now it retries (same nonce) with backoff until the start timeout.
#[test]
fn a_start_retries_registrations_that_time_out() {
    let mut config = config();
    config.call_timeout = ms(500);
    let mut h = Harness::new(config);
    let mut hangs = 5;
    let stopped = h.run_until(
        TTL * 2,
        |h| !h.core.joining(),
        |call| match call {
            Call::Register { .. } if hangs > 0 => {
                hangs -= 1;
                Fate::Hang
            }
            _ => Fate::Answer,
        },
    );
    assert!(stopped.is_none(), "the start failed: {stopped:?}");
    assert!(!h.core.joining(), "still joining");
    assert_eq!(h.sent_since("register", h.base.0).len(), 6);
    // Five timeouts of 500 ms, and five growing backoffs (heartbeat 100 ms: 25..=50 ms,
    // 50..=100, 100..=200, 200..=400, 400..=800; capped at half the ttl).
    let took = h.elapsed;
    assert!(took >= ms(3275) && took <= ms(4050), "{took:?}");
    assert_eq!(h.shared.lock().errors, 5);
    h.run_for(TTL + Duration::from_secs(1), answer);
    assert_eq!(h.owned().len(), 4);
    let group = h.model.group(&h.group).expect("the group");
    assert_eq!(
        group.members().len(),
        1,
        "one session: every retry used the same nonce"
    );
}

/// Errors a retry cannot cure fail the start at once.
#[test]
fn a_start_does_not_retry_a_group_of_another_shape() {
    let mut config = config();
    config.member_id = "b".into();
    config.buckets = 8;
    let mut h = Harness::new(config);
    h.join_peer("a", 4).expect("a joins");
    let result = h.run_to_end(TTL, answer);
    assert!(
        matches!(result, Err(Error::GroupMismatch { .. })),
        "{result:?}"
    );
    assert_eq!(h.elapsed, Duration::ZERO);
    assert_eq!(h.sent_since("register", h.base.0).len(), 1);
}

/// A store that keeps no session (it registers one, and the next call says it is gone: a
/// proxy that routes calls to different servers, a replica that drops writes) made the member
/// register again at once, every time: a busy loop, as fast as the store answers. A session
/// lost before its first renewal now backs off like a failed registration (up to half the
/// ttl), and the member still joins soon once the store keeps sessions again.
#[test]
fn a_store_that_loses_every_new_session_is_not_asked_to_register_in_a_loop() {
    enum Loses {
        /// The rebalance step right after the registration answers `SessionLost`.
        AtTheStep,
        /// Every heartbeat answers `alive: false`.
        AtTheHeartbeat,
    }
    for loses in [Loses::AtTheStep, Loses::AtTheHeartbeat] {
        let mut h = Harness::owner(config());
        let from = h.at();
        h.run_for(TTL, |call| match (call, &loses) {
            (Call::Rebalance { .. }, Loses::AtTheStep) => {
                Fate::Reply(Ok(Reply::Rebalance(RebalanceReply::session_lost())))
            }
            (Call::Heartbeat { .. }, _) => {
                Fate::Reply(Ok(Reply::Heartbeat(HeartbeatReply::default())))
            }
            _ => Fate::Answer,
        });
        // 25..=50 ms, 50..=100, 100..=200, 200..=400, 400..=800, then 750..=1,500 ms.
        let registers = h.sent_since("register", from).len();
        assert!(
            (4..=10).contains(&registers),
            "{registers} registrations in a ttl"
        );
        // The store keeps sessions again: the member joins within the longest backoff, and owns
        // its buckets (again past a quarantine: the group was empty).
        h.run_for(TTL * 2 + TTL / 2, answer);
        assert_eq!(h.owned().len(), 4);
    }
}
