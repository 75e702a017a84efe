//! `MemoryStore`: the store protocol in-process, with the same semantics as the Redis scripts:
//! the pure [`Model`] behind a lock, a clock and broadcast channels. Each call locks, reads the
//! clock once, runs the model's method and publishes the notices it returns.
//!
//! Time is tokio's clock, so tests on a paused runtime control session expiry exactly.
//! A std `Mutex`, not a tokio one: nothing async happens while it is held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::Error;
use crate::store::model::{Model, Outcome, To};
use crate::store::{
    Channel, Deletion, GroupKey, GroupSnapshot, HeartbeatReply, Holdings, Notice, Notifications,
    RebalanceReply, RegisterRequest, Registration, Removal, SessionRef, Store,
};

/// An in-process store with the semantics of [`crate::RedisStore`]: for tests, simulations,
/// demos, and for trying redbuckets without Redis. Clones share the same state.
///
/// One difference, in storage only: Redis lets the keys of a group nobody uses expire (ten
/// ttls after the last renewal, two after the last member left), while this store keeps such
/// a group until it is deleted or a registration re-creates it. Only a snapshot or a listing
/// tells them apart (none, or a stale group): such a group is unattended, so a registration
/// re-creates it either way.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    model: Model,
    /// Subscriptions: the group's channel (`None`) and each member's (`Some(id)`).
    channels: HashMap<(GroupKey, Option<String>), broadcast::Sender<Notice>>,
    /// Server clock: Unix µs at `epoch`, advanced by tokio's clock.
    base_us: u64,
    epoch: Instant,
}

