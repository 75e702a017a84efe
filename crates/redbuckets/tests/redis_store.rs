//! `RedisStore` against a real `redis-server` started per test (the testkit's `RedisServer`): the same call
//! sequences as `MemoryStore` give the same outcomes, foreign data and bad credentials give
//! clear errors, data loss keeps tokens growing (S2), and a heartbeat stays O(1) (C1).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redbuckets::store::{
    Action, Channel, Notice, Notifications, RegisterRequest, Registration, SessionRef,
};
use redbuckets::{Deletion, Error, GroupKey, MemoryStore, RedisOptions, RedisStore, Store};
use redbuckets_testkit::RedisServer;

const TTL: Duration = Duration::from_millis(500);

fn session(member: &str, nonce: &str) -> SessionRef {
    SessionRef {
        member: member.to_string(),
        session: nonce.to_string(),
    }
}

fn request(s: &SessionRef, weight: u32, buckets: u32) -> RegisterRequest {
    RegisterRequest::new(s.clone(), weight, buckets, TTL)
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

/// Ends a new group's quarantine at once, so a test is granted buckets without waiting a ttl.
async fn lift_quarantine(con: &mut redis::aio::MultiplexedConnection, g: &GroupKey) {
    let meta = format!("{}:meta", g.tag());
    redis_cmd(con, &["HSET", &meta, "grant_after_us", "0"]).await;
}

/// Registers each of `sessions` (weight 1) in `g`, a group of `buckets` buckets.
async fn register_all<'a>(
    store: &RedisStore,
    g: &GroupKey,
    sessions: impl IntoIterator<Item = &'a SessionRef>,
    buckets: u32,
) {
    for s in sessions {
        store
            .register(g, &request(s, 1, buckets))
            .await
            .expect("register");
    }
}

/// Members a and b (weight 1) of `g` with `buckets` buckets, past the quarantine, b's wake-ups
/// subscribed: a has taken its share, b (below its share) has not stepped. Returns a, the
/// buckets it took, and b's wake-ups.
async fn a_took_its_share(
    store: &RedisStore,
    con: &mut redis::aio::MultiplexedConnection,
    g: &GroupKey,
    buckets: u32,
) -> (SessionRef, Vec<u32>, Notifications) {
    let (a, b) = (session("a", "1"), session("b", "1"));
    register_all(store, g, [&a, &b], buckets).await;
    let wakes = store
        .subscribe(g, Channel::Member("b"))
        .await
        .expect("subscribe");
    lift_quarantine(con, g).await;
    let r = store.rebalance(g, &a, u32::MAX).await.expect("rebalance");
    let Action::Acquired { buckets, .. } = r.action else {
        panic!("{r:?}");
    };
    (a, buckets, wakes)
}

async fn redis_cmd(con: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(con).await.expect("raw command")
}

/// Drives one store through a scripted history and records every outcome that does not depend
/// on the store's choice of bucket ids or on timing; the two stores must record the same.
struct Probe<S> {
    store: S,
    group: GroupKey,
    buckets: u32,
    trace: Vec<String>,
    /// Tokens of the grants in rebalance replies, in order.
    tokens: Vec<u64>,
    /// Tokens of the grants in notices (`Notice::Granted`), as taken in.
    pushed: Vec<u64>,
    held: BTreeMap<String, BTreeSet<u32>>,
    /// Each member's wake-ups, from its first registration on.
    wakes: BTreeMap<String, Notifications>,
}

impl<S: Store> Probe<S> {
    fn new(store: S, group: GroupKey, buckets: u32) -> Self {
        Probe {
            store,
            group,
            buckets,
            trace: Vec::new(),
            tokens: Vec::new(),
            pushed: Vec::new(),
            held: BTreeMap::new(),
            wakes: BTreeMap::new(),
        }
    }

    /// Takes in the grants the store made session `s` in its notices until `s` knows of
    /// `count` buckets (the store's count), as a member does when it hears them.
    async fn catch_up(&mut self, s: &SessionRef, count: u32) {
        loop {
            let known = self.held.get(&s.member).map_or(0, BTreeSet::len);
            if known >= count as usize {
                return;
            }
            let wakes = self.wakes.get_mut(&s.member).expect("subscribed");
            let notice = tokio::time::timeout(Duration::from_secs(5), wakes.next())
                .await
                .unwrap_or_else(|_| panic!("{} holds {count}, knows {known}", s.member))
                .expect("subscription open");
            if let Notice::Granted {
                session,
                token,
                buckets,
            } = notice
            {
                if session != s.session {
                    continue;
                }
                self.pushed.push(token);
                let held = self.held.entry(s.member.clone()).or_default();
                for b in &buckets {
                    assert!(held.insert(*b), "bucket {b} granted twice");
                }
                self.log(format!("granted {} {} by notice", s.member, buckets.len()));
            }
        }
    }

    fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    async fn register(&mut self, s: &SessionRef, weight: u32, replaces: Option<&str>) {
        if !self.wakes.contains_key(&s.member) {
            let wakes = self
                .store
                .subscribe(&self.group, Channel::Member(&s.member))
                .await
                .expect("subscribe");
            self.wakes.insert(s.member.clone(), wakes);
        }
        let mut req = request(s, weight, self.buckets);
        req.replaces = replaces.map(str::to_string);
        let reply = self
            .store
            .register(&self.group, &req)
            .await
            .expect("register");
        let line = match &reply {
            Registration::Registered { version, .. } => format!("registered v{version}"),
            Registration::InUse { expires_in } => {
                // Expiries are rounded up to the next ms.
                assert!(
                    *expires_in <= TTL + Duration::from_millis(1),
                    "{expires_in:?}"
                );
                "in use".to_string()
            }
            other => format!("{other:?}"),
        };
        if matches!(reply, Registration::Registered { .. }) && replaces.is_some() {
            // The replaced session's buckets are gone with it.
            self.held.remove(&s.member);
        }
        self.log(format!("register {}/{}: {line}", s.member, s.session));
    }

    async fn heartbeat(&mut self, s: &SessionRef, log: bool) -> bool {
        let hb = self
            .store
            .heartbeat(&self.group, s, TTL, Duration::MAX)
            .await
            .expect("heartbeat");
        if log {
            self.log(format!(
                "heartbeat {}: alive {} v{} free {}",
                s.member, hb.alive, hb.version, hb.free
            ));
        }
        hb.alive
    }

