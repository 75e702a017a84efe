//! The core of the `slow_redis` example, shared with `tests/slow_redis.rs`: a fleet on its own
//! `redis-server`, the script calls Redis runs per second before, during and after a phase in
//! which Redis is slowed on purpose (a second connection looping `DEBUG SLEEP`), and the
//! fleet's balance and safety after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redbuckets::check::Timeline;
use redbuckets::{Event, Events, Member, RedisStore};
use redbuckets_testkit::RedisInfo;
use tokio::time::Instant;

/// What one run does.
#[derive(Debug, Clone)]
pub struct Config {
    /// `redis://127.0.0.1:port/`; the server must allow `DEBUG`.
    pub url: String,
    pub members: usize,
    pub buckets: u32,
    pub ttl: Duration,
    pub heartbeat: Duration,
    /// The members' call timeout; `None`: the library's default (3 s, capped at ttl / 3).
    pub call_timeout: Option<Duration>,
    /// Each `DEBUG SLEEP` of the slow phase.
    pub sleep: Duration,
    /// Length of each measured window (before, during, after).
    pub window: Duration,
    /// How long the fleet may take to balance (at the start, and after the slow phase).
    pub balance_limit: Duration,
}

/// Redis counters from `INFO`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Script calls (EVALSHA, EVAL, FCALL and their read-only forms).
    pub calls: f64,
    /// Redis CPU, user + sys, s.
    pub cpu_s: f64,
}

/// One measured window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    /// Script calls per second.
    pub calls_per_s: f64,
    /// Redis CPU per second of the window (1.0 = one core).
    pub cpu: f64,
    /// Errors the members reported in the window (failed or timed-out calls).
    pub errors: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub before: Rate,
    pub during: Rate,
    pub after: Rate,
    /// How long after the slow phase the fleet was balanced again; `None`: not within the limit.
    pub rebalanced_after: Option<Duration>,
    /// Buckets owned by none or by two members once balanced again.
    pub coverage: Vec<String>,
    /// S1/S2 violations over every member's events (two owners at once, tokens going back).
    pub violations: Vec<String>,
    /// Members' `Lost` events during and after the slow phase.
    pub lost: usize,
}

pub async fn counters(conn: &mut redis::aio::MultiplexedConnection) -> Result<Counters, String> {
    let text: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(conn)
        .await
        .map_err(|e| format!("INFO: {e}"))?;
    let info = RedisInfo::parse(text);
    Ok(Counters {
        calls: info.scripts("calls"),
        cpu_s: info.cpu_s(),
    })
}

struct Fleet {
    members: Vec<Member>,
    buckets: u32,
}

impl Fleet {
    fn errors(&self) -> u64 {
        self.members.iter().map(|m| m.status().errors).sum()
    }

    fn balanced(&self) -> bool {
        let n = self.members.len();
        let lo = self.buckets as usize / n;
        let hi = lo + usize::from(self.buckets as usize % n != 0);
        let counts: Vec<usize> = self.members.iter().map(|m| m.buckets().len()).collect();
        counts.iter().sum::<usize>() == self.buckets as usize
            && counts.iter().all(|&c| c >= lo && c <= hi)
    }

