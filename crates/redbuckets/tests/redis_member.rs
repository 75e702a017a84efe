//! Members on a real Redis the test starts on a free port: balance for 1 to 10 members, movement on
//! join and leave, crash reassignment, killed connections, a Redis restart that loses the data,
//! and foreign data under the group's keys.

mod group;

use std::time::{Duration, Instant};

use group::Members;
use redbuckets::{Error, Event, Member, RedisStore};
use redbuckets_testkit::{RedisServer, Sentinel};

const HEARTBEAT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_millis(1000);

/// Where the members' Redis is, and the group's name.
struct Target {
    url: String,
    name: String,
}

/// Members of one group on a real Redis, each with its own connection.
type Group = Members<Target>;

impl Group {
    fn new(server: &RedisServer, name: &str, buckets: u32) -> Self {
        let target = Target {
            url: server.url(),
            name: name.to_string(),
        };
        Members::with(target, buckets)
    }

    async fn join(&mut self, id: &str) {
        let store = RedisStore::connect(&self.ctx.url).await.expect("connect");
        let name = self.ctx.name.clone();
        self.start_on(store, &name, id, HEARTBEAT, TTL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_ten_members_reach_balance() {
    let server = RedisServer::start();
    let mut groups = Vec::new();
    for n in 1..=10 {
        let mut g = Group::new(&server, &format!("balance-{n}"), 1024);
        for i in 0..n {
            g.join(&format!("m{i}")).await;
        }
        groups.push(g);
    }
    for g in &mut groups {
        g.until_balanced(TTL * 5).await;
        g.assert_exclusive();
    }
    for g in groups {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_move_at_most_optimal_plus_n() {
    let server = RedisServer::start();
    let mut g = Group::new(&server, "moves", 1024);
    for i in 0..4 {
        g.join(&format!("m{i}")).await;
    }
    g.until_balanced(TTL * 5).await;

    let mark = g.timeline.events.len();
    g.join("m4").await;
    g.until_balanced(TTL * 2).await;
    tokio::time::sleep(HEARTBEAT).await;
    g.collect();
    let moved = g.timeline.acquisitions_since(mark);
    assert!(moved <= 204 + 5, "join moved {moved}, optimal 204");

    let leaving = g.members.remove(0);
    let held = leaving.buckets().len();
    let mark = g.timeline.events.len();
    leaving.shutdown().await.expect("graceful leave");
    g.collect();
    g.receivers.remove(0);
    g.until_balanced(TTL * 2).await;
    tokio::time::sleep(HEARTBEAT).await;
    g.collect();
    let moved = g.timeline.acquisitions_since(mark);
    assert!(moved <= held + 4, "leave moved {moved}, optimal {held}");
    g.assert_exclusive();
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_member_is_reassigned_after_the_ttl() {
    let server = RedisServer::start();
    let mut g = Group::new(&server, "crash", 256);
    for i in 0..3 {
        g.join(&format!("m{i}")).await;
    }
    g.until_balanced(TTL * 5).await;
    let crashed = g.members.remove(2);
    g.collect();
    g.receivers.remove(2);
    // Its session ends a ttl after its last renewal, which may be up to a renewal interval
    // (ttl / 2) before the crash; the survivors check at that moment.
    let renewed = crashed.status().last_heartbeat.expect("renewed");
    let began = Instant::now();
    crashed.abort();
    g.timeline.crashed("m2", tokio::time::Instant::now());
    let took = g.until_balanced(TTL * 5).await;
    let since_renewal = renewed.elapsed();
    assert!(
        since_renewal >= TTL * 99 / 100,
        "reassigned {since_renewal:?} after the last renewal, before the ttl"
    );
    // L1's bound is ttl + one heartbeat; one more heartbeat of slack for a loaded 2-core
    // machine (a CI run with other builds going once saw 1.115 s). `measure` prints the
    // real figure (10.007-10.013 s at the defaults).
    assert!(
        since_renewal <= TTL + HEARTBEAT * 2,
        "reassigned {since_renewal:?} after the last renewal ({took:?} after the crash)"
    );
    assert!(
        began.elapsed() <= TTL + HEARTBEAT * 3,
        "reassigned after {:?}, target ttl + heartbeat",
        began.elapsed()
    );
    g.assert_exclusive();
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_reconnect_without_double_ownership() {
    let server = RedisServer::start();
    let mut g = Group::new(&server, "kill", 128);
    for i in 0..3 {
        g.join(&format!("m{i}")).await;
    }
    g.until_balanced(TTL * 5).await;
    for _ in 0..3 {
        server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        tokio::time::sleep(HEARTBEAT * 3).await;
        g.collect();
        g.assert_exclusive();
    }
    g.until_balanced(TTL * 5).await;
    g.assert_exclusive();
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_data_and_members_recover_with_larger_tokens() {
    let mut server = RedisServer::start();
    let mut g = Group::new(&server, "restart", 64);
    for i in 0..3 {
        g.join(&format!("m{i}")).await;
    }
    g.until_balanced(TTL * 5).await;
    let before = g.max_token();
    let mark = g.timeline.events.len();
    server.restart();
    // Every member notices its session is gone and recovers: a new session, then the buckets
    // again after the re-created group's quarantine.
    tokio::time::sleep(HEARTBEAT * 3).await;
    g.until_balanced(TTL * 6).await;
    g.assert_exclusive();
    let lost = g.timeline.events[mark..]
        .iter()
        .filter(|(_, e)| matches!(e, Event::Lost { .. }))
        .count();
    assert_eq!(lost, 64, "every held bucket reported lost");
    g.assert_grants_above(mark, before);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_data_under_the_group_keys_is_an_error_not_a_panic() {
    let server = RedisServer::start();
    server.cli(&["SET", "{red-buckets:foreign}:meta", "not a hash"]);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let err = Member::builder(store.clone(), "foreign")
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .start()
        .await
        .expect_err("foreign data must be refused");
    assert!(matches!(err, Error::CorruptState { .. }), "{err}");

    server.cli(&["HSET", "{red-buckets:garbage}:meta", "buckets", "abc"]);
    let err = Member::builder(store.clone(), "garbage")
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .start()
        .await
        .expect_err("garbage must be refused");
    assert!(matches!(err, Error::CorruptState { .. }), "{err}");

    // Other groups on the same Redis are unaffected.
    let mut g = Group::new(&server, "healthy", 16);
    g.join("a").await;
    g.until_balanced(TTL * 3).await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_a_stale_snapshot_never_gives_one_bucket_to_two_members() {
    // A restart that reloads an old snapshot brings back a group that does not show the newest
    // grants. Granting from it would hand b's buckets to a while b still owns them.
    let file = format!("rb-stale-{}.rdb", std::process::id());
    let mut server = RedisServer::start_with(&["--dbfilename", &file]);
    let mut g = Group::new(&server, "stale", 8);
    g.join("a").await;
    g.until_balanced(TTL * 5).await;
    server.cli(&["SAVE"]);
    g.join("b").await;
    g.until_balanced(TTL * 2).await;
    let before = g.max_token();
    let mark = g.timeline.events.len();
    server.restart();
    // Sample both members' own views often: no bucket may be in both at once.
    let began = Instant::now();
    while began.elapsed() < TTL * 3 {
        g.assert_exclusive();
        g.collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    g.until_balanced(TTL * 5).await;
    g.assert_grants_above(mark, before);
    g.shutdown().await;
    let _ = std::fs::remove_file(std::env::temp_dir().join(file));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_ttl_is_refused() {
    let server = RedisServer::start();
    let mut g = Group::new(&server, "ttl", 8);
    g.join("a").await;
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let err = Member::builder(store, "ttl")
        .id("b")
        .buckets(8)
        .heartbeat(HEARTBEAT)
        .ttl(TTL * 2)
        .start()
        .await
        .expect_err("another ttl must be refused");
    assert!(matches!(err, Error::TtlMismatch { .. }), "{err}");
    assert!(err.to_string().contains("same ttl"), "{err}");
    g.shutdown().await;
}

/// A primary, its replica, a sentinel watching them, and three members of `name` (64 buckets)
/// connected through the sentinel, balanced.
async fn sentinel_group(name: &str) -> (RedisServer, RedisServer, Sentinel, Group) {
    let primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let sentinel = Sentinel::start(&primary);
    let mut g = Group::new(&primary, name, 64);
    g.ctx.url = sentinel.url();
    for i in 0..3 {
        g.join(&format!("m{i}")).await;
    }
    g.until_balanced(TTL * 5).await;
    (primary, replica, sentinel, g)
}

/// Waits until every bucket was granted again since event `mark` and the group is balanced.
async fn until_regranted(g: &mut Group, mark: usize, limit: Duration, what: &str) {
    let began = Instant::now();
    loop {
        g.collect();
        let tokens = g.timeline.grant_tokens_since(mark);
        if tokens.len() >= g.buckets as usize && g.balanced() {
            eprintln!("re-granted and balanced {:?} after {what}", began.elapsed());
            return;
        }
        assert!(
            began.elapsed() < limit,
            "not re-granted {limit:?} after {what}: {} grants, {:?}",
            tokens.len(),
            g.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Through Redis Sentinel: a forced failover promotes the replica; the sentinel announces it,
/// the store moves to the new primary, where the group is re-created (another Redis process: its
/// data may be stale), and every bucket is granted again with a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_follow_the_primary_through_a_sentinel_failover() {
    let (primary, replica, sentinel, mut g) = sentinel_group("failover").await;
    let before = g.max_token();
    let mark = g.timeline.events.len();
    let meta = "{red-buckets:failover}:meta";
    assert_eq!(primary.cli(&["HGET", meta, "buckets"]).trim(), "64");

    // The sentinel needs a moment to find the replica (NOGOODSLAVE until then).
    let began = Instant::now();
    loop {
        let reply = sentinel.cli(&["SENTINEL", "FAILOVER", "mymaster"]);
        if reply.trim() == "OK" {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the sentinel would not fail over: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The sentinel announces the switch (+switch-master), so the members move at once, while
    // the old primary still answers: a ttl of quarantine plus the failover itself (without the
    // announcement they would wait for Sentinel to demote the old primary, ~10 s more).
    until_regranted(&mut g, mark, Duration::from_secs(8), "SENTINEL FAILOVER").await;
    assert!(replica.cli(&["ROLE"]).starts_with("master"));
    assert_eq!(replica.cli(&["HGET", meta, "buckets"]).trim(), "64");
    g.assert_grants_above(mark, before);
    g.assert_exclusive();
    g.shutdown().await;
}

/// Through Redis Sentinel: the primary dies; its replica is promoted once the sentinel sees the
/// primary down (one second here), and the members, whose calls fail meanwhile, move there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_follow_the_primary_when_it_dies() {
    let (mut primary, replica, sentinel, mut g) = sentinel_group("primary-dies").await;
    let before = g.max_token();
    // The sentinel must know the replica before the primary dies, or it has none to promote.
    let began = Instant::now();
    while !sentinel
        .cli(&["SENTINEL", "REPLICAS", "mymaster"])
        .contains(&replica.port().to_string())
    {
        assert!(began.elapsed() < Duration::from_secs(30), "replica unknown");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mark = g.timeline.events.len();
    primary.stop();
    until_regranted(&mut g, mark, Duration::from_secs(30), "the primary died").await;
    assert!(replica.cli(&["ROLE"]).starts_with("master"));
    g.assert_grants_above(mark, before);
    g.assert_exclusive();
    g.shutdown().await;
}

/// Issue 9, 4 on a real Redis: a shutdown while Redis is frozen (SIGSTOP, nothing answers) at
/// ttl 1 s ends within the shutdown timeout, at about the drain (cut at the lease deadline) plus
/// two call timeouts, and every revoked bucket ends with `Released` or `Lost`. Before the fix it
/// blocked for the whole budget and the revoked buckets never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_redis_frozen_ends_in_time_and_ends_every_bucket() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let shutdown_timeout = Duration::from_secs(5);
    let member = Member::builder(store, "frozen-leave")
        .id("a")
        .buckets(16)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .shutdown_timeout(shutdown_timeout)
        .start()
        .await
        .expect("start");
    let began = Instant::now();
    while member.buckets().len() < 16 {
        assert!(
            began.elapsed() < TTL * 5,
            "not granted: {:?}",
            member.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut events = member.events();
    server.pause();
    let began = Instant::now();
    let result = member.shutdown().await;
    let took = began.elapsed();
    server.resume();
    assert!(result.is_err(), "the leave cannot be complete: {result:?}");
    // Drain ≤ 1 s, release and deregister ≤ 333 ms each; the rest is slack for a loaded host.
    assert!(took < Duration::from_millis(2500), "shutdown took {took:?}");
    let events: Vec<Event> = std::iter::from_fn(|| events.try_next()).collect();
    let revoked: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Revoked { .. }))
        .collect();
    assert_eq!(revoked.len(), 16, "{events:?}");
    for r in revoked {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Released { .. } | Event::Lost { .. })
                    && e.bucket() == r.bucket()
                    && e.token() == r.token()),
            "bucket {:?} revoked, never released or lost: {events:?}",
            r.bucket()
        );
    }
}

/// A rejoin grace through Redis Sentinel: a graceful and a crashed restart under a fixed id get
/// their buckets back, nothing else moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_a_fixed_id_gets_its_buckets_back_through_a_sentinel() {
    let primary = RedisServer::start();
    let _replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let sentinel = Sentinel::start(&primary);
    let store = RedisStore::connect(&sentinel.url()).await.expect("connect");
    group::rejoin_round(store, "rejoin", 64, HEARTBEAT, TTL).await;
}
