//! Differential test: `MemoryStore` (the reference) and `RedisStore` (the Lua scripts, on a real
//! `redis-server` of its own on a free port) run the same random operation sequences side by
//! side, and every reply and every notice must agree. A failing case shrinks to a minimal
//! sequence (proptest) and is printed with the first operation where the stores differ.
//!
//! Operations: register (a retry of the same session, a new session while the old one lives:
//! `InUse`, a replacement under the same id via `replaces`, a wrong bucket count or ttl),
//! heartbeat (own or stale session, other ttls), rebalance steps (max_take 0, 1, 2, 8,
//! unbounded), release (the i-th bucket the member holds, buckets another member holds, ids
//! beyond B, stale sessions), the same as a leave (release and deregister in one step),
//! deregister, snapshots, a member's holdings (its resync read), and time advancing (so
//! sessions expire and get purged, and the quarantine of a new group ends; also as "time passes
//! while every member heartbeats" and "every member takes a rebalance step", which the test
//! runs as plain ops); up to 5 members, weights 1 to 1,000,000, B from 1 to 65,536 (mostly
//! small). Not covered: the heartbeat's cap of 100 purged sessions per call (`HEARTBEAT_PURGE`
//! in common.lua, where `MemoryStore` purges all), and the re-creation of a group after a Redis
//! restart (run id).
//!
//! Compared after each operation: the whole reply (`Registration`, `HeartbeatReply` with
//! `next_expiry`, `RebalanceReply`, release counts, errors, snapshots, holdings by token) and
//! the notices it published, counted per channel: the group's channel and each member's
//! wake-ups, so the two stores must wake exactly the same members. Redis: one `PSUBSCRIBE *`
//! connection, read up to a marker the test publishes after each op; `MemoryStore`: the notices
//! queued on a subscription per channel right after it.
//!
//! Time. The scripts read the server's clock, so the test freezes it: the store is connected
//! with [`RedisOptions::frozen_clock_for_tests`], which loads the script variants whose clock
//! (`clock_frozen.lua`) reads a µs value from `{prefix:group}:test-clock`; the production
//! scripts (`clock.lua`) never read that key. `MemoryStore` runs on a paused tokio runtime and
//! its server clock is set to the same value (`MemoryStore::set_clock_us`); advancing time moves
//! both by the same whole milliseconds. Both stores then see exactly the same time, and tokens,
//! expiries, `next_expiry` and waits compare exactly. Times stay whole milliseconds because
//! Redis keeps session expiries in ms, rounded up (a session never ends before its member's
//! deadline), where `MemoryStore` keeps them exact: a sub-ms difference is that rounding, by
//! design. Comparing only time-independent parts was rejected: expiry, purge and the quarantine
//! are where the stores are most likely to differ.
//!
//! Buckets. Lua `SPOP`s random free buckets where `MemoryStore` takes the lowest, so the test
//! compares how many buckets a grant holds and its token, snapshots by each member's tokens,
//! and maps "release the i-th bucket member m holds" to each store's own holdings in grant
//! order, by token then id (Redis: the `:held:<member>` set and the owner records;
//! `MemoryStore::held_buckets`), so the i-th bucket carries the same token in both stores.
//! Making Lua take the lowest would need a
//! sorted free set (`ZPOPMIN`, O(log B) per bucket) in production for a test's convenience.
//!
//! CI runs `DIFF_CASES` cases (default 200: about 15 s of CPU for the test and its server in a
//! debug build; more wall time on a loaded machine). Soak:
//! `DIFF_CASES=20000 cargo test -p redbuckets --release --test differential -- --nocapture`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use redbuckets::store::{
    Action, Channel, GroupSnapshot, Holdings, Notice, Notifications, RebalanceReply,
    RegisterRequest, SessionRef,
};
use redbuckets::{Error, GroupKey, MemoryStore, RedisOptions, RedisStore, Store};
use redbuckets_testkit::RedisServer;

/// Member ids `m0..m{MEMBERS}`.
const MEMBERS: usize = 5;
/// Where both clocks start: a whole millisecond.
const T0_US: u64 = 1_700_000_000_000_000;

