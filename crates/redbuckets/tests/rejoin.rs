//! Rejoin grace (static membership) on `MemoryStore`, on tokio's paused clock: a member with a
//! fixed id that restarts gets its buckets back and nothing else moves, whether it left
//! gracefully or crashed; one that never comes back costs the group at most grace + ttl; a
//! second live process under the id is refused and the first keeps its buckets.

mod group;

use std::collections::BTreeSet;
use std::time::Duration;

use group::{until_holds, Members};
use redbuckets::store::GroupKey;
use redbuckets::{Error, Event, Member, MemoryStore, Store};
use tokio::time::{sleep, Instant};

const HEARTBEAT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_millis(1000);
const GRACE: Duration = Duration::from_secs(2);
const BUCKETS: u32 = 256;

async fn start(store: &MemoryStore, id: &str, grace: Duration) -> Member {
    Member::builder(store.clone(), "g")
        .id(id)
        .buckets(BUCKETS)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .call_timeout(Duration::from_millis(200))
        .drain_timeout(Duration::from_millis(50))
        .rejoin_grace(grace)
        .start()
        .await
        .expect("start")
}

/// Four members of 256 buckets, every one with `grace`, balanced.
async fn fleet(grace: Duration) -> Members<MemoryStore> {
    let mut g = Members::with(MemoryStore::new(), BUCKETS);
    for i in 0..4 {
        let m = start(&g.ctx, &format!("m{i}"), grace).await;
        g.add(m);
    }
    g.until_balanced(TTL * 3).await;
    g
}

/// Member `i` leaves the fleet; its events are still collected (under its id) until `forget`.
fn take_out(g: &mut Members<MemoryStore>, i: usize) -> Member {
    g.members.remove(i)
}

/// Stops collecting the events of `id` (a process that ended), after reading what is left.
fn forget(g: &mut Members<MemoryStore>, id: &str) {
    g.collect();
    g.receivers.retain(|(r, _)| r != id);
}

/// Adds a restarted process of id `id`: the checker sees it as another owner than the
/// process before it (`<id>'`).
fn add_restarted(g: &mut Members<MemoryStore>, member: Member) {
    g.receivers
        .push((format!("{}'", member.id()), member.events()));
    g.members.push(member);
}

/// The grants (bucket, token) made to members other than `except` since event `mark`.
fn grants_to_others(g: &Members<MemoryStore>, mark: usize, except: &str) -> Vec<(String, u32)> {
    g.timeline.events[mark..]
        .iter()
        .filter(|(id, _)| !id.starts_with(except))
        .filter_map(|(id, e)| match e {
            Event::Acquired { bucket, .. } => Some((id.clone(), *bucket)),
            _ => None,
        })
        .collect()
}

/// The largest token among `member`'s events so far.
fn top_token(g: &Members<MemoryStore>, member: &str) -> u64 {
    g.timeline
        .events
        .iter()
        .filter(|(id, _)| id == member)
        .filter_map(|(_, e)| e.token())
        .max()
        .unwrap_or(0)
}

fn key() -> GroupKey {
    GroupKey::new("red-buckets", "g")
}

#[tokio::test(start_paused = true)]
async fn a_graceful_restart_gets_its_buckets_back_and_nothing_else_moves() {
    let mut g = fleet(GRACE).await;
    let before: BTreeSet<u32> = g.members[0].buckets().into_iter().collect();
    let before_token = top_token(&g, "m0");
    let leaving = take_out(&mut g, 0);
    g.collect();
    let mark = g.timeline.events.len();
    leaving.shutdown().await.expect("graceful leave");
    forget(&mut g, "m0");
    // Parked: released (the store's snapshot shows them owned by nobody), granted to nobody.
    let snap = g.ctx.snapshot(&key()).await.unwrap().unwrap();
    assert_eq!(snap.parked.len(), 1, "{:?}", snap.parked);
    assert_eq!(snap.parked[0].held as usize, before.len());
    assert_eq!(snap.free(), before.len());
    sleep(GRACE / 2).await;
    g.collect();
    assert_eq!(g.counts(), vec![64, 64, 64], "the others took nothing");
    // The same id again, within the grace: exactly its buckets, at once, with larger tokens.
    let again = start(&g.ctx, "m0", GRACE).await;
    add_restarted(&mut g, again);
    let last = g.members.len() - 1;
    let took = until_holds(&g.members[last], &before, HEARTBEAT).await;
    assert!(took < Duration::from_millis(10), "back after {took:?}");
    g.collect();
    assert!(grants_to_others(&g, mark, "m0").is_empty());
    let regrants: Vec<u64> = g.timeline.events[mark..]
        .iter()
        .filter(|(id, e)| id == "m0'" && matches!(e, Event::Acquired { .. }))
        .filter_map(|(_, e)| e.token())
        .collect();
    assert_eq!(regrants.len(), before.len());
    assert!(regrants.iter().all(|t| *t > before_token));
    g.assert_exclusive();
    g.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_restart_gets_its_buckets_back_once_the_old_session_expired() {
    let mut g = fleet(GRACE).await;
    let before: BTreeSet<u32> = g.members[0].buckets().into_iter().collect();
    let crashed = take_out(&mut g, 0);
    forget(&mut g, "m0");
    let mark = g.timeline.events.len();
    let renewed = crashed.status().last_heartbeat.expect("renewed");
    let began = Instant::now();
    crashed.abort();
    g.timeline.crashed("m0", began);
    // Restarted at once: it waits for the old session, then claims what it parked.
    let again = start(&g.ctx, "m0", GRACE).await;
    assert!(
        Instant::now() >= renewed + TTL,
        "joined while the old session lived"
    );
    add_restarted(&mut g, again);
    let last = g.members.len() - 1;
    until_holds(&g.members[last], &before, HEARTBEAT).await;
    assert!(
        began.elapsed() <= TTL + HEARTBEAT,
        "back {:?} after the crash",
        began.elapsed()
    );
    g.collect();
    assert!(grants_to_others(&g, mark, "m0").is_empty());
    g.assert_exclusive();
    g.shutdown().await;
}

/// A member that joins while another is parked is balanced against the parked one's share; the
/// parked member still gets its buckets back and then gives the newcomer its part.
#[tokio::test(start_paused = true)]
async fn a_join_while_parked_leaves_the_parked_buckets_alone() {
    let mut g = fleet(GRACE).await;
    let before: BTreeSet<u32> = g.members[0].buckets().into_iter().collect();
    let leaving = take_out(&mut g, 0);
    leaving.shutdown().await.expect("graceful leave");
    forget(&mut g, "m0");
    let mark = g.timeline.events.len();
    let newcomer = start(&g.ctx, "m9", GRACE).await;
    g.add(newcomer);
    sleep(HEARTBEAT * 3).await;
    g.collect();
    // The others gave down to the five-member share (51 or 52); the newcomer took that.
    let got: Vec<u32> = g.timeline.events[mark..]
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Acquired { bucket, .. } => Some(*bucket),
            _ => None,
        })
        .collect();
    assert!(
        got.iter().all(|b| !before.contains(b)),
        "a parked bucket moved"
    );
    let counts = g.counts();
    assert!(
        counts[..3].iter().all(|c| (51..=52).contains(c)),
        "{counts:?}"
    );
    // The parked member comes back: balanced over five with everything owned.
    let again = start(&g.ctx, "m0", GRACE).await;
    add_restarted(&mut g, again);
    g.until_balanced(TTL).await;
    g.assert_exclusive();
    g.shutdown().await;
}

