//! A deterministic simulation of one redbuckets group on a `MemoryStore`: members join, leave and
//! crash while their links to the store fail, lose replies, delay, partition and hold, and the
//! store itself loses its data. One `u64` seed drives every choice; tokio's clock is paused, so a
//! run is a pure function of its seed.
//!
//! What a run checks:
//! - after every step, S1 through the members' own eyes (`buckets()`, and every valid lease
//!   handle agrees with its member and with everyone else);
//! - every half simulated second and at the end, S1/S2/S3 over the event timelines
//!   (the testkit's `EventLog`, i.e. `redbuckets::check`; a crash ends its member's ownership at the crash);
//! - with a rejoin grace ([`Options::park`]): on every store call that writes, parking as
//!   `store::model::ParkingCheck` states it (what an ended session held stays recorded to its id
//!   until the grace ends, is granted to nobody else, and goes back to the id's next session
//!   whole, under a larger token); after every step, that no process of another id owns a
//!   bucket parked for an id;
//! - once faults heal and churn stops, L1/L2/C2 within [`Params::bound`]: every bucket owned,
//!   counts within one, and the store agrees (no free bucket, owner records = members' views,
//!   member list = live members; nothing parked: a grace's end is a disturbance); then that it
//!   stays so, and that a graceful leave of everyone leaves an empty group.

pub mod faulty;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redbuckets::{Error, Event, Events, GroupKey, Lease, Member, MemoryStore, Store};
use redbuckets_testkit::EventLog;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

use faulty::{Counters, Faulty, Lie, ParkingWatch, Profile};

/// The most members alive (or starting) at once.
const MAX_MEMBERS: usize = 20;
/// The group name used by every member.
const GROUP: &str = "g";

/// What kind of run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Fault injection at the store boundary (and store wipes).
    pub faults: bool,
    /// Joins, graceful leaves and crashes.
    pub churn: bool,
    /// Deliberate misbehaviour of member `m0`'s store.
    pub lie: Lie,
    /// Members with a fixed id restart: most ids have a rejoin grace, and members are shut
    /// down or crash and start again under their id after a while, shorter or longer than
    /// the grace, or stop for longer than their session and are taken for dead: another
    /// process starts under their id at once (the stale one leaves when it runs again).
    pub park: bool,
}

impl Options {
    /// Everything on: the normal simulation.
    pub const FULL: Options = Options {
        faults: true,
        churn: true,
        lie: Lie::None,
        park: false,
    };

    /// Everything on, and restarts under fixed ids with a rejoin grace.
    pub const PARK: Options = Options {
        park: true,
        ..Options::FULL
    };

    /// What the sharded runs use for `seed`: half the seeds of each shard with the grace.
    pub fn for_seed(seed: u64) -> Options {
        if seed % 8 >= 4 {
            Options::PARK
        } else {
            Options::FULL
        }
    }

    /// A group without faults whose member `m0` has a lying store (with churn, so that
    /// buckets change hands).
    pub fn lying(lie: Lie, churn: bool) -> Options {
        Options {
            faults: false,
            churn,
            lie,
            park: false,
        }
    }
}

/// Per-second rates of the random actions of the chaos phase.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub profile: f64,
    pub partition: f64,
    pub hold: f64,
    pub freeze: f64,
    pub sub_break: f64,
    pub wipe: f64,
    pub join: f64,
    pub leave: f64,
    pub crash: f64,
    /// A shutdown or crash followed by a start under the same id ([`Options::park`]).
    pub restart: f64,
    pub lease: f64,
}

/// The parameters of one run, all drawn from the seed.
#[derive(Debug, Clone)]
pub struct Params {
    pub members: usize,
    pub buckets: u32,
    pub heartbeat: Duration,
    pub ttl: Duration,
    pub call_timeout: Duration,
    pub drain_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Length of the chaos phase.
    pub chaos: Duration,
    pub rates: Rates,
    /// The rejoin grace of the ids that have one ([`Options::park`]; zero otherwise).
    pub grace: Duration,
}

impl Params {
    fn draw(rng: &mut StdRng, opts: &Options) -> Params {
        let buckets = match rng.gen_range(0..10) {
            0 => 1,
            1 => rng.gen_range(2..=5),
            _ => rng.gen_range(1..=300),
        };
        let heartbeat = Duration::from_millis(rng.gen_range(80..=120));
        let ttl = Duration::from_millis(rng.gen_range(800..=1500));
        // Each kind of action is off, rare, normal or frequent in a run, so some runs see one
        // kind of trouble alone and others see everything at once.
        let mut scale = |on: bool| {
            if on {
                [0.0, 0.5, 1.0, 2.0][rng.gen_range(0..4)]
            } else {
                0.0
            }
        };
        let rates = Rates {
            profile: 0.8 * scale(opts.faults),
            partition: 0.4 * scale(opts.faults),
            hold: 0.2 * scale(opts.faults),
            freeze: 0.2 * scale(opts.faults),
            sub_break: 0.4 * scale(opts.faults),
            wipe: 0.1 * scale(opts.faults),
            join: 0.6 * scale(opts.churn),
            leave: 0.25 * scale(opts.churn),
            crash: 0.25 * scale(opts.churn),
            restart: 0.0,
            lease: 8.0 * scale(true),
        };
        let members = rng.gen_range(2..=MAX_MEMBERS);
        // Drawn last, and only with the grace: the runs without it stay as they were.
        let (grace, restart) = if opts.park {
            let grace = rng.gen_range(ttl / 4..=ttl);
            let restart = if opts.churn {
                [0.0, 0.5, 1.0, 2.0][rng.gen_range(0..4)]
            } else {
                0.0
            };
            (grace, 0.8 * restart)
        } else {
            (Duration::ZERO, 0.0)
        };
        let rates = Rates { restart, ..rates };
        Params {
            members,
            // A liar must hold buckets to be caught.
            buckets: if opts.lie == Lie::None {
                buckets
            } else {
                buckets.max(members as u32)
            },
            heartbeat,
            ttl,
            call_timeout: Duration::from_millis(rng.gen_range(100..=300)),
            drain_timeout: Duration::from_millis(rng.gen_range(10..=150)),
            shutdown_timeout: Duration::from_millis(rng.gen_range(500..=2000)),
            // A liar needs the quarantine, a grant, and a ttl of lying to be found out.
            chaos: Duration::from_millis(if opts.lie == Lie::None {
                rng.gen_range(1200..=3500)
            } else {
                rng.gen_range(5000..=6000)
            }),
            rates,
            grace,
        }
    }

