//! `Faulty`: a store wrapper, one per simulated member process, that injects faults at the store
//! boundary — the only place a member meets the outside world. It is the testkit's
//! `Intercepted` store with a [`Link`] as its hook.
//!
//! A call is modelled as a request on a wire and a reply coming back:
//! - the request may fail before it is sent (`fail_before`), or be lost in a partition;
//! - once sent it runs on the inner store *whether or not the caller still waits* (it is spawned),
//!   in the order the member sent its calls (one connection, FIFO), possibly late (`delay`) or
//!   only when a hold ends;
//! - the reply may be lost after the call ran (`fail_after`: the outcome-unknown case), delayed
//!   (sometimes past the member's call timeout), or held.
//!
//! Every random choice comes from the wrapper's own `StdRng`, seeded by the simulation.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redbuckets::store::model::{Before, ParkingCheck};
use redbuckets::store::{Action, Channel, GroupKey, HeartbeatReply, Notice, Notifications};
use redbuckets::{Error, MemoryStore, Store};
use redbuckets_testkit::{Call, Intercept, Intercepted, Reply};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How flaky a member's link to the store is. Probabilities are per call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Profile {
    /// The call fails before reaching the store.
    pub fail_before: f64,
    /// The call runs, its reply is lost.
    pub fail_after: f64,
    /// The request, or the reply, is delayed by up to `max_delay`.
    pub delay: f64,
    /// The longest delay.
    pub max_delay: Duration,
    /// A wake-up (a notice on the member's channel) is lost.
    pub lose_notice: f64,
    /// A wake-up is delivered twice.
    pub dup_notice: f64,
}

impl Profile {
    /// No faults (a little latency still varies the interleavings).
    pub const CALM: Profile = Profile {
        fail_before: 0.0,
        fail_after: 0.0,
        delay: 0.0,
        max_delay: Duration::ZERO,
        lose_notice: 0.0,
        dup_notice: 0.0,
    };
}

/// Deliberately broken behaviour, to show that the checks catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// An honest store.
    None,
    /// Heartbeats report success without renewing the session (the last healthy reply is
    /// replayed), and no change notice is ever delivered: the member keeps believing it owns
    /// its buckets after the store expired its session and gave them away.
    Heartbeat,
    /// Grants report tokens that go down over time (S2 broken).
    StaleTokens,
    /// Not the store: the member's clock runs 20% slow, beyond the 1% its configuration
    /// allows, and its link is cut for two ttls once it holds buckets. It believes its leases
    /// last past the store's expiry of its session (S3 broken).
    SlowClock,
}

/// Fault counters of a whole run, shared by every wrapper.
#[derive(Debug, Default)]
pub struct Counters {
    pub calls: AtomicU64,
    pub failed_before: AtomicU64,
    pub lost_replies: AtomicU64,
    pub delayed: AtomicU64,
    pub partitioned: AtomicU64,
    pub ran_unheard: AtomicU64,
    /// Holdings read by members (resynchronisations after a lost reply).
    pub resyncs: AtomicU64,
    /// Wake-ups lost, and delivered twice.
    pub lost_notices: AtomicU64,
    pub duplicated_notices: AtomicU64,
    /// When a registration last ran while its caller no longer waited: a session the member
    /// may never use (its process may even be gone) joined the group, a membership change.
    pub unheard_registration: Mutex<Option<Instant>>,
    /// In a run with a rejoin grace: the parking check on every call that writes, as the
    /// store ran them.
    pub parking: Mutex<Option<ParkingWatch>>,
}