/// Which session a register call uses.
#[derive(Debug, Clone, Copy)]
enum RegisterAs {
    /// The member's current nonce again (a retry); a fresh one if it never registered.
    Retry,
    /// A fresh nonce, replacing nothing: `InUse` while the current session lives.
    Fresh,
    /// A fresh nonce that replaces the current one.
    Replace,
}

/// What a register call gets wrong on purpose.
#[derive(Debug, Clone, Copy)]
enum Mismatch {
    None,
    Buckets,
    Ttl,
}

/// A bucket a release names, resolved against each store's own holdings.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// The i-th (mod count) bucket the member holds.
    Mine(usize),
    /// The i-th (mod count) bucket the other members hold.
    Others(usize),
    /// B + k: no such bucket.
    Outside(u32),
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        m: usize,
        weight: u32,
        who: RegisterAs,
        mismatch: Mismatch,
    },
    Heartbeat {
        m: usize,
        stale: bool,
        /// Extra ms on the group's ttl (heartbeats may pass any ttl).
        extra_ttl_ms: u64,
        /// How far ahead the heartbeat looks for watched expiries (ms; `None`: always).
        watch_ms: Option<u64>,
    },
    Rebalance {
        m: usize,
        stale: bool,
        max_take: u32,
    },
    /// A release, or with `leave` the graceful leave's one step (release and deregister).
    Release {
        m: usize,
        stale: bool,
        picks: Vec<Pick>,
        leave: bool,
        /// The release says the member knows tokens only up to its oldest grant's (else all).
        known_oldest: bool,
    },
    Deregister {
        m: usize,
        stale: bool,
    },
    Advance {
        ms: u64,
    },
    /// Time passes, `thirds` thirds of a ttl, while every member that registered heartbeats
    /// each third (as members do): runs as heartbeats and advances.
    Pass {
        thirds: u64,
    },
    /// Every member that registered takes a rebalance step (as members do after a change).
    Round,
    Snapshot,
    /// A member's resync read (`stale`: with a nonce that is not its session's).
    Holdings {
        m: usize,
        stale: bool,
    },
    /// An operator removes a member by id, whatever its session (`redbuckets remove-member`).
    Remove {
        m: usize,
    },
}

#[derive(Debug, Clone)]
struct Case {
    buckets: u32,
    ttl_ms: u64,
    ops: Vec<Op>,
}