    /// Heartbeats `live` every 100 ms for `total`.
    async fn keep_alive(&mut self, live: &[&SessionRef], total: Duration) {
        let end = Instant::now() + total;
        while Instant::now() < end {
            for s in live {
                assert!(
                    self.heartbeat(s, false).await,
                    "{} lost its session",
                    s.member
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One rebalance step; releases what the store asks for at once. Returns true on `Stay`.
    async fn step(&mut self, s: &SessionRef) -> bool {
        let reply = self
            .store
            .rebalance(&self.group, s, 3)
            .await
            .expect("rebalance");
        if !matches!(reply.action, Action::SessionLost) {
            let acquired = match &reply.action {
                Action::Acquired { buckets, .. } => buckets.len() as u32,
                _ => 0,
            };
            self.catch_up(s, reply.held - acquired).await;
        }
        let (min, max) = reply.share;
        let tail = format!("share {min}..={max} v{} free {}", reply.version, reply.free);
        let what = match &reply.action {
            Action::Acquired { buckets, token } => {
                self.tokens.push(*token);
                let held = self.held.entry(s.member.clone()).or_default();
                for b in buckets {
                    assert!(held.insert(*b), "bucket {b} granted twice");
                }
                format!("acquired {}", buckets.len())
            }
            Action::Release(k) => {
                let held = self.held.entry(s.member.clone()).or_default();
                let give: Vec<u32> = held.iter().rev().take(*k as usize).copied().collect();
                for b in &give {
                    held.remove(b);
                }
                let freed = self
                    .store
                    .release(&self.group, s, &give, u64::MAX)
                    .await
                    .expect("release");
                assert_eq!(freed, *k);
                format!("release {k}")
            }
            Action::Stay => "stay".to_string(),
            Action::Wait(_) => "wait".to_string(),
            Action::SessionLost => "lost".to_string(),
            other => format!("{other:?}"),
        };
        self.log(format!("rebalance {}: {what}, {tail}", s.member));
        // A join commits the release of members above their new share at once: the counts
        // say so (held above committed, beyond what this step asked for). Release that too.
        let asked = match reply.action {
            Action::Release(k) => k,
            _ => 0,
        };
        let surplus = reply
            .held
            .saturating_sub(reply.committed)
            .saturating_sub(asked);
        if surplus > 0 {
            let held = self.held.entry(s.member.clone()).or_default();
            let give: Vec<u32> = held.iter().rev().take(surplus as usize).copied().collect();
            for b in &give {
                held.remove(b);
            }
            let freed = self
                .store
                .release(&self.group, s, &give, u64::MAX)
                .await
                .expect("release");
            assert_eq!(freed, surplus);
            self.log(format!(
                "committed by a join: {} released {surplus}",
                s.member
            ));
        }
        matches!(reply.action, Action::Stay) && surplus == 0
    }

    /// Steps every member in order until one full round is all `Stay`.
    async fn converge(&mut self, members: &[&SessionRef]) {
        for _ in 0..50 {
            let mut quiet = true;
            for s in members {
                assert!(self.heartbeat(s, false).await);
                quiet &= self.step(s).await;
            }
            if quiet {
                return;
            }
        }
        panic!("no convergence: {:?}", self.trace);
    }

    /// Compares the store's snapshot with what the members were told; logs the counts.
    async fn check(&mut self) {
        let snap = self
            .store
            .snapshot(&self.group)
            .await
            .expect("snapshot")
            .expect("group exists");
        assert_eq!(snap.owners.len(), self.buckets as usize);
        for m in &snap.members {
            self.catch_up(&session(&m.id, &m.session), m.held).await;
        }
        let mut owned: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for (b, owner) in snap.owners.iter().enumerate() {
            if let Some(o) = owner {
                owned.entry(o.member.clone()).or_default().insert(b as u32);
            }
        }
        let told: BTreeMap<String, BTreeSet<u32>> = self
            .held
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(m, h)| (m.clone(), h.clone()))
            .collect();
        assert_eq!(owned, told, "owner records vs grants");
        let counts: Vec<String> = snap
            .members
            .iter()
            .map(|m| {
                assert_eq!(m.held, m.committed, "{} converged", m.id);
                assert_eq!(m.held as usize, told.get(&m.id).map_or(0, |h| h.len()));
                format!("{}={}", m.id, m.held)
            })
            .collect();
        self.log(format!(
            "snapshot v{} free {} counts {}",
            snap.version,
            snap.free(),
            counts.join(" ")
        ));
    }
}

/// The conformance history: join, quarantine, converge, foreign releases, leave, replace,
/// crash (expiry), and leave again.
async fn history<S: Store>(store: S, group: GroupKey, weights: [u32; 3]) -> Probe<S> {
    let mut p = Probe::new(store, group, 10);
    let (a, b, c) = (session("a", "a1"), session("b", "b1"), session("c c", "c1"));
    p.register(&a, weights[0], None).await;
    p.register(&b, weights[1], None).await;
    p.register(&c, weights[2], None).await;
    p.register(&a, weights[0], None).await; // a retry: same session, refreshed
    p.step(&a).await; // quarantine of a new group
    p.keep_alive(&[&a, &b, &c], TTL + Duration::from_millis(100))
        .await;
    p.converge(&[&a, &b, &c]).await;
    p.check().await;

    // A fourth member joins: those above the new share release (committed at once), then
    // the newcomer takes what they freed. Then it leaves again.
    let d = session("d", "d1");
    p.register(&d, 1, None).await;
    p.converge(&[&a, &b, &c, &d]).await;
    p.check().await;
    p.store.deregister(&p.group, &d).await.expect("deregister");
    p.held.remove("d");
    p.converge(&[&a, &b, &c]).await;
    p.check().await;

    // Releases of buckets the session does not hold, or with a wrong nonce, free nothing.
    let of_b: Vec<u32> = p.held["b"].iter().copied().collect();
    let n = p
        .store
        .release(&p.group, &a, &of_b, u64::MAX)
        .await
        .expect("release");
    let m = p
        .store
        .release(&p.group, &session("b", "nope"), &of_b, u64::MAX)
        .await
        .expect("release");
    p.log(format!("foreign releases freed {n} and {m}"));

    p.store.deregister(&p.group, &b).await.expect("deregister");
    p.held.remove("b");
    p.log("deregistered b".into());
    p.heartbeat(&b, true).await;
    p.converge(&[&a, &c]).await;
    p.check().await;

    // A second process with a's id: refused while a1 lives, admitted when it replaces a1.
    let a2 = session("a", "a2");
    p.register(&a2, weights[0], None).await;
    p.register(&a2, weights[0], Some("a1")).await;
    p.heartbeat(&a, true).await;
    p.converge(&[&a2, &c]).await;
    p.check().await;

    // c crashes: its session expires and a heartbeat of a2 purges it.
    p.keep_alive(&[&a2], TTL + Duration::from_millis(150)).await;
    p.held.remove("c c");
    p.heartbeat(&a2, true).await;
    p.heartbeat(&c, true).await;
    p.step(&c).await;
    let n = p
        .store
        .release(&p.group, &c, &[0, 1, 2], u64::MAX)
        .await
        .expect("release");
    p.log(format!("release by expired c freed {n}"));
    p.converge(&[&a2]).await;
    p.check().await;

    p.store.deregister(&p.group, &a2).await.expect("deregister");
    p.held.clear();
    p.check().await;
    p
}

fn assert_increasing(tokens: &[u64]) {
    assert!(!tokens.is_empty());
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens must strictly increase: {tokens:?}"
    );
}

#[tokio::test]
async fn redis_store_behaves_like_memory_store() {
    let server = RedisServer::start();
    let redis = RedisStore::connect(&server.url()).await.expect("connect");
    for (i, weights) in [[1, 1, 1], [1, 3, 2]].into_iter().enumerate() {
        let group = GroupKey::new("conf", format!("g{i}"));
        let (memory, redis) = tokio::join!(
            history(MemoryStore::new(), group.clone(), weights),
            history(redis.clone(), group, weights)
        );
        assert_eq!(
            memory.trace, redis.trace,
            "weights {weights:?}: MemoryStore and RedisStore disagree"
        );
        for (tokens, pushed) in [
            (&memory.tokens, &memory.pushed),
            (&redis.tokens, &redis.pushed),
        ] {
            assert_increasing(tokens);
            // A grant's token is used once, whichever way the member heard of it.
            let mut all: Vec<u64> = tokens.iter().chain(pushed).copied().collect();
            all.sort_unstable();
            assert_increasing(&all);
        }
        // Spot checks that the history did what it says.
        let trace = redis.trace.join("\n");
        assert!(trace.contains("by notice"), "{trace}");
        assert!(trace.contains("rebalance a: wait"), "{trace}");
        assert!(trace.contains("foreign releases freed 0 and 0"), "{trace}");
        assert!(trace.contains("register a/a2: in use"), "{trace}");
        assert!(trace.contains("heartbeat c c: alive false"), "{trace}");
        assert!(trace.contains("rebalance c c: lost"), "{trace}");
        assert!(trace.contains("counts a=10"), "{trace}");
        assert!(trace.contains("committed by a join: a released"), "{trace}");
        if weights == [1, 1, 1] {
            assert!(trace.contains("counts a=4 b=3 c c=3"), "{trace}");
        } else {
            assert!(trace.contains("counts a=2 b=5 c c=3"), "{trace}");
        }
    }
}

#[tokio::test]
async fn notifications_arrive_and_end_when_the_connection_drops() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let group = GroupKey::new("t", "notify");
    let mut notes = store
        .subscribe(&group, Channel::Group)
        .await
        .expect("subscribe");
    let a = session("a", "1");
    store
        .register(&group, &request(&a, 1, 8))
        .await
        .expect("register");
    tokio::time::timeout(Duration::from_secs(2), notes.next())
        .await
        .expect("a notice within 2s")
        .expect("stream open");
    server.restart();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while notes.next().await.is_some() {}
    })
    .await;
    assert!(end.is_ok(), "the stream must end when its connection drops");
}

#[tokio::test]
async fn a_different_bucket_count_or_protocol_is_refused() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let group = GroupKey::new("t", "mismatch");
    store
        .register(&group, &request(&session("a", "1"), 1, 10))
        .await
        .expect("register");
    match store
        .register(&group, &request(&session("b", "1"), 1, 12))
        .await
    {
        Err(Error::GroupMismatch {
            stored: 10,
            configured: 12,
            ..
        }) => {}
        other => panic!("expected a bucket mismatch, got {other:?}"),
    }
    let mut con = raw(&server.url()).await;
    redis_cmd(&mut con, &["HSET", "{t:mismatch}:meta", "protocol", "99"]).await;
    match store
        .register(&group, &request(&session("b", "1"), 1, 10))
        .await
    {
        Err(
            e @ Error::GroupMismatch {
                stored_protocol: 99,
                ..
            },
        ) => assert!(e.to_string().contains("protocol 99"), "{e}"),
        other => panic!("expected a protocol mismatch, got {other:?}"),
    }
}

fn expect_corrupt<T: std::fmt::Debug>(what: &str, result: Result<T, Error>, needle: &str) {
    match result {
        Err(e @ Error::CorruptState { .. }) => {
            assert!(
                e.to_string().contains(needle),
                "{what}: {e} lacks {needle:?}"
            );
        }
        other => panic!("{what}: expected CorruptState, got {other:?}"),
    }
}

