//! The member's metrics (issue 21), read from a test recorder while members join,
//! rebalance, leave and lose their session, on `MemoryStore` and tokio's paused clock.
//!
//! One recorder per process (the facade has one global recorder), so the whole story is one
//! test. Two members of one group in one process share their series: `buckets_owned` is their
//! sum, the other gauges are what the last writer saw (here both see the same).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use metrics_util::MetricKind;
use redbuckets::metrics::{
    BUCKETS_OWNED, BUCKETS_SHARE, BUCKET_EVENTS_TOTAL, DRAIN_DURATION_SECONDS,
    LEASE_REMAINING_SECONDS, MEMBERS, QUARANTINE_REMAINING_SECONDS, REBALANCE_DURATION_SECONDS,
    STORE_CALL_DURATION_SECONDS, STORE_ERRORS_TOTAL,
};
use redbuckets::{Error, Member, MemoryStore, Store};
use redbuckets_testkit::{Call, Intercept, Intercepted, Reply};
use tokio::time::sleep;

const HEARTBEAT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_millis(1000);
const BUCKETS: u32 = 12;

/// Every call fails while `cut` is set (reads and subscriptions too): a partition.
#[derive(Debug, Default)]
struct Cut {
    cut: AtomicBool,
}

impl Intercept<MemoryStore> for Cut {
    async fn call(&self, inner: &MemoryStore, call: Call) -> Result<Reply, Error> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                detail: "partitioned by the test".into(),
            });
        }
        call.run(inner.clone()).await
    }
}

async fn start<S: Store>(store: S, id: &str) -> Member {
    Member::builder(store, "m")
        .id(id)
        .buckets(BUCKETS)
        .heartbeat(HEARTBEAT)
        .ttl(TTL)
        .call_timeout(Duration::from_millis(200))
        .drain_timeout(Duration::from_millis(300))
        .start()
        .await
        .expect("start")
}