fn op() -> impl Strategy<Value = Op> {
    let m = 0..MEMBERS;
    let weight = prop_oneof![4 => Just(1u32), 2 => 1u32..=3, 1 => 1u32..=1_000_000];
    let who = prop_oneof![
        Just(RegisterAs::Retry),
        Just(RegisterAs::Fresh),
        Just(RegisterAs::Replace)
    ];
    let mismatch = prop_oneof![
        12 => Just(Mismatch::None),
        1 => Just(Mismatch::Buckets),
        1 => Just(Mismatch::Ttl),
    ];
    let stale = prop::bool::weighted(0.15);
    let pick = prop_oneof![
        6 => any::<usize>().prop_map(Pick::Mine),
        2 => any::<usize>().prop_map(Pick::Others),
        1 => (0u32..3).prop_map(Pick::Outside),
    ];
    let max_take = prop_oneof![Just(0u32), Just(1), Just(2), Just(8), Just(u32::MAX)];
    // Mostly less than a ttl (500..=3,000 ms), so members that heartbeat stay; sometimes more.
    let ms = prop_oneof![4 => 1u64..=50, 4 => 50u64..=700, 1 => 700u64..=4_000];
    prop_oneof![
        4 => (m.clone(), weight, who, mismatch).prop_map(|(m, weight, who, mismatch)| {
            Op::Register { m, weight, who, mismatch }
        }),
        4 => (
            m.clone(),
            stale,
            prop_oneof![4 => Just(0u64), 1 => 0u64..=2_000],
            // Around the ttl (500..=3,000 ms), so both "someone ends within it" and "nobody
            // does" come up; and 0.
            prop_oneof![2 => Just(None), 1 => Just(Some(0u64)), 3 => (1u64..=3_000).prop_map(Some)],
        )
            .prop_map(|(m, stale, extra_ttl_ms, watch_ms)| Op::Heartbeat {
                m,
                stale,
                extra_ttl_ms,
                watch_ms,
            }),
        8 => (m.clone(), stale, max_take)
            .prop_map(|(m, stale, max_take)| Op::Rebalance { m, stale, max_take }),
        3 => (
            m.clone(),
            stale,
            prop::collection::vec(pick.clone(), 0..5),
            prop::bool::weighted(0.3)
        )
            .prop_map(|(m, stale, picks, known_oldest)| Op::Release {
                m,
                stale,
                picks,
                leave: false,
                known_oldest,
            }),
        1 => (m.clone(), stale, prop::collection::vec(pick, 0..5)).prop_map(
            |(m, stale, picks)| Op::Release {
                m,
                stale,
                picks,
                leave: true,
                known_oldest: false,
            }
        ),
        1 => (m.clone(), stale).prop_map(|(m, stale)| Op::Deregister { m, stale }),
        1 => m.clone().prop_map(|m| Op::Remove { m }),
        1 => (m, stale).prop_map(|(m, stale)| Op::Holdings { m, stale }),
        4 => ms.prop_map(|ms| Op::Advance { ms }),
        3 => (1u64..=6).prop_map(|thirds| Op::Pass { thirds }),
        2 => Just(Op::Round),
        1 => Just(Op::Snapshot),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    // Large groups cost Redis ~100 ms to create and make every snapshot and every full grant
    // heavy: a few of them, with short histories.
    let buckets = prop_oneof![
        100 => 1u32..=64,
        4 => 65u32..=4_096,
        1 => 4_097u32..=65_536,
        1 => Just(65_536u32),
    ];
    // The first members join with the group's own bucket count and ttl, so that a register
    // with a mismatch later meets an existing group.
    let joins = prop::collection::vec(
        prop_oneof![3 => Just(1u32), 1 => 1u32..=3, 1 => 1u32..=1_000_000],
        1..=MEMBERS,
    );
    (
        buckets,
        500u64..=3_000,
        joins,
        prop::collection::vec(op(), 1..50),
    )
        .prop_map(|(buckets, ttl_ms, joins, mut ops)| {
            if buckets > 4_096 {
                ops.truncate(16);
            }
            let joins = joins
                .into_iter()
                .enumerate()
                .map(|(m, weight)| Op::Register {
                    m,
                    weight,
                    who: RegisterAs::Fresh,
                    mismatch: Mismatch::None,
                });
            Case {
                buckets,
                ttl_ms,
                ops: joins.chain(ops).collect(),
            }
        })
}

/// The two stores and what the test needs to drive them.
struct Harness {
    _server: RedisServer,
    /// Real time, real I/O: the Redis side.
    redis_rt: tokio::runtime::Runtime,
    /// Paused time: the `MemoryStore` side, whose clock the test advances.
    memory_rt: tokio::runtime::Runtime,
    redis: RedisStore,
    raw: RefCell<redis::Connection>,
    /// Subscribed to every channel (`PSUBSCRIBE *`).
    watch: RefCell<redis::Connection>,
}

/// The channel the test publishes on after each op, to know it has read every notice before.
const MARKER: &str = "diff-marker";

impl Harness {
    fn start() -> Self {
        let server = RedisServer::start();
        let redis_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let memory_rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        // Generous: a snapshot of 65,536 buckets on a loaded CI machine is slow, and this test
        // checks what the stores answer, not how fast.
        let options = RedisOptions::default()
            .response_timeout(Duration::from_secs(30))
            .frozen_clock_for_tests();
        let redis = redis_rt
            .block_on(RedisStore::connect_with(&server.url(), options))
            .unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        let raw = client.get_connection().unwrap();
        // Every message on every channel, in order: the notices the scripts publish.
        let mut watch = client.get_connection().unwrap();
        watch
            .send_packed_command(&redis::cmd("PSUBSCRIBE").arg("*").get_packed_command())
            .unwrap();
        watch.recv_response().unwrap();
        Harness {
            _server: server,
            redis_rt,
            memory_rt,
            redis,
            raw: RefCell::new(raw),
            watch: RefCell::new(watch),
        }
    }

    /// The notices published since the last call, per channel (`group` for the group's
    /// channel, the member's id for its wake-ups), each as [`summary`] gives it: a marker
    /// published after them comes after them on the subscription.
    fn published(&self, g: &GroupKey) -> BTreeMap<String, Vec<String>> {
        let _: () = self.cmd(redis::cmd("PUBLISH").arg(MARKER).arg("end"));
        let mut counts = BTreeMap::new();
        let mut watch = self.watch.borrow_mut();
        let group = format!("{}:events", g.tag());
        let wake = format!("{}:wake:", g.tag());
        loop {
            let message = watch.recv_response().unwrap();
            let parts = match message {
                redis::Value::Array(parts) | redis::Value::Push { data: parts, .. } => parts,
                other => panic!("not a pub/sub message: {other:?}"),
            };
            let channel = match parts.get(2) {
                Some(redis::Value::BulkString(c)) => String::from_utf8_lossy(c).into_owned(),
                other => panic!("no channel in a pub/sub message: {other:?}"),
            };
            if channel == MARKER {
                return counts;
            }
            let (label, notice) = if channel == group {
                ("group".to_string(), Notice::Act)
            } else if let Some(member) = channel.strip_prefix(&wake) {
                let payload = match parts.get(3) {
                    Some(redis::Value::BulkString(p)) => String::from_utf8_lossy(p).into_owned(),
                    other => panic!("no payload in a pub/sub message: {other:?}"),
                };
                let notice = parse_notice(&payload);
                if let Notice::Granted { token, buckets, .. } = &notice {
                    let held = self.redis_held_among(g, member, buckets);
                    assert_granted("RedisStore", member, &held, *token, buckets);
                }
                (member.to_string(), notice)
            } else {
                panic!("a notice on a channel of no group: {channel}");
            };
            counts
                .entry(label)
                .or_insert_with(Vec::new)
                .push(summary(&notice));
        }
    }

    fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        cmd.query(&mut *self.raw.borrow_mut()).unwrap()
    }

    /// `(token, bucket)` of those of `buckets` in the member's held set: O(buckets), where
    /// [`Harness::redis_held`] reads the whole held set (tens of thousands of buckets in the
    /// largest cases, once per grant, made the test slow).
    fn redis_held_among(&self, g: &GroupKey, member: &str, buckets: &[u32]) -> Vec<(u64, u32)> {
        if buckets.is_empty() {
            return Vec::new();
        }
        let ids: Vec<String> = buckets.iter().map(u32::to_string).collect();
        let member_of: Vec<bool> = self.cmd(
            redis::cmd("SMISMEMBER")
                .arg(format!("{}:held:{member}", g.tag()))
                .arg(&ids),
        );
        let records: Vec<Option<String>> = self.cmd(
            redis::cmd("HMGET")
                .arg(format!("{}:owner", g.tag()))
                .arg(&ids),
        );
        buckets
            .iter()
            .zip(member_of)
            .zip(records)
            .filter(|((_, held), _)| *held)
            .map(|((b, _), record)| {
                let token = record
                    .and_then(|r| r.split(' ').next().and_then(|t| t.parse().ok()))
                    .unwrap_or(0);
                (token, *b)
            })
            .collect()
    }

    /// `(token, bucket)` of every bucket in the member's held set, ascending.
    fn redis_held(&self, g: &GroupKey, member: &str) -> Vec<(u64, u32)> {
        let ids: Vec<String> =
            self.cmd(redis::cmd("SMEMBERS").arg(format!("{}:held:{member}", g.tag())));
        if ids.is_empty() {
            return Vec::new();
        }
        let records: Vec<Option<String>> = self.cmd(
            redis::cmd("HMGET")
                .arg(format!("{}:owner", g.tag()))
                .arg(&ids),
        );
        let mut held: Vec<(u64, u32)> = ids
            .iter()
            .zip(records)
            .map(|(b, record)| {
                let token = record
                    .and_then(|r| r.split(' ').next().and_then(|t| t.parse().ok()))
                    .unwrap_or(0);
                (token, b.parse().unwrap())
            })
            .collect();
        held.sort_unstable();
        held
    }
}

