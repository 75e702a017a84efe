//! How `RedisStore` runs its scripts (issue 10, item 4): as functions of one library (`FCALL`),
//! loaded again whenever the server lost it, and with `EVALSHA` where functions are refused.
//! The staleness check reads the server's run id once per Redis process in function mode.
//! Each test starts its own `redis-server` (the testkit's `RedisServer`).

use std::time::Duration;

use redbuckets::store::{Action, RegisterRequest, SessionRef};
use redbuckets::{GroupKey, RedisOptions, RedisStore, Store};
use redbuckets_testkit::{RedisInfo, RedisServer};

const TTL: Duration = Duration::from_secs(10);

fn session(member: &str) -> SessionRef {
    SessionRef {
        member: member.to_string(),
        session: "1".to_string(),
    }
}

/// Registers `a`, lifts the quarantine, and checks that a heartbeat and a rebalance work.
async fn join(store: &RedisStore, server: &RedisServer, g: &GroupKey) {
    let a = session("a");
    store
        .register(g, &RegisterRequest::new(a.clone(), 1, 4, TTL))
        .await
        .expect("register");
    server.cli(&["HSET", &format!("{}:meta", g.tag()), "grant_after_us", "0"]);
    calls_work(store, g).await;
}

/// A heartbeat, a rebalance and a snapshot of `a`'s live session.
async fn calls_work(store: &RedisStore, g: &GroupKey) {
    let a = session("a");
    assert!(
        store
            .heartbeat(g, &a, TTL, Duration::MAX)
            .await
            .expect("heartbeat")
            .alive
    );
    let r = store.rebalance(g, &a, 4).await.expect("rebalance");
    assert!(
        matches!(r.action, Action::Acquired { .. } | Action::Stay),
        "{r:?}"
    );
    let snap = store.snapshot(g).await.expect("snapshot").expect("group");
    assert_eq!(snap.owners.len(), 4);
}

/// `calls=` of one command in `INFO commandstats`.
fn calls(server: &RedisServer, command: &str) -> u64 {
    RedisInfo::parse(server.cli(&["INFO", "commandstats"])).command(command, "calls") as u64
}

/// The names of the libraries loaded on the server.
fn libraries(server: &RedisServer) -> Vec<String> {
    let listed = server.cli(&["FUNCTION", "LIST"]);
    let mut lines = listed.lines();
    let mut names = Vec::new();
    while let Some(line) = lines.next() {
        if line.trim() == "library_name" {
            if let Some(name) = lines.next() {
                names.push(name.trim().to_string());
            }
        }
    }
    names
}

#[tokio::test]
async fn calls_survive_function_flush_script_flush_and_a_restart() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let g = GroupKey::new("t", "flush");
    join(&store, &server, &g).await;
    assert_eq!(libraries(&server).len(), 1, "one library");
    assert!(calls(&server, "fcall") > 0);
    assert_eq!(calls(&server, "evalsha"), 0, "functions, not EVALSHA");

    server.cli(&["FUNCTION", "FLUSH"]);
    calls_work(&store, &g).await;
    assert_eq!(libraries(&server).len(), 1, "loaded again");

    // Concurrent calls that all miss the library: one loads it, the others hear "already
    // exists", and every call is answered.
    server.cli(&["FUNCTION", "FLUSH"]);
    let a = session("a");
    let beats = (0..8).map(|_| store.heartbeat(&g, &a, TTL, Duration::MAX));
    for hb in futures_util::future::join_all(beats).await {
        assert!(hb.expect("heartbeat").alive);
    }
    assert_eq!(libraries(&server).len(), 1);

    server.cli(&["SCRIPT", "FLUSH"]);
    calls_work(&store, &g).await;

    // Without persistence the group and the library are gone; the store reloads the library
    // and the group starts again.
    server.restart();
    let a = session("a");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let hb = loop {
        match store.heartbeat(&g, &a, TTL, Duration::MAX).await {
            Ok(hb) => break hb,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("heartbeat after a restart: {e}"),
        }
    };
    assert!(!hb.alive, "the session died with the data");
    join(&store, &server, &g).await;
    assert_eq!(calls(&server, "evalsha"), 0, "still functions");
}

