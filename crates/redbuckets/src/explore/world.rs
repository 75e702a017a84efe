//! The world the checker explores: the store's clock and [`Model`], and each member's real
//! [`MemberCore`] driven as `driver.rs` drives it. [`World::apply`] takes one [`Choice`] and
//! checks S1–S3 and the model's invariants after it; [`World::fingerprint`] is what the search
//! prunes on (see the parent module for why it is precise enough).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::clock::Deadline;
use crate::clock::Now;
use crate::config::Config;
use crate::error::Error;
use crate::event::Event;
use crate::machine::{Input, MemberCore, Next};
use crate::session::nonces;
use crate::shared::{Lease, Shared};
use crate::store::model::{Model, Outcome, ParkingCheck, To};
use crate::store::{Call, GroupKey, Notice, Notifications, Reply};

/// The store's clock at the start, µs since the Unix epoch.
const T0_US: u64 = 1_700_000_000_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One configuration to explore.
#[derive(Debug, Clone)]
pub(super) struct Scenario {
    pub(super) name: &'static str,
    pub(super) members: usize,
    pub(super) buckets: u32,
    /// How many transitions deep the search goes.
    pub(super) depth: usize,
    /// How many faults a path may contain.
    pub(super) faults: u8,
    /// How many graceful leaves a path may contain.
    pub(super) leaves: u8,
    /// Every member's rejoin grace (store µs; 0: off): a session that ends parks its buckets
    /// for its id, and [`Choice::Rejoin`] restarts a stopped or crashed member under its id.
    pub(super) grace_us: u64,
    /// How many rejoins a path may contain (with a grace).
    pub(super) rejoins: u8,
    /// How many of the members (the last ones) are not started with the others: each joins
    /// the running group when the search chooses.
    pub(super) late: usize,
    /// Start from a converged group (every member joined, the quarantine over, the buckets
    /// spread) instead of from nothing: the depth then goes to faults, not to the join.
    pub(super) warm: bool,
    /// Liveness is checked from every this-many-th state at the depth bound.
    pub(super) liveness_every: usize,
    /// The clock-rate error `d`: clocks run at 1 − d or 1 + d, in percent.
    pub(super) drift_pct: u64,
    /// How long time runs after the start (store µs).
    pub(super) horizon_us: u64,
}

impl Scenario {
    pub(super) fn new(
        name: &'static str,
        members: usize,
        buckets: u32,
        depth: usize,
        faults: u8,
    ) -> Self {
        Scenario {
            name,
            members,
            buckets,
            depth,
            faults,
            leaves: 1,
            grace_us: 0,
            rejoins: 0,
            late: 0,
            warm: true,
            liveness_every: 1,
            drift_pct: 10,
            horizon_us: 60_000,
        }
    }

    /// The configuration of member `m`: times of a few ms, so that few instants matter.
    fn config(&self, m: usize) -> Config {
        let mut c = Config::new("g");
        c.prefix = "x".into();
        c.member_id = format!("m{m}");
        c.buckets = self.buckets;
        c.heartbeat = ms(10);
        c.ttl = ms(30);
        c.call_timeout = ms(5);
        c.drain_timeout = ms(4);
        c.max_drain = ms(4);
        c.safety_margin = ms(1);
        #[allow(clippy::cast_precision_loss)]
        {
            c.max_clock_drift = self.drift_pct as f64 / 100.0;
        }
        c.start_timeout = ms(200);
        c.shutdown_timeout = ms(40);
        c.rejoin_grace = Duration::from_micros(self.grace_us);
        c.validate().expect("a valid configuration");
        c
    }
}

/// How long a user works on a revoked bucket before it drops the handle (store µs): less than
/// the drain time, so a correct member always waits for it.
const WORK_US: u64 = 2_000;

/// One transition. `u8`s are member indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Choice {
    /// The first transition: member `m`'s clock runs fast if bit `m` is set, else slow; every
    /// member starts.
    Begin(u8),
    /// The end of the start (warm: once the group converged without faults): from here on,
    /// faults may come, and time runs for the scenario's horizon.
    Horizon,
    /// The call runs in the store and its reply comes back at once.
    Run(u8),
    /// Fault: the call runs, its reply is held (delivered later, or never: a timeout).
    RunHold(u8),
    /// Fault: the call is lost before it runs (a timeout at its deadline).
    Drop(u8),
    /// The held reply comes back (after the notices that came before it, as the shell does).
    Reply(u8),
    /// Fault: the held reply comes back before the notices that came meanwhile.
    ReplyFirst(u8),
    /// The first queued notice is delivered.
    Notice(u8),
    /// Fault: the first queued notice is lost.
    NoticeLost(u8),
    /// Fault: the first queued notice is delivered and comes again later.
    NoticeDup(u8),
    /// Time moves to the next instant at which something happens.
    Advance,
    /// Fault: time moves on while notices wait to be delivered (they come late).
    AdvanceLate,
    /// Fault: the member's process dies; nobody is told.
    Crash(u8),
    /// Fault: a crashed or stopped member starts again under its id.
    Restart(u8),
    /// The member leaves gracefully (with a grace, its buckets are parked for its id).
    Shutdown(u8),
    /// A member that left or crashed starts again under its id (with a grace: within it, it
    /// claims its parked buckets; a crashed one first waits for its old session to expire).
    Rejoin(u8),
    /// Fault: the store loses its data.
    Wipe,
    /// Fault: the member is cut off from the store: its calls and notices are lost.
    Isolate(u8),
    /// The cut ends.
    Heal(u8),
    /// Fault: the member's process stops running (a starved CPU, a GC pause, a stopped
    /// container): its timers do not fire and it takes no notice, while time goes on.
    Pause(u8),
    /// The paused process runs again. The shell's `select!` is biased: a notice that came
    /// meanwhile goes in before the timer that fell due.
    Resume(u8),
    /// A member that was not started with the others joins.
    Start(u8),
}