#[tokio::test]
async fn foreign_data_gives_clear_errors_not_panics() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let a = session("a", "1");

    // A string where the meta hash belongs.
    let g = GroupKey::new("t", "string");
    redis_cmd(&mut con, &["SET", "{t:string}:meta", "hello"]).await;
    expect_corrupt(
        "register",
        store.register(&g, &request(&a, 1, 8)).await,
        "wrong",
    );
    expect_corrupt(
        "heartbeat",
        store.heartbeat(&g, &a, TTL, Duration::MAX).await,
        "wrong",
    );
    expect_corrupt("rebalance", store.rebalance(&g, &a, 8).await, "wrong");
    expect_corrupt("snapshot", store.snapshot(&g).await, "wrong");

    // Garbage in meta fields.
    let g = GroupKey::new("t", "garbage");
    store
        .register(&g, &request(&a, 1, 8))
        .await
        .expect("register");
    redis_cmd(&mut con, &["HSET", "{t:garbage}:meta", "buckets", "abc"]).await;
    // The steady-state heartbeat reads only what it needs (the version), so it renews the
    // session; every call that uses the bucket count reports the garbage.
    let hb = store
        .heartbeat(&g, &a, TTL, Duration::MAX)
        .await
        .expect("heartbeat");
    assert!(hb.alive);
    expect_corrupt(
        "register",
        store.register(&g, &request(&a, 1, 8)).await,
        "meta.buckets",
    );
    expect_corrupt(
        "rebalance",
        store.rebalance(&g, &a, 8).await,
        "meta.buckets",
    );
    expect_corrupt("snapshot", store.snapshot(&g).await, "meta.buckets");
    redis_cmd(
        &mut con,
        &["HSET", "{t:garbage}:meta", "buckets", "8", "ver", "-1"],
    )
    .await;
    expect_corrupt(
        "heartbeat",
        store.heartbeat(&g, &a, TTL, Duration::MAX).await,
        "meta.ver",
    );
    redis_cmd(&mut con, &["DEL", "{t:garbage}:meta"]).await;
    redis_cmd(&mut con, &["HSET", "{t:garbage}:meta", "colour", "blue"]).await;
    expect_corrupt(
        "heartbeat",
        store.heartbeat(&g, &a, TTL, Duration::MAX).await,
        "none of the fields",
    );

    // Garbage in the owner hash, the free set, counts and weights of a working group.
    let g = GroupKey::new("t", "owners");
    store
        .register(&g, &request(&a, 1, 8))
        .await
        .expect("register");
    lift_quarantine(&mut con, &g).await;
    redis_cmd(&mut con, &["SADD", "{t:owners}:free", "xyz", "99999", "-1"]).await;
    let reply = store.rebalance(&g, &a, 100).await.expect("rebalance");
    match reply.action {
        Action::Acquired { buckets, .. } => {
            assert!(buckets.iter().all(|b| *b < 8), "{buckets:?}");
            assert!(buckets.len() <= 8);
        }
        other => panic!("expected a grant, got {other:?}"),
    }
    redis_cmd(&mut con, &["HSET", "{t:owners}:owner", "3", "garbage"]).await;
    expect_corrupt("snapshot", store.snapshot(&g).await, "bucket 3");
    redis_cmd(
        &mut con,
        &["HSET", "{t:owners}:owner", "3", "12 a", "77", "12 a"],
    )
    .await;
    expect_corrupt("snapshot", store.snapshot(&g).await, "\"77\"");
    redis_cmd(&mut con, &["HDEL", "{t:owners}:owner", "77"]).await;
    store.snapshot(&g).await.expect("consistent again");
    redis_cmd(&mut con, &["ZADD", "{t:owners}:count:1", "-5", "a"]).await;
    expect_corrupt("rebalance", store.rebalance(&g, &a, 8).await, "count of a");
    redis_cmd(&mut con, &["ZADD", "{t:owners}:count:1", "8", "a"]).await;
    redis_cmd(&mut con, &["HSET", "{t:owners}:wcount", "1", "x"]).await;
    expect_corrupt("rebalance", store.rebalance(&g, &a, 8).await, "wcount");
    let b = session("b", "1");
    expect_corrupt(
        "register",
        store.register(&g, &request(&b, 1, 8)).await,
        "wcount",
    );
    redis_cmd(&mut con, &["HSET", "{t:owners}:wcount", "1", "1"]).await;
    redis_cmd(&mut con, &["HSET", "{t:owners}:weight", "a", "heavy"]).await;
    expect_corrupt("rebalance", store.rebalance(&g, &a, 8).await, "weight of a");
    expect_corrupt("snapshot", store.snapshot(&g).await, "weight");
    // Deregistering still frees what the member's held set names, garbage or not.
    store.deregister(&g, &a).await.expect("deregister");
}