/// One case's state: the group, the clock, each member's sessions.
struct Run<'h> {
    h: &'h Harness,
    g: GroupKey,
    memory: MemoryStore,
    /// The group's channel (`group`) and each member's wake-ups, on `MemoryStore`.
    notices: Vec<(String, Notifications)>,
    now_us: u64,
    buckets: u32,
    ttl: Duration,
    /// Per member: its current nonce (None before its first registration) and the one before.
    nonces: Vec<(Option<u64>, Option<u64>)>,
    next_nonce: u64,
}

fn member(m: usize) -> String {
    format!("m{m}")
}

fn nonce(n: u64) -> String {
    format!("n{n}")
}

/// Errors compare by their text: the same variant with the same fields.
fn outcome<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// A rebalance reply without the bucket ids (the stores pick different free buckets).
fn rebalance_outcome(r: Result<RebalanceReply, Error>) -> String {
    match r {
        Ok(mut reply) => {
            if let Action::Acquired { buckets, token } = &reply.action {
                let (n, token) = (buckets.len(), *token);
                reply.action = Action::Acquired {
                    buckets: (0..u32::try_from(n).unwrap()).collect(),
                    token,
                };
            }
            format!("{reply:?}")
        }
        Err(e) => format!("error: {e}"),
    }
}

