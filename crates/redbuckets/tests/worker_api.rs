//! The worker API (issue 9): subscriptions that open with what is owned and report lag, leases
//! made at the grant, the cloneable handle and the owner's shutdown, drain extension, the
//! quarantine in the status, a duplicate id, the drop WARN, and the README's worker run 100
//! times with random subscription delays. `MemoryStore` on tokio's paused clock; the last test
//! runs on a real `redis-server`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redbuckets::{Error, Event, Events, Lease, Member, MemberHandle, MemoryStore, Store};
use tokio::time::{sleep, Instant};

const HEARTBEAT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_millis(1000);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn start<S: Store>(store: S, id: &str, buckets: u32) -> Member {
    Member::builder(store, "g")
        .id(id)
        .buckets(buckets)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .start()
        .await
        .expect("start")
}

/// Everything ready in `events`, without waiting.
fn ready(events: &mut Events) -> Vec<Event> {
    std::iter::from_fn(|| events.try_next()).collect()
}

/// The buckets a subscriber believes owned after `events`: announced and not ended.
fn believed(events: &[Event]) -> BTreeSet<u32> {
    let mut owned = BTreeSet::new();
    for e in events {
        match e {
            Event::Acquired { bucket, .. } => {
                owned.insert(*bucket);
            }
            Event::Revoked { bucket, .. } | Event::Lost { bucket, .. } => {
                owned.remove(bucket);
            }
            Event::Lagged { .. } => owned.clear(),
            _ => {}
        }
    }
    owned
}

#[tokio::test(start_paused = true)]
async fn events_open_with_what_is_owned() {
    let store = MemoryStore::new();
    let a = start(store.clone(), "a", 16).await;
    sleep(TTL + HEARTBEAT * 2).await;
    assert_eq!(a.buckets().len(), 16);
    // Subscribed long after the grants: it opens with one `Acquired` per owned bucket.
    let mut events = a.events();
    let first = ready(&mut events);
    assert!(first.iter().all(|e| matches!(e, Event::Acquired { .. })));
    assert_eq!(
        believed(&first).into_iter().collect::<Vec<_>>(),
        a.buckets()
    );
    // Then live.
    let b = start(store.clone(), "b", 16).await;
    sleep(HEARTBEAT * 5).await;
    let live = ready(&mut events);
    let revoked = live
        .iter()
        .filter(|e| matches!(e, Event::Revoked { .. }))
        .count();
    assert_eq!(revoked, 8, "{live:?}");
    let all: Vec<Event> = first.into_iter().chain(live).collect();
    assert_eq!(believed(&all).into_iter().collect::<Vec<_>>(), a.buckets());
    b.abort();
}

