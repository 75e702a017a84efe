//! The core of the `scale` benchmark: one run of n members × B buckets on a real Redis, started
//! concurrently as a real deployment starts its pods, then one join and one graceful leave.
//! It owns the measurement (Redis INFO deltas, SLOWLOG samples for the per-script split, the
//! process's own CPU and RSS) and the safety checks (S1/S2 through `redbuckets::check` fed from
//! every member's events; after each convergence, every bucket owned exactly once).
//!
//! It is shared by `examples/scale/main.rs` (tables, JSON, chart) and `tests/scale_smoke.rs`
//! (a small run in CI) through `#[path]`, so the smoke test runs exactly this code.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redbuckets::check::Timeline;
use redbuckets::{Event, Events, Member, RedisStore};
use redbuckets_testkit::{RedisInfo, SCRIPT_COMMANDS};
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Redis to use (`redis://host:port/`).
    pub url: String,
    /// Members started together.
    pub members: usize,
    /// Buckets of the group.
    pub buckets: u32,
    /// Session ttl.
    pub ttl: Duration,
    /// Heartbeat.
    pub heartbeat: Duration,
    /// Wait between a failed `start()` and its retry.
    pub start_retry: Duration,
    /// Give up starting a member after this long (counted from the first attempt).
    pub start_limit: Duration,
    /// Give up waiting for a balance after this long.
    pub balance_limit: Duration,
    /// Steady-state window.
    pub window: Duration,
}

/// Redis counters read from `INFO everything`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisCounters {
    /// Script calls (EVALSHA, EVAL, FCALL, FCALL_RO, and their _RO forms): the members' round trips.
    pub calls: f64,
    /// Their server time, µs.
    pub usec: f64,
    /// PUBLISH commands (from scripts included).
    pub publish: f64,
    /// Redis CPU, user + sys, s.
    pub cpu_s: f64,
}

impl std::ops::Sub for RedisCounters {
    type Output = RedisCounters;
    fn sub(self, o: RedisCounters) -> RedisCounters {
        RedisCounters {
            calls: self.calls - o.calls,
            usec: self.usec - o.usec,
            publish: self.publish - o.publish,
            cpu_s: self.cpu_s - o.cpu_s,
        }
    }
}

/// Reads the counters (one INFO call).
pub async fn counters(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<RedisCounters, String> {
    let text: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(conn)
        .await
        .map_err(|e| format!("INFO: {e}"))?;
    let info = RedisInfo::parse(text);
    Ok(RedisCounters {
        calls: info.scripts("calls"),
        usec: info.scripts("usec"),
        publish: info.command("publish", "calls"),
        cpu_s: info.cpu_s(),
    })
}

/// This process's CPU (user + sys), s, from `getrusage`.
pub fn process_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it; a zeroed rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// `VmRSS` and `VmHWM` of this process, MiB (NaN where /proc is missing).
pub fn process_rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |k| k / 1024.0)
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Script names by the hash EVALSHA sends: the SHA1 of each text the store loads (the shared
/// prelude `common.lua` prepended to a body, as `src/store/redis/mod.rs` composes them). If that
/// composition changes, the calls show under the hash's first 8 digits; FCALL shows the function
/// name itself.
fn script_names() -> BTreeMap<String, &'static str> {
    const COMMON: &str = include_str!("../../src/store/lua/common.lua");
    let with_common = [
        ("register", include_str!("../../src/store/lua/register.lua")),
        (
            "heartbeat",
            include_str!("../../src/store/lua/heartbeat.lua"),
        ),
        (
            "rebalance",
            include_str!("../../src/store/lua/rebalance.lua"),
        ),
        ("release", include_str!("../../src/store/lua/release.lua")),
        (
            "deregister",
            include_str!("../../src/store/lua/deregister.lua"),
        ),
    ];
    let mut names = BTreeMap::new();
    for (name, body) in with_common {
        names.insert(sha1_hex(&format!("{COMMON}\n{body}")), name);
    }
    names.insert(
        sha1_hex(include_str!("../../src/store/lua/heartbeat_fast.lua")),
        "heartbeat_fast",
    );
    names.insert(
        sha1_hex(&format!(
            "#!lua flags=no-writes\n{COMMON}\n{}",
            include_str!("../../src/store/lua/snapshot.lua")
        )),
        "snapshot",
    );
    names
}

