//! A store built from the application's own client configuration (issue 22): a
//! `redis::Client` for one server (RESP3, a password), a `SentinelClient`, and a Redis
//! Cluster's nodes as `redis::ConnectionInfo`s. Two members share a group on each and balance;
//! a client with a wrong password is refused at once, without showing it.

use std::time::{Duration, Instant};

use redbuckets::{Error, Member, RedisOptions, RedisStore, Store};
use redbuckets_testkit::{RedisCluster, RedisServer, Sentinel};
use redis::IntoConnectionInfo;

const B: u32 = 16;

/// Two members of `name` on `store`, balanced (8 buckets each); both leave.
async fn two_members_balance<S: Store>(store: S, name: &str) {
    let mut members: Vec<Member> = Vec::new();
    for id in ["a", "b"] {
        members.push(
            Member::builder(store.clone(), name)
                .id(id)
                .buckets(B)
                .heartbeat(Duration::from_millis(100))
                .ttl(Duration::from_millis(500))
                .start()
                .await
                .expect("start"),
        );
    }
    let began = Instant::now();
    while members
        .iter()
        .map(|m| m.buckets().len())
        .collect::<Vec<_>>()
        != [8, 8]
    {
        assert!(began.elapsed() < Duration::from_secs(10), "not balanced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for m in members {
        m.shutdown().await.expect("leave");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_the_applications_redis_client() {
    let server = RedisServer::start_with(&["--requirepass", "s3cr3t-pw"]);
    let url = format!(
        "redis://:s3cr3t-pw@127.0.0.1:{}/?protocol=resp3",
        server.port()
    );
    let client = redis::Client::open(url).expect("client");
    let store = RedisStore::from_client(client, RedisOptions::default())
        .await
        .expect("store");
    two_members_balance(store, "own-client").await;

    let wrong = format!("redis://:wr0ng-pw@127.0.0.1:{}/", server.port());
    let began = Instant::now();
    match RedisStore::from_client(
        redis::Client::open(wrong).expect("client"),
        RedisOptions::default(),
    )
    .await
    {
        Err(e @ Error::Refused { .. }) => {
            assert!(!e.to_string().contains("wr0ng-pw"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_the_applications_sentinel_client() {
    let primary = RedisServer::start();
    let sentinel = Sentinel::start(&primary);
    // redis+sentinel://127.0.0.1:<port>/mymaster: the sentinel's own address.
    let port = sentinel
        .url()
        .trim_start_matches("redis+sentinel://127.0.0.1:")
        .trim_end_matches("/mymaster")
        .to_string();
    let client = redis::sentinel::SentinelClient::build(
        vec![format!("redis://127.0.0.1:{port}")],
        "mymaster",
        None,
        redis::sentinel::SentinelServerType::Master,
    )
    .expect("sentinel client");
    let store = RedisStore::from_sentinel_client(client, "mymaster", RedisOptions::default())
        .await
        .expect("store");
    two_members_balance(store, "own-sentinel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_the_applications_cluster_nodes() {
    let cluster = RedisCluster::start();
    let nodes = cluster.nodes().iter().map(|n| {
        format!("redis://127.0.0.1:{}", n.port())
            .into_connection_info()
            .expect("connection info")
    });
    let store = RedisStore::from_cluster_nodes(nodes, RedisOptions::default())
        .await
        .expect("store");
    two_members_balance(store, "own-cluster").await;
}