/// A snapshot with owners reduced to each member's tokens.
/// A session's holdings by token (bucket ids differ between the stores, see the module docs).
fn holdings_outcome(r: Result<Option<Holdings>, Error>) -> String {
    match r {
        Ok(Some(h)) => {
            let mut tokens: BTreeMap<u64, usize> = BTreeMap::new();
            for token in h.owned.values() {
                *tokens.entry(*token).or_default() += 1;
            }
            format!("committed {} tokens {tokens:?}", h.committed)
        }
        Ok(None) => "not live".into(),
        Err(e) => format!("error: {e}"),
    }
}

fn snapshot_outcome(r: Result<Option<GroupSnapshot>, Error>) -> String {
    match r {
        Ok(Some(s)) => {
            // member -> token -> buckets granted with it
            let mut tokens: BTreeMap<&str, BTreeMap<u64, usize>> = BTreeMap::new();
            for owner in s.owners.iter().flatten() {
                *tokens
                    .entry(owner.member.as_str())
                    .or_default()
                    .entry(owner.token)
                    .or_default() += 1;
            }
            format!(
                "buckets {} protocol {} version {} quarantine {:?} free {} members {:?} tokens {:?} \
                 ttl {:?} sessions {}",
                s.buckets,
                s.protocol,
                s.version,
                s.quarantine,
                s.free(),
                s.members,
                tokens,
                s.ttl,
                s.renewed_ago.is_some()
            )
        }
        Ok(None) => "no group".into(),
        Err(e) => format!("error: {e}"),
    }
}

impl<'h> Run<'h> {
    fn new(h: &'h Harness, index: u64, case: &Case) -> Self {
        let g = GroupKey::new("diff", format!("g{index}"));
        let _: () = h.cmd(&redis::cmd("FLUSHALL"));
        let now_us = T0_US;
        let _: () = h.cmd(
            redis::cmd("SET")
                .arg(format!("{}:test-clock", g.tag()))
                .arg(now_us),
        );
        let (memory, notices) = h.memory_rt.block_on(async {
            let memory = MemoryStore::new();
            memory.set_clock_us(now_us);
            let mut notices = vec![(
                "group".to_string(),
                memory.subscribe(&g, Channel::Group).await.unwrap(),
            )];
            for m in 0..MEMBERS {
                let id = member(m);
                let wakes = memory.subscribe(&g, Channel::Member(&id)).await.unwrap();
                notices.push((id, wakes));
            }
            (memory, notices)
        });
        Run {
            h,
            g,
            memory,
            notices,
            now_us,
            buckets: case.buckets,
            ttl: Duration::from_millis(case.ttl_ms),
            nonces: vec![(None, None); MEMBERS],
            next_nonce: 1,
        }
    }

    fn session(&self, m: usize, stale: bool) -> SessionRef {
        let (current, before) = self.nonces[m];
        let n = if stale { before } else { current };
        SessionRef {
            member: member(m),
            session: n.map_or_else(|| "never".into(), nonce),
        }
    }

