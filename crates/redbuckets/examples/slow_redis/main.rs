//! A slow Redis sees fewer calls, not more (DESIGN.md, Robustness).
//!
//! Starts its own `redis-server`, a fleet of members on it, and measures the script calls Redis
//! runs per second (`INFO commandstats`) and its CPU (`used_cpu_sys + used_cpu_user`) before,
//! during and after a phase in which a second connection loops `DEBUG SLEEP`: Redis answers
//! nothing while it sleeps, so calls queue, and those that outlast the call timeout fail and
//! are retried (with backoff). Then checks that the fleet balances again, every bucket owned
//! once, with no two owners at any instant (`redbuckets::check`).
//!
//! ```text
//! cargo run --release -p redbuckets --example slow_redis -- [members] [sleep-ms] [call-timeout-ms]
//! ```
//! Defaults: 20 members, 1,024 buckets, ttl 3 s, heartbeat 1 s, `DEBUG SLEEP 0.3`, the
//! library's call timeout (a third of the ttl here: 1 s): Redis is slow but every call
//! answers in time, so nothing is retried. Sleeps longer than the call timeout make calls fail
//! and be retried, which is where the backoff shows: `slow_redis 20 1500` (a third of the
//! calls time out, the leases run out) or `slow_redis 20 300 250` (one in six times out).

mod run;

use std::time::Duration;

use redbuckets_testkit::RedisServer;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let arg = |i: usize| std::env::args().nth(i).and_then(|a| a.parse::<u64>().ok());
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let cfg = run::Config {
        url: format!("{}/", server.url()),
        members: arg(1).map_or(20, |n| n as usize),
        buckets: 1024,
        ttl: Duration::from_secs(3),
        heartbeat: Duration::from_secs(1),
        call_timeout: arg(3).map(Duration::from_millis),
        sleep: Duration::from_millis(arg(2).unwrap_or(300)),
        window: Duration::from_secs(10),
        balance_limit: Duration::from_secs(30),
    };
    println!(
        "{} members, {} buckets, ttl {:?}, heartbeat {:?}, call timeout {}, DEBUG SLEEP {:?} looped, windows of {:?}",
        cfg.members,
        cfg.buckets,
        cfg.ttl,
        cfg.heartbeat,
        cfg.call_timeout
            .map_or("default".to_string(), |t| format!("{t:?}")),
        cfg.sleep,
        cfg.window
    );
    let report = run::run(cfg).await?;
    for (phase, rate) in [
        ("before", report.before),
        ("during", report.during),
        ("after", report.after),
    ] {
        println!(
            "{phase:>7}: {:7.1} script calls/s, redis CPU {:5.1}%, {:4} member errors",
            rate.calls_per_s,
            rate.cpu * 100.0,
            rate.errors
        );
    }
    println!(
        "balanced again {} after the slow phase; {} buckets lost during it; coverage {}; S1/S2 violations: {}",
        report
            .rebalanced_after
            .map_or("NOT".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        report.lost,
        if report.coverage.is_empty() {
            "ok".to_string()
        } else {
            report.coverage.join(", ")
        },
        report.violations.len()
    );
    for v in report.violations.iter().take(10) {
        println!("  {v}");
    }
    Ok(())
}
