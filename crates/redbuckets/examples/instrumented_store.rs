//! A store written outside the crate: `Instrumented` wraps any store and counts and times every
//! call, the usual reason to implement [`Store`] yourself (metrics, tracing, fault injection in
//! tests). Three members share 12 buckets on the in-process `MemoryStore` (or on Redis when
//! `REDIS_URL` is set); a fourth joins, one leaves; then the calls each kind took.
//!
//! ```text
//! cargo run --example instrumented_store
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redbuckets::store::{
    Channel, GroupSnapshot, HeartbeatReply, Holdings, Notifications, RebalanceReply,
    RegisterRequest, Registration, SessionRef,
};
use redbuckets::{Error, GroupKey, Member, MemoryStore, RedisStore, Store};

/// Calls and total time per kind of call.
type Tally = Arc<Mutex<BTreeMap<&'static str, (u64, Duration)>>>;

/// Any store, with every call counted and timed.
#[derive(Clone)]
struct Instrumented<S> {
    inner: S,
    tally: Tally,
}

impl<S: Store> Instrumented<S> {
    fn new(inner: S) -> Self {
        Instrumented {
            inner,
            tally: Tally::default(),
        }
    }

    /// Runs `call`, adding its time to `name`'s tally (errors included: they cost too).
    async fn timed<T>(&self, name: &'static str, call: impl Future<Output = T>) -> T {
        let began = Instant::now();
        let out = call.await;
        let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        let entry = tally.entry(name).or_default();
        entry.0 += 1;
        entry.1 += began.elapsed();
        out
    }
}

impl<S: Store> Store for Instrumented<S> {
    async fn register(&self, g: &GroupKey, req: &RegisterRequest) -> Result<Registration, Error> {
        self.timed("register", self.inner.register(g, req)).await
    }

    async fn heartbeat(
        &self,
        g: &GroupKey,
        s: &SessionRef,
        ttl: Duration,
        watch: Duration,
    ) -> Result<HeartbeatReply, Error> {
        self.timed("heartbeat", self.inner.heartbeat(g, s, ttl, watch))
            .await
    }

    async fn rebalance(
        &self,
        g: &GroupKey,
        s: &SessionRef,
        max_take: u32,
    ) -> Result<RebalanceReply, Error> {
        self.timed("rebalance", self.inner.rebalance(g, s, max_take))
            .await
    }

    async fn release(
        &self,
        g: &GroupKey,
        s: &SessionRef,
        buckets: &[u32],
        known: u64,
    ) -> Result<u32, Error> {
        self.timed("release", self.inner.release(g, s, buckets, known))
            .await
    }

    // Forwarded, not left to the default (a release then a deregistration): the wrapped
    // store's one-step leave wakes the takers once.
    async fn leave(&self, g: &GroupKey, s: &SessionRef, buckets: &[u32]) -> Result<u32, Error> {
        self.timed("leave", self.inner.leave(g, s, buckets)).await
    }

    async fn deregister(&self, g: &GroupKey, s: &SessionRef) -> Result<(), Error> {
        self.timed("deregister", self.inner.deregister(g, s)).await
    }

    async fn snapshot(&self, g: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        self.timed("snapshot", self.inner.snapshot(g)).await
    }

    async fn holdings(&self, g: &GroupKey, s: &SessionRef) -> Result<Option<Holdings>, Error> {
        self.timed("holdings", self.inner.holdings(g, s)).await
    }

    async fn subscribe(&self, g: &GroupKey, c: Channel<'_>) -> Result<Notifications, Error> {
        self.timed("subscribe", self.inner.subscribe(g, c)).await
    }
}

async fn member<S: Store>(store: S, id: &str) -> Result<Member, Error> {
    Member::builder(store, "instrumented")
        .id(id)
        .buckets(12)
        .heartbeat(Duration::from_millis(200))
        .ttl(Duration::from_secs(1))
        .start()
        .await
}

async fn run<S: Store>(store: S) -> Result<(), Error> {
    let store = Instrumented::new(store);
    let mut members = Vec::new();
    for id in ["a", "b", "c"] {
        members.push(member(store.clone(), id).await?);
    }
    // A new group grants nothing during its first ttl.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    members.push(member(store.clone(), "d").await?);
    tokio::time::sleep(Duration::from_millis(200)).await;
    members.remove(0).shutdown().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for m in &members {
        println!("{} owns {:?}", m.id(), m.buckets());
    }
    for m in members {
        m.shutdown().await?;
    }
    let tally = store.tally.lock().unwrap_or_else(|e| e.into_inner());
    for (call, (count, total)) in tally.iter() {
        println!("{call:>10}: {count:>3} calls, {total:?} in all");
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