/// [`ParkingCheck`] on one group, fed by every link: the group before and after each call
/// that writes (the store runs a call in one step, with no other call in between).
#[derive(Debug)]
pub struct ParkingWatch {
    pub group: GroupKey,
    pub check: ParkingCheck,
    /// What broke, in order.
    pub broken: Vec<String>,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn parking(&self) -> MutexGuard<'_, Option<ParkingWatch>> {
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the check needs of the watched group before a call that writes (`None` when
    /// nothing is watched).
    fn parking_before(&self, store: &MemoryStore, call: &Call) -> Option<Before> {
        let watch = self.parking();
        let group = &watch.as_ref()?.group;
        let caller = match call {
            Call::Register { req, .. } => req.session.member.as_str(),
            Call::Heartbeat { session, .. }
            | Call::Rebalance { session, .. }
            | Call::Release { session, .. }
            | Call::Leave { session, .. }
            | Call::Deregister { session, .. } => session.member.as_str(),
            _ => "",
        };
        Some(store.inspect(|model, now| ParkingCheck::before(model.group(group), now, caller)))
    }

    /// The same group after the call: checked against what it was before.
    fn parking_after(&self, store: &MemoryStore, before: &Before, purges: bool) {
        let mut watch = self.parking();
        let Some(w) = watch.as_mut() else { return };
        let broken =
            store.inspect(|model, now| w.check.observe(before, model.group(&w.group), now, purges));
        w.broken.extend(broken);
    }
}

struct Control {
    rng: StdRng,
    profile: Profile,
    partitioned_until: Option<Instant>,
    lie: Lie,
    replay: Option<HeartbeatReply>,
}

/// What happens to one call, drawn when it is made.
struct Plan {
    request_delay: Duration,
    reply_delay: Duration,
    lose_reply: bool,
    /// Changes when the link heals, cutting the delays short.
    heals: watch::Receiver<u64>,
}

/// The store as one member process sees it: every call goes through its [`Link`].
pub type Faulty = Intercepted<MemoryStore, Link>;

/// A wrapper around `inner`, its faults drawn from `seed`.
pub fn faulty(inner: &MemoryStore, seed: u64, lie: Lie, counters: Arc<Counters>) -> Faulty {
    Intercepted::new(inner.clone(), Link::new(seed, lie, counters))
}

/// The faults of one member process's link to the store. Clones share the fault state (a
/// request on the wire holds one).
#[derive(Clone)]
pub struct Link {
    ctl: Arc<Mutex<Control>>,
    /// One connection: requests reach the store in the order they were sent.
    wire: Arc<tokio::sync::Mutex<()>>,
    /// Bumped to break every open subscription (a dropped pub/sub connection).
    breaks: Arc<watch::Sender<u64>>,
    /// The end of the current hold; a watch so that healing wakes the held calls.
    held_until: Arc<watch::Sender<Option<Instant>>>,
    /// Bumped when the link heals: delays drawn before end at once.
    heals: Arc<watch::Sender<u64>>,
    /// Calls whose caller still waits, plus requests still on the wire.
    busy: Arc<AtomicUsize>,
    counters: Arc<Counters>,
}

/// Counts one call or request in [`Link::busy`] while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(busy: &Arc<AtomicUsize>) -> Busy {
        busy.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(busy))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn unavailable(detail: &str) -> Error {
    Error::Unavailable {
        detail: format!("simulated: {detail}"),
    }
}

impl Link {
    fn new(seed: u64, lie: Lie, counters: Arc<Counters>) -> Self {
        Link {
            ctl: Arc::new(Mutex::new(Control {
                rng: StdRng::seed_from_u64(seed),
                profile: Profile::CALM,
                partitioned_until: None,
                lie,
                replay: None,
            })),
            wire: Arc::new(tokio::sync::Mutex::new(())),
            breaks: Arc::new(watch::channel(0).0),
            held_until: Arc::new(watch::channel(None).0),
            heals: Arc::new(watch::channel(0).0),
            busy: Arc::new(AtomicUsize::new(0)),
            counters,
        }
    }

    fn ctl(&self) -> MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_profile(&self, profile: Profile) {
        self.ctl().profile = profile;
    }

    /// Every call fails until `until`; open subscriptions break.
    pub fn partition(&self, until: Instant) {
        self.ctl().partitioned_until = Some(until);
        self.break_subscriptions();
    }

    /// Requests and replies wait until `until` (a pause, from the store's point of view);
    /// open subscriptions break.
    pub fn hold(&self, until: Instant) {
        self.held_until.send_replace(Some(until));
        self.break_subscriptions();
    }

    pub fn break_subscriptions(&self) {
        self.breaks.send_modify(|n| *n += 1);
    }

    /// Ends every fault now: held calls go through, the profile turns calm.
    pub fn heal(&self) {
        let mut ctl = self.ctl();
        ctl.profile = Profile::CALM;
        ctl.partitioned_until = None;
        drop(ctl);
        self.held_until.send_replace(None);
        self.heals.send_modify(|n| *n += 1);
    }

    /// True if a call made now could take long: one is under way or on the wire, the link is
    /// held, or its profile delays calls. Otherwise a call ends within a few milliseconds.
    pub fn may_stall(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
            || self.held_until.borrow().is_some_and(|u| u > Instant::now())
            || self.ctl().profile.delay > 0.0
    }