impl Choice {
    fn is_fault(self) -> bool {
        matches!(
            self,
            Choice::RunHold(_)
                | Choice::Drop(_)
                | Choice::ReplyFirst(_)
                | Choice::NoticeLost(_)
                | Choice::NoticeDup(_)
                | Choice::AdvanceLate
                | Choice::Crash(_)
                | Choice::Restart(_)
                | Choice::Wipe
                | Choice::Isolate(_)
                | Choice::Pause(_)
        )
    }
}

/// Where the member's shell stands.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a few per state; boxing buys nothing here
enum Act {
    /// Waiting for an input until `wake`.
    Waiting(Instant),
    /// A call in flight.
    Calling {
        call: Call,
        deadline: Instant,
        sent: Now,
        status: Status,
    },
    /// `Next::Done` came.
    Done(Result<(), Error>),
}

/// A call in flight.
#[derive(Debug)]
enum Status {
    /// Not run yet: it runs (or is lost) at this instant.
    Sent,
    /// Ran; its reply is on its way.
    Held(Result<Reply, Error>),
    /// Lost (before or after it ran): the shell sees a timeout at the deadline.
    Lost,
}

/// A lease handle the user holds, and when it saw it cancelled (store µs).
struct Handle {
    lease: Lease,
    cancelled_at: Option<u64>,
}

/// A running member process.
struct Life {
    core: MemberCore,
    shared: Arc<Shared>,
    leases: mpsc::UnboundedReceiver<Lease>,
    /// The user's event stream (`MemberHandle::events`).
    events: broadcast::Receiver<Event>,
    /// The lease deadline when the events were last read.
    deadline: Option<Deadline>,
    handles: Vec<Handle>,
    act: Act,
    inbox: VecDeque<Notice>,
    subscribed: bool,
    /// The user asked this process to leave (a leave that fails ends with an error).
    leaving: bool,
    /// A handle was dropped: the shell wakes (`Shared::dropped`).
    poked: bool,
}

/// A member: its id's slot, across restarts.
struct Slot {
    config: Arc<Config>,
    /// Clock rate in percent of the store's.
    rate: u64,
    started: bool,
    isolated: bool,
    paused: bool,
    life: Option<Life>,
}

/// The composition explored.
pub(super) struct World {
    sc: Scenario,
    group: GroupKey,
    base: Now,
    /// Store time since the start, µs.
    t: u64,
    model: Model,
    slots: Vec<Slot>,
    faults: u8,
    leaves: u8,
    rejoins: u8,
    /// S2: the highest token the model ever granted, per bucket.
    tokens: BTreeMap<u32, u64>,
    /// Parking as the sessions seen to end say it must be (see [`ParkingCheck`]).
    parking: ParkingCheck,
    /// The first broken check, if any.
    pub(super) violation: Option<String>,
    /// Checks are made (off while replaying a path checked before).
    checking: bool,
    /// Time stops here (store µs), once set by `Choice::Horizon`.
    until: Option<u64>,
    log: Option<Vec<String>>,
    pub(super) steps: usize,
}

/// The instant every replay starts from: one per thread, so that replays agree on absolute
/// instants (the fingerprint holds them).
fn base() -> Now {
    thread_local! {
        static BASE: Now = Now::from_parts(
            Instant::now(),
            std::time::Instant::now(),
            SystemTime::now(),
        );
    }
    BASE.with(|b| *b)
}

impl World {
    /// The world before `Begin`.
    pub(super) fn new(sc: &Scenario, log: bool) -> Self {
        nonces::count_from(0);
        let slots = (0..sc.members)
            .map(|m| Slot {
                config: Arc::new(sc.config(m)),
                rate: 100,
                started: false,
                isolated: false,
                paused: false,
                life: None,
            })
            .collect();
        World {
            sc: sc.clone(),
            group: GroupKey::new("x", "g"),
            base: base(),
            t: 0,
            model: Model::new(),
            slots,
            faults: sc.faults,
            leaves: sc.leaves,
            rejoins: sc.rejoins,
            tokens: BTreeMap::new(),
            parking: ParkingCheck::new(),
            violation: None,
            checking: true,
            until: None,
            log: log.then(Vec::new),
            steps: 0,
        }
    }

    /// The world after `path`.
    /// Every state on the path was checked when the search first reached it: the replay
    /// makes no check (the S2 history is kept all the same).
    pub(super) fn replay(sc: &Scenario, path: &[Choice]) -> Self {
        let mut w = World::new(sc, false);
        w.checking = false;
        for &c in path {
            w.apply(c);
        }
        w.checking = true;
        w
    }

    // ---- clocks ----

    /// Member `m`'s clocks at the store time `t`.
    fn now_of(&self, m: usize) -> Now {
        let ns = self.t * 10 * self.slots[m].rate;
        self.base.plus(Duration::from_nanos(ns))
    }

    /// The first store time (µs) at which member `m`'s clock reads `at` or later.
    fn store_time(&self, m: usize, at: Instant) -> u64 {
        let ns = u64::try_from(at.saturating_duration_since(self.base.at).as_nanos())
            .unwrap_or(u64::MAX / 4);
        ns.div_ceil(10 * self.slots[m].rate)
    }

