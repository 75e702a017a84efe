//! Members on a real Redis Cluster the test starts (3 primaries, 3 replicas, free ports of
//! 127.0.0.1): groups spread over every primary, a primary killed (its replica takes over),
//! a group's slot migrated while it runs, a node that lost the function library, and the
//! errors for a cluster URL at a standalone server and the reverse.

mod group;

use std::time::{Duration, Instant};

use group::Members;
use redbuckets::store::{Channel, Store};
use redbuckets::{Error, Event, GroupKey, RedisStore};
use redbuckets_testkit::{RedisCluster, RedisServer};

const HEARTBEAT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_millis(1000);

/// One group's members and where its slot is.
type Group = Members<Target>;

struct Target {
    store: RedisStore,
    name: String,
    slot: u16,
}

impl Group {
    /// The members share one cluster connection (clones of one store): the client routes each
    /// call to the primary of the group's slot.
    fn on(store: &RedisStore, cluster: &RedisCluster, name: &str, buckets: u32) -> Self {
        let slot = cluster.keyslot(&format!("red-buckets:{name}"));
        let target = Target {
            store: store.clone(),
            name: name.to_string(),
            slot,
        };
        Members::with(target, buckets)
    }

    async fn join(&mut self, id: &str) {
        let (store, name) = (self.ctx.store.clone(), self.ctx.name.clone());
        self.start_on(store, &name, id, HEARTBEAT, TTL).await;
    }

    fn meta(&self) -> String {
        format!("{{red-buckets:{}}}:meta", self.ctx.name)
    }

    /// Grants, losses and releases since event `mark`: what a moved bucket leaves.
    fn moves_since(&self, mark: usize) -> usize {
        self.timeline.events[mark..]
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e,
                    Event::Acquired { .. } | Event::Lost { .. } | Event::Released { .. }
                )
            })
            .count()
    }
}

/// `RUST_LOG=redbuckets=debug` shows the members' and the store's logs.
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_ansi(false)
            .with_test_writer()
            .try_init();
    }
}

/// Names `prefix-0`, `prefix-1`, ... until each primary owns the slots of `per_primary` of them.
fn names_on_every_primary(cluster: &RedisCluster, prefix: &str, per_primary: usize) -> Vec<String> {
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    let mut chosen: Vec<(u16, String)> = Vec::new();
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        let primary = cluster.primary_of(cluster.keyslot(&format!("red-buckets:{name}")));
        if chosen.iter().filter(|(p, _)| *p == primary).count() < per_primary {
            chosen.push((primary, name));
        }
        if chosen.len() == per_primary * primaries.len() {
            break;
        }
    }
    chosen.into_iter().map(|(_, n)| n).collect()
}

async fn start_groups(
    store: &RedisStore,
    cluster: &RedisCluster,
    names: &[String],
    buckets: u32,
) -> Vec<Group> {
    let mut groups = Vec::new();
    for name in names {
        let mut g = Group::on(store, cluster, name, buckets);
        for i in 0..3 {
            g.join(&format!("m{i}")).await;
        }
        groups.push(g);
    }
    for g in &mut groups {
        g.until_balanced(TTL * 10).await;
        g.assert_exclusive();
    }
    groups
}

