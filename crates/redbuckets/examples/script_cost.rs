//! Server time per store call, by call type, as `INFO commandstats` counts it: FCALL (the
//! function library, the default) against EVALSHA (what a server that refuses functions gets;
//! here one with FCALL renamed away). Each call type runs alone against a fresh, otherwise idle
//! `redis-server`, so its `usec_per_call` is that call's alone.
//!
//! ```text
//! cargo run -p redbuckets --example script_cost                # 4 members × 1,024 buckets
//! cargo run -p redbuckets --example script_cost -- 10 16384    # members, buckets
//! ```
//! `REDBUCKETS_REDIS_SERVER` (and `_CLI`) run it on another server (Valkey, Redis 6.2: see
//! `scripts/compat.sh`); a server without functions gets the EVALSHA pass only.
//! Phases: `rebalance (settle)` (the steps that spread a new group's buckets: each member takes
//! its share, then stays), `renewal` (steady-state heartbeats), `rebalance (stay)` (steady-state
//! steps: nothing to move), then one more member joins and leaves, ten times over:
//! `register (join)` (it commits the others' releases and wakes them), `rebalance (release)`
//! (their steps report it), `release` (each grants its buckets to the newcomer in its notice),
//! `rebalance (take)` (every member steps: all stay), and `leave` (the newcomer leaves
//! gracefully: its buckets are freed and granted to the others in one call); then each
//! member's `holdings (resync)` read and one `snapshot`, the read it replaces.

use std::time::Duration;

use redbuckets::store::{Action, RegisterRequest, SessionRef};
use redbuckets::{GroupKey, RedisStore, Store};
use redbuckets_testkit::{RedisInfo, RedisServer};

/// Long enough that no session expires while the phases run (at 1,000 members the first
/// settle alone takes longer than the default 10 s); a call's server time does not depend on it.
const TTL: Duration = Duration::from_secs(3600);

/// Joins and leaves of one more member, each phase of them summed over all.
const CHANGES: usize = 10;

/// Rounds per steady phase: about 2,000 calls of each kind, at least 2 rounds, at most 500.
fn rounds(n: usize) -> usize {
    (2000 / n.max(1)).clamp(2, 500)
}

/// The script command, its calls that ran, and their µs since the last `CONFIG RESETSTAT`.
fn script_stats(server: &RedisServer) -> (String, u64, u64) {
    let info = RedisInfo::parse(server.cli(&["INFO", "commandstats"]));
    let mut found = (String::from("none"), 0, 0);
    for cmd in ["fcall", "evalsha"] {
        let calls = info.command(cmd, "calls");
        if calls == 0.0 {
            continue;
        }
        // A NOSCRIPT answer (the first EVALSHA of a script) fails at once and would pull the
        // mean down: count the calls that ran.
        found = (
            cmd.to_string(),
            (calls - info.command(cmd, "failed_calls")) as u64,
            info.command(cmd, "usec") as u64,
        );
    }
    found
}