    /// How long after the last disturbance (fault healed, member joined, left or crashed) the
    /// group must be covered and balanced: a crashed member's session expires within one ttl,
    /// a wiped store grants nothing for one ttl after the first re-registration, members learn
    /// of an expiry when it is due and of a wipe at their next renewal (half a ttl at most), and
    /// a revoked bucket waits at most one drain.
    pub fn bound(&self) -> Duration {
        self.ttl * 2 + self.heartbeat * 5 + self.drain_timeout
    }
}

/// What a passing run reports.
#[derive(Debug)]
pub struct Outcome {
    /// Every event and action, with times relative to the start and tokens relative to the
    /// smallest token (the store's clock starts at the wall clock): equal for equal seeds.
    pub trace: Vec<String>,
    /// Simulated time.
    pub simulated: Duration,
    /// Time from the last disturbance to convergence.
    pub converged_in: Duration,
    /// The bound it was checked against.
    pub bound: Duration,
    /// Counts of what happened.
    pub counts: BTreeMap<&'static str, u64>,
}

/// Runs one seed on a fresh paused current-thread runtime. `Err` describes the first failed
/// check (or panic) together with the parameters and the last actions of the run.
pub fn run(seed: u64, opts: Options) -> Result<Outcome, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(async {
            let mut world = World::new(seed, opts);
            let result = world.run().await;
            result.map_err(|failure| world.describe(&failure))
        })
    }));
    match outcome {
        Ok(result) => result,
        Err(panic) => Err(format!("seed {seed}: panicked: {}", panic_text(&*panic))),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

thread_local! {
    /// Start of the current run on this thread, for [`SimTime`].
    static RUN_START: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// A `tracing` timer printing simulated seconds since the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match RUN_START.with(std::cell::Cell::get) {
            Some(t0) => write!(w, "{:9.4}s", (Instant::now() - t0).as_secs_f64()),
            None => write!(w, "        -"),
        }
    }
}

type Started = Result<(Member, Events), Error>;

/// One member process: its id in the group, a name unique over the run (restarts of an id get
/// `.2`, `.3`, ...), and its link to the store.
struct Process {
    name: String,
    id: String,
    store: Faulty,
}

struct Live {
    process: Process,
    member: Member,
    /// Until when its task is (or may still be) frozen.
    frozen_until: Instant,
    /// Until when a freeze order may still wait for the task's current step to end: its link
    /// is neither held nor slowed meanwhile.
    freeze_taken_by: Instant,
}

struct Starting {
    process: Process,
    handle: JoinHandle<Started>,
}

struct Stopping {
    process: Process,
    handle: JoinHandle<Result<(), Error>>,
    /// The member's lease deadline when it was asked to leave.
    valid_until: Option<Instant>,
}

struct HeldLease {
    name: String,
    lease: Lease,
    until: Instant,
}

/// A process of `id` that was shut down or crashed, to start again `delay` after it ended
/// (`at`: `None` while its shutdown is under way).
struct Restart {
    id: String,
    delay: Duration,
    at: Option<Instant>,
}

struct World {
    seed: u64,
    opts: Options,
    params: Params,
    rng: StdRng,
    store: MemoryStore,
    group: GroupKey,
    counters: Arc<Counters>,
    t0: Instant,
    live: Vec<Live>,
    starting: Vec<Starting>,
    stopping: Vec<Stopping>,
    receivers: Vec<(String, Events)>,
    timeline: EventLog,
    leases: Vec<HeldLease>,
    next_id: usize,
    generations: BTreeMap<String, u32>,
    /// Ids of processes that ended, free for a restart.
    free_ids: Vec<String>,
    /// Each id's rejoin grace, drawn at its first start ([`Options::park`]).
    graces: BTreeMap<String, Duration>,
    /// Restarts to come.
    restarts: Vec<Restart>,
    /// Stopped processes that were taken for dead and replaced under their id: each leaves
    /// once it runs again (by this instant).
    stale: BTreeMap<String, Instant>,
    /// Every process's link, including those of processes that ended: their requests may
    /// still be in flight.
    links: Vec<Faulty>,
    log: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
    /// The last fault, heal, join, leave or crash.
    disturbed_at: Instant,
    /// Faults are over: processes started from now on get a healthy link.
    healed: bool,
    /// When the last freeze ends at the latest (healing does not thaw a stopped process).
    frozen_until: Instant,
    timeline_checked_at: Instant,
}