/// Waits until every bucket of `g` was granted again since event `mark` and it is balanced;
/// returns how long that took.
async fn until_regranted(g: &mut Group, mark: usize, limit: Duration, what: &str) -> Duration {
    let began = Instant::now();
    loop {
        g.collect();
        let tokens = g.timeline.grant_tokens_since(mark);
        if tokens.len() >= g.buckets as usize && g.balanced() {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < limit,
            "{}: not re-granted {limit:?} after {what}: {} grants, {:?}",
            g.ctx.name,
            tokens.len(),
            g.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 12 groups × 3 members, 4 groups on each primary: every group reaches balance with one owner
/// per bucket and increasing tokens (the event checker), its keys are on its slot's primary,
/// members listen on sharded channels there, and a primary that lost the library
/// (`FUNCTION FLUSH`) gets it back from the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_spread_over_every_primary() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let names = names_on_every_primary(&cluster, "spread", 4);
    let mut groups = start_groups(&store, &cluster, &names, 256).await;

    let mut per_primary = std::collections::BTreeMap::new();
    for g in &groups {
        let primary = cluster.primary_of(g.ctx.slot);
        *per_primary.entry(primary).or_insert(0) += 1;
        let node = cluster.node(primary);
        assert_eq!(node.cli(&["HGET", &g.meta(), "buckets"]).trim(), "256");
        // Each member's wake-up channel is a sharded channel on the slot's primary.
        let wake = format!("{{red-buckets:{}}}:wake:m0", g.ctx.name);
        let subscribed = node.cli(&["PUBSUB", "SHARDNUMSUB", &wake]);
        assert!(
            subscribed.lines().nth(1).map(str::trim) == Some("1"),
            "{wake}: {subscribed}"
        );
    }
    assert_eq!(per_primary.values().copied().collect::<Vec<_>>(), [4, 4, 4]);
    // The listing (`redbuckets groups`) scans every primary.
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(store.groups("red-buckets").await.expect("groups"), sorted);

    // A node without the library (a restart without persistence, FUNCTION FLUSH): the next
    // call loads it there, on that node only, and the groups never notice.
    let flushed = cluster.primary_of(groups[0].ctx.slot);
    let node = cluster.node(flushed);
    let marks: Vec<usize> = groups.iter().map(|g| g.timeline.events.len()).collect();
    node.cli(&["FUNCTION", "FLUSH"]);
    let began = Instant::now();
    while !node.cli(&["FUNCTION", "LIST"]).contains("redbuckets_") {
        assert!(
            began.elapsed() < TTL * 3,
            "the library was not loaded again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(TTL).await;
    for (g, mark) in groups.iter_mut().zip(marks) {
        g.collect();
        assert_eq!(g.moves_since(mark), 0, "{} moved buckets", g.ctx.name);
        assert!(g.balanced());
    }
    for g in groups {
        g.shutdown().await;
    }
}

/// `kill -9` of one primary: its replica takes over (node timeout 1 s), the groups on it are
/// re-created there (another Redis process: their data may be stale) and recover with larger
/// tokens and no overlap; the groups on the other primaries move no bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_and_only_its_groups_recover() {
    init_tracing();
    let mut cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let names = names_on_every_primary(&cluster, "failover", 2);
    let mut groups = start_groups(&store, &cluster, &names, 64).await;

    let victim = cluster.primary_of(groups[0].ctx.slot);
    let before: Vec<u64> = groups.iter().map(Group::max_token).collect();
    let marks: Vec<usize> = groups.iter().map(|g| g.timeline.events.len()).collect();
    let on_victim: Vec<bool> = groups
        .iter()
        .map(|g| cluster.primary_of(g.ctx.slot) == victim)
        .collect();
    assert_eq!(on_victim.iter().filter(|v| **v).count(), 2);

    let killed = Instant::now();
    cluster.kill(victim);
    let mut recovered = Vec::new();
    for (i, g) in groups.iter_mut().enumerate() {
        if on_victim[i] {
            let took = until_regranted(g, marks[i], Duration::from_secs(20), "kill -9").await;
            recovered.push(killed.elapsed());
            eprintln!(
                "{}: re-granted and balanced {took:?} after kill -9",
                g.ctx.name
            );
            g.assert_grants_above(marks[i], before[i]);
            g.assert_exclusive();
        }
    }
    eprintln!("groups of the killed primary recovered after {recovered:?}");
    cluster.wait_ok();
    let promoted = cluster.primary_of(groups[0].ctx.slot);
    assert_ne!(promoted, victim);
    // The group was re-created by the promoted replica itself: the library's cached run id is
    // that process's (it read its own INFO), not the dead primary's that replication copied.
    let node = cluster.node(promoted);
    let run_id = node
        .cli(&["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_string())
        .expect("run_id");
    for (i, g) in groups.iter().enumerate() {
        if on_victim[i] {
            assert_eq!(node.cli(&["HGET", &g.meta(), "run_id"]).trim(), run_id);
        }
    }
    // Let the others run through the whole episode, then check they never moved.
    tokio::time::sleep(TTL).await;
    for (i, g) in groups.iter_mut().enumerate() {
        g.collect();
        if !on_victim[i] {
            assert_eq!(g.moves_since(marks[i]), 0, "{} moved buckets", g.ctx.name);
            assert!(g.balanced(), "{}: {:?}", g.ctx.name, g.counts());
        }
    }
    for g in groups {
        g.shutdown().await;
    }
}

/// A running group's slot moves to another primary (`CLUSTER SETSLOT` and one `MIGRATE` of its
/// keys). Calls follow the redirection; the new primary is another Redis process, so the group
/// is re-created there with a quarantine, like after a failover: ownership stays exclusive,
/// tokens grow, and the group is balanced again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_a_running_group() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let names = vec!["migrating".to_string()];
    let mut groups = start_groups(&store, &cluster, &names, 128).await;
    let mut g = groups.remove(0);
    let slot = g.ctx.slot;
    let from = cluster.primary_of(slot);
    let to = cluster.another_primary(from);
    let before = g.max_token();
    let mark = g.timeline.events.len();
    let moved = Instant::now();
    cluster.migrate_slot(slot, to);
    let took = until_regranted(&mut g, mark, Duration::from_secs(20), "the migration").await;
    eprintln!(
        "slot {slot} moved {from} -> {to}; re-granted and balanced {took:?} after it ({:?} in all)",
        moved.elapsed()
    );
    g.assert_grants_above(mark, before);
    g.assert_exclusive();
    let node = cluster.node(to);
    assert_eq!(node.cli(&["HGET", &g.meta(), "buckets"]).trim(), "128");
    // Wake-ups follow: the members subscribed again on the new primary.
    let wake = format!("{{red-buckets:{}}}:wake:m1", g.ctx.name);
    let began = Instant::now();
    while node.cli(&["PUBSUB", "SHARDNUMSUB", &wake]).lines().nth(1) != Some("1") {
        assert!(
            began.elapsed() < TTL * 5,
            "not subscribed on the new primary"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.shutdown().await;
}

/// The slot moves in batches of one key, 50 ms apart (as `redis-cli --cluster reshard` moves
/// keys in batches), so calls meet it half moved: declared keys on both sides (`TRYAGAIN`,
/// `ASK`), or a script's undeclared keys (a member's `:held:` set) already gone. Whatever the
/// calls meet, ownership stays exclusive, tokens grow, and the group is balanced afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_key_by_key_under_a_running_group() {
    init_tracing();
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let names = vec!["batched".to_string()];
    let mut groups = start_groups(&store, &cluster, &names, 128).await;
    let mut g = groups.remove(0);
    let slot = g.ctx.slot;
    let from = cluster.primary_of(slot);
    let to = cluster.another_primary(from);
    let before = g.max_token();
    let mark = g.timeline.events.len();
    let moving = tokio::task::spawn_blocking(move || {
        cluster.migrate_slot_in_batches(slot, to, 1, Duration::from_millis(50));
        cluster
    });
    // Keep the members busy meanwhile: one leaves, one joins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let leaving = g.members.remove(0);
    leaving.shutdown().await.ok();
    g.collect();
    g.receivers.remove(0);
    g.join("m3").await;
    let cluster = moving.await.expect("migrated");
    let took = until_regranted(&mut g, mark, Duration::from_secs(20), "the migration").await;
    eprintln!("slot {slot} moved key by key {from} -> {to}; balanced {took:?} after");
    g.assert_grants_above(mark, before);
    g.assert_exclusive();
    tokio::time::sleep(TTL).await;
    g.collect();
    assert!(g.balanced(), "{:?}", g.counts());
    g.shutdown().await;
    drop(cluster);
}

/// While a group's slot is marked migrating (no key moved yet), no call runs on it, even one
/// whose declared keys are all there (which Redis itself would let run): the cluster scripts
/// first read a key that never exists, which Redis refuses in a migrating slot before the
/// script has written anything, and the error names the slot. Once the migration is called
/// off, the same call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_runs_on_a_migrating_slot() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let group = GroupKey::new("t", "held-still");
    let slot = cluster.keyslot("t:held-still");
    let from = cluster.primary_of(slot);
    let to = cluster.another_primary(from);
    let node = cluster.node(from);
    // Every declared key exists (with data no script wrote: whatever the call makes of it,
    // it is not a refusal of the slot).
    let tag = group.tag();
    node.cli(&["HSET", &format!("{tag}:meta"), "buckets", "8"]);
    node.cli(&["ZADD", &format!("{tag}:exp"), "1", "x"]);
    for key in ["sess", "since", "weight", "wcount", "owner"] {
        node.cli(&["HSET", &format!("{tag}:{key}"), "x", "1"]);
    }
    node.cli(&["SADD", &format!("{tag}:free"), "0"]);

    cluster.begin_migration(slot, to);
    match store.snapshot(&group).await {
        Err(Error::Unavailable { detail }) => {
            assert!(detail.contains(&format!("slot {slot}")), "{detail}");
            assert!(detail.contains("non local key"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    cluster.cancel_migration(slot);
    if let Err(Error::Unavailable { detail }) = store.snapshot(&group).await {
        panic!("still refused: {detail}");
    }
}

/// A tool's subscription to the group's events is a sharded one on the slot's primary: a
/// change arrives, and the stream ends when the slot moves away (the server unsubscribes it)
/// and when that primary dies, so the subscriber resubscribes where the slot is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_notifications_arrive_and_end_when_the_slot_moves_or_its_primary_dies() {
    let mut cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    let group = GroupKey::new("red-buckets", "notices");
    let slot = cluster.keyslot("red-buckets:notices");

    let mut notes = store
        .subscribe(&group, Channel::Group)
        .await
        .expect("subscribe");
    let mut g = Group::on(&store, &cluster, "notices", 8);
    g.join("m0").await;
    assert_eq!(
        next(&mut notes).await,
        Some(redbuckets::store::Notice::Act),
        "a notice within 5 s"
    );

    let from = cluster.primary_of(slot);
    let to = cluster.another_primary(from);
    cluster.migrate_slot(slot, to);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while notes.next().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream must end when the slot moves away"
    );

    // Subscribed again (the first try may meet the old table), on the new primary.
    let began = Instant::now();
    let mut notes = loop {
        match store.subscribe(&group, Channel::Group).await {
            Ok(notes) => break notes,
            Err(e) => {
                assert!(began.elapsed() < TTL * 5, "cannot subscribe again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    g.join("m1").await;
    assert_eq!(
        next(&mut notes).await,
        Some(redbuckets::store::Notice::Act),
        "a notice within 5 s"
    );
    cluster.kill(to);
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while notes.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream must end when the primary dies");
    for m in g.members {
        m.abort();
    }
}

/// The next notice, `None` when the stream ended or none came within 5 s.
async fn next(notes: &mut redbuckets::store::Notifications) -> Option<redbuckets::store::Notice> {
    tokio::time::timeout(Duration::from_secs(5), notes.next())
        .await
        .ok()
        .flatten()
}

/// A cluster that wants a password: the URL's credentials reach every node (calls and the
/// subscriptions' own connections), and a wrong password is refused without showing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_cluster() {
    let cluster =
        RedisCluster::start_with(&["--requirepass", "s3cretPW", "--masterauth", "s3cretPW"]);
    let url = cluster
        .url()
        .replace("redis+cluster://", "redis+cluster://:s3cretPW@");
    let store = RedisStore::connect(&url).await.expect("connect");
    let names = names_on_every_primary(&cluster, "auth", 1);
    let groups = start_groups(&store, &cluster, &names, 16).await;
    for g in &groups {
        let wake = format!("{{red-buckets:{}}}:wake:m0", g.ctx.name);
        let node = cluster
            .nodes()
            .iter()
            .find(|n| n.port() == cluster.primary_of(g.ctx.slot))
            .expect("primary");
        assert_eq!(
            node.cli(&["PUBSUB", "SHARDNUMSUB", &wake]).lines().nth(1),
            Some("1")
        );
    }
    for g in groups {
        g.shutdown().await;
    }
    let wrong = cluster
        .url()
        .replace("redis+cluster://", "redis+cluster://:wrongPW@");
    match RedisStore::connect(&wrong).await {
        Err(e @ Error::Refused { .. }) => {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("wrongPW"), "{shown}");
            assert!(shown.contains("WRONGPASS"), "{shown}");
        }
        other => panic!("{other:?}"),
    }
}

/// The wrong kind of URL for the server says which kind to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_url_kind_is_a_clear_error() {
    let server = RedisServer::start();
    let url = format!("redis+cluster://127.0.0.1:{}", server.port());
    match RedisStore::connect(&url).await {
        Err(Error::Url { reason, .. }) => {
            assert!(reason.contains("not a Redis Cluster node"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let cluster = RedisCluster::start();
    let node = cluster.nodes()[0].url();
    match RedisStore::connect(&node).await {
        Err(Error::Url { reason, .. }) => {
            assert!(reason.contains("redis+cluster://"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The code form reaches the same cluster.
    let store = RedisStore::connect_cluster([node], redbuckets::RedisOptions::default())
        .await
        .expect("connect_cluster");
    let mut g = Group::on(&store, &cluster, "code-form", 16);
    g.join("m0").await;
    g.until_balanced(TTL * 5).await;
    g.shutdown().await;
}

/// Issue 17: a call to a frozen primary (SIGSTOP) fails naming the node and the slot; calls
/// its caller cuts before any answer (as a member does, at a third of its ttl) count as
/// timeouts of that node, so the store reads the slot table again and reaches the promoted
/// replica while the old primary is still frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cut_at_a_frozen_primary_lead_the_store_to_its_replica() {
    let mut cluster = RedisCluster::start();
    let options = redbuckets::RedisOptions::default().response_timeout(Duration::from_millis(300));
    let store = RedisStore::connect_with(&cluster.url(), options)
        .await
        .expect("connect");
    let group = GroupKey::new("red-buckets", "frozen");
    let slot = cluster.keyslot("red-buckets:frozen");
    let victim = cluster.primary_of(slot);
    assert!(store.snapshot(&group).await.expect("snapshot").is_none());

    cluster.pause(victim);
    let err = store.snapshot(&group).await.expect_err("frozen");
    let text = err.to_string();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        text.contains(&format!(":{victim}")) && text.contains(&format!("slot {slot}")),
        "{text}"
    );
    // Cut every call at 100 ms, far below the store's own budget: only the cut tells the store.
    let began = Instant::now();
    loop {
        let cut = tokio::time::timeout(Duration::from_millis(100), store.snapshot(&group)).await;
        if matches!(cut, Ok(Ok(_))) {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "the store never reached the promoted replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(cluster.primary_of(slot), victim);
    eprintln!("a snapshot answered {:?} after the freeze", began.elapsed());
}

/// A rejoin grace on a Cluster: a graceful and a crashed restart under a fixed id get their
/// buckets back (the claim's grant notice is a sharded message on the slot), nothing else moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_a_fixed_id_gets_its_buckets_back() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.expect("connect");
    group::rejoin_round(store, "rejoin", 64, HEARTBEAT, TTL).await;
}