    fn partitioned(&self) -> bool {
        self.ctl()
            .partitioned_until
            .is_some_and(|u| u > Instant::now())
    }

    /// Draws the fate of one call; `Err` if it fails before being sent.
    fn plan(&self) -> Result<Plan, Error> {
        Counters::bump(&self.counters.calls);
        let mut ctl = self.ctl();
        if ctl.partitioned_until.is_some_and(|u| u > Instant::now()) {
            Counters::bump(&self.counters.partitioned);
            return Err(unavailable("partitioned"));
        }
        let p = ctl.profile;
        if p.fail_before > 0.0 && ctl.rng.gen_bool(p.fail_before) {
            Counters::bump(&self.counters.failed_before);
            return Err(unavailable("request failed"));
        }
        let delay = |ctl: &mut Control| {
            if p.delay > 0.0 && ctl.rng.gen_bool(p.delay) && !p.max_delay.is_zero() {
                Counters::bump(&self.counters.delayed);
                ctl.rng.gen_range(Duration::ZERO..=p.max_delay)
            } else if ctl.rng.gen_bool(0.2) {
                // Ordinary latency, so members' calls interleave in varied ways.
                Duration::from_micros(ctl.rng.gen_range(0..=2_000))
            } else {
                Duration::ZERO
            }
        };
        let request_delay = delay(&mut ctl);
        let reply_delay = delay(&mut ctl);
        let lose_reply = p.fail_after > 0.0 && ctl.rng.gen_bool(p.fail_after);
        let mut heals = self.heals.subscribe();
        heals.borrow_and_update();
        Ok(Plan {
            heals,
            request_delay,
            reply_delay,
            lose_reply,
        })
    }