fn sha1_hex(text: &str) -> String {
    sha1_smol::Sha1::from(text).digest().to_string()
}

/// Script calls and server µs by script, from a SLOWLOG sample.
pub type ByScript = BTreeMap<String, (u64, u64)>;

/// Logs every command to the SLOWLOG from now on (its duration is the one INFO commandstats
/// counts), dropping what was logged before.
async fn slowlog_on(conn: &mut redis::aio::MultiplexedConnection) -> Result<(), String> {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg(20_000)
        .arg("slowlog-log-slower-than")
        .arg(0)
        .query_async(conn)
        .await
        .map_err(|e| format!("CONFIG SET slowlog: {e}"))?;
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(conn)
        .await
        .map_err(|e| format!("SLOWLOG RESET: {e}"))?;
    Ok(())
}

/// Stops logging and sums the log by script.
async fn slowlog_take(
    conn: &mut redis::aio::MultiplexedConnection,
    names: &BTreeMap<String, &'static str>,
) -> Result<ByScript, String> {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(10_000)
        .query_async(conn)
        .await
        .map_err(|e| format!("CONFIG SET slowlog: {e}"))?;
    let log: redis::Value = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .map_err(|e| format!("SLOWLOG GET: {e}"))?;
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(conn)
        .await
        .map_err(|e| format!("SLOWLOG RESET: {e}"))?;
    let mut by = ByScript::new();
    let redis::Value::Array(entries) = log else {
        return Err(format!("SLOWLOG GET: unexpected reply {log:?}"));
    };
    let text = |v: &redis::Value| -> String {
        match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            other => format!("{other:?}"),
        }
    };
    for entry in entries {
        // [id, timestamp, µs, [argv...], client addr, client name]
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let (Some(redis::Value::Int(usec)), Some(redis::Value::Array(argv))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        let Some(cmd) = argv.first().map(|v| text(v).to_ascii_lowercase()) else {
            continue;
        };
        if !SCRIPT_COMMANDS.contains(&cmd.as_str()) {
            continue;
        }
        let target = argv.get(1).map(text).unwrap_or_default();
        let name = match cmd.as_str() {
            // `rb_<version>_<script>`: the script's name.
            "fcall" | "fcall_ro" => target
                .strip_prefix("rb_")
                .and_then(|rest| rest.split_once('_'))
                .map_or(target.clone(), |(_, script)| script.to_string()),
            "eval" => "eval (text)".to_string(),
            _ => names
                .get(&target)
                .map_or_else(|| target.chars().take(8).collect(), |n| (*n).to_string()),
        };
        let slot = by.entry(name).or_default();
        slot.0 += 1;
        slot.1 += u64::try_from(*usec).unwrap_or(0);
    }
    Ok(by)
}

/// A SLOWLOG sample that could not be read (a large log can outlast the client's reply
/// timeout): the split by script is left out, the rest of the run stands.
fn sample_lost(error: &str) -> ByScript {
    println!("  [warning] per-script sample lost: {error}");
    ByScript::new()
}

/// One membership change (or the cold start) as measured.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Time to balance from the change (None: not within the limit).
    pub balanced_after: Option<Duration>,
    /// Script calls in the change's window (until balanced + settle).
    pub calls: f64,
    /// The same, minus what the steady rate would have made in that window.
    pub calls_net: f64,
    /// Redis CPU in the window, s.
    pub redis_cpu_s: f64,
    /// Mean server µs per call in the window.
    pub usec_per_call: f64,
    /// PUBLISH commands in the window.
    pub publish: f64,
    /// Buckets granted in the window.
    pub moved: usize,
    /// The fewest grants that could balance it.
    pub optimal: usize,
    /// Member-side CPU in the window, s.
    pub member_cpu_s: f64,
    /// Calls by script (SLOWLOG sample of the window).
    pub by_script: ByScript,
}