/// A member that never comes back: its buckets are spread when the grace ends (after a
/// graceful leave) or grace + ttl after the last renewal (after a crash), not later.
#[tokio::test(start_paused = true)]
async fn a_member_that_never_returns_costs_at_most_grace_plus_ttl() {
    let mut g = fleet(GRACE).await;
    let leaving = take_out(&mut g, 0);
    let began = Instant::now();
    leaving.shutdown().await.expect("graceful leave");
    forget(&mut g, "m0");
    sleep(GRACE - HEARTBEAT).await;
    g.collect();
    assert_eq!(
        g.counts().iter().sum::<usize>(),
        192,
        "spread before the grace ended"
    );
    g.until_balanced(GRACE).await;
    let took = began.elapsed();
    assert!(
        took >= GRACE,
        "spread {took:?} after the leave, within the grace"
    );
    assert!(took <= GRACE + TTL, "spread {took:?} after the leave");

    let crashed = take_out(&mut g, 0);
    forget(&mut g, "m1");
    let renewed = crashed.status().last_heartbeat.expect("renewed");
    let began = Instant::now();
    crashed.abort();
    g.timeline.crashed("m1", began);
    g.until_balanced(GRACE + TTL * 2).await;
    let spread = Instant::now() - renewed;
    assert!(
        spread >= TTL + GRACE,
        "spread {spread:?} after the last renewal"
    );
    assert!(
        began.elapsed() <= GRACE + TTL + HEARTBEAT,
        "spread {:?} after the crash",
        began.elapsed()
    );
    g.assert_exclusive();
    g.shutdown().await;
}

/// Two live processes under one id: the second is refused with an error that names the
/// cause, and the first keeps its buckets.
#[tokio::test(start_paused = true)]
async fn a_second_live_process_under_the_id_is_refused() {
    let mut g = fleet(GRACE).await;
    let before = g.members[0].buckets();
    let err = Member::builder(g.ctx.clone(), "g")
        .id("m0")
        .buckets(BUCKETS)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .rejoin_grace(GRACE)
        .start()
        .await
        .expect_err("the id is in use");
    assert!(matches!(err, Error::IdInUse { .. }), "{err}");
    assert!(
        err.to_string().contains("give each process its own id"),
        "{err}"
    );
    g.collect();
    assert_eq!(g.members[0].buckets(), before);
    g.assert_exclusive();
    g.shutdown().await;
}

/// Without the option nothing is parked: a graceful leave hands the buckets over at once.
#[tokio::test(start_paused = true)]
async fn without_a_grace_a_leave_hands_over_at_once() {
    let mut g = fleet(Duration::ZERO).await;
    let leaving = take_out(&mut g, 0);
    leaving.shutdown().await.expect("graceful leave");
    forget(&mut g, "m0");
    let snap = g.ctx.snapshot(&key()).await.unwrap().unwrap();
    assert!(snap.parked.is_empty());
    g.until_balanced(HEARTBEAT).await;
    g.shutdown().await;
}

/// The store-generic round the Redis tests run (Sentinel, Cluster), on the in-memory store.
#[tokio::test(start_paused = true)]
async fn the_shared_rejoin_round_on_the_memory_store() {
    group::rejoin_round(MemoryStore::new(), "round", 64, HEARTBEAT, TTL).await;
}