    /// Waits while the member's calls are held.
    async fn wait_hold(&self) {
        let mut held_until = self.held_until.subscribe();
        loop {
            let until = *held_until.borrow_and_update();
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::select! {
                        biased;
                        _ = held_until.changed() => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                }
                _ => return,
            }
        }
    }

    /// Sleeps `d`, unless the link heals first.
    async fn pause(heals: &mut watch::Receiver<u64>, d: Duration) {
        if d.is_zero() {
            return;
        }
        tokio::select! {
            biased;
            _ = heals.changed() => {}
            () = tokio::time::sleep(d) => {}
        }
    }

    /// How much later a repeated notice arrives than the first: up to the profile's largest
    /// delay, or half a second when it has none (several heartbeats of the simulation).
    fn repeat_delay(&self) -> Duration {
        let mut ctl = self.ctl();
        let most = ctl.profile.max_delay.max(Duration::from_millis(500));
        ctl.rng.gen_range(Duration::ZERO..=most)
    }

    /// What happens to one notice: lost (`None`), or delivered once or twice after a delay.
    fn notice_fate(&self) -> Option<(u32, Duration)> {
        let mut ctl = self.ctl();
        let p = ctl.profile;
        if p.lose_notice > 0.0 && ctl.rng.gen_bool(p.lose_notice) {
            Counters::bump(&self.counters.lost_notices);
            return None;
        }
        let times = if p.dup_notice > 0.0 && ctl.rng.gen_bool(p.dup_notice) {
            Counters::bump(&self.counters.duplicated_notices);
            2
        } else {
            1
        };
        let late = if p.delay > 0.0 && ctl.rng.gen_bool(p.delay) && !p.max_delay.is_zero() {
            ctl.rng.gen_range(Duration::ZERO..=p.max_delay)
        } else {
            Duration::ZERO
        };
        Some((times, late))
    }

    /// A subscription through the link: it breaks when the link does. Each notice may be lost,
    /// duplicated or late (the profile's `lose_notice`, `dup_notice`, `delay`).
    async fn subscribe(
        &self,
        inner: &MemoryStore,
        g: &GroupKey,
        member: Option<&str>,
    ) -> Result<Reply, Error> {
        if self.ctl().lie == Lie::Heartbeat {
            // A liar never tells the member that anything changed.
            let never = futures_util::stream::pending();
            return Ok(Reply::Subscribe(Notifications::new(never)));
        }
        self.plan()?;
        let channel = member.map_or(Channel::Group, Channel::Member);
        let inner = inner.subscribe(g, channel).await?;
        let mut breaks = self.breaks.subscribe();
        breaks.borrow_and_update();
        let link = self.clone();
        // Notices in flight, each with the time it arrives: a late one may arrive after later
        // ones, and a repeat arrives after the first, possibly after the member acted on it
        // (a grant it released since must not come back).
        let queue: Vec<(Instant, Notice)> = Vec::new();
        Ok(Reply::Subscribe(Notifications::new(
            futures_util::stream::unfold(
                (inner, breaks, link, queue),
                |(mut inner, mut breaks, link, mut queue)| async move {
                    loop {
                        // The earliest first; among equals, the first sent.
                        let first = (0..queue.len()).min_by_key(|&i| queue[i].0);
                        if let Some(i) = first.filter(|&i| queue[i].0 <= Instant::now()) {
                            let (_, notice) = queue.remove(i);
                            return Some((notice, (inner, breaks, link, queue)));
                        }
                        let due = first.map(|i| queue[i].0);
                        tokio::select! {
                            biased;
                            _ = breaks.changed() => return None,
                            notice = inner.next() => {
                                let notice = notice?;
                                let Some((times, late)) = link.notice_fate() else {
                                    continue;
                                };
                                let at = Instant::now() + late;
                                queue.push((at, notice.clone()));
                                if times > 1 {
                                    queue.push((at + link.repeat_delay(), notice));
                                }
                            }
                            () = async {
                                match due {
                                    Some(at) => tokio::time::sleep_until(at).await,
                                    None => std::future::pending().await,
                                }
                            } => {}
                        }
                    }
                },
            ),
        )))
    }

    /// Sends one call through the simulated wire to `inner`.
    async fn wire_call(&self, inner: &MemoryStore, call: Call) -> Result<Reply, Error> {
        let name = call.name();
        let inner = inner.clone();
        if name == "holdings" {
            Counters::bump(&self.counters.resyncs);
        }
        let _busy = Busy::new(&self.busy);
        let mut plan = self.plan()?;
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let (mut heals, request_delay) = (plan.heals.clone(), plan.request_delay);
        let on_wire = Busy::new(&self.busy);
        // Spawned: a request that is on the wire runs even if the caller gives up on it.
        tokio::spawn(async move {
            let _on_wire = on_wire;
            let _turn = this.wire.lock().await;
            Self::pause(&mut heals, request_delay).await;
            this.wait_hold().await;
            if this.partitioned() {
                Counters::bump(&this.counters.partitioned);
                return; // lost on the way
            }
            // The calls that write; those that purge expired sessions and graces whatever
            // they find.
            let writes = !matches!(name, "holdings" | "snapshot");
            let purges = matches!(name, "register" | "heartbeat" | "rebalance");
            let before = if writes {
                this.counters.parking_before(&inner, &call)
            } else {
                None
            };
            let result = call.run(inner.clone()).await;
            if let Some(before) = before {
                this.counters.parking_after(&inner, &before, purges);
            }
            if tx.send(result).is_err() {
                Counters::bump(&this.counters.ran_unheard);
                if name == "register" {
                    *this
                        .counters
                        .unheard_registration
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                }
            }
        });
        let result = rx.await.map_err(|_| unavailable("request lost"))?;
        Self::pause(&mut plan.heals, plan.reply_delay).await;
        self.wait_hold().await;
        if plan.lose_reply || self.partitioned() {
            Counters::bump(&self.counters.lost_replies);
            return Err(unavailable("reply lost"));
        }
        result
    }
}

impl Intercept<MemoryStore> for Link {
    async fn call(&self, inner: &MemoryStore, call: Call) -> Result<Reply, Error> {
        let lie = self.ctl().lie;
        match call {
            Call::Heartbeat { .. } if lie == Lie::Heartbeat => {
                if let Some(reply) = self.ctl().replay {
                    return Ok(Reply::Heartbeat(reply));
                }
            }
            Call::Subscribe { group, member } => {
                return self.subscribe(inner, &group, member.as_deref()).await
            }
            _ => {}
        }
        // Members read their holdings to resynchronise after a lost reply; those reads meet the
        // same faults as every other call.
        let mut reply = self.wire_call(inner, call).await?;
        match &mut reply {
            Reply::Heartbeat(beat) if lie == Lie::Heartbeat && beat.alive && beat.free == 0 => {
                // From now on, every heartbeat "succeeds" with this reply.
                self.ctl().replay = Some(*beat);
            }
            Reply::Rebalance(step) if lie == Lie::StaleTokens => {
                if let Action::Acquired { token, .. } = &mut step.action {
                    *token = u64::MAX - *token;
                }
            }
            _ => {}
        }
        Ok(reply)
    }
}