/// An ACL user allowed EVAL and EVALSHA but not FUNCTION or FCALL gets the EVALSHA path.
#[tokio::test]
async fn a_user_without_functions_gets_evalsha() {
    let server = RedisServer::start();
    server.cli(&[
        "ACL",
        "SETUSER",
        "nofn",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@all",
        "-fcall",
        "-fcall_ro",
        "-function",
    ]);
    let url = format!("redis://nofn:pw@127.0.0.1:{}", server.port());
    let store = RedisStore::connect(&url).await.expect("connect");
    let g = GroupKey::new("t", "acl");
    join(&store, &server, &g).await;
    assert!(libraries(&server).is_empty());
    let evalsha = calls(&server, "evalsha");
    assert!(evalsha > 0);
    // Decided once: later calls go straight to EVALSHA.
    let refused_fcalls = calls(&server, "fcall");
    calls_work(&store, &g).await;
    assert_eq!(calls(&server, "fcall"), refused_fcalls, "asked FCALL again");
    assert_eq!(calls(&server, "evalsha"), evalsha + 3);
}

/// A server without FCALL (as Redis before 7.0 answers: unknown command) gets EVALSHA; one
/// without EVALSHA runs functions.
#[tokio::test]
async fn each_missing_command_has_a_way_around() {
    let server = RedisServer::start_with(&["--rename-command", "FCALL", ""]);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let g = GroupKey::new("t", "old");
    join(&store, &server, &g).await;
    assert!(calls(&server, "evalsha") > 0);

    let server = RedisServer::start_with(&["--rename-command", "EVALSHA", ""]);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    join(&store, &server, &g).await;
    assert!(calls(&server, "fcall") > 0);
}

/// Two versions of the library (here the normal one and the frozen-clock one; across releases,
/// two redbuckets versions in a rolling upgrade) are loaded side by side and both serve calls.
#[tokio::test]
async fn two_library_versions_coexist() {
    let server = RedisServer::start();
    let normal = RedisStore::connect(&server.url()).await.expect("connect");
    let other = RedisStore::connect_with(
        &server.url(),
        RedisOptions::default().frozen_clock_for_tests(),
    )
    .await
    .expect("connect");
    let g = GroupKey::new("t", "upgrade");
    join(&normal, &server, &g).await;
    let b = session("b");
    other
        .register(&g, &RegisterRequest::new(b.clone(), 1, 4, TTL))
        .await
        .expect("register b");
    assert!(
        other
            .heartbeat(&g, &b, TTL, Duration::MAX)
            .await
            .expect("hb")
            .alive
    );
    let a = session("a");
    assert!(
        normal
            .heartbeat(&g, &a, TTL, Duration::MAX)
            .await
            .expect("hb")
            .alive
    );
    // b's join (through the other library) committed a's release; a's step says so.
    let r = normal.rebalance(&g, &a, 4).await.expect("rebalance a");
    assert!(
        matches!(r.action, Action::Stay) && (r.committed, r.held) == (2, 4),
        "{r:?}"
    );
    let snap = other.snapshot(&g).await.expect("snapshot").expect("group");
    assert_eq!(snap.members.len(), 2);
    let libs = libraries(&server);
    assert_eq!(libs.len(), 2, "{libs:?}");
    assert!(
        libs.iter().all(|l| l.starts_with("redbuckets_")),
        "{libs:?}"
    );
    assert_eq!(calls(&server, "evalsha"), 0);
}

/// In function mode the run id is read (`INFO server`) once per Redis process, not per
/// granting call; after a restart that reloads the data and the library, the new process
/// reads its own id, so the reloaded group is still found stale and re-created.
#[tokio::test]
async fn the_run_id_is_read_once_per_redis_process() {
    let dir = std::env::temp_dir().join(format!("redbuckets-fn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let dir_arg = dir.display().to_string();
    let mut server = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ]);
    let store = RedisStore::connect(&server.url()).await.expect("connect");
    let g = GroupKey::new("t", "runid");
    join(&store, &server, &g).await;
    let a = session("a");
    // Each `calls` reads INFO once itself.
    let before = calls(&server, "info");
    for _ in 0..5 {
        store.rebalance(&g, &a, 4).await.expect("rebalance");
        store.snapshot(&g).await.expect("snapshot");
    }
    assert_eq!(calls(&server, "info"), before + 1, "INFO per call");

    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let snap = loop {
        match store.snapshot(&g).await {
            Ok(snap) => break snap,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("snapshot after a restart: {e}"),
        }
    };
    let snap = snap.expect("the group was reloaded from the append-only file");
    assert!(snap.stale, "another process wrote the group");
    assert_eq!(libraries(&server).len(), 1, "the library was reloaded too");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