    fn store_now(&self) -> u64 {
        T0_US + self.t
    }

    // ---- choices ----

    /// Every choice open in this state, in a fixed order.
    pub(super) fn enabled(&self) -> Vec<Choice> {
        if self.t == 0 && !self.slots.iter().any(|s| s.started) {
            return (0..1u8 << self.sc.members).map(Choice::Begin).collect();
        }
        // Faults only after the start.
        let fault_ok = self.faults > 0 && self.until.is_some();
        // With a grace, a restart under the id is a choice of its own (not a fault): the
        // restart the grace is for.
        let rejoin_ok = self.sc.grace_us > 0 && self.rejoins > 0 && self.until.is_some();
        let mut out = Vec::new();
        let mut blocked = false;
        let mut late = false;
        for (i, slot) in self.slots.iter().enumerate() {
            let m = u8::try_from(i).expect("few members");
            let Some(life) = &slot.life else {
                if slot.started && rejoin_ok {
                    out.push(Choice::Rejoin(m));
                } else if slot.started && fault_ok {
                    out.push(Choice::Restart(m));
                } else if !slot.started && self.until.is_some() {
                    out.push(Choice::Start(m));
                }
                continue;
            };
            if slot.paused {
                out.push(Choice::Resume(m));
                if fault_ok {
                    out.push(Choice::Crash(m));
                }
                continue;
            }
            let now = self.now_of(i);
            match &life.act {
                Act::Calling {
                    status, deadline, ..
                } => match status {
                    Status::Sent => {
                        blocked = true;
                        out.push(Choice::Run(m));
                        if fault_ok {
                            out.extend([Choice::RunHold(m), Choice::Drop(m)]);
                        }
                    }
                    Status::Held(_) if now.at < *deadline => {
                        out.push(Choice::Reply(m));
                        if fault_ok && !life.inbox.is_empty() && life.core.notices_before_reply() {
                            out.push(Choice::ReplyFirst(m));
                        }
                    }
                    Status::Held(_) | Status::Lost => {}
                },
                Act::Waiting(_) => {
                    if fault_ok {
                        out.push(Choice::Pause(m));
                    }
                    if !life.inbox.is_empty() {
                        late = true;
                        out.push(Choice::Notice(m));
                        if fault_ok {
                            out.extend([Choice::NoticeLost(m), Choice::NoticeDup(m)]);
                        }
                    }
                }
                Act::Done(_) => {
                    if rejoin_ok {
                        out.push(Choice::Rejoin(m));
                    } else if fault_ok {
                        out.push(Choice::Restart(m));
                    }
                    continue;
                }
            }
            if fault_ok {
                out.push(Choice::Crash(m));
            }
            if self.leaves > 0
                && self.until.is_some()
                && !life.core.leaving()
                && !life.core.joining()
            {
                out.push(Choice::Shutdown(m));
            }
            if slot.isolated {
                out.push(Choice::Heal(m));
            } else if fault_ok {
                out.push(Choice::Isolate(m));
            }
        }
        if fault_ok {
            out.push(Choice::Wipe);
        }
        let open = |at: u64| self.until.is_none_or(|until| at <= until);
        if !blocked && self.next_event().is_some_and(open) {
            if !late {
                out.push(Choice::Advance);
            } else if fault_ok {
                out.push(Choice::AdvanceLate);
            }
        }
        out
    }

    /// The next instant (store µs) after now at which something happens without a choice.
    fn next_event(&self) -> Option<u64> {
        let mut at: Vec<u64> = Vec::new();
        for (m, slot) in self.slots.iter().enumerate() {
            let Some(life) = &slot.life else { continue };
            match &life.act {
                Act::Waiting(wake) => at.push(self.store_time(m, *wake)),
                Act::Calling { deadline, .. } => at.push(self.store_time(m, *deadline)),
                Act::Done(_) => {}
            }
            if let Some(until) = *life.shared.valid_until.borrow() {
                at.push(self.store_time(m, until.at));
            }
            at.extend(
                life.handles
                    .iter()
                    .filter_map(|h| h.cancelled_at.map(|c| c + WORK_US)),
            );
        }
        if let Some(g) = self.model.group(&self.group) {
            at.extend(g.members().values().map(|m| m.expires() - T0_US));
            at.extend(g.parked().values().map(|p| p.until() - T0_US));
            at.push(g.grant_after().saturating_sub(T0_US));
        }
        at.into_iter().filter(|&a| a > self.t).min()
    }

