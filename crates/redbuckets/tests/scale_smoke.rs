//! The `scale` benchmark at a small size, as a test: 5 members × 256 buckets started together on
//! a real Redis, one join and one graceful leave. It fails on any S1/S2 violation (the checker
//! reads every member's events), on a bucket unowned or owned twice after a convergence, and on a
//! group that does not balance. It runs the benchmark's own core (`examples/scale/bench.rs`).

#[allow(dead_code)]
#[path = "../examples/scale/bench.rs"]
mod bench;

use std::time::Duration;

use redbuckets_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_start_together_join_and_leave_without_overlap() {
    let server = RedisServer::start();
    let cfg = bench::Config {
        url: format!("{}/", server.url()),
        members: 5,
        buckets: 256,
        ttl: Duration::from_secs(1),
        heartbeat: Duration::from_millis(250),
        start_retry: Duration::from_millis(200),
        start_limit: Duration::from_secs(10),
        balance_limit: Duration::from_secs(15),
        window: Duration::from_secs(1),
    };
    let report = tokio::time::timeout(Duration::from_secs(50), bench::run(cfg))
        .await
        .expect("the smoke run finishes within 50 s")
        .expect("the harness reaches Redis");
    assert!(
        report.violations.is_empty(),
        "violations: {:#?}",
        report.violations
    );
    assert_eq!(report.start_gave_up, 0, "{:?}", report.start_errors);
    assert!(report.cold.balanced_after.is_some());
    let join = report.join.expect("the join was measured");
    let leave = report.leave.expect("the leave was measured");
    assert!(join.balanced_after.is_some() && leave.balanced_after.is_some());
    // The measurements are live, not zeros: the join moved buckets and Redis ran scripts.
    assert!(join.moved > 0 && join.calls > 0.0, "{join:?}");
    assert!(leave.moved > 0 && leave.calls > 0.0, "{leave:?}");
    assert!(report.cold.calls > 0.0 && report.cold.redis_cpu_s >= 0.0);
}
