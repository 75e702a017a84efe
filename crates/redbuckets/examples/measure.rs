//! Measures redbuckets on a real Redis: commands/s and Redis CPU at steady state, moves and time to
//! balance after a join and a graceful leave, and time to reassign a crashed member's buckets.
//!
//! ```text
//! cargo run --release --example measure                 # 4 × 1,024 and 10 × 16,384
//! cargo run --release --example measure -- 4 1024      # one configuration
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --release --example measure
//! MEASURE_PING=1 cargo run --release --example measure -- 4 1024   # also: the cost of PINGs
//! MEASURE_CLUSTER=1 cargo run --release --example measure -- 4 1024   # on a Redis Cluster
//! ```
//! Without `REDIS_URL` it starts its own `redis-server` on a free port (and stops it at the end);
//! with `MEASURE_CLUSTER=1`, its own Redis Cluster (3 primaries, 3 replicas: the testkit's),
//! reached with a `redis+cluster://` URL; the Redis figures are then the group's primary's, and
//! it also measures what `WAIT 1` (one replica acknowledged) adds to a write there.
//! Heartbeat 1 s and ttl 10 s, the defaults. Redis CPU is taken over a steady-state window of
//! `MEASURE_WINDOW` seconds (default 30) and compared with idle windows of the same length
//! before the members join and after they leave: an idle Redis on a VM wanders by ±0.1 ms/s.

use std::time::{Duration, Instant};

use redbuckets::{Event, Member, RedisStore};
use redbuckets_testkit::{RedisCluster, RedisInfo, RedisServer};