/// The scenario: a member joins a running group and its grants come within a few
/// milliseconds of `start()`; a subscriber that comes any time later still learns every bucket.
#[tokio::test(start_paused = true)]
async fn a_late_subscriber_misses_no_grant() {
    for delay in [0u64, 1, 2, 3, 5, 8, 13, 50, 300] {
        for yields in [0usize, 1, 3, 10] {
            let store = MemoryStore::new();
            let b = start(store.clone(), "b", 42).await;
            sleep(TTL + HEARTBEAT * 2).await;
            let a = start(store.clone(), "a", 42).await;
            let handle = a.handle();
            let subscriber = tokio::spawn(async move {
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                sleep(ms(delay)).await;
                handle.events()
            });
            let mut events = subscriber.await.expect("subscriber");
            sleep(HEARTBEAT * 5).await;
            let seen = ready(&mut events);
            assert_eq!(a.buckets().len(), 21);
            assert_eq!(
                believed(&seen).into_iter().collect::<Vec<_>>(),
                a.buckets(),
                "delay {delay} ms, {yields} yields: {seen:?}"
            );
            a.abort();
            b.abort();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_lagging_subscriber_is_told_and_gets_a_fresh_snapshot() {
    let store = MemoryStore::new();
    let a = start(store.clone(), "a", 600).await;
    sleep(TTL + HEARTBEAT * 2).await;
    let mut events = a.events();
    // Churn without reading: each join and leave of another member moves 300 buckets (revoked,
    // released, acquired again): 2,700 events, over the channel's 1,216.
    for i in 0..3 {
        let b = start(store.clone(), &format!("b{i}"), 600).await;
        sleep(HEARTBEAT * 5).await;
        b.shutdown().await.expect("shutdown");
        sleep(HEARTBEAT * 5).await;
    }
    let seen = ready(&mut events);
    let lagged: Vec<usize> = (0..seen.len())
        .filter(|&i| matches!(seen[i], Event::Lagged { .. }))
        .collect();
    assert_eq!(lagged.len(), 1, "one lag, reported once");
    let Event::Lagged { missed, .. } = seen[lagged[0]] else {
        unreachable!()
    };
    assert!(missed > 0);
    // After it, a fresh snapshot: exactly what is owned now (nothing moved since).
    let after = &seen[lagged[0] + 1..];
    assert!(after.iter().all(|e| matches!(e, Event::Acquired { .. })));
    assert_eq!(after.len(), 600);
    assert_eq!(believed(&seen).into_iter().collect::<Vec<_>>(), a.buckets());
}

/// A lease is made at the grant: a bucket revoked before the worker reads its lease still
/// waits for the drain (the new owner gets it only after `drain_timeout`), and the stream
/// still yields that grant's lease, already cancelled.
#[tokio::test(start_paused = true)]
async fn a_lease_exists_from_the_grant_even_if_not_read_yet() {
    let store = MemoryStore::new();
    let drain = ms(500);
    let a = Member::builder(store.clone(), "g")
        .id("a")
        .buckets(8)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .drain_timeout(drain)
        .start()
        .await
        .expect("start");
    let mut leases = a.leases();
    let mut a_events = a.events();
    sleep(TTL + HEARTBEAT * 2).await;
    assert_eq!(a.buckets().len(), 8);
    let b = start(store.clone(), "b", 8).await;
    let mut b_events = b.events();
    sleep(drain + HEARTBEAT * 3).await;
    assert_eq!((a.buckets().len(), b.buckets().len()), (4, 4));
    let revoked: BTreeMap<u32, Instant> = ready(&mut a_events)
        .into_iter()
        .filter_map(|e| match e {
            Event::Revoked { bucket, at, .. } => Some((bucket, at)),
            _ => None,
        })
        .collect();
    assert_eq!(revoked.len(), 4);
    for e in ready(&mut b_events) {
        if let Event::Acquired { bucket, at, .. } = e {
            let gap = at - revoked[&bucket];
            assert!(
                gap >= drain,
                "bucket {bucket} moved {gap:?} after its revoke, before the unread lease drained"
            );
        }
    }
    let got: Vec<Lease> = std::iter::from_fn(|| leases.try_next()).collect();
    assert_eq!(got.len(), 8, "every grant yields its lease");
    let valid: Vec<u32> = got
        .iter()
        .filter(|l| l.is_valid())
        .map(Lease::bucket)
        .collect();
    assert_eq!(valid, a.buckets());
    b.abort();
}

#[tokio::test(start_paused = true)]
async fn handles_are_cheap_clones_and_the_owner_shuts_down() {
    let store = MemoryStore::new();
    let a = start(store.clone(), "a", 8).await;
    let handle = a.handle();
    let waiter = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.wait_until_owned(3).await })
    };
    let mut owned = handle.owned_changed();
    sleep(TTL + HEARTBEAT * 2).await;
    assert_eq!(
        waiter.await.expect("waiter").expect("owned"),
        a.token(3).expect("token")
    );
    assert!(owned.has_changed().expect("open"));
    assert_eq!(*owned.borrow_and_update(), (0..8).collect::<Vec<u32>>());

    let mut events = handle.events();
    let mut leases = handle.leases();
    let worker = tokio::spawn(async move {
        let mut n = 0;
        while let Some(lease) = leases.next().await {
            lease.cancelled().await;
            n += 1;
        }
        n
    });
    sleep(HEARTBEAT).await;
    a.shutdown().await.expect("shutdown");
    assert_eq!(
        worker.await.expect("worker"),
        8,
        "the stream ends after the leave"
    );
    assert!(handle.buckets().is_empty() && !handle.owns(3) && handle.lease(3).is_none());
    assert_eq!(handle.status().held, 0);
    assert!(matches!(
        handle.wait_until_owned(3).await,
        Err(Error::Shutdown)
    ));
    let mut seen = Vec::new();
    while let Some(e) = events.next().await {
        seen.push(e);
    }
    let count = |kind: fn(&Event) -> bool| seen.iter().filter(|e| kind(e)).count();
    assert_eq!(count(|e| matches!(e, Event::Acquired { .. })), 8);
    assert_eq!(count(|e| matches!(e, Event::Revoked { .. })), 8);
    assert_eq!(count(|e| matches!(e, Event::Released { .. })), 8);
}