impl Default for Inner {
    fn default() -> Self {
        let base_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or(0);
        Inner {
            model: Model::new(),
            channels: HashMap::new(),
            base_us,
            epoch: Instant::now(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The names of the groups under `prefix`, sorted (as [`crate::RedisStore::groups`]).
    #[must_use]
    pub fn groups(&self, prefix: &str) -> Vec<String> {
        self.lock().model.groups(prefix)
    }

    /// Deletes `group` (as [`crate::RedisStore::delete_group`], delete.lua): refused while
    /// sessions are live unless `force`; a forced deletion wakes the live members and keeps the
    /// latest expiry of their sessions as the floor of the re-created group's quarantine.
    pub fn delete_group(&self, group: &GroupKey, force: bool) -> Deletion {
        self.call(group, |model, now| model.delete(group, force, now))
    }

    /// Ends `member`'s session now, whatever its nonce (as [`crate::RedisStore::remove_member`],
    /// remove.lua): a deregistration that also wakes the member.
    pub fn remove_member(&self, group: &GroupKey, member: &str) -> Removal {
        self.call(group, |model, now| model.remove_member(group, member, now))
    }

    /// Forgets every group, as a Redis restart without persistence does. Subscribers are told.
    pub fn wipe(&self) {
        let mut inner = self.lock();
        inner.model.wipe();
        for tx in inner.channels.values() {
            let _ = tx.send(Notice::Act);
        }
    }

    /// **Unstable, for tests** (feature `testing`): sets the store's server clock so that it
    /// reads `unix_us` (µs since the Unix epoch) now; it goes on advancing with tokio's clock.
    /// The differential test (`tests/differential.rs`) sets it to the value it freezes the
    /// Redis scripts' clock at (see [`crate::RedisOptions::frozen_clock_for_tests`]), so that
    /// both stores read the same time and tokens, expiries and waits compare exactly.
    #[cfg(feature = "testing")]
    pub fn set_clock_us(&self, unix_us: u64) {
        let mut inner = self.lock();
        inner.base_us = unix_us;
        inner.epoch = Instant::now();
    }

    /// **Unstable, for tests** (feature `testing`): the buckets the store lists as `member`'s
    /// in `group` (owned, or committed for release and not yet released) with their tokens, as
    /// `(token, bucket)` in ascending order, whether or not the session is still alive, without
    /// reading the whole group.
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn held_buckets(&self, group: &GroupKey, member: &str) -> Vec<(u64, u32)> {
        self.lock().model.held_buckets(group, member)
    }

    /// **Unstable, for tests** (feature `testing`): the protocol model behind the store, as it
    /// is now (a copy), with the store's clock (µs) now: for checks of the store's own
    /// invariants ([`Model::check`]) and for a model checker to start from.
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn model(&self) -> (Model, u64) {
        self.read(|model, now| (model.clone(), now))
    }

    /// **Unstable, for tests** (feature `testing`): `inspect` sees the protocol model behind
    /// the store as it is now, with the store's clock (µs) now, without a copy (under the
    /// store's lock: it must not call the store).
    #[cfg(feature = "testing")]
    pub fn inspect<R>(&self, inspect: impl FnOnce(&Model, u64) -> R) -> R {
        self.read(inspect)
    }

    /// Runs one call of the model on `group` at the store's now, and publishes its notices.
    fn call<R>(&self, group: &GroupKey, call: impl FnOnce(&mut Model, u64) -> Outcome<R>) -> R {
        let mut inner = self.lock();
        let now = inner.now_us();
        let Outcome { reply, notices } = call(&mut inner.model, now);
        inner.publish(group, notices);
        reply
    }

    /// A read-only call of the model on the store's now.
    fn read<R>(&self, read: impl FnOnce(&Model, u64) -> R) -> R {
        let inner = self.lock();
        read(&inner.model, inner.now_us())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-written in a way later
        // calls would misread more than the panic itself did; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// The server clock now: Unix µs.
    fn now_us(&self) -> u64 {
        let elapsed = u64::try_from(Instant::now().duration_since(self.epoch).as_micros());
        self.base_us.saturating_add(elapsed.unwrap_or(0))
    }

    /// Sends each notice to the subscribers of its channel of `group`, if any.
    fn publish(&self, group: &GroupKey, notices: Vec<(To, Notice)>) {
        let mut key = (group.clone(), None);
        for (to, notice) in notices {
            key.1 = match to {
                To::Group => None,
                To::Member(id) => Some(id),
            };
            if let Some(tx) = self.channels.get(&key) {
                let _ = tx.send(notice);
            }
        }
    }
}

impl Store for MemoryStore {
    async fn register(
        &self,
        group: &GroupKey,
        req: &RegisterRequest,
    ) -> Result<Registration, Error> {
        self.call(group, |model, now| model.register(group, req, now))
    }

    async fn heartbeat(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
        watch: Duration,
    ) -> Result<HeartbeatReply, Error> {
        Ok(self.call(group, |model, now| {
            model.heartbeat(group, session, ttl, watch, now)
        }))
    }

    async fn rebalance(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
    ) -> Result<RebalanceReply, Error> {
        Ok(self.call(group, |model, now| {
            model.rebalance(group, session, max_take, now)
        }))
    }

    async fn release(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        known: u64,
    ) -> Result<u32, Error> {
        Ok(self.call(group, |model, now| {
            model.release(group, session, buckets, known, now)
        }))
    }

    async fn leave(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
    ) -> Result<u32, Error> {
        Ok(self.call(group, |model, now| {
            model.leave(group, session, buckets, now)
        }))
    }

    async fn deregister(&self, group: &GroupKey, session: &SessionRef) -> Result<(), Error> {
        self.call(group, |model, now| model.deregister(group, session, now));
        Ok(())
    }

    /// The session's held set with each owner record's token, O(held) (mirrors `holdings.lua`).
    async fn holdings(
        &self,
        group: &GroupKey,
        session: &SessionRef,
    ) -> Result<Option<Holdings>, Error> {
        Ok(self.read(|model, now| model.holdings(group, session, now)))
    }

    /// Read-only, as snapshot.lua: nothing is purged and nobody notified.
    async fn snapshot(&self, group: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        Ok(self.read(|model, now| model.snapshot(group, now)))
    }

    async fn subscribe(
        &self,
        group: &GroupKey,
        channel: Channel<'_>,
    ) -> Result<Notifications, Error> {
        let member = match channel {
            Channel::Group => None,
            Channel::Member(id) => Some(id.to_string()),
        };
        let mut inner = self.lock();
        let rx = inner
            .channels
            .entry((group.clone(), member))
            .or_insert_with(|| broadcast::channel(64).0)
            .subscribe();
        Ok(Notifications::new(futures_util::stream::unfold(
            rx,
            |mut rx| async move {
                match rx.recv().await {
                    Ok(notice) => Some((notice, rx)),
                    // Notices were lost: a grant among them is found by the member's checks.
                    Err(broadcast::error::RecvError::Lagged(_)) => Some((Notice::Act, rx)),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Action;
    use futures_util::FutureExt;

    /// S2 within one instant: grants in the same µs of the store's clock (a paused clock here)
    /// still get strictly growing tokens, never the same one twice (issue 19: a mutant that
    /// repeated a token was caught by 6 of 1,000 simulation seeds only).
    #[tokio::test(start_paused = true)]
    async fn grants_at_one_instant_get_growing_tokens() {
        let store = MemoryStore::new();
        let g = GroupKey::new("t", "tokens");
        let ttl = Duration::from_secs(1);
        let members: Vec<SessionRef> = ["a", "b", "c"]
            .iter()
            .map(|m| request(m, "1").session)
            .collect();
        for s in &members {
            store
                .register(&g, &RegisterRequest::new(s.clone(), 1, 9, ttl))
                .await
                .unwrap();
        }
        // Past the quarantine (a ttl), with the sessions renewed halfway.
        tokio::time::advance(ttl / 2).await;
        for s in &members {
            assert!(renew(&store, &g, s, ttl).await);
        }
        tokio::time::advance(ttl / 2 + Duration::from_millis(1)).await;
        let mut tokens = Vec::new();
        for s in &members {
            if let Action::Acquired { token, .. } = store.rebalance(&g, s, 9).await.unwrap().action
            {
                tokens.push(token);
            }
        }
        assert_eq!(tokens.len(), 3, "{tokens:?}");
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    }

    /// Renews session `s` (looking up every watched expiry); whether it is alive.
    async fn renew(store: &MemoryStore, g: &GroupKey, s: &SessionRef, ttl: Duration) -> bool {
        let reply = store.heartbeat(g, s, ttl, Duration::MAX).await.unwrap();
        reply.alive
    }

    /// Notices queued on `n` right now.
    fn drain(n: &mut Notifications) -> usize {
        let mut count = 0;
        while let Some(Some(_)) = n.next().now_or_never() {
            count += 1;
        }
        count
    }

    fn request(member: &str, nonce: &str) -> RegisterRequest {
        let session = SessionRef {
            member: member.into(),
            session: nonce.into(),
        };
        RegisterRequest::new(session, 1, 8, Duration::from_secs(1))
    }

    /// A release frees a bucket only under a token the member says it knows: a bucket granted
    /// to it again since (whose notice may still be on its way) stays (release.lua).
    #[tokio::test(start_paused = true)]
    async fn a_release_never_frees_a_grant_newer_than_the_member_knows() {
        let store = MemoryStore::new();
        let g = GroupKey::new("p", "g");
        let a = request("a", "a1");
        store.register(&g, &a).await.unwrap();
        // Past the quarantine (a ttl), with the session renewed halfway.
        tokio::time::advance(a.ttl / 2).await;
        let ttl = a.ttl;
        renew(&store, &g, &a.session, ttl).await;
        tokio::time::advance(a.ttl / 2).await;
        let take = |store: MemoryStore| {
            let (g, s) = (g.clone(), a.session.clone());
            async move {
                match store.rebalance(&g, &s, u32::MAX).await.unwrap().action {
                    Action::Acquired { buckets, token } => (buckets, token),
                    other => panic!("{other:?}"),
                }
            }
        };
        let (buckets, t1) = take(store.clone()).await;
        assert_eq!(buckets.len(), 8);
        let b = buckets[0];
        assert_eq!(store.release(&g, &a.session, &[b], t1).await.unwrap(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        let (again, t2) = take(store.clone()).await;
        assert_eq!((again, t2 > t1), (vec![b], true));
        assert_eq!(store.release(&g, &a.session, &[b], t1).await.unwrap(), 0);
        assert_eq!(store.release(&g, &a.session, &[b], t2).await.unwrap(), 1);
    }

    /// A heartbeat looks up the watched sessions' expiry only when some other session ends
    /// within its `watch`: in a healthy group every other session ends after the member's next
    /// renewal, and the reply says `None` (redis: heartbeat.lua, heartbeat_fast.lua).
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_looks_at_watched_expiries_only_within_its_watch() {
        let store = MemoryStore::new();
        let g = GroupKey::new("p", "g");
        let (a, b, c) = (request("a", "a1"), request("b", "b1"), request("c", "c1"));
        let ttl = a.ttl;
        for r in [&a, &b, &c] {
            store.register(&g, r).await.unwrap();
        }
        tokio::time::advance(Duration::from_millis(400)).await;
        renew(&store, &g, &c.session, ttl).await;
        // b ends in 600 ms, c in 1,000 ms: a watches both.
        let ms = Duration::from_millis;
        let next = |watch| {
            let (store, g, a) = (store.clone(), g.clone(), a.session.clone());
            async move {
                let reply = store.heartbeat(&g, &a, ttl, watch).await.unwrap();
                reply.next_expiry
            }
        };
        assert_eq!(next(Duration::MAX).await, Some(ms(600)));
        assert_eq!(next(ms(601)).await, Some(ms(600)));
        assert_eq!(
            next(ms(600)).await,
            None,
            "b ends exactly at the watch: later than it"
        );
        assert_eq!(next(Duration::ZERO).await, None);
        // a's own expiry (renewed just now) does not count.
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(next(ms(200)).await, Some(ms(100)));
    }

    /// Issue 8, bug 4: a registration that purges expired sessions notifies even when it ends
    /// `InUse` or refreshes the same session, as register.lua does.
    #[tokio::test(start_paused = true)]
    async fn a_registration_that_purges_notifies_on_every_outcome() {
        let store = MemoryStore::new();
        let g = GroupKey::new("p", "g");
        let mut notices = store.subscribe(&g, Channel::Group).await.unwrap();
        let a = request("a", "a1");
        let ttl = a.ttl;
        for (member, nonce) in [("a", "a1"), ("b", "b1"), ("c", "c1")] {
            store.register(&g, &request(member, nonce)).await.unwrap();
        }
        assert_eq!(drain(&mut notices), 3);

        // b expires; a registers again under another nonce while its session lives: InUse.
        tokio::time::advance(Duration::from_millis(600)).await;
        renew(&store, &g, &a.session, ttl).await;
        let c = request("c", "c1");
        renew(&store, &g, &c.session, ttl).await;
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(drain(&mut notices), 0);
        let reply = store.register(&g, &request("a", "a2")).await.unwrap();
        assert!(matches!(reply, Registration::InUse { .. }), "{reply:?}");
        assert_eq!(drain(&mut notices), 1, "b's purge wakes the group");

        // c's heartbeat lapses too; a retried registration of c (same nonce) refreshes it,
        // while a's lapsed session is purged.
        tokio::time::advance(Duration::from_millis(300)).await;
        renew(&store, &g, &c.session, ttl).await;
        tokio::time::advance(Duration::from_millis(800)).await;
        assert_eq!(drain(&mut notices), 0);
        let reply = store.register(&g, &c).await.unwrap();
        assert!(
            matches!(reply, Registration::Registered { .. }),
            "{reply:?}"
        );
        assert_eq!(drain(&mut notices), 1, "a's purge wakes the group");
        let members: Vec<String> = store
            .snapshot(&g)
            .await
            .unwrap()
            .unwrap()
            .members
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(members, ["c"]);
    }

    /// Issue 8, bug 2: a snapshot neither purges nor notifies; it shows the group as the purge
    /// would leave it, and the purge, when a call makes it, leaves exactly that.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_does_not_purge_or_notify() {
        let store = MemoryStore::new();
        let g = GroupKey::new("p", "g");
        let (a, b) = (request("a", "a1"), request("b", "b1"));
        let ttl = a.ttl;
        for r in [&a, &b] {
            store.register(&g, r).await.unwrap();
        }
        // Past the quarantine, with both sessions renewed on the way.
        tokio::time::advance(ttl * 3 / 5).await;
        for r in [&a, &b] {
            assert!(renew(&store, &g, &r.session, ttl).await);
        }
        tokio::time::advance(ttl * 3 / 5).await;
        for r in [&a, &b] {
            let reply = store.rebalance(&g, &r.session, u32::MAX).await.unwrap();
            assert!(matches!(reply.action, Action::Acquired { .. }), "{reply:?}");
        }
        assert!(renew(&store, &g, &a.session, ttl).await);
        // b's session ends; a's does not.
        tokio::time::advance(ttl * 3 / 5).await;
        let mut notices = store.subscribe(&g, Channel::Group).await.unwrap();
        let version = |store: &MemoryStore| store.lock().model.group(&g).map(|g| g.version());
        let before = version(&store).unwrap();

        let seen = store.snapshot(&g).await.unwrap().unwrap();
        assert_eq!(store.snapshot(&g).await.unwrap().as_ref(), Some(&seen));
        assert_eq!(drain(&mut notices), 0, "a snapshot notified");
        {
            let inner = store.lock();
            let state = inner.model.group(&g).unwrap();
            assert!(state.members().contains_key("b"), "a snapshot purged b");
            assert_eq!(state.version(), before);
            assert_eq!(state.free().len(), 0);
        }
        assert_eq!(seen.members.len(), 1);
        assert_eq!(seen.members[0].id, "a");
        assert_eq!(seen.version, before + 1);
        assert_eq!(seen.free(), 4);
        assert!(seen.owners.iter().flatten().all(|o| o.member == "a"));
        assert!(!seen.stale);

        // A heartbeat purges: the group then is what the snapshot showed.
        assert!(renew(&store, &g, &a.session, ttl).await);
        assert_eq!(drain(&mut notices), 1);
        let after = store.snapshot(&g).await.unwrap().unwrap();
        assert_eq!(after.version, seen.version);
        assert_eq!(after.owners, seen.owners);
        assert_eq!(after.members.len(), 1);
    }
}