    /// Takes one choice, fires the timers and deadlines it made due, then checks every
    /// property.
    pub(super) fn apply(&mut self, c: Choice) {
        self.steps += 1;
        if c.is_fault() {
            self.faults -= 1;
        }
        let line = self.log.is_some().then(|| self.describe_choice(c));
        if let (Some(log), Some(line), Choice::Begin(_)) = (&mut self.log, &line, c) {
            // Before the warm start's own lines.
            log.push(format!("   0.000 ms  {line}"));
        }
        let mut note = String::new();
        let owned_before: Vec<BTreeMap<u32, u64>> = if self.checking {
            (0..self.slots.len())
                .map(|m| self.ledger_owned(m))
                .collect()
        } else {
            Vec::new()
        };
        match c {
            Choice::Begin(fast) => {
                for (m, slot) in self.slots.iter_mut().enumerate() {
                    slot.rate = if fast & (1 << m) != 0 {
                        100 + self.sc.drift_pct
                    } else {
                        100 - self.sc.drift_pct
                    };
                }
                for m in 0..self.slots.len() - self.sc.late {
                    self.start(m);
                }
            }
            Choice::Horizon => self.until = Some(self.t + self.sc.horizon_us),
            Choice::Run(m) | Choice::RunHold(m) => {
                let m = m as usize;
                let result = self.run(m);
                if self.log.is_some() {
                    note = summarize(&result);
                }
                if c == Choice::Run(m as u8) {
                    self.answer(m, result, true);
                } else if let Some(life) = &mut self.slots[m].life {
                    if let Act::Calling { status, .. } = &mut life.act {
                        *status = Status::Held(result);
                    }
                }
            }
            Choice::Drop(m) => self.set_status(m as usize, Status::Lost),
            Choice::Reply(m) | Choice::ReplyFirst(m) => {
                let m = m as usize;
                let held = std::mem::replace(self.status_mut(m), Status::Lost);
                let Status::Held(result) = held else {
                    unreachable!("a reply without a held one");
                };
                if self.log.is_some() {
                    note = summarize(&result);
                }
                self.answer(m, result, c == Choice::Reply(m as u8));
            }
            Choice::Notice(m) | Choice::NoticeDup(m) => {
                let m = m as usize;
                let life = self.slots[m].life.as_mut().expect("a live member");
                let notice = if c == Choice::Notice(m as u8) {
                    life.inbox.pop_front()
                } else {
                    life.inbox.front().cloned()
                };
                if self.log.is_some() {
                    note = format!("{notice:?}");
                }
                self.input(m, Input::Notice(notice));
            }
            Choice::NoticeLost(m) => {
                let life = self.slots[m as usize].life.as_mut().expect("a live member");
                let lost = life.inbox.pop_front();
                if self.log.is_some() {
                    note = format!("{lost:?}");
                }
            }
            Choice::Advance | Choice::AdvanceLate => {
                if let Some(at) = self.next_event() {
                    self.t = at;
                }
                self.drop_finished_handles();
            }
            Choice::Crash(m) => {
                let slot = &mut self.slots[m as usize];
                slot.life = None;
                slot.paused = false;
            }
            Choice::Restart(m) => self.start(m as usize),
            Choice::Rejoin(m) => {
                self.rejoins = self.rejoins.saturating_sub(1);
                self.start(m as usize);
            }
            Choice::Shutdown(m) => {
                let m = m as usize;
                self.leaves -= 1;
                if let Some(life) = &mut self.slots[m].life {
                    life.leaving = true;
                }
                let calling = matches!(
                    self.slots[m].life.as_ref().map(|l| &l.act),
                    Some(Act::Calling { .. })
                );
                if calling {
                    // The shell drops the call in flight (`Error::Shutdown`), hands the core
                    // the notices that came and that reply, then the shutdown.
                    self.answer_then(m, Err(Error::Shutdown), true, Some(Input::Shutdown));
                } else {
                    self.input(m, Input::Shutdown);
                }
            }
            Choice::Wipe => {
                self.model.wipe();
                // Parked buckets are lost with the rest.
                self.parking.forget();
                // MemoryStore::wipe tells every subscriber.
                for slot in &mut self.slots {
                    if let (false, Some(life)) = (slot.isolated, &mut slot.life) {
                        if life.subscribed {
                            life.inbox.push_back(Notice::Act);
                        }
                    }
                }
            }
            Choice::Isolate(m) => {
                let slot = &mut self.slots[m as usize];
                slot.isolated = true;
                if let Some(Life {
                    act: Act::Calling { status, .. },
                    ..
                }) = &mut slot.life
                {
                    if matches!(status, Status::Sent) {
                        *status = Status::Lost;
                    }
                }
            }
            Choice::Heal(m) => self.slots[m as usize].isolated = false,
            Choice::Pause(m) => self.slots[m as usize].paused = true,
            Choice::Resume(m) => {
                let m = m as usize;
                self.slots[m].paused = false;
                let life = self.slots[m].life.as_mut().expect("a live member");
                if let Some(notice) = life.inbox.pop_front() {
                    if self.log.is_some() {
                        note = format!("{notice:?} first");
                    }
                    self.input(m, Input::Notice(Some(notice)));
                }
            }
            Choice::Start(m) => self.start(m as usize),
        }
        if let (Some(line), false) = (line, matches!(c, Choice::Begin(_))) {
            let arrow = if note.is_empty() { "" } else { " → " };
            self.log_line(format!("{line}{arrow}{note}"));
        }
        self.fire_due();
        if self.checking {
            self.check_grants(&owned_before);
            self.check();
        }
    }

    /// The owned buckets in member `m`'s ledger, with their tokens, valid or not.
    fn ledger_owned(&self, m: usize) -> BTreeMap<u32, u64> {
        let Some(life) = &self.slots[m].life else {
            return BTreeMap::new();
        };
        let local = life.shared.lock();
        local.ledger.owned().map(|(b, h)| (b, h.token)).collect()
    }

    /// S1 as the user's events tell it: a member applies a grant (its ledger gains an owned
    /// bucket: an `Acquired` event) only while its lease deadline has not passed. One applied
    /// after it would start an ownership the deadline no longer covers.
    fn check_grants(&mut self, before: &[BTreeMap<u32, u64>]) {
        for (m, before) in before.iter().enumerate() {
            let gained: Vec<(u32, u64)> = self
                .ledger_owned(m)
                .into_iter()
                .filter(|(b, t)| before.get(b) != Some(t))
                .collect();
            if gained.is_empty() {
                continue;
            }
            let Some(life) = &self.slots[m].life else {
                continue;
            };
            let now = self.now_of(m);
            let until = *life.shared.valid_until.borrow();
            if until.is_none_or(|until| until.passed(&now)) {
                self.violate(format!(
                    "S1: m{m} took {gained:?} (bucket, token) after its lease deadline \
                     ({until:?}) had passed at its clock"
                ));
            }
        }
    }