#[tokio::test(start_paused = true)]
async fn a_lease_extends_its_drain_up_to_max_drain() {
    let store = MemoryStore::new();
    let a = Member::builder(store.clone(), "g")
        .id("a")
        .buckets(2)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .drain_timeout(ms(100))
        .max_drain(ms(2000))
        .start()
        .await
        .expect("start");
    let mut a_events = a.events();
    sleep(TTL + HEARTBEAT * 2).await;
    let leases: Vec<Lease> = (0..2).filter_map(|b| a.lease(b)).collect();
    assert_eq!(leases.len(), 2);
    assert_eq!(leases[0].extend_drain(ms(5000)), Some(ms(2000)), "capped");
    assert_eq!(leases[1].extend_drain(ms(5000)), Some(ms(2000)), "capped");
    assert_eq!(
        leases[1].extend_drain(ms(10)),
        Some(ms(2000)),
        "never shorter"
    );
    let b = start(store.clone(), "b", 2).await;
    let mut b_events = b.events();
    sleep(ms(2500)).await;
    let revoked: Vec<(u32, Instant)> = ready(&mut a_events)
        .into_iter()
        .filter_map(|e| match e {
            Event::Revoked { bucket, at, .. } => Some((bucket, at)),
            _ => None,
        })
        .collect();
    assert_eq!(revoked.len(), 1);
    let (bucket, revoked_at) = revoked[0];
    assert!(
        !leases[bucket as usize].is_valid(),
        "ownership ends at the revoke"
    );
    let acquired_at = ready(&mut b_events)
        .into_iter()
        .find_map(|e| match e {
            Event::Acquired { bucket: b, at, .. } if b == bucket => Some(at),
            _ => None,
        })
        .expect("b got the bucket");
    let gap = acquired_at - revoked_at;
    assert!(gap >= ms(2000) && gap < ms(2300), "{gap:?}");
    b.abort();
}

#[tokio::test(start_paused = true)]
async fn the_status_tells_when_a_new_groups_grants_begin() {
    let store = MemoryStore::new();
    let a = start(store.clone(), "a", 8).await;
    sleep(HEARTBEAT).await;
    let status = a.status();
    assert_eq!(status.held, 0);
    let q = status.quarantine.expect("a new group's quarantine");
    assert!(q <= TTL - HEARTBEAT && q >= TTL - HEARTBEAT * 3, "{q:?}");
    sleep(TTL).await;
    let status = a.status();
    assert_eq!((status.held, status.quarantine), (8, None));
}

#[tokio::test(start_paused = true)]
async fn a_live_duplicate_id_fails_within_a_ttl_with_the_expiry() {
    let store = MemoryStore::new();
    let a = start(store.clone(), "dup", 8).await;
    sleep(TTL * 2).await;
    let began = Instant::now();
    let err = Member::builder(store.clone(), "g")
        .id("dup")
        .buckets(8)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .start()
        .await
        .expect_err("the id is in use");
    assert!(matches!(err, Error::IdInUse { .. }), "{err}");
    assert!(err.to_string().contains("expires in"), "{err}");
    assert!(
        began.elapsed() <= TTL + HEARTBEAT,
        "start blocked {:?}",
        began.elapsed()
    );
    a.abort();
}

/// A writer that keeps what the log subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture")).into_owned()
    }
}

/// The WARN comes on the thread that drops the member, which here has the capturing subscriber
/// as its scoped default, whatever other threads do. That needs a second dispatcher alive
/// throughout: while exactly one is registered, tracing-core (0.1.36, `Dispatchers::rebuilder`)
/// takes the shortcut of asking the *registering thread's* default whether a callsite is of
/// interest, and caches the answer for the whole process. Another test that drops a member
/// (this binary runs its tests in parallel threads, none with a subscriber) then registered the
/// WARN's callsite as "never" between this test's `set_default` and its `drop(a)`, and the WARN
/// was never written: the failure seen once in eleven runs. With two dispatchers the callsite
/// is "sometimes", and each event asks its own thread's default. The thread below drops a
/// member with no subscriber of its own in that very window, so the test fails every time
/// without the second dispatcher (when it runs alone, the callsite not yet registered).
#[tokio::test(start_paused = true)]
async fn dropping_a_member_without_shutdown_warns() {
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let store = MemoryStore::new();
    let a = start(store.clone(), "a", 8).await;
    let b = start(store.clone(), "b", 8).await;
    let c = start(store.clone(), "c", 8).await;
    let elsewhere = start(store.clone(), "d", 8).await;
    std::thread::spawn(move || drop(elsewhere))
        .join()
        .expect("drop on another thread");
    sleep(TTL + HEARTBEAT * 2).await;
    b.abort();
    c.shutdown().await.expect("shutdown");
    assert!(
        !capture.text().contains("without shutdown"),
        "abort and shutdown say nothing (and the other thread's drop is not logged here)"
    );
    drop(a);
    let text = capture.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(
        text.contains("dropped without shutdown()") && text.contains("crash"),
        "{text}"
    );
}

