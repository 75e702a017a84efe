//! Three members share 12 buckets; a fourth joins, one leaves. On the in-process `MemoryStore`,
//! or on Redis when `REDIS_URL` is set. SIGTERM or Ctrl-C ends it early, every member leaving
//! gracefully (`redbuckets::shutdown_signal`).
//!
//! ```text
//! cargo run --example quickstart
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example quickstart
//! ```

use std::future::Future;
use std::time::Duration;

use redbuckets::{Error, Member, MemoryStore, RedisStore, Store};

async fn member<S: Store>(store: S, id: &str) -> Result<Member, Error> {
    Member::builder(store, "quickstart")
        .id(id)
        .buckets(12)
        .heartbeat(Duration::from_millis(200))
        .ttl(Duration::from_secs(1))
        .start()
        .await
}

fn show(members: &[Member]) {
    for m in members {
        println!("  {} owns {:?}", m.id(), m.buckets());
    }
}

/// Waits `d`, or less when the process is asked to stop (`stop` completed): then `false`.
async fn pause(d: Duration, stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stop.as_mut() => false,
    }
}

async fn run<S: Store>(store: S) -> Result<(), Error> {
    // SIGTERM or Ctrl-C at any point: every member still running leaves gracefully.
    let stop = redbuckets::shutdown_signal();
    tokio::pin!(stop);
    let mut members = Vec::new();
    for id in ["a", "b", "c"] {
        members.push(member(store.clone(), id).await?);
    }
    // A new group grants nothing during its first ttl: a member that held buckets before a
    // store restart must have given them up before anyone else can take them.
    if pause(Duration::from_millis(1200), &mut stop).await {
        println!("three members:");
        show(&members);

        members.push(member(store.clone(), "d").await?);
        if pause(Duration::from_millis(100), &mut stop).await {
            println!("d joined:");
            show(&members);

            let leaving = members.remove(0);
            leaving.shutdown().await?;
            if pause(Duration::from_millis(100), &mut stop).await {
                println!("a left:");
                show(&members);
            }
        }
    }

    for m in members {
        m.shutdown().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    match std::env::var("REDIS_URL") {
        Ok(url) => run(RedisStore::connect(&url).await?).await,
        Err(_) => run(MemoryStore::new()).await,
    }
}