    pub(super) fn log_line(&mut self, line: String) {
        let t = self.t;
        if let Some(log) = &mut self.log {
            log.push(format!("{:>4}.{:03} ms  {line}", t / 1000, t % 1000));
        }
    }

    /// Timers and call deadlines fire as soon as they are due, in member order: the shell
    /// sleeps until its core's wake-up and cuts each call at its deadline. (A member that runs
    /// late — a paused process — is not modelled, except through replies that come late.)
    fn fire_due(&mut self) {
        loop {
            let mut fired = false;
            for m in 0..self.slots.len() {
                let now = self.now_of(m);
                if self.slots[m].paused {
                    continue;
                }
                let Some(life) = &mut self.slots[m].life else {
                    continue;
                };
                match &life.act {
                    Act::Waiting(wake) if now.at >= *wake || life.poked => {
                        life.poked = false;
                        self.log_line(format!("  m{m} timer"));
                        self.input(m, Input::Tick);
                        fired = true;
                    }
                    Act::Calling {
                        call,
                        deadline,
                        sent,
                        status: Status::Held(_) | Status::Lost,
                    } if now.at >= *deadline => {
                        let name = call.name();
                        let e = Error::Timeout {
                            call: name,
                            after: deadline.saturating_duration_since(sent.at),
                        };
                        self.log_line(format!("  m{m} {name} times out"));
                        self.answer(m, Err(e), true);
                        fired = true;
                    }
                    _ => {}
                }
            }
            if !fired {
                return;
            }
        }
    }

    fn set_status(&mut self, m: usize, status: Status) {
        *self.status_mut(m) = status;
    }

    fn status_mut(&mut self, m: usize) -> &mut Status {
        match self.slots[m].life.as_mut().map(|l| &mut l.act) {
            Some(Act::Calling { status, .. }) => status,
            _ => unreachable!("no call in flight"),
        }
    }

    /// A new process for member `m` at the current instant.
    fn start(&mut self, m: usize) {
        let now = self.now_of(m);
        let slot = &mut self.slots[m];
        slot.started = true;
        let shared = Shared::new(Arc::clone(&slot.config), 64);
        let (tx, leases) = mpsc::unbounded_channel();
        shared.lock().leases.push(tx);
        let events = shared.events.subscribe();
        let core = MemberCore::new(Arc::clone(&slot.config), Arc::clone(&shared), None, &now);
        slot.life = Some(Life {
            core,
            shared,
            leases,
            events,
            deadline: None,
            handles: Vec::new(),
            act: Act::Waiting(now.at),
            inbox: VecDeque::new(),
            subscribed: false,
            leaving: false,
            poked: false,
        });
        self.next(m);
    }

    /// Asks member `m`'s core what to do next (after an input, as the shell does).
    fn next(&mut self, m: usize) {
        let now = self.now_of(m);
        let isolated = self.slots[m].isolated;
        let Some(life) = &mut self.slots[m].life else {
            return;
        };
        life.act = match life.core.next(&now) {
            Next::Call { call, deadline } => Act::Calling {
                call,
                deadline,
                sent: now,
                status: if isolated { Status::Lost } else { Status::Sent },
            },
            Next::Wait { wake } => Act::Waiting(wake),
            Next::Done(result) => Act::Done(result),
        };
        self.collect_leases(m);
    }

    /// One input to member `m`'s core, then its next step.
    fn input(&mut self, m: usize, input: Input) {
        let now = self.now_of(m);
        if let Some(life) = &mut self.slots[m].life {
            life.core.step(input, &now);
        }
        self.collect_leases(m);
        let waiting = matches!(
            self.slots[m].life.as_ref().map(|l| &l.act),
            Some(Act::Waiting(_))
        );
        if waiting {
            self.next(m);
        }
    }

    /// Hands member `m` the reply to its call (after the queued notices, if `notices_first`
    /// and the core wants them first), then asks for its next step.
    fn answer(&mut self, m: usize, result: Result<Reply, Error>, notices_first: bool) {
        self.answer_then(m, result, notices_first, None);
    }

    /// [`World::answer`], with `then` handed to the core right after the reply, before its
    /// next step (the shell's shutdown during a call).
    fn answer_then(
        &mut self,
        m: usize,
        result: Result<Reply, Error>,
        notices_first: bool,
        then: Option<Input>,
    ) {
        let now = self.now_of(m);
        let life = self.slots[m].life.as_mut().expect("a live member");
        let Act::Calling { sent, .. } = std::mem::replace(&mut life.act, Act::Waiting(now.at))
        else {
            unreachable!("a reply without a call");
        };
        if notices_first {
            while life.core.notices_before_reply() {
                let Some(notice) = life.inbox.pop_front() else {
                    break;
                };
                life.core.step(Input::Notice(Some(notice)), &now);
            }
        }
        life.core.step(Input::Reply { sent, result }, &now);
        if let Some(then) = then {
            life.core.step(then, &now);
        }
        self.collect_leases(m);
        self.next(m);
    }