async fn until_ok<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline && e.is_transient() => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test]
async fn data_loss_quarantines_the_group_and_tokens_keep_growing() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let group = GroupKey::new("t", "loss");
    let a = session("a", "1");
    store
        .register(&group, &request(&a, 1, 4))
        .await
        .expect("register");
    tokio::time::sleep(TTL / 2).await;
    store
        .heartbeat(&group, &a, TTL, Duration::MAX)
        .await
        .expect("heartbeat");
    tokio::time::sleep(TTL / 2 + Duration::from_millis(50)).await;
    let before = match store
        .rebalance(&group, &a, 4)
        .await
        .expect("rebalance")
        .action
    {
        Action::Acquired { buckets, token } => {
            assert_eq!(buckets.len(), 4);
            token
        }
        other => panic!("expected a grant, got {other:?}"),
    };

    server.restart();
    let hb = until_ok("heartbeat", || {
        store.heartbeat(&group, &a, TTL, Duration::MAX)
    })
    .await;
    assert!(!hb.alive, "the session died with the data");
    let a2 = session("a", "2");
    let req = request(&a2, 1, 4);
    until_ok("register", || store.register(&group, &req)).await;
    match store
        .rebalance(&group, &a2, 4)
        .await
        .expect("rebalance")
        .action
    {
        Action::Wait(left) => assert!(left <= TTL && left > TTL / 2, "{left:?}"),
        other => panic!("a recreated group must wait, got {other:?}"),
    }
    let snap = store
        .snapshot(&group)
        .await
        .expect("snapshot")
        .expect("group");
    assert!(snap.quarantine > Duration::ZERO);
    tokio::time::sleep(TTL / 2).await;
    store
        .heartbeat(&group, &a2, TTL, Duration::MAX)
        .await
        .expect("heartbeat");
    tokio::time::sleep(TTL / 2 + Duration::from_millis(50)).await;
    match store
        .rebalance(&group, &a2, 4)
        .await
        .expect("rebalance")
        .action
    {
        Action::Acquired { buckets, token } => {
            assert_eq!(buckets.len(), 4);
            assert!(
                token > before + TTL.as_micros() as u64,
                "token {token} after the loss must pass {before} + ttl"
            );
        }
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn credentials_and_addresses_give_clear_errors_without_secrets() {
    const PASSWORD: &str = "Zs3cr3tServerPw";
    const WRONG: &str = "Wr0ngGuessXyz";
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let port = server.port();

    let url = format!("redis://:{WRONG}@127.0.0.1:{port}");
    match RedisStore::connect(&url).await {
        Err(e @ Error::Refused { .. }) => {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(WRONG), "password leaked: {shown}");
            assert!(shown.contains("authentication"), "{shown}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    match RedisStore::connect(&format!("redis://127.0.0.1:{port}")).await {
        Err(e @ Error::Refused { .. }) => assert!(e.to_string().contains("password"), "{e}"),
        other => panic!("expected Refused without a password, got {other:?}"),
    }
    let good = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let store = RedisStore::connect(&good)
        .await
        .expect("the right password");
    assert!(!format!("{store:?}").contains(PASSWORD), "{store:?}");
    let g = GroupKey::new("t", "auth");
    store
        .register(&g, &request(&session("a", "1"), 1, 4))
        .await
        .expect("register");

    // Nobody listens on this port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let started = Instant::now();
    // One attempt: by default connecting retries a refused connection (Redis not up yet).
    let once = RedisOptions::default().connect_retry(Duration::ZERO);
    match RedisStore::connect_with(&format!("redis://:{WRONG}@127.0.0.1:{closed}"), once).await {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(!e.to_string().contains(WRONG), "{e}");
            assert!(e.to_string().contains(&closed.to_string()), "{e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    for bad in [
        format!("not a url {WRONG}"),
        format!("http://:{WRONG}@127.0.0.1:{port}"),
        format!("redis://:{WRONG}@127.0.0.1:notaport"),
    ] {
        match RedisStore::connect(&bad).await {
            Err(e @ Error::Url { .. }) => {
                let shown = format!("{e} {e:?}");
                if bad.contains("://") {
                    assert!(!shown.contains(WRONG), "password leaked: {shown}");
                }
            }
            other => panic!("{bad}: expected Error::Url, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn refused_scripts_are_reported_clearly() {
    // Neither functions nor EVAL scripts: the store falls back from FCALL to EVALSHA, which
    // fails too (tests/redis_functions.rs has the servers that refuse only one of them).
    let server = RedisServer::start_with(&[
        "--rename-command",
        "EVALSHA",
        "",
        "--rename-command",
        "FCALL",
        "",
    ]);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let g = GroupKey::new("t", "noscripts");
    match store.register(&g, &request(&session("a", "1"), 1, 4)).await {
        Err(e @ Error::Refused { .. }) => assert!(e.to_string().contains("scripts"), "{e}"),
        other => panic!("expected Refused, got {other:?}"),
    }

    let server = RedisServer::start();
    let mut con = raw(&server.url()).await;
    redis_cmd(
        &mut con,
        &[
            "ACL",
            "SETUSER",
            "limited",
            "on",
            ">pw",
            "~*",
            "+@all",
            "-@scripting",
        ],
    )
    .await;
    let url = format!("redis://limited:pw@127.0.0.1:{}", server.port());
    let store = RedisStore::connect(&url).await.expect("connect");
    match store
        .heartbeat(&g, &session("a", "1"), TTL, Duration::MAX)
        .await
    {
        Err(e @ Error::Refused { .. }) => assert!(e.to_string().contains("NOPERM"), "{e}"),
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// Sum of calls per command since the last `CONFIG RESETSTAT`, without the test's own.
async fn command_calls(con: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await
        .expect("info");
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let n = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !matches!(name, "info" | "config|resetstat" | "config") {
            calls.insert(name.to_string(), n);
        }
    }
    calls
}

#[tokio::test]
async fn steady_state_heartbeat_is_one_round_trip_of_constant_work() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let mut per_heartbeat = Vec::new();
    for buckets in [16u32, 8192] {
        let g = GroupKey::new("t", format!("cost{buckets}"));
        let members: Vec<SessionRef> = (0..4).map(|i| session(&format!("m{i}"), "1")).collect();
        for m in &members {
            store
                .register(&g, &request(m, 1, buckets))
                .await
                .expect("register");
        }
        lift_quarantine(&mut con, &g).await;
        // Until every member stays. Each round renews the sessions first: on a loaded machine the
        // rounds can outlast the ttl, and a member whose session expired never hears `Stay` (the
        // loop spun for 15 minutes once). Bounded, so a regression fails instead of hanging.
        for round in 0.. {
            assert!(
                round < 100,
                "{buckets} buckets: not settled after 100 rounds"
            );
            let mut quiet = true;
            for m in &members {
                let hb = store
                    .heartbeat(&g, m, TTL, Duration::MAX)
                    .await
                    .expect("heartbeat");
                assert!(hb.alive, "{} lost its session while settling", m.member);
                let r = store.rebalance(&g, m, u32::MAX).await.expect("rebalance");
                quiet &= matches!(r.action, Action::Stay);
            }
            if quiet {
                break;
            }
        }
        const N: u64 = 20;
        // The first call on a server loads the library (FCALL, FUNCTION LOAD, FCALL): not steady.
        store
            .heartbeat(&g, &members[0], TTL, Duration::MAX)
            .await
            .expect("heartbeat");
        redis_cmd(&mut con, &["CONFIG", "RESETSTAT"]).await;
        for _ in 0..N {
            let hb = store
                .heartbeat(&g, &members[0], TTL, Duration::MAX)
                .await
                .expect("heartbeat");
            assert!(hb.alive);
            // The three peers renewed moments ago: their sessions end about a ttl from now (up
            // to 1 ms more: expiries are rounded up to the ms, the script's now down).
            let next = hb.next_expiry.expect("the peers' expiry");
            assert!(
                next <= TTL + Duration::from_millis(1) && next >= TTL / 2,
                "{next:?}"
            );
        }
        let calls = command_calls(&mut con).await;
        assert_eq!(
            calls.get("fcall"),
            Some(&N),
            "one FCALL per heartbeat: {calls:?}"
        );
        let inner: u64 = calls
            .iter()
            .filter(|(k, _)| *k != "fcall")
            .map(|(_, v)| v)
            .sum();
        // The heartbeat reads the two earliest sessions (ZRANGE 0 1, O(log n)); nothing else
        // reads a whole key.
        assert_eq!(calls.get("zrange"), Some(&N), "{calls:?}");
        for heavy in [
            "smembers",
            "hgetall",
            "hkeys",
            "zrangebyscore",
            "sadd",
            "spop",
        ] {
            assert!(
                !calls.contains_key(heavy),
                "{heavy} in a heartbeat: {calls:?}"
            );
        }
        assert_eq!(inner % N, 0, "{calls:?}");
        per_heartbeat.push(inner / N);

        // A rebalance at steady state (all weights 1) is constant work too.
        redis_cmd(&mut con, &["CONFIG", "RESETSTAT"]).await;
        let r = store
            .rebalance(&g, &members[0], 8)
            .await
            .expect("rebalance");
        assert!(matches!(r.action, Action::Stay), "{r:?}");
        let calls = command_calls(&mut con).await;
        // Includes the key-type checks that run before any write.
        assert!(calls.values().sum::<u64>() <= 32, "{calls:?}");
    }
    assert_eq!(
        per_heartbeat[0], per_heartbeat[1],
        "work must not grow with B"
    );
    // 12: the renewal, the free count, the member's counts (the safety net under lost
    // wake-ups), the expiry of the two sessions it watches, and the live count (the members
    // gauge, issue 21). The check of the group keys' expiry rides on the version's read.
    assert!(per_heartbeat[0] <= 12, "{per_heartbeat:?}");
}

#[tokio::test]
async fn a_frozen_server_times_out_and_recovers() {
    let mut server = RedisServer::start();
    let options = RedisOptions::default().response_timeout(Duration::from_millis(300));
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .expect("connect");
    let g = GroupKey::new("t", "frozen");
    let a = session("a", "1");
    let long = Duration::from_secs(30);
    store
        .register(&g, &RegisterRequest::new(a.clone(), 1, 4, long))
        .await
        .expect("register");
    server.pause();
    let started = Instant::now();
    let err = store
        .heartbeat(&g, &a, long, Duration::MAX)
        .await
        .expect_err("frozen");
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    server.resume();
    let hb = until_ok("heartbeat", || store.heartbeat(&g, &a, long, Duration::MAX)).await;
    assert!(hb.alive);
}

#[tokio::test]
async fn tls_urls_work() {
    let dir = std::env::temp_dir().join(format!("redbuckets-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext file");
    let openssl = |args: &str| {
        let status = std::process::Command::new("openssl")
            .args(args.split(' '))
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl not found: install it (apt-get install -y openssl) to test rediss://");
        assert!(status.success(), "openssl {args} failed");
    };
    // A test CA, and a server certificate for 127.0.0.1 signed by it.
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem",
    );
    openssl("req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out server.csr");
    openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
         -extfile server.ext -out cert.pem",
    );
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("cert.pem"), path("key.pem"));
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let _server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    // A plain URL to the TLS port: the port answers a TLS hello, so the hint is given.
    match RedisStore::connect(&format!("redis://127.0.0.1:{tls_port}")).await {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(e.to_string().contains("needs rediss://"), "{e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let url = format!("rediss://127.0.0.1:{tls_port}");
    // Not signed by a public CA: refused by default, accepted with its CA configured.
    match RedisStore::connect(&url).await {
        Err(e @ Error::Unavailable { .. }) => assert!(e.to_string().contains("cert"), "{e}"),
        other => panic!("an untrusted certificate must be refused, got {other:?}"),
    }
    // Skipping verification is not offered: a clear error, not a silent downgrade.
    match RedisStore::connect(&format!("{url}/#insecure")).await {
        Err(e @ Error::Url { .. }) => assert!(e.to_string().contains("insecure"), "{e}"),
        other => panic!("#insecure must be refused, got {other:?}"),
    }
    let options = RedisOptions::default().tls_root_cert(b"not a pem".to_vec());
    match RedisStore::connect_with(&url, options).await {
        Err(Error::Config { field, .. }) => assert_eq!(field, "tls_root_cert"),
        other => panic!("a bad CA must be a config error, got {other:?}"),
    }
    let pem = std::fs::read(&ca).expect("read CA");
    let options = RedisOptions::default().tls_root_cert(pem);
    let store = RedisStore::connect_with(&url, options)
        .await
        .expect("connect over TLS");
    let g = GroupKey::new("t", "tls");
    store
        .register(&g, &request(&session("a", "1"), 1, 4))
        .await
        .expect("register over TLS");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_call_that_fails_on_foreign_data_changes_nothing() {
    // Redis keeps what a script wrote before an error: scripts check key types first.
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let count = |v: redis::Value| match v {
        redis::Value::Int(n) => n,
        other => panic!("not a count: {other:?}"),
    };

    // A release over a foreign owner key.
    let g = GroupKey::new("t", "atomic-release");
    let tag = g.tag();
    let a = session("a", "1");
    store
        .register(&g, &request(&a, 1, 8))
        .await
        .expect("register");
    lift_quarantine(&mut con, &g).await;
    let r = store.rebalance(&g, &a, 8).await.expect("rebalance");
    assert!(matches!(r.action, Action::Acquired { ref buckets, .. } if buckets.len() == 8));
    redis_cmd(&mut con, &["SET", &format!("{tag}:owner"), "garbage"]).await;
    expect_corrupt(
        "release",
        store.release(&g, &a, &[0, 1], u64::MAX).await,
        "owner",
    );
    let held = redis_cmd(&mut con, &["SCARD", &format!("{tag}:held:a")]).await;
    assert_eq!(count(held), 8, "the failed release kept its buckets");
    redis_cmd(&mut con, &["DEL", &format!("{tag}:owner")]).await;
    assert_eq!(
        store
            .release(&g, &a, &[0, 1], u64::MAX)
            .await
            .expect("release"),
        2
    );
    let free = redis_cmd(&mut con, &["SCARD", &format!("{tag}:free")]).await;
    assert_eq!(count(free), 2, "the retry after the repair freed both");

    // A grant over a foreign owner key.
    let g = GroupKey::new("t", "atomic-grant");
    let tag = g.tag();
    store
        .register(&g, &request(&a, 1, 8))
        .await
        .expect("register");
    lift_quarantine(&mut con, &g).await;
    redis_cmd(&mut con, &["SET", &format!("{tag}:owner"), "garbage"]).await;
    expect_corrupt("rebalance", store.rebalance(&g, &a, 8).await, "owner");
    let free = redis_cmd(&mut con, &["SCARD", &format!("{tag}:free")]).await;
    assert_eq!(
        count(free),
        8,
        "the failed grant took nothing from the free set"
    );
    redis_cmd(&mut con, &["DEL", &format!("{tag}:owner")]).await;
    let r = store.rebalance(&g, &a, 8).await.expect("rebalance");
    assert!(matches!(r.action, Action::Acquired { ref buckets, .. } if buckets.len() == 8));
}

/// Every key on the server with its DUMP, to show that a call changed nothing at all.
async fn dump_all(con: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, Vec<u8>> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(con)
        .await
        .expect("KEYS");
    let mut all = BTreeMap::new();
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(con)
            .await
            .expect("DUMP");
        all.insert(key, dump);
    }
    all
}

/// Fails naming the keys that differ (a DUMP is long).
fn assert_unchanged(
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
    what: &str,
) {
    let changed: Vec<&String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(changed.is_empty(), "{what} changed {changed:?}");
}

/// A group of 8 buckets where a and b hold 4 each, and b's session has expired but is not
/// purged yet (its expiry set into the past by hand, so no call had a chance to purge it).
/// Long enough that `a` outlives any pause of a loaded machine during the checks; `b`'s
/// expiry is forced by hand.
const LOOK_TTL: Duration = Duration::from_secs(30);

async fn group_with_an_expired_member(
    store: &RedisStore,
    con: &mut redis::aio::MultiplexedConnection,
    g: &GroupKey,
) -> (SessionRef, SessionRef) {
    let (a, b) = (session("a", "1"), session("b", "1"));
    for s in [&a, &b] {
        store
            .register(g, &RegisterRequest::new(s.clone(), 1, 8, LOOK_TTL))
            .await
            .expect("register");
    }
    lift_quarantine(con, g).await;
    for s in [&a, &b] {
        let r = store.rebalance(g, s, 8).await.expect("rebalance");
        assert!(
            matches!(r.action, Action::Acquired { ref buckets, .. } if buckets.len() == 4),
            "{r:?}"
        );
    }
    redis_cmd(con, &["ZADD", &format!("{}:exp", g.tag()), "1", "b"]).await;
    (a, b)
}

/// Issue 8, bug 2: looking at a group never changes it. The snapshot neither purges, nor
/// publishes, nor wipes a group written by another Redis process; it shows the group as the
/// purge would leave it, and says when the data is stale.
#[tokio::test]
async fn a_snapshot_changes_no_key_and_publishes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "look");
    let (a, _b) = group_with_an_expired_member(&store, &mut con, &g).await;
    let mut notices = store
        .subscribe(&g, Channel::Group)
        .await
        .expect("subscribe");
    let stored_ver = redis_cmd(&mut con, &["HGET", "{t:look}:meta", "ver"]).await;

    let before = dump_all(&mut con).await;
    let seen = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert_unchanged(&before, &dump_all(&mut con).await, "the snapshot");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), notices.next())
            .await
            .is_err(),
        "the snapshot published a notice"
    );
    let ids: Vec<&str> = seen.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a"], "the expired member is left out");
    assert_eq!(seen.free(), 4, "its buckets are shown free");
    assert!(seen.owners.iter().flatten().all(|o| o.member == "a"));
    assert!(!seen.stale);
    let redis::Value::BulkString(ver) = stored_ver else {
        panic!("ver: {stored_ver:?}");
    };
    let ver: u64 = String::from_utf8_lossy(&ver).parse().expect("ver");
    assert_eq!(seen.version, ver + 1, "the version the purge will give");

    // The purge, when a call makes it, leaves what the snapshot showed, and publishes.
    assert!(
        store
            .heartbeat(&g, &a, LOOK_TTL, Duration::MAX)
            .await
            .expect("heartbeat")
            .alive
    );
    tokio::time::timeout(Duration::from_secs(2), notices.next())
        .await
        .expect("the purge publishes")
        .expect("a notice");
    let after = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert_eq!(after.version, seen.version);
    assert_eq!(after.owners, seen.owners);

    // Data written by another Redis process: said, not wiped.
    redis_cmd(&mut con, &["HSET", "{t:look}:meta", "run_id", "0123abcd"]).await;
    let before = dump_all(&mut con).await;
    let stale = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert!(stale.stale, "a run_id of another process is stale");
    assert_eq!(stale.owners, after.owners);
    assert_unchanged(
        &before,
        &dump_all(&mut con).await,
        "the snapshot of a stale group",
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(200), notices.next())
            .await
            .is_err(),
        "the snapshot of a stale group published a notice"
    );
}