    /// The notices queued on `MemoryStore`'s subscriptions, per channel (see `published`).
    fn memory_notices(&mut self) -> BTreeMap<String, Vec<String>> {
        let mut counts = BTreeMap::new();
        for (label, notices) in &mut self.notices {
            while let Some(Some(notice)) = notices.next().now_or_never() {
                if let Notice::Granted { token, buckets, .. } = &notice {
                    let held = self.memory.held_buckets(&self.g, label);
                    assert_granted("MemoryStore", label, &held, *token, buckets);
                }
                counts
                    .entry(label.clone())
                    .or_insert_with(Vec::new)
                    .push(summary(&notice));
            }
        }
        counts
    }

    /// Runs one op on both stores: (memory outcome, redis outcome).
    fn apply(&mut self, op: &Op) -> (String, String) {
        let h = self.h;
        let (g, mem, red) = (&self.g, &self.memory, &h.redis);
        match op {
            Op::Register {
                m,
                weight,
                who,
                mismatch,
            } => {
                let (current, _) = self.nonces[*m];
                let (n, replaces) = match (who, current) {
                    (RegisterAs::Retry, Some(c)) => (c, None),
                    (RegisterAs::Replace, Some(c)) => (self.next_nonce, Some(nonce(c))),
                    _ => (self.next_nonce, None),
                };
                if n == self.next_nonce {
                    self.next_nonce += 1;
                }
                let (buckets, ttl) = match mismatch {
                    Mismatch::None => (self.buckets, self.ttl),
                    Mismatch::Buckets if self.buckets == 65_536 => (1, self.ttl),
                    Mismatch::Buckets => (self.buckets + 1, self.ttl),
                    Mismatch::Ttl => (self.buckets, self.ttl + Duration::from_millis(1)),
                };
                let session = SessionRef {
                    member: member(*m),
                    session: nonce(n),
                };
                let mut req = RegisterRequest::new(session, *weight, buckets, ttl);
                req.replaces = replaces;
                let a = h.memory_rt.block_on(mem.register(g, &req));
                let b = h.redis_rt.block_on(red.register(g, &req));
                let registered = matches!(
                    (&a, &b),
                    (
                        Ok(redbuckets::store::Registration::Registered { .. }),
                        Ok(redbuckets::store::Registration::Registered { .. })
                    )
                );
                if registered && current != Some(n) {
                    self.nonces[*m] = (Some(n), current);
                }
                (outcome(a), outcome(b))
            }
            Op::Heartbeat {
                m,
                stale,
                extra_ttl_ms,
                watch_ms,
            } => {
                let s = self.session(*m, *stale);
                let ttl = self.ttl + Duration::from_millis(*extra_ttl_ms);
                let watch = watch_ms.map_or(Duration::MAX, Duration::from_millis);
                let a = h.memory_rt.block_on(mem.heartbeat(g, &s, ttl, watch));
                let b = h.redis_rt.block_on(red.heartbeat(g, &s, ttl, watch));
                (outcome(a), outcome(b))
            }
            Op::Rebalance { m, stale, max_take } => {
                let s = self.session(*m, *stale);
                let a = h.memory_rt.block_on(mem.rebalance(g, &s, *max_take));
                let b = h.redis_rt.block_on(red.rebalance(g, &s, *max_take));
                if let Ok(Action::Acquired { buckets, token }) = a.as_ref().map(|r| &r.action) {
                    let held = mem.held_buckets(g, &s.member);
                    assert_granted("MemoryStore", &s.member, &held, *token, buckets);
                }
                if let Ok(Action::Acquired { buckets, token }) = b.as_ref().map(|r| &r.action) {
                    let held = h.redis_held_among(g, &s.member, buckets);
                    assert_granted("RedisStore", &s.member, &held, *token, buckets);
                }
                (rebalance_outcome(a), rebalance_outcome(b))
            }
            Op::Release {
                m,
                stale,
                picks,
                leave,
                known_oldest,
            } => {
                let s = self.session(*m, *stale);
                // Buckets in grant order (token, then id): the i-th bucket of a member then
                // has the same token in both stores, though not the same id.
                let resolve = |held: &dyn Fn(&str) -> Vec<(u64, u32)>| -> Vec<u32> {
                    let mine = held(&member(*m));
                    let others: Vec<(u64, u32)> = (0..MEMBERS)
                        .filter(|o| o != m)
                        .flat_map(|o| held(&member(o)))
                        .collect();
                    picks
                        .iter()
                        .filter_map(|p| match *p {
                            Pick::Mine(i) => mine.get(i % mine.len().max(1)).map(|h| h.1),
                            Pick::Others(i) => others.get(i % others.len().max(1)).map(|h| h.1),
                            Pick::Outside(k) => Some(self.buckets + k),
                        })
                        .collect()
                };
                let mem_ids = resolve(&|id: &str| mem.held_buckets(g, id));
                let red_ids = resolve(&|id: &str| h.redis_held(g, id));
                // The member's oldest grant's token (the same in both stores, by grant order):
                // buckets granted to it later are not freed.
                let known = match mem.held_buckets(g, &member(*m)).first() {
                    Some((token, _)) if *known_oldest => *token,
                    _ => u64::MAX,
                };
                let (a, b) = if *leave {
                    (
                        h.memory_rt.block_on(mem.leave(g, &s, &mem_ids)),
                        h.redis_rt.block_on(red.leave(g, &s, &red_ids)),
                    )
                } else {
                    (
                        h.memory_rt.block_on(mem.release(g, &s, &mem_ids, known)),
                        h.redis_rt.block_on(red.release(g, &s, &red_ids, known)),
                    )
                };
                (
                    format!("{} of {} named", outcome(a), mem_ids.len()),
                    format!("{} of {} named", outcome(b), red_ids.len()),
                )
            }
            Op::Deregister { m, stale } => {
                let s = self.session(*m, *stale);
                let a = h.memory_rt.block_on(mem.deregister(g, &s));
                let b = h.redis_rt.block_on(red.deregister(g, &s));
                (outcome(a), outcome(b))
            }
            Op::Remove { m } => {
                let id = self.session(*m, false).member;
                let a = h
                    .memory_rt
                    .block_on(async { Ok::<_, Error>(mem.remove_member(g, &id)) });
                let b = h.redis_rt.block_on(red.remove_member(g, &id));
                (outcome(a), outcome(b))
            }
            Op::Advance { ms } => {
                self.now_us += ms * 1_000;
                let _: () = h.cmd(
                    redis::cmd("SET")
                        .arg(format!("{}:test-clock", g.tag()))
                        .arg(self.now_us),
                );
                h.memory_rt
                    .block_on(tokio::time::advance(Duration::from_millis(*ms)));
                (String::new(), String::new())
            }
            Op::Pass { .. } | Op::Round => unreachable!("expanded by run_case"),
            Op::Snapshot => {
                let a = h.memory_rt.block_on(mem.snapshot(g));
                let b = h.redis_rt.block_on(red.snapshot(g));
                (snapshot_outcome(a), snapshot_outcome(b))
            }
            Op::Holdings { m, stale } => {
                let s = self.session(*m, *stale);
                let a = h.memory_rt.block_on(mem.holdings(g, &s));
                let b = h.redis_rt.block_on(red.holdings(g, &s));
                (holdings_outcome(a), holdings_outcome(b))
            }
        }
    }
}