/// The README's worker, as written there, except that it records each lease it is given.
async fn readme_worker(member: MemberHandle, seen: Arc<Mutex<Vec<(u32, u64)>>>) {
    let mut leases = member.leases();
    while let Some(lease) = leases.next().await {
        tokio::spawn(poll_partition(lease, Arc::clone(&seen)));
    }
}

async fn poll_partition(lease: Lease, seen: Arc<Mutex<Vec<(u32, u64)>>>) {
    seen.lock()
        .expect("seen")
        .push((lease.bucket(), lease.token()));
    loop {
        tokio::select! {
            () = lease.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Done-when of issue 9: the README's worker, subscribed any time after `start()` (random
/// delays, from none to past the grants), is given every grant the member held from its
/// subscription on, through a join and two leaves. 100 runs; the seed is printed on failure.
#[tokio::test(start_paused = true)]
async fn the_readme_worker_never_misses_a_grant() {
    let seed: u64 = std::env::var("REDBUCKETS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let mut rng = StdRng::seed_from_u64(seed);
    for trial in 0..100 {
        let store = MemoryStore::new();
        let b = start(store.clone(), "b", 32).await;
        sleep(TTL + HEARTBEAT * 2).await;
        let a = start(store.clone(), "a", 32).await;
        // The oracle: subscribed before the member's task ran, so it saw every event.
        let oracle = Arc::new(Mutex::new(a.events()));
        let mark = Arc::new(Mutex::new(None::<Vec<Event>>));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let yields = rng.gen_range(0..5usize);
        let delay = if rng.gen_bool(0.3) {
            Duration::ZERO
        } else {
            ms(rng.gen_range(0..=600))
        };
        let worker = {
            let (handle, oracle, mark, seen) =
                (a.handle(), oracle.clone(), mark.clone(), seen.clone());
            tokio::spawn(async move {
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                sleep(delay).await;
                // What happened before the subscription; nothing runs between this and the
                // worker's first poll.
                *mark.lock().expect("mark") = Some(ready(&mut oracle.lock().expect("oracle")));
                readme_worker(handle, seen).await;
            })
        };
        sleep(ms(200)).await;
        let c = start(store.clone(), "c", 32).await;
        sleep(ms(300)).await;
        c.shutdown().await.expect("shutdown c");
        sleep(ms(300)).await;
        b.shutdown().await.expect("shutdown b");
        sleep(ms(300)).await;
        assert_eq!(a.buckets().len(), 32);
        a.shutdown().await.expect("shutdown a");
        worker.await.expect("worker");
        // The leases read last are recorded by tasks spawned just now.
        sleep(ms(10)).await;

        let before = mark.lock().expect("mark").take().expect("subscribed");
        let after = ready(&mut oracle.lock().expect("oracle"));
        let mut open: BTreeSet<(u32, u64)> = BTreeSet::new();
        for e in &before {
            match *e {
                Event::Acquired { bucket, token, .. } => {
                    open.insert((bucket, token));
                }
                Event::Revoked { bucket, token, .. } | Event::Lost { bucket, token, .. } => {
                    open.remove(&(bucket, token));
                }
                _ => {}
            }
        }
        let later: BTreeSet<(u32, u64)> = after
            .iter()
            .filter_map(|e| match *e {
                Event::Acquired { bucket, token, .. } => Some((bucket, token)),
                _ => None,
            })
            .collect();
        let required: BTreeSet<(u32, u64)> = open.union(&later).copied().collect();
        let got: Vec<(u32, u64)> = seen.lock().expect("seen").clone();
        let got_set: BTreeSet<(u32, u64)> = got.iter().copied().collect();
        assert_eq!(
            got.len(),
            got_set.len(),
            "seed {seed} trial {trial}: a grant twice"
        );
        let missed: Vec<_> = required.difference(&got_set).collect();
        assert!(
            missed.is_empty(),
            "seed {seed} trial {trial} (delay {delay:?}, {yields} yields): missed {missed:?}"
        );
        let phantom: Vec<_> = got_set.difference(&required).collect();
        assert!(
            phantom.is_empty(),
            "seed {seed} trial {trial}: leases of grants that had ended: {phantom:?}"
        );
        assert!(required.len() >= 16, "the run granted buckets to a");
    }
}

/// On a real Redis: a worker that subscribes in a spawned task after some set-up (the issue's
/// case, which missed every grant), here 300 ms, past the grants, gets a lease for each of the
/// member's buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_worker_subscribed_late_gets_every_bucket() {
    use redbuckets::RedisStore;
    use redbuckets_testkit::RedisServer;

    let server = RedisServer::start();
    let member = |id: &'static str| {
        let url = server.url();
        async move {
            let store = RedisStore::connect(&url).await.expect("connect");
            Member::builder(store, "late")
                .id(id)
                .buckets(42)
                .heartbeat(ms(100))
                // A ttl long enough that a loaded machine's pauses cost no deadline.
                .ttl(ms(3000))
                .start()
                .await
                .expect("start")
        }
    };
    let b = member("b").await;
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while b.buckets().len() < 42 && std::time::Instant::now() < until {
        sleep(ms(20)).await;
    }
    assert_eq!(b.buckets().len(), 42);
    let a = member("a").await;
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let worker = {
        let (handle, seen) = (a.handle(), seen.clone());
        tokio::spawn(async move {
            sleep(ms(300)).await;
            let mut leases = handle.leases();
            while let Some(lease) = leases.next().await {
                if lease.is_valid() {
                    seen.lock().expect("seen").insert(lease.bucket());
                }
            }
        })
    };
    // Until a holds its share and the worker, subscribed after the grants, has a lease for each.
    let got = || -> Vec<u32> { seen.lock().expect("seen").iter().copied().collect() };
    let until = std::time::Instant::now() + Duration::from_secs(15);
    while (a.buckets().len() < 21 || got() != a.buckets()) && std::time::Instant::now() < until {
        sleep(ms(20)).await;
    }
    assert_eq!(a.buckets().len(), 21);
    assert_eq!(got(), a.buckets());
    a.shutdown().await.expect("shutdown a");
    b.shutdown().await.expect("shutdown b");
    worker.await.expect("worker");
}

/// Issue 18, defect 4: `Events` and `Leases` are `Stream`s, so `StreamExt` combinators work on
/// them, and both end once the member has stopped.
#[tokio::test(start_paused = true)]
async fn events_and_leases_are_streams() {
    use futures_util::StreamExt as _;

    let store = MemoryStore::new();
    let a = start(store.clone(), "a", 8).await;
    let events = a.events();
    let leases = a.leases();
    sleep(TTL + HEARTBEAT * 3).await;
    assert_eq!(a.buckets().len(), 8);

    let acquired: Vec<u32> = events
        .filter_map(|e| async move {
            match e {
                Event::Acquired { bucket, .. } => Some(bucket),
                _ => None,
            }
        })
        .take(8)
        .collect()
        .await;
    assert_eq!(acquired.len(), 8);
    let mut granted: Vec<u32> = leases.map(|l| l.bucket()).take(8).collect().await;
    granted.sort_unstable();
    assert_eq!(granted, (0..8).collect::<Vec<_>>());

    // Both end with the member: a stream read to its end after shutdown.
    let mut events = a.events().boxed();
    let mut leases = a.leases();
    a.shutdown().await.expect("shutdown");
    let rest: Vec<Event> = events.by_ref().collect().await;
    assert!(
        rest.iter().any(|e| matches!(e, Event::Released { .. })),
        "{rest:?}"
    );
    assert!(events.next().await.is_none());
    let mut held = 0;
    while let Some(lease) = leases.next().await {
        held += 1;
        drop(lease);
    }
    assert_eq!(held, 8, "the subscription opened with the 8 owned buckets");
}

/// `try_next` drains everything buffered, beyond tokio's cooperative budget (128 per task poll).
#[tokio::test(start_paused = true)]
async fn try_next_reads_every_buffered_event() {
    let a = start(MemoryStore::new(), "a", 300).await;
    let mut events = a.events();
    sleep(TTL + HEARTBEAT * 3).await;
    assert_eq!(a.buckets().len(), 300);
    assert_eq!(ready(&mut events).len(), 300);
    a.shutdown().await.expect("shutdown");
}

/// The streams can move to (and be shared with) other tasks, as before they were `Stream`s.
#[test]
fn handles_and_streams_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<MemberHandle>();
    send_sync::<Events>();
    send_sync::<redbuckets::Leases>();
    send_sync::<Lease>();
}