/// Issue 8, bug 3: with a foreign type under `:free`, the snapshot reports corrupt state and
/// deletes nothing (it used to purge, deleting owner records, before it failed).
#[tokio::test]
async fn a_snapshot_over_a_foreign_free_key_deletes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "foreign-free");
    group_with_an_expired_member(&store, &mut con, &g).await;
    redis_cmd(&mut con, &["DEL", "{t:foreign-free}:free"]).await;
    redis_cmd(&mut con, &["SET", "{t:foreign-free}:free", "garbage"]).await;
    let owners = redis_cmd(&mut con, &["HLEN", "{t:foreign-free}:owner"]).await;
    assert_eq!(owners, redis::Value::Int(8));

    let before = dump_all(&mut con).await;
    expect_corrupt("snapshot", store.snapshot(&g).await, "free");
    assert_unchanged(&before, &dump_all(&mut con).await, "the failed snapshot");
}

/// Issue 9, item 6: "a TLS port needs rediss://" only when the port answered in TLS, not when
/// a connection timed out (a busy server) or was closed by something that is not TLS.
#[tokio::test]
async fn no_tls_hint_without_tls_bytes() {
    let options = RedisOptions::default()
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300))
        .connect_retry(Duration::ZERO);
    // Accepts, and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    match RedisStore::connect_with(&format!("redis://127.0.0.1:{port}"), options.clone()).await {
        Err(e @ Error::Unavailable { .. }) => {
            let shown = e.to_string();
            assert!(
                shown.contains("timed out") || shown.contains("no answer"),
                "{shown}"
            );
            assert!(
                !shown.contains("TLS") && !shown.contains("rediss"),
                "{shown}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    drop(silent);
    // Accepts and hangs up at once.
    let rude = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = rude.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in rude.incoming() {
            drop(stream);
        }
    });
    match RedisStore::connect_with(&format!("redis://127.0.0.1:{port}"), options).await {
        Err(e @ Error::Unavailable { .. }) => {
            let shown = e.to_string();
            assert!(
                !shown.contains("TLS") && !shown.contains("rediss"),
                "{shown}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// The scripts look up the watched sessions' expiry only when another session ends within the
/// heartbeat's `watch`, as `MemoryStore` does (its unit test of the same name), to the ms: on
/// the test clock (`frozen_clock_for_tests`), so the boundary is exact.
#[tokio::test]
async fn a_heartbeat_looks_at_watched_expiries_only_within_its_watch() {
    let server = RedisServer::start();
    let options = RedisOptions::default().frozen_clock_for_tests();
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "watch");
    let clock = format!("{}:test-clock", g.tag());
    let t0: u64 = 1_700_000_000_000_000;
    let set_clock = |ms: u64| (t0 + ms * 1000).to_string();
    redis_cmd(&mut con, &["SET", &clock, &set_clock(0)]).await;
    let ttl = Duration::from_secs(1);
    let (a, b, c) = (session("a", "1"), session("b", "1"), session("c", "1"));
    for s in [&a, &b, &c] {
        store
            .register(&g, &RegisterRequest::new(s.clone(), 1, 8, ttl))
            .await
            .expect("register");
    }
    redis_cmd(&mut con, &["SET", &clock, &set_clock(400)]).await;
    store
        .heartbeat(&g, &c, ttl, Duration::MAX)
        .await
        .expect("heartbeat");
    // b ends in 600 ms, c in 1,000 ms: a watches both.
    let ms = Duration::from_millis;
    for (watch, want) in [
        (Duration::MAX, Some(ms(600))),
        (ms(601), Some(ms(600))),
        (ms(600), None),
        (Duration::ZERO, None),
    ] {
        let reply = store
            .heartbeat(&g, &a, ttl, watch)
            .await
            .expect("heartbeat");
        assert!(reply.alive);
        assert_eq!(reply.next_expiry, want, "watch {watch:?}");
    }
    // a's own expiry (renewed just now) does not count.
    redis_cmd(&mut con, &["SET", &clock, &set_clock(900)]).await;
    let reply = store
        .heartbeat(&g, &a, ttl, ms(200))
        .await
        .expect("heartbeat");
    assert_eq!(reply.next_expiry, Some(ms(100)));
}

/// Data another Redis process wrote (a restart that reloaded a file, a failover to a replica)
/// is never granted from: a release on such data wakes the member below its share (`act`; its
/// step re-creates the group) instead of granting it the freed buckets, as it is granted on
/// current data.
#[tokio::test]
async fn freed_buckets_are_granted_in_the_notice_but_never_from_stale_data() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    for stale in [false, true] {
        let g = GroupKey::new("t", format!("stale-{stale}"));
        let (a, buckets, mut wakes) = a_took_its_share(&store, &mut con, &g, 4).await;
        if stale {
            let meta = format!("{}:meta", g.tag());
            redis_cmd(&mut con, &["HSET", &meta, "run_id", "another-process"]).await;
        }
        let freed = store
            .release(&g, &a, &buckets[..1], u64::MAX)
            .await
            .expect("release");
        assert_eq!(freed, 1);
        let notice = tokio::time::timeout(Duration::from_secs(5), wakes.next())
            .await
            .expect("a notice for b")
            .expect("subscribed");
        match (stale, notice) {
            (
                false,
                Notice::Granted {
                    session, buckets, ..
                },
            ) => {
                assert_eq!((session.as_str(), buckets.len()), ("1", 2));
            }
            (true, Notice::Act) => {}
            (stale, other) => panic!("stale data {stale}: {other:?}"),
        }
    }
}

/// A bucket that two members' held sets name (a foreign edit), both purged in one call, is
/// freed twice but granted once: the buckets a call frees go to its grants first, each once,
/// with no second owner and no repeated id in the grant.
#[tokio::test]
async fn a_bucket_freed_twice_in_one_call_is_granted_once() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "twice");
    let (a, b, c) = (session("a", "1"), session("b", "1"), session("c", "1"));
    register_all(&store, &g, [&a, &b, &c], 6).await;
    lift_quarantine(&mut con, &g).await;
    let r = store.rebalance(&g, &a, u32::MAX).await.expect("rebalance");
    let Action::Acquired { buckets, .. } = r.action else {
        panic!("{r:?}");
    };
    let tag = g.tag();
    let shared = buckets[0].to_string();
    redis_cmd(&mut con, &["SADD", &format!("{tag}:held:b"), &shared]).await;
    // a and b expire; c's next step purges both, then takes what they held.
    let exp = format!("{tag}:exp");
    for m in ["a", "b"] {
        redis_cmd(&mut con, &["ZADD", &exp, "1", m]).await;
    }
    let r = store.rebalance(&g, &c, u32::MAX).await.expect("rebalance");
    let Action::Acquired { buckets: taken, .. } = r.action else {
        panic!("{r:?}");
    };
    let distinct: BTreeSet<u32> = taken.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        taken.len(),
        "a bucket granted twice: {taken:?}"
    );
    assert_eq!(taken.len(), 6, "c, alone now, takes all six: {taken:?}");
    assert_eq!((r.committed, r.held), (6, 6));
    let snap = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert_eq!(snap.free(), 0);
    assert!(snap
        .owners
        .iter()
        .all(|o| o.as_ref().is_some_and(|o| o.member == "c")));
}