/// The outcome of one run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Members started together.
    pub members: usize,
    /// Buckets.
    pub buckets: u32,
    /// ttl, heartbeat (s).
    pub ttl_s: f64,
    /// Heartbeat, s.
    pub heartbeat_s: f64,
    /// Time until every `start()` returned Ok (or gave up).
    pub starts_returned: Duration,
    /// Failed `start()` calls (each retried).
    pub start_failures: usize,
    /// Members that never started within the start limit.
    pub start_gave_up: usize,
    /// A few distinct start errors.
    pub start_errors: Vec<String>,
    /// The first grant, from the first start() call (≈ the end of the quarantine).
    pub first_grant: Option<Duration>,
    /// Cold start: from the first start() call to balanced, calls, CPU…
    pub cold: Change,
    /// Balanced this long after the first grant.
    pub cold_after_quarantine: Option<Duration>,
    /// Steady state: script calls per second.
    pub steady_calls_per_s: f64,
    /// Steady state: Redis CPU, ms per s.
    pub steady_cpu_ms_per_s: f64,
    /// Steady state: server µs per call.
    pub steady_usec_per_call: f64,
    /// Steady state: member-side CPU, ms per s.
    pub steady_member_cpu_ms_per_s: f64,
    /// Steady state by script (a SLOWLOG sample after the window).
    pub steady_by_script: ByScript,
    /// One join.
    pub join: Option<Change>,
    /// One graceful leave.
    pub leave: Option<Change>,
    /// RSS at the end, and its peak, MiB.
    pub rss_mib: (f64, f64),
    /// Member-side CPU over the whole run, s.
    pub member_cpu_s: f64,
    /// S1/S2 violations and coverage failures; empty means safe.
    pub violations: Vec<String>,
    /// Receivers that lagged (events lost to the checker: the check is then incomplete).
    pub lagged: usize,
}

struct Fleet {
    cfg: Config,
    group: String,
    members: Vec<Member>,
    timeline: Arc<Mutex<Timeline>>,
    lagged: Arc<Mutex<usize>>,
}

impl Fleet {
    /// Starts one member, retrying failed starts. Returns the member or the errors seen.
    async fn start_one(
        cfg: Config,
        group: String,
        id: String,
        failures: Arc<Mutex<Vec<String>>>,
        timeline: Arc<Mutex<Timeline>>,
        lagged: Arc<Mutex<usize>>,
    ) -> Option<Member> {
        let began = Instant::now();
        loop {
            let attempt = async {
                let store = RedisStore::connect(&cfg.url)
                    .await
                    .map_err(|e| e.to_string())?;
                Member::builder(store, group.clone())
                    .id(id.clone())
                    .buckets(cfg.buckets)
                    .ttl(cfg.ttl)
                    .heartbeat(cfg.heartbeat)
                    .start()
                    .await
                    .map_err(|e| e.to_string())
            };
            match attempt.await {
                Ok(member) => {
                    // The stream opens with what the member already holds: nothing is missed.
                    let rx = member.events();
                    tokio::spawn(collect(id, rx, timeline, lagged));
                    return Some(member);
                }
                Err(e) => {
                    if let Ok(mut f) = failures.lock() {
                        f.push(e);
                    }
                    if began.elapsed() >= cfg.start_limit {
                        return None;
                    }
                    tokio::time::sleep(cfg.start_retry).await;
                }
            }
        }
    }

    fn counts(&self) -> Vec<usize> {
        self.members.iter().map(|m| m.buckets().len()).collect()
    }

