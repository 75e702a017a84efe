//! Issue 18, defect 1: a member that starts before its Redis (Docker Compose, Kubernetes) or
//! during a failover waits for it within the start budget instead of failing at once, through
//! each kind of URL; a refused password or a bad URL still fails at once.

use std::time::{Duration, Instant};

use redbuckets::{Error, Member, RedisOptions, RedisStore};
use redbuckets_testkit::{RedisCluster, RedisServer, Sentinel};

/// How long the store is down when the member starts.
const HEAD_START: Duration = Duration::from_secs(2);
/// The start budget of these members: connecting, then registering.
const BUDGET: Duration = Duration::from_secs(10);

/// Connects and starts a member of `group` at `url` within [`BUDGET`], as `redbuckets join
/// --start-timeout` does: the connect's retry budget, then what is left of it for `start`.
async fn join(url: String, group: &'static str) -> Result<(Member, Duration), Error> {
    let began = Instant::now();
    let options = RedisOptions::default().connect_retry(BUDGET);
    let store = RedisStore::connect_with(&url, options).await?;
    let member = Member::builder(store, group)
        .buckets(8)
        .heartbeat(Duration::from_millis(100))
        .ttl(Duration::from_millis(500))
        .start_timeout(BUDGET.saturating_sub(began.elapsed()))
        .start()
        .await?;
    Ok((member, began.elapsed()))
}

async fn joined_after_head_start(
    joining: tokio::task::JoinHandle<Result<(Member, Duration), Error>>,
) {
    let (member, took) = joining.await.expect("join task").expect("join");
    assert!(
        took >= HEAD_START && took < BUDGET,
        "joined after {took:?}: expected after the {HEAD_START:?} head start, within {BUDGET:?}"
    );
    member
        .wait_until_owned(0)
        .await
        .expect("the member owns bucket 0 after the quarantine");
    member.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_before_its_redis_joins_when_it_comes_up() {
    let mut server = RedisServer::start();
    server.stop();
    let joining = tokio::spawn(join(server.url(), "before-redis"));
    tokio::time::sleep(HEAD_START).await;
    assert!(!joining.is_finished(), "{:?}", joining.await);
    server.restart();
    joined_after_head_start(joining).await;
}

/// Through Sentinel: first the sentinel knows no primary of that name (a member started during
/// a failover, or before the sentinels were configured), then it names one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_before_sentinel_names_a_primary_joins_when_it_does() {
    let primary = RedisServer::start();
    let sentinel = Sentinel::start(&primary);
    assert!(sentinel
        .cli(&["SENTINEL", "REMOVE", "mymaster"])
        .contains("OK"));
    let joining = tokio::spawn(join(sentinel.url(), "before-sentinel"));
    tokio::time::sleep(HEAD_START).await;
    assert!(!joining.is_finished(), "{:?}", joining.await);
    let port = primary.port().to_string();
    let reply = sentinel.cli(&["SENTINEL", "MONITOR", "mymaster", "127.0.0.1", &port, "1"]);
    assert!(reply.contains("OK"), "{reply}");
    joined_after_head_start(joining).await;
}

/// Through Sentinel, while the primary it names is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_while_the_sentinels_primary_is_down_joins_when_it_is_back() {
    let mut primary = RedisServer::start();
    let sentinel = Sentinel::start(&primary);
    primary.stop();
    let joining = tokio::spawn(join(sentinel.url(), "primary-down"));
    tokio::time::sleep(HEAD_START).await;
    assert!(!joining.is_finished(), "{:?}", joining.await);
    primary.restart();
    joined_after_head_start(joining).await;
}

/// Through `redis+cluster://`: every node down when the member starts, then the cluster back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_before_its_redis_cluster_joins_when_it_comes_up() {
    let mut cluster = RedisCluster::start();
    cluster.stop_all();
    let joining = tokio::spawn(join(cluster.url(), "before-cluster"));
    tokio::time::sleep(HEAD_START).await;
    assert!(!joining.is_finished(), "{:?}", joining.await);
    tokio::task::block_in_place(|| cluster.restart_all());
    joined_after_head_start(joining).await;
}

/// A port that accepts and never answers: retried for the whole budget, not one call budget.
#[tokio::test]
async fn a_silent_port_is_retried_for_the_budget() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "redis://127.0.0.1:{}",
        silent.local_addr().expect("addr").port()
    );
    let options = RedisOptions::default()
        .connection_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300))
        .connect_retry(Duration::from_secs(2));
    let began = Instant::now();
    let e = RedisStore::connect_with(&url, options)
        .await
        .expect_err("nothing answers");
    let took = began.elapsed();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("attempts"), "{e}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

/// What waiting does not cure fails at once, with the default 30 s retry budget.
#[tokio::test]
async fn a_refused_password_or_a_bad_url_fails_at_once() {
    let server = RedisServer::start_with(&["--requirepass", "right"]);
    let began = Instant::now();
    let wrong = format!("redis://:wrong@127.0.0.1:{}", server.port());
    match RedisStore::connect(&wrong).await {
        Err(Error::Refused { detail }) => assert!(!detail.contains("wrong@"), "{detail}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let none = server.url();
    assert!(matches!(
        RedisStore::connect(&none).await,
        Err(Error::Refused { .. })
    ));
    for bad in [
        "not a url",
        "http://127.0.0.1:6379",
        "redis+sentinel://127.0.0.1:1",
    ] {
        let at = Instant::now();
        match RedisStore::connect(bad).await {
            Err(Error::Url { .. }) => assert!(at.elapsed() < Duration::from_millis(500)),
            other => panic!("{bad}: expected Url, got {other:?}"),
        }
    }
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
}