/// A member's resync read: its own buckets with their tokens and its committed count, the same
/// as the snapshot tells; nothing for another nonce, an expired session or stale data; and it
/// writes nothing (no purge of the expired session, no re-creation of the stale group).
#[tokio::test]
async fn holdings_are_a_sessions_own_buckets_read_without_a_write() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "holdings");
    let (a, b) = (session("a", "1"), session("b", "1"));
    register_all(&store, &g, [&a, &b], 8).await;
    lift_quarantine(&mut con, &g).await;
    for s in [&a, &b] {
        store.rebalance(&g, s, u32::MAX).await.expect("rebalance");
    }
    let snap = store.snapshot(&g).await.expect("snapshot").expect("group");
    for s in [&a, &b] {
        let held = store.holdings(&g, s).await.expect("holdings");
        assert_eq!(held, snap.holdings(s), "{}", s.member);
        let held = held.expect("live");
        assert_eq!((held.owned.len(), held.committed), (4, 4));
    }
    assert_eq!(
        store
            .holdings(&g, &session("a", "2"))
            .await
            .expect("holdings"),
        None
    );

    let tag = g.tag();
    redis_cmd(&mut con, &["ZADD", &format!("{tag}:exp"), "1", "b"]).await;
    assert_eq!(store.holdings(&g, &b).await.expect("holdings"), None);
    assert_eq!(
        redis_cmd(&mut con, &["SCARD", &format!("{tag}:held:b")]).await,
        redis::Value::Int(4),
        "the expired session was purged"
    );

    let meta = format!("{tag}:meta");
    redis_cmd(&mut con, &["HSET", &meta, "run_id", "another-process"]).await;
    assert_eq!(store.holdings(&g, &a).await.expect("holdings"), None);
    assert_eq!(
        redis_cmd(&mut con, &["HGET", &meta, "run_id"]).await,
        redis::Value::BulkString(b"another-process".to_vec()),
        "the stale group was re-created"
    );
}

/// A release purges expired sessions first: a session that expired before it stepped is not
/// granted the freed buckets (it would never take them in, and they would wait for its purge,
/// owned by nobody who works on them), nor woken.
#[tokio::test]
async fn a_release_grants_nothing_to_an_expired_session() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "expired-taker");
    let (a, buckets, mut wakes) = a_took_its_share(&store, &mut con, &g, 4).await;
    // b's session ends before it steps.
    let tag = g.tag();
    redis_cmd(&mut con, &["ZADD", &format!("{tag}:exp"), "1", "b"]).await;
    let freed = store
        .release(&g, &a, &buckets[..1], u64::MAX)
        .await
        .expect("release");
    assert_eq!(freed, 1);
    assert_eq!(
        redis_cmd(&mut con, &["SCARD", &format!("{tag}:held:b")]).await,
        redis::Value::Int(0),
        "granted to the expired session"
    );
    assert_eq!(
        redis_cmd(&mut con, &["SCARD", &format!("{tag}:free")]).await,
        redis::Value::Int(3),
        "the two b never took, and the one released"
    );
    let notice = tokio::time::timeout(Duration::from_millis(200), wakes.next()).await;
    assert!(notice.is_err(), "b was told: {notice:?}");
}

/// A bucket id written with a leading zero (a foreign edit: "01" in the free set) is not a
/// second bucket 1: it is never granted, so no grant names bucket 1 twice.
#[tokio::test]
async fn a_bucket_id_with_a_leading_zero_is_never_granted() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "leading-zero");
    let a = session("a", "1");
    store
        .register(&g, &request(&a, 1, 4))
        .await
        .expect("register");
    lift_quarantine(&mut con, &g).await;
    let tag = g.tag();
    redis_cmd(&mut con, &["SADD", &format!("{tag}:free"), "01", "001"]).await;
    let mut granted = Vec::new();
    for _ in 0..3 {
        let r = store.rebalance(&g, &a, u32::MAX).await.expect("rebalance");
        if let Action::Acquired { buckets, .. } = r.action {
            granted.extend(buckets);
        }
    }
    granted.sort_unstable();
    assert_eq!(granted, [0, 1, 2, 3]);
    assert_eq!(
        redis_cmd(&mut con, &["HEXISTS", &format!("{tag}:owner"), "01"]).await,
        redis::Value::Int(0)
    );
}

/// A renewal purges at most 100 expired sessions; the freed buckets it then grants go to no
/// session among the expired ones left for the next call.
#[tokio::test]
async fn a_renewal_that_purges_at_its_cap_grants_nothing_to_the_expired_rest() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "purge-cap");
    let a = session("a", "1");
    let others: Vec<SessionRef> = (0..102)
        .map(|i| session(&format!("x{i:03}"), "1"))
        .collect();
    register_all(&store, &g, std::iter::once(&a).chain(&others), 1030).await;
    lift_quarantine(&mut con, &g).await;
    let r = store.rebalance(&g, &a, u32::MAX).await.expect("rebalance");
    assert!(matches!(r.action, Action::Acquired { .. }), "{r:?}");
    // Every other session expires: 100 are purged by the next renewal, two are left.
    let exp = format!("{}:exp", g.tag());
    for (i, s) in others.iter().enumerate() {
        redis_cmd(&mut con, &["ZADD", &exp, &(i + 1).to_string(), &s.member]).await;
    }
    let beat = store
        .heartbeat(&g, &a, TTL, Duration::MAX)
        .await
        .expect("heartbeat");
    assert!(beat.alive);
    for s in &others[100..] {
        assert_eq!(
            redis_cmd(
                &mut con,
                &["SCARD", &format!("{}:held:{}", g.tag(), s.member)]
            )
            .await,
            redis::Value::Int(0),
            "granted to the expired {}",
            s.member
        );
    }
    assert_eq!(
        redis_cmd(&mut con, &["ZCARD", &exp]).await,
        redis::Value::Int(3),
        "a and the two expired sessions the cap left"
    );
}