    async fn until_balanced(&self, limit: Duration) -> Option<Duration> {
        let from = Instant::now();
        while from.elapsed() <= limit {
            if self.balanced() {
                return Some(from.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    fn coverage(&self) -> Vec<String> {
        let mut owners = vec![0u32; self.buckets as usize];
        for m in &self.members {
            for b in m.buckets() {
                if let Some(slot) = owners.get_mut(b as usize) {
                    *slot += 1;
                }
            }
        }
        let unowned = owners.iter().filter(|&&c| c == 0).count();
        let doubled = owners.iter().filter(|&&c| c > 1).count();
        let mut problems = Vec::new();
        if unowned > 0 {
            problems.push(format!("{unowned} buckets unowned"));
        }
        if doubled > 0 {
            problems.push(format!("{doubled} buckets owned twice"));
        }
        problems
    }

    /// Script calls per second, Redis CPU and the members' errors over `window`.
    async fn measure(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        window: Duration,
    ) -> Result<Rate, String> {
        let (c0, e0, t0) = (counters(conn).await?, self.errors(), Instant::now());
        tokio::time::sleep(window).await;
        let (c1, e1) = (counters(conn).await?, self.errors());
        let secs = t0.elapsed().as_secs_f64();
        Ok(Rate {
            calls_per_s: (c1.calls - c0.calls) / secs,
            cpu: (c1.cpu_s - c0.cpu_s) / secs,
            errors: e1 - e0,
        })
    }
}

/// Feeds one member's events to the shared timeline until the member has stopped; counts its
/// `Lost` events. Returns how many events the stream dropped (a lag makes the check incomplete).
async fn collect(
    id: String,
    mut rx: Events,
    timeline: Arc<Mutex<Timeline>>,
    lost: Arc<Mutex<usize>>,
) -> u64 {
    let mut lagged = 0;
    while let Some(event) = rx.next().await {
        if let Event::Lagged { missed, .. } = event {
            lagged += missed;
        }
        if matches!(event, Event::Lost { .. }) {
            if let Ok(mut l) = lost.lock() {
                *l += 1;
            }
        }
        if let Ok(mut t) = timeline.lock() {
            t.push(&id, &event);
        }
    }
    lagged
}

/// Loops `DEBUG SLEEP` on a connection of its own until `stop`.
async fn slow_down(url: String, sleep: Duration, stop: Arc<AtomicBool>) -> Result<(), String> {
    let client = redis::Client::open(url.as_str()).map_err(|e| format!("url: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_response_timeout(Duration::from_secs(60));
    while !stop.load(Ordering::SeqCst) {
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(sleep.as_secs_f64())
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("DEBUG SLEEP (the server needs --enable-debug-command): {e}"))?;
    }
    Ok(())
}

pub async fn run(cfg: Config) -> Result<Report, String> {
    let client = redis::Client::open(cfg.url.as_str()).map_err(|e| format!("url: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The slowed Redis answers the harness late too; its readings must not be cut off.
    conn.set_response_timeout(Duration::from_secs(60));
    let group = format!("slow-{}", std::process::id());
    let timeline = Arc::new(Mutex::new(Timeline::new().complete_streams()));
    let lost = Arc::new(Mutex::new(0usize));

    let starts: Vec<_> = (0..cfg.members)
        .map(|i| {
            let (cfg, group, timeline, lost) = (
                cfg.clone(),
                group.clone(),
                Arc::clone(&timeline),
                Arc::clone(&lost),
            );
            tokio::spawn(async move {
                let store = RedisStore::connect(&cfg.url)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut builder = Member::builder(store, group)
                    .id(format!("m{i:03}"))
                    .buckets(cfg.buckets)
                    .ttl(cfg.ttl)
                    .heartbeat(cfg.heartbeat);
                if let Some(timeout) = cfg.call_timeout {
                    builder = builder.call_timeout(timeout);
                }
                let member = builder.start().await.map_err(|e| e.to_string())?;
                // The stream opens with what the member already holds: nothing is missed.
                let collector = tokio::spawn(collect(
                    member.id().to_string(),
                    member.events(),
                    timeline,
                    lost,
                ));
                Ok::<_, String>((member, collector))
            })
        })
        .collect();
    let (mut members, mut collectors) = (Vec::new(), Vec::new());
    for start in starts {
        let (member, collector) = start.await.map_err(|e| e.to_string())??;
        members.push(member);
        collectors.push(collector);
    }
    let fleet = Fleet {
        members,
        buckets: cfg.buckets,
    };
    fleet
        .until_balanced(cfg.balance_limit)
        .await
        .ok_or("the fleet did not balance at the start")?;
    // Past the join's late wake-ups and the first renewals.
    tokio::time::sleep(cfg.ttl).await;

    let mut report = Report {
        before: fleet.measure(&mut conn, cfg.window).await?,
        ..Report::default()
    };
    let lost_before = *lost.lock().map_err(|e| e.to_string())?;

    let stop = Arc::new(AtomicBool::new(false));
    let slow = tokio::spawn(slow_down(cfg.url.clone(), cfg.sleep, Arc::clone(&stop)));
    report.during = fleet.measure(&mut conn, cfg.window).await?;
    stop.store(true, Ordering::SeqCst);
    slow.await.map_err(|e| e.to_string())??;
    let ended = Instant::now();

    // Balanced again: every bucket owned once, each member within its share, and it stays so
    // for a while (not a moment between a loss and a regrant).
    report.rebalanced_after = loop {
        let Some(_) = fleet
            .until_balanced(cfg.balance_limit.saturating_sub(ended.elapsed()))
            .await
        else {
            break None;
        };
        let at = ended.elapsed();
        tokio::time::sleep(cfg.heartbeat).await;
        if fleet.balanced() {
            break Some(at);
        }
    };
    report.coverage = fleet.coverage();
    report.after = fleet.measure(&mut conn, cfg.window).await?;
    report.lost = *lost.lock().map_err(|e| e.to_string())? - lost_before;

    for member in fleet.members {
        member.shutdown().await.map_err(|e| e.to_string())?;
    }
    // Each stream ends once its member has stopped and every event was read: check only the
    // whole record (a collector still behind would leave a handed-over bucket open).
    let mut lagged = 0;
    for collector in collectors {
        lagged += collector.await.map_err(|e| e.to_string())?;
    }
    report.violations = timeline.lock().map_err(|e| e.to_string())?.violations();
    if lagged > 0 {
        report.violations.push(format!(
            "the event streams dropped {lagged} events: the check is incomplete"
        ));
    }
    Ok(report)
}