    /// Every bucket owned by exactly one member and each member within its share (all weights 1).
    fn balanced(&self) -> bool {
        let n = self.members.len();
        if n == 0 {
            return false;
        }
        let lo = self.cfg.buckets as usize / n;
        let hi = lo + usize::from(self.cfg.buckets as usize % n != 0);
        let counts = self.counts();
        counts.iter().sum::<usize>() == self.cfg.buckets as usize
            && counts.iter().all(|&c| c >= lo && c <= hi)
    }

    async fn until_balanced(&self, from: Instant) -> Option<Duration> {
        loop {
            if self.balanced() {
                return Some(from.elapsed());
            }
            if from.elapsed() > self.cfg.balance_limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// After a convergence: each bucket has exactly one owner among the members.
    fn coverage(&self, when: &str) -> Vec<String> {
        let mut owners = vec![0u32; self.cfg.buckets as usize];
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
            problems.push(format!(
                "{when}: {unowned} buckets unowned after convergence"
            ));
        }
        if doubled > 0 {
            problems.push(format!("{when}: {doubled} buckets owned twice"));
        }
        problems
    }

    /// Buckets acquired in `[from, to]` (the members' own event times). Counted a moment
    /// later: the balance is read from the members, and their events reach the timeline
    /// through channels that may still hold the last of them (a cold start at 100 members
    /// once counted 50,529 of 65,536).
    async fn acquisitions(&self, from: Instant, to: Instant) -> usize {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.timeline
            .lock()
            .map(|t| t.acquisitions(from, to))
            .unwrap_or(0)
    }
}

/// Feeds one member's events to the shared timeline until the member is gone.
async fn collect(
    id: String,
    mut rx: Events,
    timeline: Arc<Mutex<Timeline>>,
    lagged: Arc<Mutex<usize>>,
) {
    while let Some(event) = rx.next().await {
        if matches!(event, Event::Lagged { .. }) {
            if let Ok(mut l) = lagged.lock() {
                *l += 1;
            }
        } else if let Ok(mut t) = timeline.lock() {
            t.push(&id, &event);
        }
    }
}

/// Settling time after a balance, so the calls that follow a change (late wake-ups, re-checks)
/// are counted with it.
const SETTLE: Duration = Duration::from_secs(1);

/// Runs one configuration. Errors are problems of the harness (Redis unreachable), not results.
pub async fn run(cfg: Config) -> Result<Report, String> {
    let client = redis::Client::open(cfg.url.as_str()).map_err(|e| format!("url: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // A saturated Redis answers the harness late too; its readings must not be cut off.
    conn.set_response_timeout(Duration::from_secs(60));
    let names = script_names();
    let group = format!(
        "scale-{}-{}x{}",
        std::process::id(),
        cfg.members,
        cfg.buckets
    );
    let mut fleet = Fleet {
        cfg: cfg.clone(),
        group: group.clone(),
        members: Vec::new(),
        // Every stream is read from its member's start: an end of a bucket the member was not
        // seen to own is a violation too.
        timeline: Arc::new(Mutex::new(Timeline::new().complete_streams())),
        lagged: Arc::new(Mutex::new(0)),
    };
    let mut report = Report {
        members: cfg.members,
        buckets: cfg.buckets,
        ttl_s: cfg.ttl.as_secs_f64(),
        heartbeat_s: cfg.heartbeat.as_secs_f64(),
        ..Report::default()
    };
    let cpu_at_start = process_cpu_s();

    // Cold start: every start() spawned together.
    let failures = Arc::new(Mutex::new(Vec::new()));
    let before = counters(&mut conn).await?;
    let began = Instant::now();
    let starts: Vec<_> = (0..cfg.members)
        .map(|i| {
            tokio::spawn(Fleet::start_one(
                cfg.clone(),
                group.clone(),
                format!("m{i:04}"),
                Arc::clone(&failures),
                Arc::clone(&fleet.timeline),
                Arc::clone(&fleet.lagged),
            ))
        })
        .collect();
    for start in starts {
        match start.await {
            Ok(Some(member)) => fleet.members.push(member),
            _ => report.start_gave_up += 1,
        }
    }
    report.starts_returned = began.elapsed();
    {
        let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
        report.start_failures = failures.len();
        let mut distinct: Vec<String> = Vec::new();
        for f in failures {
            if distinct.len() < 5 && !distinct.contains(&f) {
                distinct.push(f);
            }
        }
        report.start_errors = distinct;
    }
    println!(
        "  [progress] start() calls returned after {:.2} s ({} failed attempts, {} gave up)",
        report.starts_returned.as_secs_f64(),
        report.start_failures,
        report.start_gave_up
    );
    let cold_balanced = fleet.until_balanced(began).await;
    println!("  [progress] cold start balanced: {cold_balanced:?} after the first start()");
    let balanced_at = Instant::now();
    let after = counters(&mut conn).await?;
    let first_grant = fleet.timeline.lock().ok().and_then(|t| {
        t.intervals()
            .0
            .values()
            .filter_map(|list| list.first().map(|i| i.start))
            .min()
    });
    report.first_grant = first_grant.map(|at| at.saturating_duration_since(began));
    report.cold_after_quarantine = match (cold_balanced, report.first_grant) {
        (Some(b), Some(q)) => Some(b.saturating_sub(q)),
        _ => None,
    };
    let d = after - before;
    report.cold = Change {
        balanced_after: cold_balanced,
        calls: d.calls,
        calls_net: d.calls,
        redis_cpu_s: d.cpu_s,
        usec_per_call: if d.calls > 0.0 { d.usec / d.calls } else { 0.0 },
        publish: d.publish,
        member_cpu_s: process_cpu_s() - cpu_at_start,
        moved: fleet.acquisitions(began, balanced_at).await,
        optimal: cfg.buckets as usize,
        by_script: ByScript::new(),
    };
    if cold_balanced.is_none() {
        report.violations.push(format!(
            "cold start: not balanced within {:?} (counts min {:?} max {:?}, {} of {} buckets owned)",
            cfg.balance_limit,
            fleet.counts().iter().min(),
            fleet.counts().iter().max(),
            fleet.counts().iter().sum::<usize>(),
            cfg.buckets
        ));
        return Ok(finish(fleet, report).await);
    }
    report.violations.extend(fleet.coverage("cold start"));

    // Steady state.
    tokio::time::sleep(2 * SETTLE).await;
    let a = counters(&mut conn).await?;
    let cpu_a = process_cpu_s();
    tokio::time::sleep(cfg.window).await;
    let b = counters(&mut conn).await?;
    let secs = cfg.window.as_secs_f64();
    let d = b - a;
    report.steady_calls_per_s = d.calls / secs;
    report.steady_cpu_ms_per_s = d.cpu_s * 1000.0 / secs;
    report.steady_usec_per_call = if d.calls > 0.0 { d.usec / d.calls } else { 0.0 };
    report.steady_member_cpu_ms_per_s = (process_cpu_s() - cpu_a) * 1000.0 / secs;
    // The per-script split of the steady state, from a short SLOWLOG sample of its own.
    if let Err(e) = slowlog_on(&mut conn).await {
        println!("  [warning] {e}");
    }
    tokio::time::sleep(cfg.window.min(Duration::from_secs(3))).await;
    report.steady_by_script = slowlog_take(&mut conn, &names)
        .await
        .unwrap_or_else(|e| sample_lost(&e));

    println!(
        "  [progress] steady: {:.1} calls/s, Redis {:.1} ms/s",
        report.steady_calls_per_s, report.steady_cpu_ms_per_s
    );

    // One join.
    let n = fleet.members.len();
    let optimal = cfg.buckets as usize / (n + 1);
    let change = measure_change(&mut fleet, &mut conn, &names, &report, optimal, |fleet| {
        Box::pin(async move {
            let id = format!("m{:04}", fleet.cfg.members);
            let failures = Arc::new(Mutex::new(Vec::new()));
            let member = Fleet::start_one(
                fleet.cfg.clone(),
                fleet.group.clone(),
                id,
                Arc::clone(&failures),
                Arc::clone(&fleet.timeline),
                Arc::clone(&fleet.lagged),
            )
            .await;
            match member {
                Some(m) => {
                    fleet.members.push(m);
                    Ok(())
                }
                None => Err(format!(
                    "join: start failed: {:?}",
                    failures.lock().map(|f| f.clone()).unwrap_or_default()
                )),
            }
        })
    })
    .await?;
    report.violations.extend(fleet.coverage("join"));
    let joined = change.balanced_after.is_some();
    report.join = Some(change);
    if !joined {
        report
            .violations
            .push("join: not balanced within the limit".into());
        return Ok(finish(fleet, report).await);
    }

    // One graceful leave: the member that held the most buckets leaves.
    let optimal = fleet.members.first().map_or(0, |m| m.buckets().len());
    let change = measure_change(&mut fleet, &mut conn, &names, &report, optimal, |fleet| {
        Box::pin(async move {
            let leaving = fleet.members.remove(0);
            leaving
                .shutdown()
                .await
                .map_err(|e| format!("leave: shutdown: {e}"))
        })
    })
    .await?;
    report.violations.extend(fleet.coverage("leave"));
    if change.balanced_after.is_none() {
        report
            .violations
            .push("leave: not balanced within the limit".into());
    }
    report.leave = Some(change);
    Ok(finish(fleet, report).await)
}

type Step<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// Makes one change and measures it up to balance + [`SETTLE`], with a SLOWLOG sample.
async fn measure_change(
    fleet: &mut Fleet,
    conn: &mut redis::aio::MultiplexedConnection,
    names: &BTreeMap<String, &'static str>,
    report: &Report,
    optimal: usize,
    step: impl for<'a> FnOnce(&'a mut Fleet) -> Step<'a>,
) -> Result<Change, String> {
    if let Err(e) = slowlog_on(conn).await {
        println!("  [warning] {e}");
    }
    let a = counters(conn).await?;
    let cpu_a = process_cpu_s();
    let began = Instant::now();
    step(fleet).await?;
    let balanced = fleet.until_balanced(began).await;
    let balanced_at = Instant::now();
    tokio::time::sleep(SETTLE).await;
    let b = counters(conn).await?;
    let window = began.elapsed().as_secs_f64();
    let by_script = slowlog_take(conn, names)
        .await
        .unwrap_or_else(|e| sample_lost(&e));
    let d = b - a;
    Ok(Change {
        balanced_after: balanced,
        calls: d.calls,
        calls_net: d.calls - report.steady_calls_per_s * window,
        redis_cpu_s: d.cpu_s,
        usec_per_call: if d.calls > 0.0 { d.usec / d.calls } else { 0.0 },
        publish: d.publish,
        member_cpu_s: process_cpu_s() - cpu_a,
        moved: fleet.acquisitions(began, balanced_at).await,
        optimal,
        by_script,
    })
}

/// Stops every member (dropped: a crash, to keep the end quick; the timeline is read before),
/// and completes the report with the checker's verdict and the process's figures.
async fn finish(fleet: Fleet, mut report: Report) -> Report {
    // Let the collectors drain what the members reported last.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(t) = fleet.timeline.lock() {
        report.violations.extend(t.violations());
    }
    report.lagged = fleet.lagged.lock().map(|l| *l).unwrap_or(0);
    if report.lagged > 0 {
        report.violations.push(format!(
            "{} event receivers lagged: the S1 check missed events",
            report.lagged
        ));
    }
    report.rss_mib = process_rss_mib();
    report.member_cpu_s = process_cpu_s();
    drop(fleet.members);
    report
}