/// A rebalance of `s`'s first step in `g`: the buckets granted, or the quarantine left.
async fn first_step(store: &RedisStore, g: &GroupKey, s: &SessionRef) -> Result<usize, Duration> {
    match store
        .rebalance(g, s, u32::MAX)
        .await
        .expect("rebalance")
        .action
    {
        Action::Acquired { buckets, .. } => Ok(buckets.len()),
        Action::Wait(left) => Err(left),
        other => panic!("{other:?}"),
    }
}

/// Issue 17: a primary that hangs (SIGSTOP) for longer than a ttl and comes back does not know
/// yet whether its replica was promoted meanwhile and granted the group's buckets. Every
/// session has expired on its clock; the group is re-created with its quarantine instead of
/// granting at once to the first member that registers there (two owners, seen on a cluster).
#[tokio::test]
async fn a_primary_that_hung_for_a_ttl_grants_nothing_when_it_comes_back() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "hung");
    let a = session("a", "1");
    register_all(&store, &g, [&a], 4).await;
    lift_quarantine(&mut con, &g).await;
    assert_eq!(first_step(&store, &g, &a).await, Ok(4));

    server.pause();
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    server.resume();

    let b = session("b", "1");
    let req = request(&b, 1, 4);
    let registered = until_ok("register", || store.register(&g, &req)).await;
    assert!(
        matches!(registered, Registration::Registered { version: 1, .. }),
        "{registered:?}"
    );
    let left = first_step(&store, &g, &b).await.expect_err("quarantined");
    assert!(left > TTL / 2 && left <= TTL, "{left:?}");
    let hb = store
        .heartbeat(&g, &a, TTL, Duration::MAX)
        .await
        .expect("heartbeat");
    assert!(!hb.alive);
}

/// A group whose last member left gracefully less than a ttl ago grants at once (a restart of a
/// one-instance service); one nobody was seen in for a ttl is re-created with its quarantine,
/// and a snapshot, which changes nothing, calls it stale meanwhile.
#[tokio::test]
async fn a_group_nobody_was_seen_in_for_a_ttl_is_quarantined_again() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "unattended");
    let a = session("a", "1");
    register_all(&store, &g, [&a], 4).await;
    lift_quarantine(&mut con, &g).await;
    assert_eq!(first_step(&store, &g, &a).await, Ok(4));
    assert_eq!(store.leave(&g, &a, &[0, 1, 2, 3]).await.expect("leave"), 4);

    let b = session("b", "1");
    register_all(&store, &g, [&b], 4).await;
    assert_eq!(first_step(&store, &g, &b).await, Ok(4), "left just now");
    store.deregister(&g, &b).await.expect("deregister");

    tokio::time::sleep(TTL + Duration::from_millis(50)).await;
    let snap = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert!(snap.stale, "{snap:?}");
    let c = session("c", "1");
    register_all(&store, &g, [&c], 4).await;
    let left = first_step(&store, &g, &c).await.expect_err("quarantined");
    assert!(left > TTL / 2 && left <= TTL, "{left:?}");
}

/// Data another Redis process wrote (a failover, a restart that reloaded a file) is forgotten,
/// and the group waits twice the ttl: until then the old primary, back from a hang, might still
/// renew a session that was live when it stopped, for one more ttl.
#[tokio::test]
async fn stale_data_is_quarantined_for_two_ttls() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "stale-twice");
    let a = session("a", "1");
    register_all(&store, &g, [&a], 4).await;
    lift_quarantine(&mut con, &g).await;
    assert_eq!(first_step(&store, &g, &a).await, Ok(4));
    let meta = format!("{}:meta", g.tag());
    redis_cmd(&mut con, &["HSET", &meta, "run_id", "another-process"]).await;
    let b = session("b", "1");
    register_all(&store, &g, [&b], 4).await;
    let left = first_step(&store, &g, &b).await.expect_err("quarantined");
    assert!(left > TTL * 3 / 2 && left <= TTL * 2, "{left:?}");

    // Found stale by a rebalance, which forgets the group: the registration that re-creates
    // it keeps the two ttls, counted from then.
    lift_quarantine(&mut con, &g).await;
    assert_eq!(first_step(&store, &g, &b).await, Ok(4));
    redis_cmd(&mut con, &["HSET", &meta, "run_id", "another-process"]).await;
    let r = store.rebalance(&g, &b, 4).await.expect("rebalance");
    assert!(matches!(r.action, Action::SessionLost), "{r:?}");
    let c = session("c", "1");
    register_all(&store, &g, [&c], 4).await;
    let left = first_step(&store, &g, &c).await.expect_err("quarantined");
    assert!(left > TTL * 3 / 2 && left <= TTL * 2, "{left:?}");
}

/// The exact expiry boundary, on the test clock, as `MemoryStore` keeps it (issue 19: two
/// mutants of the scripts passed every test). A session registered at a time with a sub-ms part
/// is alive one µs before registration + ttl (its expiry in ms is rounded up, never down: the
/// member's deadline counts from its send time, before the server's now), and the renewal's
/// fast path does not renew a session whose expiry is the current ms: it has expired, and the
/// full script purges it.
#[tokio::test]
async fn sessions_expire_at_their_exact_boundary() {
    let server = RedisServer::start();
    let options = RedisOptions::default().frozen_clock_for_tests();
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .expect("connect");
    let mut con = raw(&server.url()).await;
    let g = GroupKey::new("t", "boundary");
    let clock = format!("{}:test-clock", g.tag());
    // 500 µs into a ms.
    let t0: u64 = 1_700_000_000_000_500;
    let ttl = Duration::from_millis(1000);
    let ttl_us = ttl.as_micros() as u64;
    let at = |us: u64| (t0 + us).to_string();
    redis_cmd(&mut con, &["SET", &clock, &at(0)]).await;
    let (a, b) = (session("a", "1"), session("b", "1"));
    for s in [&a, &b] {
        store
            .register(&g, &RegisterRequest::new(s.clone(), 1, 4, ttl))
            .await
            .expect("register");
    }
    // One µs before registration + ttl: alive, and renewed.
    redis_cmd(&mut con, &["SET", &clock, &at(ttl_us - 1)]).await;
    let hb = store
        .heartbeat(&g, &a, ttl, Duration::MAX)
        .await
        .expect("heartbeat");
    assert!(hb.alive, "a session one µs before its ttl ended");
    // b's expiry, in ms, rounded up: ceil((t0 + ttl) / 1000). At that ms, b has expired: its
    // own renewal finds it gone, whichever path the script takes.
    let expiry_ms = (t0 + ttl_us).div_ceil(1000);
    redis_cmd(&mut con, &["SET", &clock, &(expiry_ms * 1000).to_string()]).await;
    let hb = store
        .heartbeat(&g, &b, ttl, Duration::MAX)
        .await
        .expect("heartbeat");
    assert!(!hb.alive, "b was renewed at its expiry");
}

/// Issue 21: an operator's deletion. Refused while a session is live unless forced; a forced
/// one wakes the live member, whose session is then gone, and the group re-created by a
/// registration with a much shorter ttl still grants nothing before the ended session would
/// have expired (S1: its member may own its buckets until its own deadline, before that);
/// the new grants carry larger tokens (S2). Both stores.
async fn forced_deletion_keeps_the_old_sessions_quarantine(store: &(impl Store + Deleting)) {
    let g = GroupKey::new("del", "g");
    let long = Duration::from_secs(3);
    let a = session("a", "1");
    assert_eq!(store.delete(&g, false).await, Deletion::Absent);
    store
        .register(&g, &RegisterRequest::new(a.clone(), 1, 4, long))
        .await
        .expect("register");
    let mut wake = store
        .subscribe(&g, Channel::Member("a"))
        .await
        .expect("subscribe");
    assert_eq!(
        store.delete(&g, false).await,
        Deletion::Refused { live: 1 },
        "a live session"
    );
    assert!(store.snapshot(&g).await.expect("snapshot").is_some());
    assert_eq!(store.delete(&g, true).await, Deletion::Deleted { live: 1 });
    assert_eq!(store.snapshot(&g).await.expect("snapshot"), None);
    let woken = tokio::time::timeout(Duration::from_secs(2), wake.next())
        .await
        .expect("a is woken");
    assert_eq!(woken, Some(Notice::Act));
    let reply = store
        .heartbeat(&g, &a, long, Duration::ZERO)
        .await
        .expect("heartbeat");
    assert!(!reply.alive, "the session ended with the group");

    // Re-created by b with a ttl of 500 ms: the quarantine still covers a's session (3 s).
    let b = session("b", "1");
    store
        .register(&g, &request(&b, 1, 4))
        .await
        .expect("register b");
    let snap = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert_eq!(snap.ttl, TTL, "the new registrant's configuration");
    assert!(
        snap.quarantine > Duration::from_millis(2500),
        "quarantine {:?} is shorter than the ended session's life",
        snap.quarantine
    );
}