/// Runs one case; the first divergence fails it.
fn run_case(h: &Harness, index: u64, case: &Case) -> Result<(), TestCaseError> {
    let mut run = Run::new(h, index, case);
    let third = (case.ttl_ms / 3).max(1);
    let ops = case.ops.iter().chain(std::iter::once(&Op::Snapshot));
    for (i, op) in ops.enumerate() {
        // Compound ops run as the plain ops they stand for, each compared on its own.
        let registered: Vec<usize> = (0..MEMBERS)
            .filter(|&m| run.nonces[m].0.is_some())
            .collect();
        let steps = match op {
            Op::Pass { thirds } => (0..*thirds)
                .flat_map(|_| {
                    let beats = registered.iter().map(|&m| Op::Heartbeat {
                        m,
                        stale: false,
                        extra_ttl_ms: 0,
                        watch_ms: None,
                    });
                    beats.chain(std::iter::once(Op::Advance { ms: third }))
                })
                .collect(),
            Op::Round => registered
                .iter()
                .map(|&m| Op::Rebalance {
                    m,
                    stale: false,
                    max_take: u32::MAX,
                })
                .collect(),
            op => vec![op.clone()],
        };
        for step in &steps {
            run_step(h, &mut run, i, step)?;
        }
    }
    Ok(())
}

