//! One generic intercepting [`Store`]: [`Intercepted`] forwards each of the store's calls to an
//! inner store through a hook ([`Intercept`]), so that a test can fail, delay, count or drop
//! calls, lose or rewrite their replies, without writing the forwarding methods again.
//!
//! A call goes to the hook as a value ([`Call`], owning its arguments, so a hook may also spawn
//! it: a request on the wire runs even if the caller stops waiting), and the hook answers with a
//! [`Reply`], usually after [`Call::run`] on the inner store.

use std::future::Future;
use std::ops::Deref;
use std::time::Duration;

pub use redbuckets::store::{Call, Reply};
use redbuckets::store::{
    Channel, HeartbeatReply, Holdings, Notifications, RebalanceReply, RegisterRequest,
    Registration, SessionRef,
};
use redbuckets::{Error, GroupKey, GroupSnapshot, Store};

/// What a test does with each call: by default, runs it on the inner store unchanged.
pub trait Intercept<S: Store>: Send + Sync + 'static {
    /// Answers `call`, usually by `call.run(inner.clone())` with something before or after.
    /// The reply must be the variant of the call's name.
    fn call(&self, inner: &S, call: Call) -> impl Future<Output = Result<Reply, Error>> + Send {
        call.run(inner.clone())
    }
}

/// A [`Store`] that hands every call to its hook `H`, which usually forwards it to `S`. Clones
/// share the hook. It derefs to the hook, so a test reaches the hook's controls (counters,
/// switches) through the store it handed to its members.
#[derive(Debug)]
pub struct Intercepted<S, H> {
    inner: S,
    hook: std::sync::Arc<H>,
}

impl<S: Clone, H> Clone for Intercepted<S, H> {
    fn clone(&self) -> Self {
        Intercepted {
            inner: self.inner.clone(),
            hook: std::sync::Arc::clone(&self.hook),
        }
    }
}

impl<S: Store, H: Intercept<S>> Intercepted<S, H> {
    /// `inner`'s calls, through `hook`.
    pub fn new(inner: S, hook: H) -> Self {
        Intercepted {
            inner,
            hook: std::sync::Arc::new(hook),
        }
    }

    /// The store the calls are forwarded to.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Hands `call` to the hook and takes the reply as the type the call returns.
    async fn ask<T: TryFrom<Reply, Error = Reply>>(&self, call: Call) -> Result<T, Error> {
        let name = call.name();
        let reply = self.hook.call(&self.inner, call).await?;
        T::try_from(reply)
            .map_err(|other| panic!("the test's store hook answered a {name} call with {other:?}"))
    }
}

impl<S, H> Deref for Intercepted<S, H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.hook
    }
}

impl<S: Store, H: Intercept<S>> Store for Intercepted<S, H> {
    async fn register(
        &self,
        group: &GroupKey,
        req: &RegisterRequest,
    ) -> Result<Registration, Error> {
        let (group, req) = (group.clone(), req.clone());
        self.ask(Call::Register { group, req }).await
    }

    async fn heartbeat(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
        watch: Duration,
    ) -> Result<HeartbeatReply, Error> {
        let (group, session) = (group.clone(), session.clone());
        self.ask(Call::Heartbeat {
            group,
            session,
            ttl,
            watch,
        })
        .await
    }

    async fn rebalance(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
    ) -> Result<RebalanceReply, Error> {
        let (group, session) = (group.clone(), session.clone());
        self.ask(Call::Rebalance {
            group,
            session,
            max_take,
        })
        .await
    }

    async fn leave(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
    ) -> Result<u32, Error> {
        let (group, session, buckets) = (group.clone(), session.clone(), buckets.to_vec());
        self.ask(Call::Leave {
            group,
            session,
            buckets,
        })
        .await
    }

    async fn release(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        known: u64,
    ) -> Result<u32, Error> {
        let (group, session, buckets) = (group.clone(), session.clone(), buckets.to_vec());
        self.ask(Call::Release {
            group,
            session,
            buckets,
            known,
        })
        .await
    }

    async fn deregister(&self, group: &GroupKey, session: &SessionRef) -> Result<(), Error> {
        let (group, session) = (group.clone(), session.clone());
        self.ask(Call::Deregister { group, session }).await
    }

    async fn holdings(
        &self,
        group: &GroupKey,
        session: &SessionRef,
    ) -> Result<Option<Holdings>, Error> {
        let (group, session) = (group.clone(), session.clone());
        self.ask(Call::Holdings { group, session }).await
    }

    async fn snapshot(&self, group: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        let group = group.clone();
        self.ask(Call::Snapshot { group }).await
    }

    async fn subscribe(
        &self,
        group: &GroupKey,
        channel: Channel<'_>,
    ) -> Result<Notifications, Error> {
        let group = group.clone();
        let member = match channel {
            Channel::Member(id) => Some(id.to_string()),
            _ => None,
        };
        self.ask(Call::Subscribe { group, member }).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use redbuckets::MemoryStore;

    use super::*;

    /// Counts calls by name and fails every heartbeat.
    #[derive(Debug, Default)]
    struct Counting {
        calls: AtomicUsize,
    }

    impl Intercept<MemoryStore> for Counting {
        async fn call(&self, inner: &MemoryStore, call: Call) -> Result<Reply, Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Call::Heartbeat { .. } = call {
                return Err(Error::Unavailable {
                    detail: "cut by the test".into(),
                });
            }
            call.run(inner.clone()).await
        }
    }

    /// Forwards as it is.
    #[derive(Debug)]
    struct Plain;

    impl Intercept<MemoryStore> for Plain {}

    #[tokio::test]
    async fn every_call_goes_through_the_hook() {
        let inner = MemoryStore::new();
        let store = Intercepted::new(inner.clone(), Counting::default());
        let group = GroupKey::new("test", "g");
        let session = SessionRef {
            member: "a".into(),
            session: "s1".into(),
        };
        let req = RegisterRequest::new(session.clone(), 1, 4, Duration::from_secs(1));
        store.register(&group, &req).await.expect("register");
        assert!(store
            .heartbeat(&group, &session, Duration::from_secs(1), Duration::MAX)
            .await
            .is_err());
        store
            .rebalance(&group, &session, 4)
            .await
            .expect("rebalance");
        store
            .release(&group, &session, &[], u64::MAX)
            .await
            .expect("release");
        let snapshot = store.snapshot(&group).await.expect("snapshot");
        assert_eq!(snapshot.expect("the group").members.len(), 1);
        store
            .subscribe(&group, Channel::Group)
            .await
            .expect("subscribe");
        store
            .deregister(&group, &session)
            .await
            .expect("deregister");
        assert_eq!(store.calls.load(Ordering::SeqCst), 7);

        let plain = Intercepted::new(inner, Plain);
        plain.register(&group, &req).await.expect("register");
        let reply = plain
            .heartbeat(&group, &session, Duration::from_secs(1), Duration::MAX)
            .await;
        assert!(reply.expect("heartbeat").alive);
    }
}