    /// Runs member `m`'s call in flight in the store, at the store's now.
    fn run(&mut self, m: usize) -> Result<Reply, Error> {
        let now = self.store_now();
        let call = match self.slots[m].life.as_ref().map(|l| &l.act) {
            Some(Act::Calling { call, .. }) => call.clone(),
            _ => unreachable!("run without a call"),
        };
        let before = self.owners();
        let caller = &self.slots[m].config.member_id;
        let group = ParkingCheck::before(self.model.group(&self.group), now, caller);
        // These calls end expired sessions and graces first (a release or a leave only for
        // its own live session, a holdings read never).
        let purges = matches!(
            call,
            Call::Register { .. } | Call::Heartbeat { .. } | Call::Rebalance { .. }
        );
        let Some(Outcome {
            reply: result,
            notices,
        }) = self.model.call(call, now)
        else {
            // A subscription: no state in the store, the member's notices are queued from now.
            if let Some(life) = &mut self.slots[m].life {
                life.subscribed = true;
            }
            let stream = Notifications::new(futures_util::stream::pending());
            return Ok(Reply::Subscribe(stream));
        };
        for (to, notice) in notices {
            let To::Member(id) = to else { continue };
            let to = self.slots.iter_mut().find(|s| s.config.member_id == id);
            if let Some(Slot {
                isolated: false,
                life: Some(life),
                ..
            }) = to
            {
                if life.subscribed {
                    life.inbox.push_back(notice);
                }
            }
        }
        self.after_store_call(&before);
        let broken = self
            .parking
            .observe(&group, self.model.group(&self.group), now, purges);
        if let Some(why) = broken.into_iter().next() {
            self.violate(format!("parking: {why}"));
        }
        result
    }

    /// Every bucket's owner record in the model.
    fn owners(&self) -> Vec<Option<(String, u64)>> {
        let g = self.model.group(&self.group);
        (0..self.sc.buckets)
            .map(|b| g.and_then(|g| g.owner(b)).map(|(m, t)| (m.to_string(), t)))
            .collect()
    }

    /// S2 and S3 on what a store call changed.
    fn after_store_call(&mut self, before: &[Option<(String, u64)>]) {
        let after = self.owners();
        for (b, (old, new)) in before.iter().zip(&after).enumerate() {
            if old == new {
                continue;
            }
            let b = u32::try_from(b).expect("few buckets");
            if let Some((owner, token)) = new {
                let last = self.tokens.get(&b).copied().unwrap_or(0);
                if *token <= last {
                    self.violate(format!(
                        "S2: bucket {b} granted to {owner} under token {token}, not above the \
                         earlier grant's {last}"
                    ));
                }
                self.tokens.insert(b, last.max(*token));
            }
            let new_owner = new.as_ref().map(|(m, _)| m.as_str());
            let members = if self.checking { self.slots.len() } else { 0 };
            for m in 0..members {
                let id = self.slots[m].config.member_id.clone();
                if Some(id.as_str()) != new_owner && self.believes(m).contains_key(&b) {
                    self.violate(format!(
                        "S3: the store {} bucket {b} while {id} still owns it (owned, or \
                         draining with its user's handle live, before its lease deadline at its \
                         own clock)",
                        if new.is_some() { "granted" } else { "freed" }
                    ));
                }
            }
        }
    }

    /// Drops the handles whose user has finished (a revoked bucket's work takes
    /// [`WORK_US`]), and notes newly cancelled ones.
    fn drop_finished_handles(&mut self) {
        let t = self.t;
        for slot in &mut self.slots {
            let Some(life) = &mut slot.life else { continue };
            let before = life.handles.len();
            life.handles
                .retain(|h| h.cancelled_at.is_none_or(|at| at + WORK_US > t));
            if life.handles.len() < before {
                life.poked = true;
            }
        }
    }

    /// Takes the leases member `m`'s user got, and notes which were cancelled.
    fn collect_leases(&mut self, m: usize) {
        let t = self.t;
        let Some(life) = &mut self.slots[m].life else {
            return;
        };
        while let Ok(lease) = life.leases.try_recv() {
            life.handles.push(Handle {
                lease,
                cancelled_at: None,
            });
        }
        for h in &mut life.handles {
            if h.cancelled_at.is_none() && h.lease.cancel.is_cancelled() {
                h.cancelled_at = Some(t);
            }
        }
        // S1 as the user's events tell it: ownership begins (`Acquired`) only before the lease
        // deadline, the one in force before this step or after it (a renewal in the step).
        let now = *life.shared.valid_until.borrow();
        let allowed = match (life.deadline, now) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        life.deadline = now;
        let mut late = Vec::new();
        while let Ok(event) = life.events.try_recv() {
            if let Event::Acquired { bucket, token, at } = event {
                if allowed.is_none_or(|until| at >= until.at) {
                    late.push((bucket, token));
                }
            }
        }
        if !late.is_empty() {
            self.violate(format!(
                "S1: m{m} acquired {late:?} (bucket, token) at or after its lease deadline"
            ));
        }
    }

    // ---- checks ----

    fn violate(&mut self, why: String) {
        if self.checking {
            self.violation.get_or_insert(why);
        }
    }