/// A wake-up's payload as the scripts publish it: `act`, or `grant <nonce> <token> <bucket>...`.
fn parse_notice(payload: &str) -> Notice {
    let words: Vec<&str> = payload.split(' ').collect();
    match words.as_slice() {
        ["act"] => Notice::Act,
        ["grant", session, token, buckets @ ..] => Notice::Granted {
            session: session.to_string(),
            token: token.parse().expect("a grant's token"),
            buckets: buckets
                .iter()
                .map(|b| b.parse().expect("a bucket id"))
                .collect(),
        },
        _ => panic!("a wake-up that is neither act nor grant: {payload:?}"),
    }
}

/// Each bucket a grant names (a rebalance's `Acquired`, a `Granted` notice) is in `member`'s
/// held set of that store with the grant's token, right after the call: the comparison across
/// the stores sees counts and tokens only (they pick different free buckets), so a store
/// naming other buckets than it recorded would pass it (issue 19).
fn assert_granted(store: &str, member: &str, held: &[(u64, u32)], token: u64, buckets: &[u32]) {
    // A set: a member may hold tens of thousands of buckets, and a grant name as many.
    let held: std::collections::HashSet<&(u64, u32)> = held.iter().collect();
    for b in buckets {
        assert!(
            held.contains(&(token, *b)),
            "{store}: a grant to {member} names bucket {b} with token {token}, which it does not \
             record"
        );
    }
}

/// A notice, compared across the stores: a grant by session, token and bucket count (Lua
/// `SPOP`s random free buckets where `MemoryStore` takes the lowest, see the module docs).
fn summary(notice: &Notice) -> String {
    match notice {
        Notice::Act => "act".into(),
        Notice::Granted {
            session,
            token,
            buckets,
        } => format!("grant {session} {token} ×{}", buckets.len()),
    }
}

/// Runs one plain op on both stores and compares replies and notices.
fn run_step(h: &Harness, run: &mut Run<'_>, i: usize, op: &Op) -> Result<(), TestCaseError> {
    let (memory, redis) = run.apply(op);
    let memory_notices = run.memory_notices();
    let redis_notices = h.published(&run.g);
    prop_assert_eq!(
        &memory,
        &redis,
        "op {} {:?}: replies differ (left MemoryStore, right RedisStore)",
        i,
        op
    );
    prop_assert_eq!(
        memory_notices,
        redis_notices,
        "op {} {:?}: notices differ (left MemoryStore, right RedisStore); reply {}",
        i,
        op,
        memory
    );
    Ok(())
}

fn cases() -> u32 {
    std::env::var("DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn memory_store_and_lua_scripts_agree() {
    let h = Harness::start();
    let started = Instant::now();
    let index = std::cell::Cell::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        index.set(index.get() + 1);
        run_case(&h, index.get(), &case)
    });
    eprintln!(
        "differential: {} cases in {:?}",
        index.get(),
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Divergences the property test found, kept as fixed cases (each failed before its fix).
#[test]
fn found_divergences_stay_fixed() {
    let h = Harness::start();
    let register = |m, who| Op::Register {
        m,
        weight: 1,
        who,
        mismatch: Mismatch::None,
    };
    let cases = [
        // Issue 8, bug 4: m0's session expires; m2's retried registration purges it, and
        // register.lua published where MemoryStore stayed silent.
        Case {
            buckets: 1,
            ttl_ms: 633,
            ops: vec![
                register(0, RegisterAs::Fresh),
                Op::Advance { ms: 1 },
                register(2, RegisterAs::Retry),
                Op::Advance { ms: 632 },
                register(2, RegisterAs::Retry),
            ],
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        if let Err(e) = run_case(&h, i as u64, case) {
            panic!("{case:?}: {e}");
        }
    }
}