/// Calls and server µs per phase, summed over the rounds that run it, in the order first run.
#[derive(Default)]
struct Tally(Vec<(&'static str, String, u64, u64)>);

impl Tally {
    /// Adds what ran since the last reset to `phase`, and resets the counts.
    fn add(&mut self, server: &RedisServer, phase: &'static str) {
        let (cmd, calls, usec) = script_stats(server);
        discard(server);
        match self.0.iter_mut().find(|p| p.0 == phase) {
            Some(p) => {
                p.2 += calls;
                p.3 += usec;
            }
            None => self.0.push((phase, cmd, calls, usec)),
        }
    }

    fn print(&self) {
        for (phase, cmd, calls, usec) in &self.0 {
            let per = if *calls > 0 {
                *usec as f64 / *calls as f64
            } else {
                0.0
            };
            println!("  {phase:<20} {cmd:<8} {calls:>6} calls  {per:>7.1} µs/call");
        }
    }
}

/// Forgets the counts of what ran since the last reset (reads the test makes for itself).
fn discard(server: &RedisServer) {
    server.cli(&["CONFIG", "RESETSTAT"]);
}

fn session(i: usize) -> SessionRef {
    SessionRef {
        member: format!("m{i}"),
        session: "1".to_string(),
    }
}

/// Rebalances every member until all of them stay, releasing what a member is told to; the
/// buckets each member holds are tracked in `held`.
async fn settle(store: &RedisStore, g: &GroupKey, members: &[SessionRef], held: &mut Held) {
    for _ in 0..100 {
        let mut quiet = true;
        for m in members {
            quiet &= step(store, g, m, held).await;
        }
        if quiet {
            return;
        }
    }
    panic!("not settled after 100 rounds");
}

type Held = std::collections::BTreeMap<String, Vec<u32>>;

/// One rebalance step of `m` (and the release it asks for); true when it says stay.
async fn step(store: &RedisStore, g: &GroupKey, m: &SessionRef, held: &mut Held) -> bool {
    let r = store.rebalance(g, m, u32::MAX).await.expect("rebalance");
    let mine = held.entry(m.member.clone()).or_default();
    match r.action {
        Action::Acquired { buckets, .. } => mine.extend(buckets),
        Action::Release(n) => {
            let gone: Vec<u32> = mine.split_off(mine.len() - n as usize);
            store.release(g, m, &gone, u64::MAX).await.expect("release");
        }
        Action::Stay => return true,
        _ => {}
    }
    false
}

async fn measure(extra: &[&str], n: usize, buckets: u32) {
    let server = RedisServer::start_with(extra);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let g = GroupKey::new("cost", "g");
    let members: Vec<SessionRef> = (0..n).map(session).collect();
    for m in &members {
        store
            .register(&g, &RegisterRequest::new(m.clone(), 1, buckets, TTL))
            .await
            .expect("register");
    }
    server.cli(&["HSET", &format!("{}:meta", g.tag()), "grant_after_us", "0"]);
    let mut held = Held::new();

    let mut tally = Tally::default();
    discard(&server);
    settle(&store, &g, &members, &mut held).await;
    tally.add(&server, "rebalance (settle)");

    for _ in 0..rounds(n) {
        for m in &members {
            assert!(
                store
                    .heartbeat(&g, m, TTL, Duration::MAX)
                    .await
                    .expect("heartbeat")
                    .alive
            );
        }
    }
    tally.add(&server, "renewal");

    for _ in 0..rounds(n) {
        for m in &members {
            assert!(step(&store, &g, m, &mut held).await, "not settled");
        }
    }
    tally.add(&server, "rebalance (stay)");

    // One more member joins and leaves, CHANGES times: its registration commits the others'
    // releases (`register (join)`), their next step reports them in its counts, they release,
    // granting it their buckets in its notice, and its step then stays (`rebalance (take)`);
    // then it leaves gracefully: one call frees its buckets, ends its session and grants the
    // buckets to the others in their notices.
    let newcomer = session(n);
    let mut all = members.clone();
    all.push(newcomer.clone());
    for _ in 0..CHANGES {
        store
            .register(&g, &RegisterRequest::new(newcomer.clone(), 1, buckets, TTL))
            .await
            .expect("register");
        tally.add(&server, "register (join)");
        let mut told = Vec::new();
        for m in &members {
            let r = store.rebalance(&g, m, u32::MAX).await.expect("rebalance");
            let asked = match r.action {
                Action::Release(k) => k,
                _ => 0,
            };
            let k = asked.max(r.held.saturating_sub(r.committed));
            if k > 0 {
                told.push((m, k));
            }
        }
        tally.add(&server, "rebalance (release)");
        for (m, k) in told {
            let mine = held.get_mut(&m.member).expect("held");
            let gone: Vec<u32> = mine.split_off(mine.len() - k as usize);
            store
                .release(&g, m, &gone, u64::MAX)
                .await
                .expect("release");
        }
        tally.add(&server, "release");
        settle(&store, &g, &all, &mut held).await;
        tally.add(&server, "rebalance (take)");

        // What each member holds now (grants in notices are not in `held`), not counted.
        refresh(&store, &g, &all, &mut held).await;
        discard(&server);
        let mine = held.remove(&newcomer.member).unwrap_or_default();
        store.leave(&g, &newcomer, &mine).await.expect("leave");
        tally.add(&server, "leave");
        refresh(&store, &g, &members, &mut held).await;
        discard(&server);
    }

    // A member's resync read after a lost reply: its own buckets, against the whole snapshot
    // it read before `Store::holdings`.
    for m in &members {
        store.holdings(&g, m).await.expect("holdings");
    }
    tally.add(&server, "holdings (resync)");
    store.snapshot(&g).await.expect("snapshot");
    tally.add(&server, "snapshot");
    tally.print();
}

/// Sets `held` to what each of `members` holds in the store.
async fn refresh(store: &RedisStore, g: &GroupKey, members: &[SessionRef], held: &mut Held) {
    for m in members {
        let owned = store
            .holdings(g, m)
            .await
            .expect("holdings")
            .map(|h| h.owned.into_keys().collect())
            .unwrap_or_default();
        held.insert(m.member.clone(), owned);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("members and buckets are numbers"))
        .collect();
    let (n, buckets) = match args[..] {
        [n, b] => (n as usize, b),
        _ => (4, 1024),
    };
    println!(
        "{n} members × {buckets} buckets, ttl {TTL:?}, {} rounds per steady phase",
        rounds(n)
    );
    // A server older than 7.0 (REDBUCKETS_REDIS_SERVER, e.g. Redis 6.2) has no FCALL to rename:
    // it gets EVALSHA anyway.
    let version = RedisServer::start().cli(&["INFO", "server"]);
    let functions = version
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .and_then(|v| v.trim().split('.').next()?.parse::<u32>().ok())
        .is_some_and(|major| major >= 7);
    if !functions {
        println!("EVALSHA (a server without functions):");
        measure(&[], n, buckets).await;
        return;
    }
    println!("EVALSHA (a server with FCALL renamed away):");
    measure(&["--rename-command", "FCALL", ""], n, buckets).await;
    println!("FCALL (the function library):");
    measure(&[], n, buckets).await;
}
