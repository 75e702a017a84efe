//! A Redis primary that hangs (SIGSTOP) for longer than its failover takes, is replaced by its
//! replica, and comes back (SIGCONT) still believing, for a moment, that it is the primary with
//! the group's old state: a hung VM, a long stall, a network black hole (issue 17). On a Redis
//! Cluster (3 primaries, 3 replicas, node timeout 1 s) and through Redis Sentinel.
//!
//! Every member is a `redbuckets join --json` process (B = 64, heartbeat 100 ms, ttl 1 s), so
//! each has its own slot table or sentinel view, as in a deployment; the external checker of
//! `faults/harness.rs` turns their lines into ownership intervals and checks S1 (no two owners
//! of a bucket at any instant) and S2 (tokens only grow). A member joins after the promotion,
//! while the old primary is still frozen, and the groups must be balanced again within a few
//! ttl of the promotion; groups on the untouched primaries move nothing. Then the old primary
//! either comes back or stays frozen to the end. Timings go to stderr as `[hung] ...` lines
//! (`cargo nextest run -p redbuckets-cli --test hung_primary --no-capture`).

#[path = "common/process.rs"]
mod process;

// Shared with tests/faults.rs, which uses all of it.
#[path = "faults/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::thread;
use std::time::{Duration, Instant};

use harness::{Group, TTL};
use redbuckets_testkit::{RedisCluster, RedisServer, Sentinel};

const B: u32 = 64;

/// A new group's start, not under test.
const START_LIMIT: Duration = Duration::from_secs(15);

/// From the promotion to every bucket owned and balanced over the live members: the members
/// notice the hung node (their calls time out), read the topology again, register on the new
/// primary, which re-creates the group (its data came from another Redis process) with a
/// quarantine of two ttls, and take their shares. 2 s of quarantine, the rest for the calls
/// and process scheduling on a loaded 2-core machine.
const RECOVERY_LIMIT: Duration = Duration::from_secs(6);

macro_rules! report {
    ($($arg:tt)*) => { eprintln!("[hung] {}", format!($($arg)*)) };
}

/// Grants and losses among `g`'s lines from index `mark` on: what a moved bucket leaves.
fn moves_since(g: &Group, mark: usize) -> usize {
    g.timeline.lines()[mark..]
        .iter()
        .filter(|l| matches!(l.event(), "acquired" | "lost"))
        .count()
}