    /// What member `m` believes it owns at its now, with tokens: owned buckets, and draining
    /// ones its user still works on, while its lease deadline has not passed.
    fn believes(&self, m: usize) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        let Some(life) = &self.slots[m].life else {
            return out;
        };
        let now = self.now_of(m);
        let until = *life.shared.valid_until.borrow();
        let valid = !life.shared.expired.load(Ordering::SeqCst)
            && until.is_some_and(|until| !until.passed(&now));
        if !valid {
            return out;
        }
        let local = life.shared.lock();
        for (b, held) in local.ledger.owned() {
            out.insert(b, held.token);
        }
        let held = local.ledger.buckets();
        for h in &life.handles {
            if h.cancelled_at.is_some() && held.contains(&h.lease.bucket) {
                out.entry(h.lease.bucket).or_insert(h.lease.token);
            }
        }
        out
    }

    /// S1, S2 (members' tokens) and the model's invariants, in this state.
    fn check(&mut self) {
        if let Err(e) = self.model.check() {
            self.violate(format!("Model::check: {e}"));
        }
        let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
        for m in 0..self.slots.len() {
            for (b, token) in self.believes(m) {
                if let Some(other) = owner.insert(b, m) {
                    self.violate(format!("S1: m{other} and m{m} both own bucket {b}"));
                }
                let last = self.tokens.get(&b).copied().unwrap_or(0);
                if token > last {
                    self.violate(format!(
                        "S2: m{m} holds bucket {b} under token {token}, above the store's \
                         latest grant {last}"
                    ));
                }
            }
        }
    }

    /// Converged: every bucket owned by exactly one live member, as the model records it,
    /// shares balanced. `None` when converged, else why not.
    fn unconverged(&self) -> Option<String> {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&m| {
                self.slots[m]
                    .life
                    .as_ref()
                    .is_some_and(|l| !matches!(l.act, Act::Done(_)) && !l.core.leaving())
            })
            .collect();
        for (m, slot) in self.slots.iter().enumerate() {
            if let Some(Life {
                act: Act::Done(Err(e)),
                leaving: false,
                ..
            }) = &slot.life
            {
                return Some(format!("m{m} stopped with an error: {e}"));
            }
        }
        if live.is_empty() {
            return None;
        }
        let n = live.len() as u32;
        let (lo, hi) = (self.sc.buckets / n, self.sc.buckets.div_ceil(n));
        let owners = self.owners();
        let beliefs: Vec<BTreeMap<u32, u64>> =
            (0..self.slots.len()).map(|m| self.believes(m)).collect();
        let mut count = vec![0u32; self.slots.len()];
        for b in 0..self.sc.buckets {
            let believers: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&m| beliefs[m].contains_key(&b))
                .collect();
            let [m] = believers[..] else {
                return Some(format!("bucket {b} owned by {believers:?}"));
            };
            let recorded = owners[b as usize].as_ref().map(|(id, _)| id.as_str());
            if recorded != Some(self.slots[m].config.member_id.as_str()) {
                return Some(format!(
                    "bucket {b}: m{m} owns it, the store says {recorded:?}"
                ));
            }
            count[m] += 1;
        }
        live.iter()
            .find(|&&m| !(lo..=hi).contains(&count[m]))
            .map(|&m| {
                format!(
                    "m{m} holds {} of {}, not {lo}..={hi}",
                    count[m], self.sc.buckets
                )
            })
    }

    /// Runs without faults (every call answered at once, notices delivered, timers fired)
    /// until converged, for at most four ttls of store time. `restart`: the crashed members
    /// start again first, under their ids.
    ///
    /// `converges` holds fingerprints of states already seen to converge without faults:
    /// reaching one ends the run (the rest is deterministic), and a run that converges adds
    /// the states it passed through.
    pub(super) fn settle(
        &mut self,
        converges: Option<&mut HashSet<u64>>,
        restart: bool,
    ) -> Result<Vec<Choice>, String> {
        let horizon = self.t + 4 * 30_000;
        // The faults stop, and time runs on.
        self.faults = 0;
        self.until = None;
        let mut taken = Vec::new();
        let crashed = (0..self.slots.len()).filter(|&m| {
            let slot = &self.slots[m];
            restart && slot.started && slot.life.is_none()
        });
        for m in crashed.collect::<Vec<_>>() {
            let rejoin = Choice::Rejoin(u8::try_from(m).expect("few members"));
            self.apply(rejoin);
            taken.push(rejoin);
        }
        let mut passed = Vec::new();
        loop {
            let steps = taken.len();
            if self.violation.is_some() {
                return Ok(taken);
            }
            if let Some(known) = &converges {
                let fp = self.fingerprint();
                if known.contains(&fp) {
                    break;
                }
                passed.push(fp);
            }
            let Some(why) = self.unconverged() else {
                break;
            };
            if self.t > horizon || steps > 5_000 {
                return Err(format!("after {steps} steps: {why}"));
            }
            let enabled = self.enabled();
            let pick = |want: fn(Choice) -> bool| enabled.iter().copied().find(|&c| want(c));
            let next = pick(|c| matches!(c, Choice::Run(_) | Choice::Reply(_)))
                .or_else(|| {
                    pick(|c| matches!(c, Choice::Notice(_) | Choice::Heal(_) | Choice::Resume(_)))
                })
                .or_else(|| pick(|c| c == Choice::Advance));
            let Some(next) = next else {
                return Err(format!("stuck after {steps} steps: {why}"));
            };
            self.apply(next);
            taken.push(next);
        }
        if let Some(known) = converges {
            known.extend(passed);
        }
        Ok(taken)
    }

    // ---- output ----

    /// The search's key for this state (see the parent module).
    pub(super) fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.t.hash(&mut h);
        self.model.hash(&mut h);
        (
            self.faults,
            self.leaves,
            self.rejoins,
            self.until,
            &self.tokens,
        )
            .hash(&mut h);
        self.parking.hash(&mut h);
        nonces::peek().hash(&mut h);
        for slot in &self.slots {
            (slot.rate, slot.started, slot.isolated, slot.paused).hash(&mut h);
            let Some(life) = &slot.life else {
                0u8.hash(&mut h);
                continue;
            };
            life.core.fingerprint().hash(&mut h);
            format!("{:?}", life.shared.lock().ledger).hash(&mut h);
            format!("{:?}", *life.shared.valid_until.borrow()).hash(&mut h);
            life.shared.expired.load(Ordering::SeqCst).hash(&mut h);
            format!("{:?}", life.act).hash(&mut h);
            format!("{:?}", life.inbox).hash(&mut h);
            (life.subscribed, life.poked).hash(&mut h);
            for handle in &life.handles {
                (handle.lease.bucket, handle.lease.token, handle.cancelled_at).hash(&mut h);
            }
        }
        h.finish()
    }

    fn describe_choice(&self, c: Choice) -> String {
        let call = |m: u8| match self.slots[m as usize].life.as_ref().map(|l| &l.act) {
            Some(Act::Calling { call, .. }) => describe_call(call),
            _ => String::new(),
        };
        match c {
            Choice::Begin(fast) => {
                let rates: Vec<String> = (0..self.sc.members)
                    .map(|m| {
                        let pct = if fast & (1 << m) != 0 {
                            100 + self.sc.drift_pct
                        } else {
                            100 - self.sc.drift_pct
                        };
                        format!("m{m} clock ×{:.2}", pct as f64 / 100.0)
                    })
                    .collect();
                format!("begin: {}, all start", rates.join(", "))
            }
            Choice::Horizon => format!(
                "faults may come from here on, for {} ms",
                self.sc.horizon_us / 1000
            ),
            Choice::Run(m) => format!("m{m} {} runs, replied", call(m)),
            Choice::RunHold(m) => format!("m{m} {} runs, reply held [fault]", call(m)),
            Choice::Drop(m) => format!("m{m} {} lost before it runs [fault]", call(m)),
            Choice::Reply(m) => format!("m{m} gets the held reply of {}", call(m)),
            Choice::ReplyFirst(m) => format!(
                "m{m} gets the held reply of {} before its notices [fault]",
                call(m)
            ),
            Choice::Notice(m) => format!("m{m} notice"),
            Choice::NoticeLost(m) => format!("m{m} notice lost [fault]"),
            Choice::NoticeDup(m) => format!("m{m} notice, duplicated [fault]"),
            Choice::Advance => "time passes".into(),
            Choice::AdvanceLate => "time passes, notices late [fault]".into(),
            Choice::Crash(m) => format!("m{m} crashes [fault]"),
            Choice::Restart(m) => format!("m{m} restarts [fault]"),
            Choice::Shutdown(m) => format!("m{m} shutdown (graceful leave)"),
            Choice::Rejoin(m) => format!("m{m} starts again under its id"),
            Choice::Wipe => "the store loses its data [fault]".into(),
            Choice::Isolate(m) => format!("m{m} cut off from the store [fault]"),
            Choice::Heal(m) => format!("m{m} reconnected"),
            Choice::Pause(m) => format!("m{m} paused [fault]"),
            Choice::Resume(m) => format!("m{m} runs again"),
            Choice::Start(m) => format!("m{m} starts"),
        }
    }

    /// The trace, one line per transition (replayed with the log on).
    pub(super) fn trace(&self) -> String {
        let mut out = String::new();
        for line in self.log.iter().flatten() {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// The state: the model's owner records and each member's belief and phase.
    pub(super) fn describe(&self) -> String {
        let mut out = String::new();
        let now = self.store_now();
        let _ = writeln!(
            out,
            "store at {}.{:03} ms: owners {:?}",
            self.t / 1000,
            self.t % 1000,
            self.owners()
        );
        if let Some(g) = self.model.group(&self.group) {
            for (id, m) in g.members() {
                let _ = writeln!(
                    out,
                    "  session {id}/{} expires in {} µs, held {:?}",
                    m.session(),
                    i128::from(m.expires()) - i128::from(now),
                    m.held()
                );
            }
            for (id, p) in g.parked() {
                let _ = writeln!(
                    out,
                    "  parked {id} for {} µs more: {:?}",
                    i128::from(p.until()) - i128::from(now),
                    p.held()
                );
            }
        }
        for (m, slot) in self.slots.iter().enumerate() {
            let Some(life) = &slot.life else {
                let _ = writeln!(out, "m{m}: not running");
                continue;
            };
            let until = life
                .shared
                .valid_until
                .borrow()
                .map(|u| self.store_time(m, u.at));
            let _ = writeln!(
                out,
                "m{m} (clock ×{:.2}): believes {:?}, deadline at store {:?} µs, {:?}, act {:?}, \
                 inbox {:?}",
                slot.rate as f64 / 100.0,
                self.believes(m),
                until,
                life.core,
                life.act,
                life.inbox
            );
        }
        out
    }
}

fn describe_call(call: &Call) -> String {
    match call {
        Call::Release { buckets, .. } | Call::Leave { buckets, .. } => {
            format!("{} {buckets:?}", call.name())
        }
        _ => call.name().to_string(),
    }
}

fn summarize(result: &Result<Reply, Error>) -> String {
    match result {
        Ok(Reply::Subscribe(_)) => "subscribed".into(),
        Ok(reply) => format!("{reply:?}"),
        Err(e) => format!("error: {e}"),
    }
}