/// The deletion call of either store, for the shared test.
trait Deleting {
    async fn delete(&self, g: &GroupKey, force: bool) -> Deletion;
}

impl Deleting for RedisStore {
    async fn delete(&self, g: &GroupKey, force: bool) -> Deletion {
        self.delete_group(g, force).await.expect("delete")
    }
}

impl Deleting for MemoryStore {
    async fn delete(&self, g: &GroupKey, force: bool) -> Deletion {
        self.delete_group(g, force)
    }
}

#[tokio::test]
async fn a_forced_deletion_keeps_the_old_sessions_quarantine_on_redis() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    forced_deletion_keeps_the_old_sessions_quarantine(&store).await;
}

#[tokio::test]
async fn a_forced_deletion_keeps_the_old_sessions_quarantine_in_memory() {
    forced_deletion_keeps_the_old_sessions_quarantine(&MemoryStore::new()).await;
}

/// Issue 21: a group with no live session holds nothing, so its next member sets its
/// configuration (another bucket count or ttl re-creates it, quarantine and all, tokens still
/// growing), while a live session still makes a mismatch an error. Both stores.
async fn the_next_member_of_an_empty_group_sets_its_configuration(store: &impl Store) {
    let g = GroupKey::new("reconf", "g");
    let a = session("a", "1");
    let long = Duration::from_secs(60);
    store
        .register(&g, &RegisterRequest::new(a.clone(), 1, 4, long))
        .await
        .expect("register a");
    let b = session("b", "1");
    let refused = store.register(&g, &request(&b, 1, 8)).await;
    assert!(
        matches!(refused, Err(Error::GroupMismatch { .. })),
        "a live session keeps the group's shape: {refused:?}"
    );
    let refused = store.register(&g, &request(&b, 1, 4)).await;
    assert!(
        matches!(refused, Err(Error::TtlMismatch { .. })),
        "and its ttl: {refused:?}"
    );
    store.deregister(&g, &a).await.expect("a leaves");
    let Registration::Registered { token, .. } = store
        .register(&g, &request(&b, 1, 8))
        .await
        .expect("b sets the configuration")
    else {
        panic!("b was not registered");
    };
    let snap = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert_eq!((snap.buckets, snap.ttl), (8, TTL));
    assert!(
        snap.quarantine > Duration::ZERO,
        "a re-created group's quarantine"
    );
    assert!(token > 0, "the token floor follows the store's clock");
}

#[tokio::test]
async fn the_next_member_of_an_empty_group_sets_its_configuration_on_redis() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    the_next_member_of_an_empty_group_sets_its_configuration(&store).await;
}

#[tokio::test]
async fn the_next_member_of_an_empty_group_sets_its_configuration_in_memory() {
    the_next_member_of_an_empty_group_sets_its_configuration(&MemoryStore::new()).await;
}

/// The keys under `g`'s tag, sorted, with their PTTL (ms; -1: none).
async fn keys_and_ttls(url: &str, g: &GroupKey) -> Vec<(String, i64)> {
    let mut con = raw(url).await;
    let found = redis_cmd(&mut con, &["KEYS", &format!("{}*", g.tag())]).await;
    let mut names: Vec<String> = redis::from_redis_value(found).expect("names");
    names.sort();
    let mut out = Vec::new();
    for key in names {
        let v = redis_cmd(&mut con, &["PTTL", &key]).await;
        out.push((key, redis::from_redis_value::<i64>(v).expect("pttl")));
    }
    out
}

/// Issue 21: the keys of a group nobody uses do not stay behind. While members renew, every
/// key expires ten ttls (at least a minute) ahead, renewed once half of that is gone; when the
/// last live session leaves (a graceful leave, a deregistration, an operator's removal), in two
/// ttls (at least a minute); a registration keeps them again. A group whose members all crashed
/// loses its keys a minute after their last renewal here.
#[tokio::test]
async fn a_groups_keys_expire_when_nobody_uses_it() {
    let server = RedisServer::start();
    let url = server.url();
    let store = RedisStore::connect(&url).await.expect("connect");
    let mut con = raw(&url).await;
    let g = GroupKey::new("empty", "g");
    let (a, b) = (session("a", "1"), session("b", "1"));
    let kept = |keys: &[(String, i64)], what: &str| {
        assert!(!keys.is_empty(), "{what}: {keys:?}");
        for (key, pttl) in keys {
            assert!(
                (30_000..=60_000).contains(pttl),
                "{what}: {key} has PTTL {pttl}"
            );
        }
    };
    register_all(&store, &g, [&a, &b], 8).await;
    lift_quarantine(&mut con, &g).await;
    store.rebalance(&g, &a, 8).await.expect("a takes");
    store
        .heartbeat(&g, &a, TTL, Duration::ZERO)
        .await
        .expect("a renews");
    // Every key, the owner hash and a's held set made by the grant too.
    let keys = keys_and_ttls(&url, &g).await;
    assert!(keys.iter().any(|(k, _)| k.ends_with(":held:a")), "{keys:?}");
    assert!(keys.iter().any(|(k, _)| k.ends_with(":owner")), "{keys:?}");
    kept(&keys, "live");
    let removal = store.remove_member(&g, "b").await.expect("remove b");
    assert_eq!(removal, redbuckets::store::Removal::Removed { held: 0 });
    kept(&keys_and_ttls(&url, &g).await, "a still live");
    store.deregister(&g, &a).await.expect("a leaves");
    let left = keys_and_ttls(&url, &g).await;
    kept(&left, "after the last leave");
    assert_eq!(left.len(), 2, "the meta hash and the free set: {left:?}");
    // A registration keeps the group, and keeps it fresh.
    register_all(&store, &g, [&session("c", "1")], 8).await;
    kept(&keys_and_ttls(&url, &g).await, "registered again");
    // A crash: nobody renews; the keys go at their expiry (DEBUG SLEEP is not needed: the
    // expiry is what matters, checked above to be at most a minute).
}

/// Parking: the keys of parked ids (their held sets, `:parked`, the members' `:grace`) expire
/// with the group's other keys, also once the last live session has left, and a deletion
/// leaves no key of the group behind.
#[tokio::test]
async fn parked_ids_keys_expire_with_the_group_and_a_deletion_takes_them() {
    let server = RedisServer::start();
    let url = server.url();
    let store = RedisStore::connect(&url).await.expect("connect");
    let mut con = raw(&url).await;
    let g = GroupKey::new("parked", "g");
    let (a, b, c) = (session("a", "1"), session("b", "1"), session("c", "1"));
    for (s, grace) in [(&a, 60), (&b, 60), (&c, 0)] {
        let mut req = request(s, 1, 9);
        req.grace = Duration::from_secs(grace);
        store.register(&g, &req).await.expect("register");
    }
    lift_quarantine(&mut con, &g).await;
    for s in [&a, &b, &c] {
        let r = store.rebalance(&g, s, u32::MAX).await.expect("rebalance");
        assert!(matches!(r.action, Action::Acquired { ref buckets, .. } if buckets.len() == 3));
    }
    let kept = |keys: &[(String, i64)], what: &str| {
        for (key, pttl) in keys {
            assert!(
                (30_000..=60_000).contains(pttl),
                "{what}: {key} has PTTL {pttl}"
            );
        }
    };
    let has = |keys: &[(String, i64)], suffix: &str| keys.iter().any(|(k, _)| k.ends_with(suffix));
    store.deregister(&g, &a).await.expect("a leaves");
    let keys = keys_and_ttls(&url, &g).await;
    for suffix in [":held:a", ":parked", ":grace"] {
        assert!(has(&keys, suffix), "{suffix}: {keys:?}");
    }
    kept(&keys, "a parked");
    let snap = store.snapshot(&g).await.expect("snapshot").expect("group");
    assert_eq!(
        snap.parked
            .iter()
            .map(|p| (p.id.as_str(), p.held))
            .collect::<Vec<_>>(),
        [("a", 3)]
    );
    assert_eq!(snap.free(), 3, "parked buckets are owned by nobody");
    // The last live session leaves: every key, the parked ones too, goes within a minute.
    store.deregister(&g, &b).await.expect("b leaves");
    store.deregister(&g, &c).await.expect("c leaves");
    let keys = keys_and_ttls(&url, &g).await;
    for suffix in [":held:a", ":held:b", ":parked"] {
        assert!(has(&keys, suffix), "{suffix}: {keys:?}");
    }
    assert!(!has(&keys, ":held:c"), "c had no grace: {keys:?}");
    kept(&keys, "after the last leave");
    assert_eq!(
        store.delete_group(&g, false).await.expect("delete"),
        Deletion::Deleted { live: 0 }
    );
    assert_eq!(
        keys_and_ttls(&url, &g).await,
        [],
        "a deletion leaves no key"
    );
}