/// A recorder whose values a test reads without resetting them (the debugging recorder of
/// metrics-util resets counters and gauges at each snapshot, which a gauge moved by
/// increments cannot survive). Histograms are read since the last look.
#[derive(Clone)]
struct TestRecorder(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// A recorded value.
#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

/// The recorded values, by name and labels (`name{k=v,...}`, labels sorted).
struct Seen(Vec<(String, MetricKind, Value)>);

fn series(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Seen {
    fn take(recorder: &TestRecorder) -> Self {
        let mut all = Vec::new();
        recorder.0.visit_counters(|key, c| {
            all.push((
                series(key),
                MetricKind::Counter,
                Value::Counter(c.load(Ordering::SeqCst)),
            ));
        });
        recorder.0.visit_gauges(|key, g| {
            let v = f64::from_bits(g.load(Ordering::SeqCst));
            all.push((series(key), MetricKind::Gauge, Value::Gauge(v)));
        });
        recorder.0.visit_histograms(|key, h| {
            let mut values = Vec::new();
            h.clear_with(|xs| values.extend_from_slice(xs));
            all.push((series(key), MetricKind::Histogram, Value::Histogram(values)));
        });
        Seen(all)
    }

    fn value(&self, name: &str, labels: &str) -> Option<&Value> {
        let full = format!("{name}{{{labels}}}");
        self.0
            .iter()
            .find(|(n, _, _)| *n == full)
            .map(|(_, _, v)| v)
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.value(name, "group=m") {
            Some(Value::Gauge(v)) => *v,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn counter(&self, name: &str, labels: &str) -> u64 {
        match self.value(name, labels) {
            Some(Value::Counter(n)) => *n,
            other => panic!("{name}{{{labels}}}: {other:?}"),
        }
    }

    fn event(&self, event: &str) -> u64 {
        self.counter(BUCKET_EVENTS_TOTAL, &format!("event={event},group=m"))
    }

    fn lost(&self, reason: &str) -> u64 {
        self.counter(
            BUCKET_EVENTS_TOTAL,
            &format!("event=lost,group=m,reason={reason}"),
        )
    }

    /// The values a histogram recorded since the last snapshot.
    fn histogram(&self, name: &str, labels: &str) -> Vec<f64> {
        match self.value(name, labels) {
            Some(Value::Histogram(v)) => v.clone(),
            other => panic!("{name}{{{labels}}}: {other:?}"),
        }
    }

    /// Every series name is of the documented set, with a `group` label and no `bucket` one.
    fn check_names(&self) {
        let known = [
            BUCKETS_OWNED,
            BUCKETS_SHARE,
            MEMBERS,
            BUCKET_EVENTS_TOTAL,
            REBALANCE_DURATION_SECONDS,
            DRAIN_DURATION_SECONDS,
            STORE_CALL_DURATION_SECONDS,
            STORE_ERRORS_TOTAL,
            LEASE_REMAINING_SECONDS,
            QUARANTINE_REMAINING_SECONDS,
        ];
        for (name, kind, _) in &self.0 {
            let base = name.split('{').next().unwrap_or_default();
            assert!(known.contains(&base), "{name}");
            assert!(name.contains("group=m"), "{name}");
            assert!(!name.contains("bucket="), "{name}");
            assert_eq!(
                base.ends_with("_total"),
                *kind == MetricKind::Counter,
                "{name}: counters and only counters end in _total"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn gauges_and_counters_follow_join_rebalance_leave_and_a_lost_session() {
    let recorder = TestRecorder(Arc::new(Registry::atomic()));
    metrics::set_global_recorder(recorder.clone()).expect("the only recorder of this process");
    let store = MemoryStore::new();
    let a_store = Intercepted::new(store.clone(), Cut::default());

    // Join: a new group's quarantine first, then every bucket.
    let a = start(a_store.clone(), "a").await;
    sleep(HEARTBEAT * 2).await;
    let seen = Seen::take(&recorder);
    let quarantine = seen.gauge(QUARANTINE_REMAINING_SECONDS);
    assert!(quarantine > 0.5 && quarantine <= 1.0, "{quarantine}");
    assert_eq!(seen.gauge(BUCKETS_OWNED), 0.0);
    assert_eq!(seen.gauge(MEMBERS), 1.0);
    for call in ["register", "heartbeat", "rebalance", "subscribe"] {
        assert!(
            !seen
                .histogram(STORE_CALL_DURATION_SECONDS, &format!("call={call},group=m"))
                .is_empty(),
            "{call}"
        );
    }
    sleep(TTL).await;
    let seen = Seen::take(&recorder);
    seen.check_names();
    assert_eq!(seen.gauge(BUCKETS_OWNED), 12.0);
    assert_eq!(seen.gauge(BUCKETS_SHARE), 12.0);
    assert_eq!(seen.gauge(QUARANTINE_REMAINING_SECONDS), 0.0);
    assert_eq!(seen.event("acquired"), 12);
    let lease = seen.gauge(LEASE_REMAINING_SECONDS);
    let validity = a.config().lease_validity().as_secs_f64();
    assert!(lease > 0.0 && lease <= validity, "{lease} of {validity}");

    // A second member: a gives up half (revoked, drained without handles, released), b takes it.
    let b = start(store.clone(), "b").await;
    sleep(TTL).await;
    let seen = Seen::take(&recorder);
    assert_eq!(a.buckets().len(), 6);
    assert_eq!(seen.gauge(BUCKETS_OWNED), 12.0, "the sum of a's and b's");
    assert_eq!(seen.gauge(BUCKETS_SHARE), 6.0);
    assert_eq!(seen.gauge(MEMBERS), 2.0);
    assert_eq!(seen.event("revoked"), 6);
    assert_eq!(seen.event("released"), 6);
    assert_eq!(seen.event("acquired"), 18);
    let drains = seen.histogram(DRAIN_DURATION_SECONDS, "group=m,result=dropped");
    assert_eq!(drains.len(), 6, "{drains:?}");
    let rebalances = seen.histogram(REBALANCE_DURATION_SECONDS, "group=m");
    assert!(!rebalances.is_empty());
    assert!(
        rebalances.iter().all(|d| *d < HEARTBEAT.as_secs_f64()),
        "{rebalances:?}"
    );

    // b leaves: its six are released and a takes them back (a push grant).
    b.shutdown().await.expect("leave");
    sleep(TTL).await;
    let seen = Seen::take(&recorder);
    assert_eq!(a.buckets().len(), 12);
    assert_eq!(seen.gauge(BUCKETS_OWNED), 12.0);
    // As of a's last rebalance step: a push grant does not carry the share (nor does the
    // status's), so it lags until a's next step.
    assert_eq!(seen.gauge(BUCKETS_SHARE), a.status().share.1 as f64);
    assert_eq!(seen.gauge(MEMBERS), 1.0, "from a's next renewal");
    assert_eq!(seen.event("revoked"), 12);
    assert_eq!(seen.event("released"), 12);
    assert_eq!(seen.event("acquired"), 24);

    // a is cut off: its renewals fail, the lease's time runs down, then every bucket is lost
    // at the local deadline.
    a_store.cut.store(true, Ordering::SeqCst);
    sleep(TTL / 2 + HEARTBEAT).await;
    let seen = Seen::take(&recorder);
    assert!(
        seen.counter(
            STORE_ERRORS_TOTAL,
            "call=heartbeat,group=m,kind=unavailable"
        ) >= 1,
        "a failed renewal counts"
    );
    let lease = seen.gauge(LEASE_REMAINING_SECONDS);
    assert!(lease < validity / 2.0, "{lease}");
    sleep(TTL).await;
    let seen = Seen::take(&recorder);
    assert_eq!(seen.lost("deadline"), 12);
    assert_eq!(seen.gauge(BUCKETS_OWNED), 0.0);
    assert_eq!(seen.gauge(LEASE_REMAINING_SECONDS), 0.0);
    a.abort();
}
