//! The store's calls as values: [`Call`] owns its arguments and [`Reply`] holds the answer of
//! the same name. The member's core asks for calls this way, its shell runs them
//! ([`Call::run`]), and test stores that fail, delay or rewrite calls (the testkit's
//! interceptor) take and give the same values.

use std::time::Duration;

use super::{
    Channel, GroupKey, GroupSnapshot, HeartbeatReply, Holdings, Notifications, RebalanceReply,
    RegisterRequest, Registration, SessionRef, Store,
};
use crate::error::Error;

/// One store call with its arguments.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Call {
    /// [`Store::register`].
    Register {
        /// The group.
        group: GroupKey,
        /// The registration.
        req: RegisterRequest,
    },
    /// [`Store::heartbeat`].
    Heartbeat {
        /// The group.
        group: GroupKey,
        /// The session renewed.
        session: SessionRef,
        /// For how long.
        ttl: Duration,
        /// How far ahead it looks for the watched sessions' expiry.
        watch: Duration,
    },
    /// [`Store::rebalance`].
    Rebalance {
        /// The group.
        group: GroupKey,
        /// The session that steps.
        session: SessionRef,
        /// At most this many grants.
        max_take: u32,
    },
    /// [`Store::release`].
    Release {
        /// The group.
        group: GroupKey,
        /// The session that releases.
        session: SessionRef,
        /// The buckets released.
        buckets: Vec<u32>,
        /// The highest token the member has applied.
        known: u64,
    },
    /// [`Store::leave`]; answered with a [`Reply::Release`].
    Leave {
        /// The group.
        group: GroupKey,
        /// The session that leaves.
        session: SessionRef,
        /// The buckets released.
        buckets: Vec<u32>,
    },
    /// [`Store::deregister`].
    Deregister {
        /// The group.
        group: GroupKey,
        /// The session that ends.
        session: SessionRef,
    },
    /// [`Store::holdings`].
    Holdings {
        /// The group.
        group: GroupKey,
        /// The session whose buckets are read.
        session: SessionRef,
    },
    /// [`Store::snapshot`].
    Snapshot {
        /// The group.
        group: GroupKey,
    },
    /// [`Store::subscribe`].
    Subscribe {
        /// The group.
        group: GroupKey,
        /// The member whose wake-ups are asked for, or `None` for the group's channel.
        member: Option<String>,
    },
}

impl Call {
    /// The call's name: `register`, `heartbeat`, `rebalance`, `release`, `leave`, `deregister`,
    /// `holdings`, `snapshot` or `subscribe`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Call::Register { .. } => "register",
            Call::Heartbeat { .. } => "heartbeat",
            Call::Rebalance { .. } => "rebalance",
            Call::Release { .. } => "release",
            Call::Leave { .. } => "leave",
            Call::Deregister { .. } => "deregister",
            Call::Holdings { .. } => "holdings",
            Call::Snapshot { .. } => "snapshot",
            Call::Subscribe { .. } => "subscribe",
        }
    }

    /// Runs the call on `store`. The future owns everything it needs (it can be spawned).
    pub async fn run<S: Store>(self, store: S) -> Result<Reply, Error> {
        Ok(match self {
            Call::Register { group, req } => Reply::Register(store.register(&group, &req).await?),
            Call::Heartbeat {
                group,
                session,
                ttl,
                watch,
            } => Reply::Heartbeat(store.heartbeat(&group, &session, ttl, watch).await?),
            Call::Rebalance {
                group,
                session,
                max_take,
            } => Reply::Rebalance(store.rebalance(&group, &session, max_take).await?),
            Call::Release {
                group,
                session,
                buckets,
                known,
            } => Reply::Release(store.release(&group, &session, &buckets, known).await?),
            Call::Leave {
                group,
                session,
                buckets,
            } => Reply::Release(store.leave(&group, &session, &buckets).await?),
            Call::Deregister { group, session } => {
                Reply::Deregister(store.deregister(&group, &session).await?)
            }
            Call::Holdings { group, session } => {
                Reply::Holdings(store.holdings(&group, &session).await?)
            }
            Call::Snapshot { group } => Reply::Snapshot(store.snapshot(&group).await?),
            Call::Subscribe { group, member } => {
                let channel = member.as_deref().map_or(Channel::Group, Channel::Member);
                Reply::Subscribe(store.subscribe(&group, channel).await?)
            }
        })
    }
}

/// The reply to a [`Call`], in the variant of the same name.
#[derive(Debug)]
#[non_exhaustive]
pub enum Reply {
    /// To [`Call::Register`].
    Register(Registration),
    /// To [`Call::Heartbeat`].
    Heartbeat(HeartbeatReply),
    /// To [`Call::Rebalance`].
    Rebalance(RebalanceReply),
    /// To [`Call::Release`]: how many buckets were freed.
    Release(u32),
    /// To [`Call::Deregister`].
    Deregister(()),
    /// To [`Call::Holdings`].
    Holdings(Option<Holdings>),
    /// To [`Call::Snapshot`].
    Snapshot(Option<GroupSnapshot>),
    /// To [`Call::Subscribe`].
    Subscribe(Notifications),
}

/// `TryFrom<Reply>` for the type each call returns: `Err` gives back another call's reply.
macro_rules! reply_of {
    ($($variant:ident => $ty:ty),* $(,)?) => {$(
        impl TryFrom<Reply> for $ty {
            type Error = Reply;

            fn try_from(reply: Reply) -> Result<$ty, Reply> {
                match reply {
                    Reply::$variant(value) => Ok(value),
                    other => Err(other),
                }
            }
        }
    )*};
}

reply_of! {
    Register => Registration,
    Heartbeat => HeartbeatReply,
    Rebalance => RebalanceReply,
    Release => u32,
    Deregister => (),
    Holdings => Option<Holdings>,
    Snapshot => Option<GroupSnapshot>,
    Subscribe => Notifications,
}
