//! `Store` is open: a store written outside the crate builds every reply from the public
//! constructors, and a member runs on it as on the built-in stores. Here a scripted store (the
//! kind a user writes to test a worker's handling of a lost session without Redis): it grants
//! buckets 0 and 1 under token 10, then reports the session gone at a heartbeat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redbuckets::store::{
    Action, Channel, GroupSnapshot, HeartbeatReply, Holdings, MemberInfo, Notifications,
    RebalanceReply, RegisterRequest, Registration, SessionRef,
};
use redbuckets::{Error, Event, GroupKey, Member, Store};

#[derive(Clone, Default)]
struct Scripted {
    granted: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
}

impl Store for Scripted {
    async fn register(&self, _: &GroupKey, _: &RegisterRequest) -> Result<Registration, Error> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                detail: "scripted: gone".into(),
            });
        }
        Ok(Registration::Registered {
            version: 1,
            token: 0,
        })
    }

    async fn heartbeat(
        &self,
        _: &GroupKey,
        _: &SessionRef,
        _: Duration,
        _: Duration,
    ) -> Result<HeartbeatReply, Error> {
        let mut reply = HeartbeatReply::default();
        if !self.gone.load(Ordering::SeqCst) {
            reply.alive = true;
            reply.version = 1;
            reply.committed = 2;
            reply.held = 2;
        }
        Ok(reply)
    }

    async fn rebalance(
        &self,
        _: &GroupKey,
        _: &SessionRef,
        _: u32,
    ) -> Result<RebalanceReply, Error> {
        if self.gone.load(Ordering::SeqCst) {
            return Ok(RebalanceReply::session_lost());
        }
        let first = !self.granted.swap(true, Ordering::SeqCst);
        let mut reply = RebalanceReply::new(if first {
            Action::Acquired {
                buckets: vec![0, 1],
                token: 10,
            }
        } else {
            Action::Stay
        });
        reply.share = (2, 2);
        reply.version = 1;
        reply.committed = 2;
        reply.held = 2;
        Ok(reply)
    }

    async fn release(&self, _: &GroupKey, _: &SessionRef, b: &[u32], _: u64) -> Result<u32, Error> {
        Ok(u32::try_from(b.len()).unwrap_or(u32::MAX))
    }

    async fn deregister(&self, _: &GroupKey, _: &SessionRef) -> Result<(), Error> {
        Ok(())
    }

    async fn snapshot(&self, _: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        let mut snapshot = GroupSnapshot::new(2);
        snapshot.members.push(MemberInfo::new("w", "s"));
        Ok(Some(snapshot))
    }

    async fn holdings(&self, _: &GroupKey, _: &SessionRef) -> Result<Option<Holdings>, Error> {
        let mut holdings = Holdings::default();
        holdings.owned.extend([(0, 10), (1, 10)]);
        holdings.committed = 2;
        Ok(Some(holdings))
    }

    async fn subscribe(&self, _: &GroupKey, _: Channel<'_>) -> Result<Notifications, Error> {
        Ok(Notifications::new(futures_util::stream::pending()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_member_runs_on_a_store_written_outside_the_crate() {
    let store = Scripted::default();
    let member = Member::builder(store.clone(), "g")
        .id("w")
        .buckets(2)
        .heartbeat(Duration::from_millis(100))
        .ttl(Duration::from_secs(1))
        .start()
        .await
        .expect("start");
    let mut events = member.events();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(member.buckets(), vec![0, 1]);
    assert_eq!(member.token(0), Some(10));

    store.gone.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(member.buckets().is_empty());
    let mut lost = Vec::new();
    while let Some(e) = events.try_next() {
        if let Event::Lost { bucket, token, .. } = e {
            lost.push((bucket, token));
        }
    }
    assert_eq!(lost, [(0, 10), (1, 10)]);
    member.abort();
}