fn window() -> Duration {
    let secs = std::env::var("MEASURE_WINDOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Without `REDIS_URL`, a server of our own (the testkit's, killed when dropped).
fn start_server() -> (Option<RedisServer>, String) {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return (None, url);
    }
    let server = RedisServer::start();
    let url = format!("{}/", server.url());
    (Some(server), url)
}

struct Stats {
    /// Every command Redis ran, the ones inside scripts included.
    commands: f64,
    /// Script calls (FCALL, or EVALSHA where functions are refused): the members' round trips.
    script_calls: f64,
    script_usec: f64,
    cpu_s: f64,
}

async fn redis_stats(conn: &mut redis::aio::MultiplexedConnection) -> Stats {
    let text: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(conn)
        .await
        .expect("INFO");
    let info = RedisInfo::parse(text);
    Stats {
        commands: info.field("total_commands_processed"),
        script_calls: info.scripts("calls"),
        script_usec: info.scripts("usec"),
        cpu_s: info.cpu_s(),
    }
}

/// Rates over a window of Redis activity.
struct Rates {
    /// Round trips from members (script calls) per second.
    calls: f64,
    /// Commands per second, the ones run inside scripts included.
    commands: f64,
    /// Mean server time of one script call, µs.
    usec_per_call: f64,
    /// Redis CPU (user + sys), ms per s.
    cpu_ms: f64,
}

/// Rates of Redis over `window`, minus the INFO calls themselves.
async fn rates(conn: &mut redis::aio::MultiplexedConnection, window: Duration) -> Rates {
    let a = redis_stats(conn).await;
    tokio::time::sleep(window).await;
    let b = redis_stats(conn).await;
    let secs = window.as_secs_f64();
    let calls = b.script_calls - a.script_calls;
    Rates {
        calls: calls / secs,
        commands: (b.commands - a.commands - 1.0) / secs,
        usec_per_call: if calls > 0.0 {
            (b.script_usec - a.script_usec) / calls
        } else {
            0.0
        },
        cpu_ms: (b.cpu_s - a.cpu_s) * 1000.0 / secs,
    }
}

struct Run {
    url: String,
    group: String,
    buckets: u32,
    members: Vec<Member>,
    events: Vec<redbuckets::Events>,
}

impl Run {
    async fn join(&mut self, id: &str) {
        let store = RedisStore::connect(&self.url).await.expect("connect");
        let member = Member::builder(store, self.group.clone())
            .id(id)
            .buckets(self.buckets)
            .start()
            .await
            .expect("start");
        self.events.push(member.events());
        self.members.push(member);
    }

    fn balanced(&self) -> bool {
        let n = self.members.len();
        let lo = self.buckets as usize / n;
        let counts: Vec<usize> = self.members.iter().map(|m| m.buckets().len()).collect();
        counts.iter().sum::<usize>() == self.buckets as usize
            && counts.iter().all(|&c| c == lo || c == lo + 1)
    }

    async fn until_balanced(&self, limit: Duration) -> Option<Duration> {
        let began = Instant::now();
        while !self.balanced() {
            if began.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Some(began.elapsed())
    }

    /// Acquisitions seen since the last call (drains every receiver).
    fn acquisitions(&mut self) -> usize {
        let mut count = 0;
        for rx in &mut self.events {
            while let Some(event) = rx.try_next() {
                if matches!(event, Event::Acquired { .. }) {
                    count += 1;
                }
            }
        }
        count
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("never (limit)".to_string(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

/// The `redis://` URL of the cluster's primary for `group`'s slot.
fn primary_url(cluster: &RedisCluster, group: &str) -> String {
    let port = cluster.primary_of(cluster.keyslot(&format!("red-buckets:{group}")));
    format!("redis://127.0.0.1:{port}/")
}

/// Mean round trip of a write alone and of the write followed by `WAIT 1` (one replica
/// acknowledged), on the group's primary: what waiting for a replica after a grant would add.
async fn wait_cost(url: &str, group: &str) {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let key = format!("{{red-buckets:{group}}}:wait-probe");
    const N: u32 = 2000;
    let mut plain = Duration::ZERO;
    let mut waited = Duration::ZERO;
    for i in 0..N {
        let mut write = redis::cmd("HSET");
        write.arg(&key).arg("i").arg(i);
        let began = Instant::now();
        let _: i64 = write.query_async(&mut conn).await.expect("HSET");
        plain += began.elapsed();
        let began = Instant::now();
        let _: i64 = write.query_async(&mut conn).await.expect("HSET");
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica did not acknowledge");
        waited += began.elapsed();
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    println!(
        "WAIT 1: a write takes {:.1} µs alone, {:.1} µs with WAIT 1 after it ({N} of each, \
         one connection, in a row)",
        plain.as_secs_f64() * 1e6 / f64::from(N),
        waited.as_secs_f64() * 1e6 / f64::from(N)
    );
}

async fn scenario(url: &str, cluster: Option<&RedisCluster>, n: usize, buckets: u32) {
    let group = format!("measure-{}-{n}x{buckets}", std::process::id());
    // On a cluster, the figures are those of the primary that owns the group's slot.
    let stats_url = cluster.map_or_else(|| url.to_string(), |c| primary_url(c, &group));
    let client = redis::Client::open(stats_url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    println!("== {n} members × {buckets} buckets (heartbeat 1s, ttl 10s) ==");
    let window = window();
    let idle_before = rates(&mut conn, window).await;
    if std::env::var_os("MEASURE_PING").is_some() {
        // The floor: what merely waking Redis costs, one PING per member per second.
        let mut pingers = Vec::new();
        for _ in 0..n {
            pingers.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect"),
            );
        }
        let pinging = tokio::spawn(async move {
            loop {
                for p in &mut pingers {
                    let _: String = redis::cmd("PING").query_async(p).await.expect("PING");
                    tokio::time::sleep(Duration::from_secs(1) / n as u32).await;
                }
            }
        });
        let pings = rates(&mut conn, window).await;
        pinging.abort();
        println!(
            "floor: {n} PINGs/s cost Redis {:.3} ms/s above idle ({:.3} − idle {:.3})",
            pings.cpu_ms - idle_before.cpu_ms,
            pings.cpu_ms,
            idle_before.cpu_ms
        );
    }

    if cluster.is_some() {
        wait_cost(&stats_url, &group).await;
    }
    let mut run = Run {
        url: url.to_string(),
        group,
        buckets,
        members: Vec::new(),
        events: Vec::new(),
    };
    let began = Instant::now();
    for i in 0..n {
        run.join(&format!("m{i}")).await;
    }
    let first = run.until_balanced(Duration::from_secs(60)).await;
    println!(
        "initial balance: {} after start (includes the 10 s quarantine of a new group)",
        ms(first.map(|_| began.elapsed()))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.acquisitions();

    let steady = rates(&mut conn, window).await;
    let reacquired = run.acquisitions();
    println!(
        "steady state: {:.2} round trips/s (target ≤ {n}), {:.1} commands/s counting those \
         inside scripts, {:.1} µs of server time per call, re-acquisitions in {}s: {reacquired}",
        steady.calls,
        steady.commands,
        steady.usec_per_call,
        window.as_secs()
    );

    // A join.
    let optimal_join = buckets as usize / (n + 1);
    let began = Instant::now();
    run.join(&format!("m{n}")).await;
    let join_time = run.until_balanced(Duration::from_secs(60)).await;
    let join_time = join_time.map(|_| began.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = run.acquisitions();
    println!(
        "join: balanced in {}, moved {moved} (optimal {optimal_join}, bound {})",
        ms(join_time),
        optimal_join + n + 1
    );

    // A graceful leave.
    let leaving = run.members.remove(0);
    run.events.remove(0);
    let held = leaving.buckets().len();
    let began = Instant::now();
    leaving.shutdown().await.expect("shutdown");
    let leave_time = run
        .until_balanced(Duration::from_secs(60))
        .await
        .map(|_| began.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = run.acquisitions();
    println!(
        "graceful leave: balanced in {}, moved {moved} (optimal {held}, bound {})",
        ms(leave_time),
        held + n
    );

    // A crash.
    let crashed = run.members.remove(0);
    run.events.remove(0);
    let held = crashed.buckets().len();
    let renewed = crashed.status().last_heartbeat.map(|at| at.into_std());
    let began = Instant::now();
    crashed.abort();
    let crash_time = run
        .until_balanced(Duration::from_secs(60))
        .await
        .map(|_| began.elapsed());
    let after_renewal = renewed.map(|at| at.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = run.acquisitions();
    println!(
        "crash: reassigned in {} (target ≤ ttl + heartbeat = 11 s), {} after its last renewal, \
         moved {moved} (optimal {held})",
        ms(crash_time),
        ms(after_renewal)
    );

    for m in run.members.drain(..) {
        let _ = m.shutdown().await;
    }
    let idle_after = rates(&mut conn, window).await;
    let idle = (idle_before.cpu_ms + idle_after.cpu_ms) / 2.0;
    println!(
        "steady state: Redis CPU {:.3} ms/s above idle ({:.3} − idle {idle:.3}, the mean of \
         {:.3} before and {:.3} after; {}s windows)",
        steady.cpu_ms - idle,
        steady.cpu_ms,
        idle_before.cpu_ms,
        idle_after.cpu_ms,
        window.as_secs()
    );
    println!();
}

#[tokio::main]
async fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let configs: Vec<(usize, u32)> = match args.as_slice() {
        [n, b] => vec![(*n as usize, *b)],
        _ => vec![(4, 1024), (10, 16_384)],
    };
    let cluster = std::env::var_os("MEASURE_CLUSTER").map(|_| RedisCluster::start());
    let (_server, url) = match &cluster {
        Some(cluster) => (None, cluster.url()),
        None => start_server(),
    };
    println!("Redis at {}", redbuckets::redact_url(&url));
    for (n, b) in configs {
        scenario(&url, cluster.as_ref(), n, b).await;
    }
}