impl World {
    fn new(seed: u64, opts: Options) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let params = Params::draw(&mut rng, &opts);
        let now = Instant::now();
        RUN_START.with(|t| t.set(Some(now)));
        let group = GroupKey::new("red-buckets", GROUP);
        let counters = Arc::new(Counters::default());
        if opts.park {
            *counters.parking.lock().unwrap_or_else(|e| e.into_inner()) = Some(ParkingWatch {
                group: group.clone(),
                check: redbuckets::store::model::ParkingCheck::new(),
                broken: Vec::new(),
            });
        }
        World {
            seed,
            opts,
            params,
            rng,
            store: MemoryStore::new(),
            group,
            counters,
            t0: now,
            live: Vec::new(),
            starting: Vec::new(),
            stopping: Vec::new(),
            receivers: Vec::new(),
            timeline: EventLog::default(),
            leases: Vec::new(),
            next_id: 0,
            generations: BTreeMap::new(),
            free_ids: Vec::new(),
            graces: BTreeMap::new(),
            restarts: Vec::new(),
            stale: BTreeMap::new(),
            links: Vec::new(),
            log: Vec::new(),
            counts: BTreeMap::new(),
            disturbed_at: now,
            healed: false,
            frozen_until: now,
            timeline_checked_at: now,
        }
    }

    fn since_start(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.t0).as_secs_f64()
    }

    fn note(&mut self, what: impl AsRef<str>) {
        let line = format!(
            "{:9.4}s {}",
            self.since_start(Instant::now()),
            what.as_ref()
        );
        self.log.push(line);
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn disturbed(&mut self) {
        self.disturbed_at = self.disturbed_at.max(Instant::now());
    }

    /// The failure report: seed, parameters, and the tail of the action log.
    fn describe(&self, failure: &str) -> String {
        let tail = self.log.len().saturating_sub(60);
        format!(
            "seed {}: {failure}\n  at {:.4}s; {:?}\n  params {:?}\n  live {:?}\n  last actions:\n    {}",
            self.seed,
            self.since_start(Instant::now()),
            self.opts,
            self.params,
            self.live
                .iter()
                .map(|l| l.process.name.as_str())
                .collect::<Vec<_>>(),
            self.log[tail..].join("\n    ")
        )
    }

    async fn run(&mut self) -> Result<Outcome, String> {
        for _ in 0..self.params.members {
            let id = self.new_id();
            self.start(id);
        }
        let chaos_end = self.t0 + self.params.chaos;
        while Instant::now() < chaos_end {
            self.step(true).await?;
        }

        // Heal every fault and stop the churn.
        self.healed = true;
        for link in &self.links {
            link.heal();
        }
        self.note("heal: every fault ends, churn stops");
        self.disturbed();
        let healed_at = Instant::now();
        if self.live.is_empty() && self.starting.is_empty() {
            let id = self.new_id();
            self.start(id);
        }
        let bound = self.params.bound();
        // Converged within the bound after the last disturbance, then stays converged for a
        // few heartbeats (a ghost registration landing late counts as a new disturbance).
        let mut converged: Option<(Instant, Duration)> = None;
        let converged_in = loop {
            self.step(false).await?;
            let now = Instant::now();
            if now.saturating_duration_since(self.disturbed_at) > bound + self.params.ttl * 10 {
                return Err("a start or leave never finished".into());
            }
            if !self.starting.is_empty()
                || !self.stopping.is_empty()
                || !self.restarts.is_empty()
                || !self.stale.is_empty()
            {
                converged = None;
                continue;
            }
            // Parked buckets are unowned until the grace ends, when they are spread: a
            // disturbance to come.
            self.parked_until().await?;
            if self.live.is_empty() {
                let id = self.new_id();
                self.start(id);
                continue;
            }
            // A member whose last renewal predates the heal may still run out of lease time
            // (a consequence of the faults): converged counts once everyone renewed since.
            let renewed = self.live.iter().all(|l| {
                l.member
                    .status()
                    .last_heartbeat
                    .is_some_and(|at| at >= healed_at)
            });
            let state = if now < self.disturbed_at {
                Err("a freeze or a grace may still last".into())
            } else if renewed {
                self.convergence().await
            } else {
                Err("not every member renewed its session since the heal".into())
            };
            match (state, converged) {
                (Ok(()), None) => {
                    let took = now.saturating_duration_since(self.disturbed_at);
                    self.note(format!("converged {took:?} after the last disturbance"));
                    converged = Some((now, took));
                }
                (Ok(()), Some((since, took))) => {
                    if now - since >= self.params.heartbeat * 3 {
                        break took;
                    }
                }
                (Err(why), Some((since, _))) if self.disturbed_at <= since => {
                    return Err(format!("converged, then diverged without a cause: {why}"));
                }
                (Err(why), _) if now.saturating_duration_since(self.disturbed_at) > bound => {
                    return Err(format!(
                        "L1/L2/C2: not converged {:?} after the last disturbance: {why}\n  {}",
                        now.saturating_duration_since(self.disturbed_at),
                        self.store_versus_views().await
                    ));
                }
                (Err(_), _) => converged = None,
            }
        };

        self.teardown().await?;
        self.check_timeline()?;
        Ok(Outcome {
            trace: self.trace(),
            simulated: Instant::now() - self.t0,
            converged_in,
            bound,
            counts: self.all_counts(),
        })
    }

    /// Everyone leaves gracefully on a healthy store: every leave succeeds and the group ends
    /// empty (C2: departed members are purged).
    async fn teardown(&mut self) -> Result<(), String> {
        self.leases.clear();
        while let Some(live) = self.live.pop() {
            self.leave(live);
        }
        let give_up = Instant::now() + self.params.shutdown_timeout * 2;
        while !self.stopping.is_empty() {
            if Instant::now() > give_up {
                return Err("teardown: a graceful leave hangs".into());
            }
            sleep(Duration::from_millis(5)).await;
            self.collect();
            if let Some(failed) = self.reap()? {
                return Err(format!("teardown: graceful leave failed: {failed}"));
            }
        }
        let snap = self
            .store
            .snapshot(&self.group)
            .await
            .map_err(|e| format!("snapshot: {e}"))?
            .ok_or("teardown: the group vanished")?;
        if let Some(p) = snap
            .parked
            .iter()
            .find(|p| self.graces.get(&p.id).is_none_or(Duration::is_zero))
        {
            return Err(format!("{} is parked without a grace", p.id));
        }
        if !snap.members.is_empty() || snap.free() != self.params.buckets as usize {
            return Err(format!(
                "C2: after everyone left: {} members, {} of {} buckets free",
                snap.members.len(),
                snap.free(),
                self.params.buckets
            ));
        }
        Ok(())
    }

    fn new_id(&mut self) -> String {
        let id = format!("m{}", self.next_id);
        self.next_id += 1;
        id
    }

    /// Starts a member process with `id` (in the background: `start` may wait for a previous
    /// session of the same id to expire).
    fn start(&mut self, id: String) {
        let generation = self.generations.entry(id.clone()).or_insert(0);
        *generation += 1;
        let name = if *generation == 1 {
            id.clone()
        } else {
            format!("{id}.{generation}")
        };
        let lie = if name == "m0" {
            self.opts.lie
        } else {
            Lie::None
        };
        let store = faulty::faulty(&self.store, self.rng.gen(), lie, Arc::clone(&self.counters));
        if self.opts.faults && !self.healed && self.rng.gen_bool(0.3) {
            store.set_profile(self.random_profile());
        }
        self.links.push(store.clone());
        // Every member's clock runs up to 1% fast or slow against the store's (uniformly): the
        // drift the configuration allows for (`max_clock_drift`, default 0.01).
        let clock_rate = if lie == Lie::SlowClock {
            0.8
        } else {
            self.rng.gen_range(0.99..=1.01)
        };
        let p = &self.params;
        let mut config = redbuckets::Config::new(GROUP);
        config.member_id = id.clone();
        config.buckets = p.buckets;
        config.heartbeat = p.heartbeat;
        config.ttl = p.ttl;
        config.call_timeout = p.call_timeout;
        config.drain_timeout = p.drain_timeout;
        config.shutdown_timeout = p.shutdown_timeout;
        if self.opts.park {
            // Most ids have the grace, a few none: both kinds of session end side by side.
            let grace = *self.graces.entry(id.clone()).or_insert_with(|| {
                if self.rng.gen_bool(0.8) {
                    p.grace
                } else {
                    Duration::ZERO
                }
            });
            config.rejoin_grace = grace;
        }
        config = config.with_clock_rate(clock_rate);
        let builder = Member::builder(store.clone(), GROUP).config(config);
        let handle = tokio::spawn(async move {
            let member = builder.start().await?;
            // Subscribed before this task yields, so before the member's task emits anything.
            let events = member.events();
            Ok((member, events))
        });
        self.note(format!("start {name} (clock rate {clock_rate:.4})"));
        self.count("starts");
        self.starting.push(Starting {
            process: Process { name, id, store },
            handle,
        });
    }

    fn leave(&mut self, live: Live) {
        let name = live.process.name.clone();
        // Once the leave begins the member renews nothing; if it never gets to revoke (a frozen
        // task, aborted when the shutdown times out), its ownership ended at this deadline.
        let valid_until = live.member.status().valid_until;
        let handle = tokio::spawn(live.member.shutdown());
        self.note(format!("leave {name}"));
        self.count("leaves");
        self.stopping.push(Stopping {
            process: live.process,
            handle,
            valid_until,
        });
    }

    fn crash(&mut self, index: usize) {
        let live = self.live.remove(index);
        let name = live.process.name.clone();
        self.collect();
        self.receivers.retain(|(n, _)| *n != name);
        // A crashed process's lease handles die with it.
        self.leases.retain(|h| h.name != name);
        // The process owned its buckets until now, or until its deadline if that passed
        // first (a frozen task has not reported the loss).
        let now = Instant::now();
        let until = live.member.status().valid_until.map_or(now, |u| u.min(now));
        live.member.abort();
        self.timeline.crashed(&name, until);
        self.free_id(live.process.id);
        self.note(format!("crash {name}"));
        self.count("crashes");
        self.disturbed();
    }

    /// Picks up finished starts and leaves. Returns the first failed leave, if any.
    fn reap(&mut self) -> Result<Option<String>, String> {
        let mut failed_leave = None;
        let mut i = 0;
        while i < self.starting.len() {
            if !self.starting[i].handle.is_finished() {
                i += 1;
                continue;
            }
            let s = self.starting.remove(i);
            let result = (&mut { s.handle })
                .now_or_never()
                .ok_or("a finished task has no result")?;
            let name = s.process.name.clone();
            match result {
                Ok(Ok((member, events))) => {
                    self.receivers.push((name.clone(), events));
                    self.live.push(Live {
                        process: s.process,
                        member,
                        frozen_until: Instant::now(),
                        freeze_taken_by: Instant::now(),
                    });
                    self.note(format!("{name} joined"));
                }
                Ok(Err(e)) => {
                    self.note(format!("{name} failed to start: {e}"));
                    self.count("failed starts");
                    self.free_id(s.process.id);
                }
                Err(e) => return Err(format!("{name}: start task failed: {e}")),
            }
            self.disturbed();
        }
        let mut i = 0;
        while i < self.stopping.len() {
            if !self.stopping[i].handle.is_finished() {
                i += 1;
                continue;
            }
            let s = self.stopping.remove(i);
            let result = (&mut { s.handle })
                .now_or_never()
                .ok_or("a finished task has no result")?;
            let name = s.process.name.clone();
            self.collect();
            self.receivers.retain(|(n, _)| *n != name);
            match result {
                Ok(Ok(())) => self.note(format!("{name} left")),
                Ok(Err(e)) => {
                    // The process is gone (the handle's drop aborted it): whatever it did not
                    // revoke ended at its deadline, or now.
                    let now = Instant::now();
                    let until = s.valid_until.map_or(now, |u| u.min(now));
                    self.timeline.crashed(&name, until);
                    self.note(format!("{name} left with an error: {e}"));
                    self.count("failed leaves");
                    failed_leave.get_or_insert(format!("{name}: {e}"));
                }
                Err(e) => return Err(format!("{name}: shutdown task failed: {e}")),
            }
            let now = Instant::now();
            match self
                .restarts
                .iter_mut()
                .find(|r| r.id == s.process.id && r.at.is_none())
            {
                Some(r) => r.at = Some(now + r.delay),
                None => self.free_id(s.process.id),
            }
            self.disturbed();
        }
        Ok(failed_leave)
    }

    fn chance(&mut self, rate: f64, dt: Duration) -> bool {
        rate > 0.0 && self.rng.gen_bool((rate * dt.as_secs_f64()).min(1.0))
    }

    fn random_profile(&mut self) -> Profile {
        let ct = self.params.call_timeout;
        let rng = &mut self.rng;
        match rng.gen_range(0..4) {
            0 => Profile::CALM,
            1 => Profile {
                fail_before: rng.gen_range(0.0..0.5),
                lose_notice: rng.gen_range(0.0..0.5),
                ..Profile::CALM
            },
            2 => Profile {
                fail_after: rng.gen_range(0.0..0.5),
                dup_notice: rng.gen_range(0.0..0.5),
                ..Profile::CALM
            },
            _ => Profile {
                fail_before: rng.gen_range(0.0..0.2),
                fail_after: rng.gen_range(0.0..0.2),
                delay: rng.gen_range(0.0..0.5),
                max_delay: ct.mul_f64(rng.gen_range(0.5..2.0)),
                lose_notice: rng.gen_range(0.0..0.3),
                dup_notice: rng.gen_range(0.0..0.3),
            },
        }
    }

    fn pick_live(&mut self) -> Option<usize> {
        if self.live.is_empty() {
            None
        } else {
            Some(self.rng.gen_range(0..self.live.len()))
        }
    }

    /// The random actions of one chaos step of length `dt`.
    fn act(&mut self, dt: Duration) {
        let r = self.params.rates;
        let ttl = self.params.ttl;
        let now = Instant::now();
        if self.opts.lie == Lie::SlowClock && !self.counts.contains_key("partitions") {
            // Cut the slow member off once it holds buckets.
            if let Some(m0) = self
                .live
                .iter()
                .find(|l| l.process.name == "m0" && !l.member.buckets().is_empty())
            {
                m0.process.store.partition(now + ttl * 2);
                self.note("partition m0 for two ttls");
                self.count("partitions");
            }
        }
        // A link is neither held nor slowed while a freeze order waits (see the freeze below).
        if self.chance(r.profile, dt) {
            if let Some(i) = self
                .pick_live()
                .filter(|&i| self.live[i].freeze_taken_by <= now)
            {
                let profile = self.random_profile();
                self.live[i].process.store.set_profile(profile);
                let name = self.live[i].process.name.clone();
                self.note(format!("{name}: link {profile:?}"));
                self.count("link changes");
                self.disturbed();
            }
        }
        if self.chance(r.partition, dt) {
            if let Some(i) = self.pick_live() {
                let d = self.rng.gen_range(Duration::from_millis(20)..=ttl * 3);
                self.live[i].process.store.partition(now + d);
                let name = self.live[i].process.name.clone();
                self.note(format!("partition {name} for {d:?}"));
                self.count("partitions");
                self.disturbed();
            }
        }
        if self.chance(r.hold, dt) {
            if let Some(i) = self
                .pick_live()
                .filter(|&i| self.live[i].freeze_taken_by <= now)
            {
                let d = self.rng.gen_range(ttl / 2..=ttl * 3);
                self.live[i].process.store.hold(now + d);
                let name = self.live[i].process.name.clone();
                self.note(format!("hold {name} for {d:?}"));
                self.count("holds");
                self.disturbed();
            }
        }
        if self.chance(r.freeze, dt) {
            // The member's own task stops (SIGSTOP) while everything else goes on. The task
            // takes the order when its current step ends, and queues a second one: never freeze
            // a frozen member. A step's store calls may each take a call timeout, so freeze only
            // members whose link cannot stall a call, and neither hold nor slow it until the
            // order is taken: then it is taken within milliseconds, or, for a member whose
            // deadline passes first, after a wait for its old session to expire (a ttl at most).
            // Known bounds keep the checks that wait for the freeze to end short.
            // Members that own buckets first: freezing one that owns nothing (many start in
            // the new group's quarantine) tests little.
            let thawed: Vec<usize> = (0..self.live.len())
                .filter(|&i| {
                    self.live[i].frozen_until <= now && !self.live[i].process.store.may_stall()
                })
                .collect();
            let owners: Vec<usize> = thawed
                .iter()
                .copied()
                .filter(|&i| !self.live[i].member.buckets().is_empty())
                .collect();
            let pool = if owners.is_empty() { thawed } else { owners };
            if !pool.is_empty() {
                let i = pool[self.rng.gen_range(0..pool.len())];
                let d = self.rng.gen_range(ttl / 4..=ttl * 5 / 2);
                self.freeze(i, d);
            }
        }
        if self.chance(r.sub_break, dt) {
            if let Some(i) = self.pick_live() {
                self.live[i].process.store.break_subscriptions();
                let name = self.live[i].process.name.clone();
                self.note(format!("break {name}'s subscription"));
                self.count("subscription breaks");
            }
        }
        if self.chance(r.wipe, dt) {
            self.store.wipe();
            if let Some(w) = self.counters.parking().as_mut() {
                w.check.forget();
            }
            self.note("wipe the store");
            self.count("wipes");
            self.disturbed();
        }
        if self.chance(r.join, dt) && self.live.len() + self.starting.len() < MAX_MEMBERS {
            let id = if !self.free_ids.is_empty() && self.rng.gen_bool(0.4) {
                let i = self.rng.gen_range(0..self.free_ids.len());
                self.free_ids.swap_remove(i)
            } else {
                self.new_id()
            };
            self.start(id);
            self.disturbed();
        }
        if self.chance(r.leave, dt) && self.live.len() > 1 {
            if let Some(i) = self.pick_live() {
                let live = self.live.remove(i);
                self.leave(live);
                self.disturbed();
            }
        }
        if self.chance(r.crash, dt) && self.live.len() > 1 {
            if let Some(i) = self.pick_live() {
                self.crash(i);
            }
        }
        if self.chance(r.restart, dt) && self.live.len() > 1 {
            // One process per id: not one whose id another process has (a stale one, or the
            // one that replaced it), nor one with a restart to come.
            let alone = self.pick_live().filter(|&i| {
                let id = &self.live[i].process.id;
                self.processes().filter(|p| p.id == *id).count() == 1
                    && !self.restarts.iter().any(|r| r.id == *id)
            });
            if let Some(i) = alone {
                let id = self.live[i].process.id.clone();
                let grace = self.graces.get(&id).copied().unwrap_or_default();
                // Shorter or longer than the grace (or than a ttl, for an id without one).
                let most = if grace.is_zero() { ttl * 2 } else { grace * 2 };
                let delay = self.rng.gen_range(Duration::ZERO..=most);
                let stalls = self.live[i].frozen_until <= now
                    && !self.live[i].process.store.may_stall()
                    && !self.stale.contains_key(&self.live[i].process.name);
                let at = match self.rng.gen_range(0..4) {
                    // The process stops (SIGSTOP) for longer than its session, and is taken
                    // for dead: another starts under its id at once, and waits for the old
                    // session to expire (and park) before it registers. The stale one leaves
                    // when it runs again.
                    0 if stalls => {
                        let d = self.rng.gen_range(ttl * 6 / 5..=ttl * 2);
                        let name = self.live[i].process.name.clone();
                        let until = self.freeze(i, d);
                        self.stale.insert(name, until);
                        self.count("stale processes");
                        Some(now)
                    }
                    0 | 1 => {
                        let live = self.live.remove(i);
                        self.leave(live);
                        None
                    }
                    _ => {
                        self.crash(i);
                        self.free_ids.retain(|f| *f != id);
                        Some(now + delay)
                    }
                };
                let after = if at == Some(now) {
                    "at once, while the stopped one lives".to_string()
                } else {
                    format!("{delay:?} after it ends")
                };
                self.note(format!("{id} starts again {after} (grace {grace:?})"));
                self.count("restarts");
                self.restarts.push(Restart { id, delay, at });
                self.disturbed();
            }
        }
    }

    /// Freezes live member `i` for `d` (see the freeze in [`World::act`]); returns when it
    /// thaws at the latest.
    fn freeze(&mut self, i: usize, d: Duration) -> Instant {
        let now = Instant::now();
        let (ttl, hb) = (self.params.ttl, self.params.heartbeat);
        let member = &self.live[i].member;
        let valid = member.status().valid_until.is_some_and(|u| u > now + hb);
        let taken_within = if valid && !member.buckets().is_empty() {
            hb
        } else {
            ttl + hb
        };
        member.freeze(d);
        let until = now + taken_within + d;
        self.live[i].freeze_taken_by = now + taken_within;
        self.live[i].frozen_until = until;
        self.frozen_until = self.frozen_until.max(until);
        let name = self.live[i].process.name.clone();
        self.note(format!("freeze {name} for {d:?}"));
        self.count("freezes");
        self.disturbed_at = self.disturbed_at.max(until);
        until
    }

    /// Starts the restarts whose time has come, and makes the stale processes that run again
    /// leave.
    fn restart_due(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.restarts.len() {
            if self.restarts[i].at.is_some_and(|at| at <= now) {
                let r = self.restarts.remove(i);
                self.start(r.id);
                self.disturbed();
            } else {
                i += 1;
            }
        }
        let thawed: Vec<String> = self
            .stale
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in thawed {
            self.stale.remove(&name);
            if let Some(i) = self.live.iter().position(|l| l.process.name == name) {
                let live = self.live.remove(i);
                self.leave(live);
                self.disturbed();
            }
        }
    }

    /// Every process that runs: live, starting or stopping.
    fn processes(&self) -> impl Iterator<Item = &Process> {
        self.live
            .iter()
            .map(|l| &l.process)
            .chain(self.starting.iter().map(|s| &s.process))
            .chain(self.stopping.iter().map(|s| &s.process))
    }

    /// Frees `id` for a later start, unless another process has it (a stale one, or the one
    /// that replaced it).
    fn free_id(&mut self, id: String) {
        if !self.processes().any(|p| p.id == id) {
            self.free_ids.push(id);
        }
    }

    /// After every step: what the parking check found on the store's calls, and no process of
    /// another id owns a bucket parked for an id (it was granted to nobody else).
    fn check_parking(&mut self) -> Result<(), String> {
        let watch = self.counters.parking();
        let Some(w) = watch.as_ref() else {
            return Ok(());
        };
        if let Some(why) = w.broken.first() {
            return Err(format!("parking: {why}"));
        }
        let now = self.store.inspect(|_, now| now);
        let parked: BTreeMap<u32, &str> = w
            .check
            .parked(now)
            .flat_map(|(id, buckets, _)| buckets.into_iter().map(move |b| (b, id)))
            .collect();
        if parked.is_empty() {
            return Ok(());
        }
        for live in &self.live {
            let owned = live.member.buckets();
            let found = owned.iter().find_map(|b| {
                parked
                    .get(b)
                    .filter(|id| **id != live.process.id)
                    .map(|id| (*b, *id))
            });
            if let Some((b, id)) = found {
                let record = self.store.inspect(|model, _| {
                    let owner = model.group(&self.group).and_then(|g| g.owner(b));
                    owner.map(|(id, token)| (id.to_string(), token))
                });
                return Err(format!(
                    "parking: {} owns bucket {b} (token {:?}), parked for {id}; the store \
                     records {record:?}",
                    live.process.name,
                    live.member.token(b)
                ));
            }
        }
        Ok(())
    }

    /// Parked ids (in the store's snapshot) make the end of their grace a disturbance to come.
    async fn parked_until(&mut self) -> Result<(), String> {
        if !self.opts.park {
            return Ok(());
        }
        let snap = self
            .store
            .snapshot(&self.group)
            .await
            .map_err(|e| format!("snapshot: {e}"))?;
        let now = Instant::now();
        for p in snap.iter().flat_map(|s| &s.parked) {
            self.disturbed_at = self.disturbed_at.max(now + p.until);
        }
        Ok(())
    }

    /// Takes a lease handle on a random owned bucket and keeps it for a random while (sometimes
    /// longer than the drain time); drops handles whose time is up.
    fn leases(&mut self, dt: Duration) -> Result<(), String> {
        let now = Instant::now();
        self.leases.retain(|h| h.until > now);
        if !self.chance(self.params.rates.lease, dt) {
            return Ok(());
        }
        let Some(i) = self.pick_live() else {
            return Ok(());
        };
        let owned = self.live[i].member.buckets();
        if owned.is_empty() {
            return Ok(());
        }
        let bucket = owned[self.rng.gen_range(0..owned.len())];
        let keep = self
            .params
            .drain_timeout
            .mul_f64(self.rng.gen_range(0.0..3.0));
        let member = &self.live[i].member;
        let Some(lease) = member.lease(bucket) else {
            return Err(format!(
                "{} reports bucket {bucket} owned but gives no lease",
                self.live[i].process.name
            ));
        };
        if member.token(bucket) != Some(lease.token()) {
            return Err(format!("lease of bucket {bucket}: token differs"));
        }
        let name = self.live[i].process.name.clone();
        self.leases.push(HeldLease {
            name,
            lease,
            until: now + keep,
        });
        self.count("leases");
        Ok(())
    }

    async fn step(&mut self, chaos: bool) -> Result<(), String> {
        let dt = Duration::from_millis(self.rng.gen_range(1..=50));
        if chaos {
            self.act(dt);
        }
        // Restarts go on after the heal: the process was on its way back.
        self.restart_due();
        self.leases(dt)?;
        // A leave begun under faults may fail (it is noted in the log); only the teardown's
        // leaves, on a healed store, must succeed.
        let _failed_leave = self.reap()?;
        sleep(dt).await;
        let ghost = self
            .counters
            .unheard_registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(at) = ghost {
            self.note("a registration ran after its caller gave up on it");
            self.disturbed_at = self.disturbed_at.max(at);
        }
        self.collect();
        self.check_parking()?;
        self.check_views()?;
        // A frozen member reports its losses when it thaws (dated at its deadline), so the
        // timeline cannot be judged while one is frozen; the final check covers that time.
        let now = Instant::now();
        if now - self.timeline_checked_at >= Duration::from_millis(500) && now >= self.frozen_until
        {
            self.check_timeline()?;
        }
        Ok(())
    }

    fn collect(&mut self) {
        self.timeline.collect(&mut self.receivers);
    }

    fn check_timeline(&mut self) -> Result<(), String> {
        self.timeline_checked_at = Instant::now();
        let bad = self.timeline.violations();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("timeline check: {}", bad.join("; ")))
        }
    }

    /// S1 as the users see it, now: no bucket in two members' `buckets()`, and every valid
    /// lease handle belongs to the bucket's one owner with the owner's token.
    fn check_views(&self) -> Result<(), String> {
        let buckets = self.params.buckets as usize;
        let mut owner: Vec<Option<&str>> = vec![None; buckets];
        for live in &self.live {
            let name = live.process.name.as_str();
            for b in live.member.buckets() {
                let slot = owner
                    .get_mut(b as usize)
                    .ok_or_else(|| format!("{name} owns bucket {b}, out of range"))?;
                if let Some(other) = slot.replace(name) {
                    return Err(format!("S1: bucket {b} owned by {other} and {name}"));
                }
            }
        }
        let mut lessee: Vec<Option<&str>> = vec![None; buckets];
        for held in &self.leases {
            if !held.lease.is_valid() {
                continue;
            }
            let b = held.lease.bucket();
            let name = held.name.as_str();
            if let Some(other) = lessee[b as usize].replace(name) {
                if other != name {
                    return Err(format!("S1: valid leases on {b} from {other} and {name}"));
                }
            }
            match self.live.iter().find(|l| l.process.name == name) {
                Some(live) => {
                    if live.member.token(b) != Some(held.lease.token()) {
                        return Err(format!(
                            "{name}: lease on {b} (token {}) valid, member says {:?}",
                            held.lease.token(),
                            live.member.token(b)
                        ));
                    }
                }
                None => {
                    if let Some(other) = owner[b as usize] {
                        return Err(format!(
                            "S1: {name} (leaving) holds a valid lease on {b}, owned by {other}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// `Ok` when every bucket is owned, counts are within one, and the store agrees.
    async fn convergence(&self) -> Result<(), String> {
        let b = self.params.buckets as usize;
        let n = self.live.len();
        let views: Vec<Vec<u32>> = self.live.iter().map(|l| l.member.buckets()).collect();
        let counts: Vec<usize> = views.iter().map(Vec::len).collect();
        let total: usize = counts.iter().sum();
        let lo = b / n;
        if total != b || counts.iter().any(|&c| c != lo && c != lo + 1) {
            return Err(format!("L1/L2: counts {counts:?}, {total} of {b} owned"));
        }
        let snap = self
            .store
            .snapshot(&self.group)
            .await
            .map_err(|e| format!("snapshot: {e}"))?
            .ok_or("the group does not exist")?;
        if let Some(p) = snap.parked.first() {
            return Err(format!("{} buckets parked for {}", p.held, p.id));
        }
        if snap.free() != 0 || !snap.quarantine.is_zero() {
            return Err(format!(
                "store: {} free, quarantine {:?}",
                snap.free(),
                snap.quarantine
            ));
        }
        let mut ids: Vec<&str> = self.live.iter().map(|l| l.process.id.as_str()).collect();
        ids.sort_unstable();
        let stored: Vec<&str> = snap.members.iter().map(|m| m.id.as_str()).collect();
        if stored != ids {
            return Err(format!("C2: store lists {stored:?}, live are {ids:?}"));
        }
        // A release the store still expects (a join lowered the member's committed count, and
        // the joiner may be gone again) is a move yet to come: not converged.
        if let Some(m) = snap.members.iter().find(|m| m.committed != m.held) {
            return Err(format!(
                "store expects a release: {} holds {}, committed {}",
                m.id, m.held, m.committed
            ));
        }
        for (live, view) in self.live.iter().zip(&views) {
            let id = live.process.id.as_str();
            let recorded: Vec<u32> = (0u32..)
                .zip(&snap.owners)
                .filter(|(_, o)| o.as_ref().is_some_and(|o| o.member == id))
                .map(|(b, _)| b)
                .collect();
            if recorded != *view {
                return Err(format!(
                    "store and member disagree: {} holds {view:?}, store records {recorded:?}",
                    live.process.name
                ));
            }
            for &bucket in view {
                let stored = snap.owners[bucket as usize].as_ref().map(|o| o.token);
                if stored != live.member.token(bucket) {
                    return Err(format!("{id}: token of {bucket} differs from the store's"));
                }
            }
        }
        Ok(())
    }

    /// For failure reports: each member's view next to what the store records for it.
    async fn store_versus_views(&self) -> String {
        let snap = match self.store.snapshot(&self.group).await {
            Ok(Some(snap)) => snap,
            other => return format!("snapshot: {other:?}"),
        };
        let mut lines = vec![format!(
            "store: {} free, quarantine {:?}, members {:?}",
            snap.free(),
            snap.quarantine,
            snap.members
                .iter()
                .map(|m| (m.id.as_str(), m.held, m.committed))
                .collect::<Vec<_>>()
        )];
        for live in &self.live {
            let id = live.process.id.as_str();
            let view = live.member.buckets();
            let recorded: Vec<u32> = (0u32..)
                .zip(&snap.owners)
                .filter(|(_, o)| o.as_ref().is_some_and(|o| o.member == id))
                .map(|(b, _)| b)
                .collect();
            if view != recorded {
                let unknown: Vec<u32> = recorded
                    .iter()
                    .copied()
                    .filter(|b| !view.contains(b))
                    .collect();
                lines.push(format!(
                    "{}: holds {}, store records {}; recorded but unknown to it: {unknown:?}; status {:?}",
                    live.process.name,
                    view.len(),
                    recorded.len(),
                    live.member.status()
                ));
            }
        }
        lines.join("\n  ")
    }

    fn all_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = self.counts.clone();
        let c = &self.counters;
        for (name, counter) in [
            ("calls", &c.calls),
            ("failed before", &c.failed_before),
            ("lost replies", &c.lost_replies),
            ("delayed", &c.delayed),
            ("partitioned calls", &c.partitioned),
            ("ran unheard", &c.ran_unheard),
            ("resyncs", &c.resyncs),
            ("lost wake-ups", &c.lost_notices),
            ("duplicated wake-ups", &c.duplicated_notices),
        ] {
            counts.insert(name, counter.load(Ordering::Relaxed));
        }
        counts.insert("events", self.timeline.events.len() as u64);
        if let Some(w) = self.counters.parking().as_ref() {
            counts.insert("claims", w.check.claims());
        }
        counts
    }

    /// The run as text, comparable across runs of the same seed.
    fn trace(&self) -> Vec<String> {
        let base = self
            .timeline
            .events
            .iter()
            .filter_map(|(_, e)| e.token())
            .min()
            .unwrap_or(0);
        let events = self.timeline.events.iter().map(|(name, e)| {
            let kind = match e {
                Event::Acquired { .. } => "acquired",
                Event::Revoked { .. } => "revoked",
                Event::Released { .. } => "released",
                Event::Lost { .. } => "lost",
                _ => "other",
            };
            format!(
                "{:.6} {name} {kind} {} token+{}",
                self.since_start(e.at()),
                e.bucket().unwrap_or(u32::MAX),
                e.token().unwrap_or(base) - base
            )
        });
        events.chain(self.log.iter().cloned()).collect()
    }
}