/// Waits until `pred`, at most `limit`; panics naming `what`.
fn wait_for(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !pred() {
        assert!(began.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
    began.elapsed()
}

/// Group names `hung-0`, `hung-1`, ...: `on_victim` of them on the primary of the first one
/// chosen, and one on each other primary. Returns the names and the victim's port.
fn names(cluster: &RedisCluster, on_victim: usize) -> (Vec<String>, u16) {
    let primary_of =
        |name: &str| cluster.primary_of(cluster.keyslot(&format!("red-buckets:{name}")));
    let victim = primary_of("hung-0");
    let mut chosen = vec!["hung-0".to_string()];
    let mut others = Vec::new();
    for i in 1.. {
        let name = format!("hung-{i}");
        let primary = primary_of(&name);
        if primary == victim {
            if chosen.len() < on_victim {
                chosen.push(name);
            }
        } else if !others.iter().any(|(p, _)| *p == primary) {
            others.push((primary, name));
        }
        if chosen.len() == on_victim && others.len() == 2 {
            break;
        }
    }
    chosen.extend(others.into_iter().map(|(_, n)| n));
    (chosen, victim)
}

/// How many clients of `node` listen on `name`'s wake-up channel of member `id`.
fn wake_subscribers(node: &RedisServer, name: &str, id: &str) -> usize {
    let channel = format!("{{red-buckets:{name}}}:wake:{id}");
    let reply = node.cli(&["PUBSUB", "SHARDNUMSUB", &channel]);
    reply
        .lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The cluster case: 2 groups on the victim primary, one on each other primary, 3 members each.
/// The victim is frozen; once its replica is promoted, a fourth member joins each of its groups;
/// with `resume`, the old primary then comes back.
fn cluster_primary_hangs(resume: bool) {
    let mut cluster = RedisCluster::start();
    let url = cluster.url();
    let (names, victim) = names(&cluster, 2);
    let mut groups: Vec<Group> = names.iter().map(|n| Group::new(&url, n, B)).collect();
    for g in &mut groups {
        for id in ["m1", "m2", "m3"] {
            g.spawn(id);
        }
    }
    for g in &groups {
        g.wait_joined(START_LIMIT);
        g.wait_converged(START_LIMIT);
    }
    let slot = cluster.keyslot("red-buckets:hung-0");
    let on_victim: Vec<bool> = names
        .iter()
        .map(|n| cluster.primary_of(cluster.keyslot(&format!("red-buckets:{n}"))) == victim)
        .collect();
    assert_eq!(on_victim.iter().filter(|v| **v).count(), 2);
    let marks: Vec<usize> = groups.iter().map(|g| g.timeline.len()).collect();

    cluster.pause(victim);
    let frozen = Instant::now();
    let mut promoted = victim;
    wait_for("the replica's promotion", Duration::from_secs(20), || {
        promoted = cluster.try_primary_of(slot).unwrap_or(victim);
        promoted != victim
    });
    let promotion = frozen.elapsed();
    report!("cluster: replica {promoted} promoted {promotion:?} after the freeze of {victim}");
    let after_promotion = Instant::now();
    for (g, hit) in groups.iter_mut().zip(&on_victim) {
        if *hit {
            g.spawn("m4");
        }
    }
    for (g, hit) in groups.iter().zip(&on_victim) {
        if *hit {
            g.wait_converged_over(&g.live(), RECOVERY_LIMIT);
            report!(
                "cluster: {} balanced over 4 members {:?} after the promotion (old primary frozen)",
                g.name,
                after_promotion.elapsed()
            );
        }
    }
    for g in &groups {
        g.check_safety();
    }
    for (g, hit) in groups.iter().zip(&on_victim) {
        if *hit {
            for id in ["m1", "m2", "m3", "m4"] {
                wait_for(
                    &format!("{} {id} subscribed on the new primary", g.name),
                    TTL * 3,
                    || wake_subscribers(cluster.node(promoted), &g.name, id) == 1,
                );
            }
        }
    }

    if resume {
        cluster.resume(victim);
        report!(
            "cluster: {victim} resumed {:?} after the freeze",
            frozen.elapsed()
        );
        // Long enough for the old node to serve what it still believes, to learn it was
        // replaced, and for every member routed there to come back.
        thread::sleep(TTL * 3);
        cluster.wait_ok();
        assert_ne!(
            cluster.primary_of(slot),
            victim,
            "the old primary took its slots back"
        );
        let (old, new_primary) = (cluster.node(victim), cluster.node(promoted));
        for (g, hit) in groups.iter().zip(&on_victim) {
            if *hit {
                g.wait_converged_over(&g.live(), RECOVERY_LIMIT);
                for id in ["m1", "m2", "m3", "m4"] {
                    wait_for(
                        &format!("{} {id} subscribed on the primary only", g.name),
                        TTL * 3,
                        || {
                            wake_subscribers(new_primary, &g.name, id) == 1
                                && wake_subscribers(old, &g.name, id) == 0
                        },
                    );
                }
            }
        }
    }
    for (i, g) in groups.iter().enumerate() {
        g.check_safety();
        if !on_victim[i] {
            assert_eq!(
                moves_since(g, marks[i]),
                0,
                "{} is on an untouched primary and moved buckets",
                g.name
            );
        }
    }
    for g in &mut groups {
        g.shutdown();
    }
}

#[test]
fn a_cluster_primary_that_hangs_is_replaced_and_comes_back_without_two_owners() {
    cluster_primary_hangs(true);
}

#[test]
fn a_cluster_primary_that_stays_hung_is_abandoned() {
    cluster_primary_hangs(false);
}

/// The Sentinel case: a primary, its replica and a sentinel (down-after 1 s), 3 members through
/// the sentinel. The primary is frozen; once the sentinel promoted the replica, a fourth member
/// joins; with `resume`, the old primary comes back, and answers until the sentinel makes it a
/// replica.
fn sentinel_primary_hangs(resume: bool) {
    let mut primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let sentinel = Sentinel::start(&primary);
    // The sentinel must know the replica before the primary hangs, or it has none to promote.
    wait_for(
        "the sentinel to find the replica",
        Duration::from_secs(20),
        || {
            sentinel
                .cli(&["SENTINEL", "REPLICAS", "mymaster"])
                .contains(&replica.port().to_string())
        },
    );
    let mut g = Group::new(&sentinel.url(), "hung-sentinel", B);
    for id in ["m1", "m2", "m3"] {
        g.spawn(id);
    }
    g.wait_joined(START_LIMIT);
    g.wait_converged(START_LIMIT);

    primary.pause();
    let frozen = Instant::now();
    // Promoted, and the failover ended: the sentinel names the replica as a healthy primary
    // (until then, its answer is "no such master").
    wait_for("the replica's promotion", Duration::from_secs(20), || {
        let master = sentinel.cli(&["SENTINEL", "MASTER", "mymaster"]);
        let field = |name: &str| {
            let mut lines = master.lines();
            lines.find(|l| l.trim() == name)?;
            lines.next().map(|v| v.trim().to_string())
        };
        replica.cli(&["ROLE"]).starts_with("master")
            && field("port") == Some(replica.port().to_string())
            && field("flags").as_deref() == Some("master")
    });
    report!(
        "sentinel: replica promoted {:?} after the freeze",
        frozen.elapsed()
    );
    let after_promotion = Instant::now();
    g.spawn("m4");
    g.wait_joined(START_LIMIT);
    g.wait_converged_over(&g.live(), RECOVERY_LIMIT);
    report!(
        "sentinel: balanced over 4 members {:?} after the promotion (old primary frozen)",
        after_promotion.elapsed()
    );
    g.check_safety();
    if resume {
        primary.resume();
        report!(
            "sentinel: old primary resumed {:?} after the freeze",
            frozen.elapsed()
        );
        thread::sleep(TTL * 3);
        g.wait_converged_over(&g.live(), RECOVERY_LIMIT);
    }
    g.check_safety();
    g.shutdown();
}

#[test]
fn a_sentinel_primary_that_hangs_is_replaced_and_comes_back_without_two_owners() {
    sentinel_primary_hangs(true);
}

#[test]
fn a_sentinel_primary_that_stays_hung_is_abandoned() {
    sentinel_primary_hangs(false);
}
