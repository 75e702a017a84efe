//! The store trait: the protocol a member speaks with the shared state, one atomic step per call.
//!
//! Two implementations ship: [`crate::RedisStore`] (Lua scripts on Redis) and
//! [`crate::MemoryStore`] (the same semantics in-process). Both keep, per group: its parameters,
//! the live sessions with their server-side expiry, each member's *committed* holdings, each
//! bucket's owner record (member, token), the set of free buckets, and a group-wide token clock.
//!
//! # What every implementation must guarantee
//! - **Server time only.** Session expiry and tokens come from the store's own clock.
//! - **Atomic steps.** Each call runs as one indivisible step against the group's state.
//! - **Idempotence.** A call that timed out may have run; running it again must be harmless
//!   (every call is keyed by member id and session nonce).
//! - **Tokens** for a bucket strictly increase, also after the store lost its data: a token is
//!   `max(server time in µs, last token + 1)`, and a group that is (re)created grants nothing
//!   during its first ttl, so any member still holding leases from before the loss has passed its
//!   local deadline (S3) before the buckets can be granted again.
//! - **Purge.** Expired sessions are removed, with their buckets freed (C2), first thing by
//!   every call that writes (in Redis a renewal purges at most 100, so that one never stalls
//!   the server), and a freed bucket is never granted to a session that expired unpurged.
//!   [`Store::snapshot`] and [`Store::holdings`] only look.
//! - **Push, to whom must act.** Whenever buckets are freed or membership changes, the group's
//!   channel ([`Channel::Group`], for tools that watch) gets a notice, and the members that must
//!   act get a wake-up on their own channel ([`Channel::Member`]), nobody else: after a join, the
//!   members above their new share (the store commits their lower counts at once, see
//!   [`crate::share::givers`]); after buckets were freed, enough members below their share to
//!   take them all ([`crate::share::takers`]), which the store grants them right there, each
//!   what [`crate::share::step`] lets it take, and tells them so ([`Notice::Granted`]): a freed
//!   bucket has its next owner one notice after the call that freed it, with no call of the
//!   taker's own. During the quarantine of a new group nobody is woken. So a change costs work
//!   in proportion to the members that give or take, not to the group's size (C1b). A member
//!   that misses its wake-up or its grant learns at its next heartbeat ([`HeartbeatReply`]
//!   carries its counts and the free count).

mod call;
pub(crate) mod memory;
#[cfg(feature = "testing")]
pub mod model;
// Without `testing`, the readers meant for tests and model checkers are unused.
#[cfg(not(feature = "testing"))]
#[allow(dead_code)]
pub(crate) mod model;
pub(crate) mod redis;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use crate::error::Error;

pub use call::{Call, Reply};

/// Identifies a group in a store: a key prefix and a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// Key prefix (default `red-buckets`).
    pub prefix: String,
    /// Group name.
    pub name: String,
}

impl GroupKey {
    /// A group key from a prefix and a name.
    #[must_use]
    pub fn new(prefix: impl Into<String>, name: impl Into<String>) -> Self {
        GroupKey {
            prefix: prefix.into(),
            name: name.into(),
        }
    }

    /// The Redis hash tag that keeps all keys of the group on one cluster slot.
    #[must_use]
    pub fn tag(&self) -> String {
        format!("{{{}:{}}}", self.prefix, self.name)
    }
}

/// One member's session in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// Member id.
    pub member: String,
    /// Session nonce, fresh per registration.
    pub session: String,
}

/// Request to join a group with a new session.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RegisterRequest {
    /// Member id and new session nonce.
    pub session: SessionRef,
    /// Weight of the member.
    pub weight: u32,
    /// Bucket count the member expects; must match the group's if it exists.
    pub buckets: u32,
    /// Session ttl.
    pub ttl: Duration,
    /// A previous session nonce of this same member that may be replaced even if it still looks
    /// alive (the member already gave up its leases locally).
    pub replaces: Option<String>,
    /// How long the store keeps this session's buckets for the member's id after the session
    /// ends (a graceful leave, or an expiry after a crash): they are *parked*, owned by nobody
    /// and granted to nobody else, and the next session under the same id gets them back at
    /// its registration, with new tokens. Zero (the default): freed at once, as always.
    pub grace: Duration,
}

impl RegisterRequest {
    /// A registration request.
    #[must_use]
    pub fn new(session: SessionRef, weight: u32, buckets: u32, ttl: Duration) -> Self {
        RegisterRequest {
            session,
            weight,
            buckets,
            ttl,
            replaces: None,
            grace: Duration::ZERO,
        }
    }
}

/// Outcome of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Registration {
    /// The session is live; `version` is the group's membership version.
    Registered {
        /// Membership version after the join.
        version: u64,
        /// A floor for this session's grant tokens: every grant to this session comes later,
        /// with a higher token, and every grant to an earlier session under the same nonce (a
        /// registration that ran unheard, then expired or was lost with the store's data, and
        /// was made again) had one not higher. The group's last token, or the store's clock
        /// (µs) less one if later (tokens follow the store's clock). A grant notice at or below
        /// it must not be applied.
        token: u64,
    },
    /// Another live session holds this member id; it expires in `expires_in` unless renewed.
    InUse {
        /// Remaining lifetime of the other session.
        expires_in: Duration,
    },
}

/// Reply to a heartbeat. A store outside this crate builds one from
/// [`HeartbeatReply::default`] (a session that is not alive) and sets the fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HeartbeatReply {
    /// False when the session is unknown or expired: every lease of it is gone.
    pub alive: bool,
    /// Membership version; a change means shares may have changed.
    pub version: u64,
    /// Free buckets in the group.
    pub free: u32,
    /// Time from the store's now until the earliest expiry of the sessions this member watches:
    /// the next two members after it in id order (wrapping around), if there are others. The
    /// member checks the group again at that moment, so a crashed peer's buckets are freed when
    /// its session ends, by two checkers, not by every member at once. `None` also when no
    /// other session expires within the heartbeat's `watch` (see [`Store::heartbeat`]).
    pub next_expiry: Option<Duration>,
    /// The member's committed holdings, as in [`RebalanceReply::committed`] (0 when not alive).
    /// Lower than what the member keeps: the store committed a release for it (a join), and the
    /// member must rebalance, even if the wake-up that said so was lost.
    pub committed: u32,
    /// Buckets the store lists as the session's, as in [`RebalanceReply::held`].
    pub held: u32,
    /// Live sessions in the group (0 when the group does not exist).
    pub members: u32,
}

/// Which notices a subscription receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Channel<'a> {
    /// Every change of the group (membership, freed buckets): for tools that watch it.
    Group,
    /// The wake-ups of one member: the store needs this member to act (take or release).
    Member(&'a str),
}

/// What a rebalance step did for the calling member.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// These buckets were granted, all with `token`.
    Acquired {
        /// The buckets, now owned by the session.
        buckets: Vec<u32>,
        /// Fencing token of this grant.
        token: u64,
    },
    /// The member must give up this many buckets. The store already counts them as gone from
    /// the member's share; the member picks which, drains them and calls `release`.
    Release(u32),
    /// The member holds its share.
    Stay,
    /// The group grants nothing for this long (it was just created or recreated after data loss).
    Wait(Duration),
    /// The session is unknown or expired.
    SessionLost,
}

/// Reply to a rebalance step.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RebalanceReply {
    /// What the step did.
    pub action: Action,
    /// The member's share: `(min, max)` it converges to.
    pub share: (u32, u32),
    /// Membership version.
    pub version: u64,
    /// Free buckets after the step.
    pub free: u32,
    /// The member's committed holdings after the step: what it holds, minus what it must
    /// release. A member that counts otherwise lost a reply and resyncs.
    pub committed: u32,
    /// Buckets the store lists as the session's: owned, or committed for release and not yet
    /// released. A member that counts otherwise lost a reply and resyncs.
    pub held: u32,
    /// Live sessions in the group after the step.
    pub members: u32,
}

impl RebalanceReply {
    /// A reply with `action` and every count zero; a store outside this crate sets the other
    /// fields.
    #[must_use]
    pub fn new(action: Action) -> Self {
        RebalanceReply {
            action,
            share: (0, 0),
            version: 0,
            free: 0,
            committed: 0,
            held: 0,
            members: 0,
        }
    }

    /// The reply when the session is unknown or expired: nothing else in it means anything.
    #[must_use]
    pub fn session_lost() -> Self {
        Self::new(Action::SessionLost)
    }
}

/// What deleting a group did ([`crate::RedisStore::delete_group`],
/// [`crate::MemoryStore::delete_group`]): an operator's call, not a member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deletion {
    /// There was no such group.
    Absent,
    /// Refused: this many sessions are live, and `force` was not given. Nothing was changed.
    Refused {
        /// Live sessions.
        live: u32,
    },
    /// Every key of the group is gone. The `live` sessions it ended are woken: each member finds
    /// its session gone, reports its buckets `Lost` (`session_expired`) and registers again,
    /// which re-creates the group (with the registrant's configuration) and its quarantine, never
    /// shorter than the latest expiry of the ended sessions, so no bucket is granted while a
    /// member that has not heard yet may still own it (S1). Tokens keep growing: they follow
    /// the store's clock.
    Deleted {
        /// Live sessions the deletion ended.
        live: u32,
    },
}

/// What removing a member did ([`crate::RedisStore::remove_member`],
/// [`crate::MemoryStore::remove_member`]): an operator's call for a member known to be dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Removal {
    /// No live session of that member and nothing parked for it (or no group).
    Absent,
    /// Its session ended (or the buckets parked for its id were freed); the `held` buckets it
    /// held were freed and granted to the live members (larger tokens). A member that was alive after all keeps working on them until it
    /// hears (it is woken) or its own deadline passes: two owners meanwhile.
    Removed {
        /// Buckets its session held.
        held: u32,
    },
}

/// The owner record of a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Member id.
    pub member: String,
    /// Fencing token of the grant.
    pub token: u64,
}

/// One live member as the store holds it. A store outside this crate builds one with
/// [`MemberInfo::new`] and sets the fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberInfo {
    /// Member id.
    pub id: String,
    /// Session nonce.
    pub session: String,
    /// Weight.
    pub weight: u32,
    /// Owner records naming this member.
    pub held: u32,
    /// Holdings minus buckets committed for release.
    pub committed: u32,
    /// Time until the session expires without a heartbeat.
    pub expires_in: Duration,
    /// Time since the session registered.
    pub session_age: Duration,
}

impl MemberInfo {
    /// Member `id` with session `session`, weight 1, holding nothing, expiring now.
    #[must_use]
    pub fn new(id: impl Into<String>, session: impl Into<String>) -> Self {
        MemberInfo {
            id: id.into(),
            session: session.into(),
            weight: 1,
            held: 0,
            committed: 0,
            expires_in: Duration::ZERO,
            session_age: Duration::ZERO,
        }
    }
}

/// The whole state of a group, for status tools and tests. A store outside this crate builds
/// one with [`GroupSnapshot::new`] and sets the fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupSnapshot {
    /// Bucket count.
    pub buckets: u32,
    /// Protocol version stored with the group.
    pub protocol: u32,
    /// Membership version.
    pub version: u64,
    /// Live members, sorted by id.
    pub members: Vec<MemberInfo>,
    /// Owner of each bucket, `None` when free.
    pub owners: Vec<Option<Owner>>,
    /// Time left during which the group grants nothing.
    pub quarantine: Duration,
    /// True when the group's data was written by another Redis process than the one that
    /// answered (a restart that reloaded a snapshot or an append-only file, or a failover to a
    /// replica): members may hold leases it does not show, so its owners are not to be trusted.
    /// Reading changes nothing; the next registration or rebalance re-creates such a group,
    /// with the quarantine. Also true when nobody was seen in the group for a ttl (no live
    /// session, no graceful leave within the ttl), which the next registration re-creates too
    /// (the only way [`crate::MemoryStore`] shows it).
    pub stale: bool,
    /// The group's session ttl (zero for a group stored before it was recorded).
    pub ttl: Duration,
    /// Time since the group was created (or re-created).
    pub age: Duration,
    /// Time since the latest renewal (or registration) of any of its sessions, including
    /// expired ones not purged yet; `None` when it has no session at all (every member left).
    /// A group whose members all stopped shows it growing past the ttl.
    pub renewed_ago: Option<Duration>,
    /// Ids whose session ended with a rejoin grace ([`RegisterRequest::grace`]), sorted: their
    /// buckets wait for the id's next session (shown unowned in `owners`).
    pub parked: Vec<ParkedInfo>,
}

/// An id whose buckets are parked for its next session (see [`GroupSnapshot::parked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedInfo {
    /// Member id.
    pub id: String,
    /// The weight its session had; the shares count it as if it were there.
    pub weight: u32,
    /// How many buckets wait for it.
    pub held: u32,
    /// Time until the grace ends and they are freed.
    pub until: Duration,
}

impl ParkedInfo {
    /// Id `id`, weight 1, no bucket, the grace over now.
    #[must_use]
    pub fn new(id: impl Into<String>) -> Self {
        ParkedInfo {
            id: id.into(),
            weight: 1,
            held: 0,
            until: Duration::ZERO,
        }
    }
}

impl GroupSnapshot {
    /// A group of `buckets` buckets, all free, with no member, at this crate's protocol
    /// version, version 0, no quarantine, not stale, ttl and age zero, never renewed.
    #[must_use]
    pub fn new(buckets: u32) -> Self {
        GroupSnapshot {
            buckets,
            protocol: crate::config::PROTOCOL_VERSION,
            version: 0,
            members: Vec::new(),
            owners: vec![None; buckets as usize],
            quarantine: Duration::ZERO,
            stale: false,
            ttl: Duration::ZERO,
            age: Duration::ZERO,
            renewed_ago: None,
            parked: Vec::new(),
        }
    }

    /// Number of buckets without an owner.
    #[must_use]
    pub fn free(&self) -> usize {
        self.owners.iter().filter(|o| o.is_none()).count()
    }

    /// What `session` holds, as this snapshot records it: `None` when the snapshot does not
    /// list the session (it ended, or expired) or its data is [`stale`](Self::stale). The
    /// default of [`Store::holdings`].
    #[must_use]
    pub fn holdings(&self, session: &SessionRef) -> Option<Holdings> {
        if self.stale {
            return None;
        }
        let ours = self
            .members
            .iter()
            .find(|m| m.id == session.member && m.session == session.session)?;
        let owned = (0u32..)
            .zip(&self.owners)
            .filter_map(|(b, o)| {
                let o = o.as_ref()?;
                (o.member == session.member).then_some((b, o.token))
            })
            .collect();
        Some(Holdings {
            owned,
            committed: ours.committed,
        })
    }
}

/// What one live session holds, as the store records it ([`Store::holdings`]): what a member
/// reads to align itself with the store after a lost reply. A store outside this crate builds
/// one from [`Holdings::default`] (nothing held) and sets the fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Holdings {
    /// Each bucket of the session whose owner record names its member, with the token of that
    /// record.
    pub owned: BTreeMap<u32, u64>,
    /// The session's committed count: what it holds minus the releases the store expects.
    pub committed: u32,
}

/// A notice on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Something changed: on the group's channel, anything; on a member's, that it must act
    /// (rebalance).
    Act,
    /// On a member's channel: the store granted `buckets` to its session `session` under
    /// fencing token `token`, as a rebalance step would have (the member had room, and the
    /// buckets were freed). The member owns them from the moment it hears this, if `session` is
    /// its live session and `token` is above every token it has seen: a notice can come late
    /// or twice, after the member released those buckets. A lost one is found by the member's
    /// checks (the store's held count differs), and costs a resync.
    Granted {
        /// The session the buckets were granted to.
        session: String,
        /// The grant's fencing token.
        token: u64,
        /// The buckets.
        buckets: Vec<u32>,
    },
}

/// A stream of notices ([`Notice`]). When it ends, the subscription broke and notices may have
/// been missed: the member resynchronises and subscribes again.
pub struct Notifications {
    inner: Pin<Box<dyn Stream<Item = Notice> + Send>>,
}

impl Notifications {
    /// Wraps any stream of notices.
    pub fn new(stream: impl Stream<Item = Notice> + Send + 'static) -> Self {
        Notifications {
            inner: Box::pin(stream),
        }
    }

    /// The next notice, or `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Notice> {
        self.inner.next().await
    }
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifications")
    }
}

/// The protocol a member speaks with its store. Each call is one atomic step.
///
/// Errors: any `Err` means "the outcome is unknown" — the call may or may not have run. The member
/// treats a failed heartbeat as not renewing its leases (S3), retries idempotent calls, and never
/// claims a bucket it has not seen granted.
///
/// # Implementing it
/// The trait is open: a store written outside this crate is a first-class store. The common
/// case wraps another store, to count, time, trace or fault its calls
/// (`examples/instrumented_store.rs`); a store of its own must keep every guarantee in the
/// [module docs](self), method by method as documented here, or the members' guarantees
/// (one owner per bucket, growing tokens) do not hold. Replies are `#[non_exhaustive]` (they
/// may gain fields): build them from their constructors ([`HeartbeatReply::default`],
/// [`RebalanceReply::new`], [`Holdings::default`], [`MemberInfo::new`],
/// [`GroupSnapshot::new`]) and set the public fields. To carry the protocol over another Redis
/// client, hand [`crate::RedisStore`] a `redis::Client` instead: its Lua scripts are the
/// protocol, checked against [`crate::MemoryStore`] by a differential test.
pub trait Store: Clone + Send + Sync + 'static {
    /// Joins `group` with a new session, creating the group if needed. Fails with
    /// [`Error::GroupMismatch`] when the group's bucket count differs.
    fn register(
        &self,
        group: &GroupKey,
        req: &RegisterRequest,
    ) -> impl Future<Output = Result<Registration, Error>> + Send;

    /// Renews the session for one more ttl and purges expired sessions.
    /// `Ok(alive: false)` means every lease of the session is gone.
    /// `watch` is how far ahead the caller looks for the expiry of the sessions it watches
    /// ([`HeartbeatReply::next_expiry`]): when no other session expires within `watch` of the
    /// store's now, the reply says `None` without looking them up (`Duration::MAX`: always
    /// look). A healthy group's sessions all expire later than a member's next renewal, so the
    /// steady-state renewal skips the lookup.
    fn heartbeat(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
        watch: Duration,
    ) -> impl Future<Output = Result<HeartbeatReply, Error>> + Send;

    /// Applies the share rule ([`crate::share::step`]) for the session: takes up to `max_take`
    /// free buckets, or commits a number of buckets to release.
    fn rebalance(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
    ) -> impl Future<Output = Result<RebalanceReply, Error>> + Send;

    /// Frees the given buckets if the session owns them under a token not above `known` (the
    /// highest token the member has applied); returns how many it freed. A bucket the store
    /// granted the session since, under a higher token, stays: a release retried after its
    /// first attempt ran unheard must not free a grant whose notice is still on its way to the
    /// member ([`Notice::Granted`]), which would make the member its owner after all. Buckets
    /// released beyond the committed surplus lower the member's count too.
    fn release(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        known: u64,
    ) -> impl Future<Output = Result<u32, Error>> + Send;

    /// The graceful leave's last step: frees the given buckets if the session owns them and
    /// ends the session (freeing whatever else it still owns), as one atomic step; returns how
    /// many of `buckets` it freed. One step, not [`Store::release`] then [`Store::deregister`]:
    /// the members that take the freed buckets are woken once, with the membership after the
    /// leave (a release alone counts the leaving member in everyone's share, so the others are
    /// at their share and nobody is woken until the deregistration, a round trip later).
    /// The default runs the two calls, for stores that have no such step.
    fn leave(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
    ) -> impl Future<Output = Result<u32, Error>> + Send {
        async move {
            let freed = self.release(group, session, buckets, u64::MAX).await?;
            self.deregister(group, session).await?;
            Ok(freed)
        }
    }

    /// Ends the session: frees whatever it still owns and removes it from the group.
    fn deregister(
        &self,
        group: &GroupKey,
        session: &SessionRef,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Reads the whole group, or `None` if it does not exist. Read-only: it purges nothing,
    /// notifies nobody and re-creates nothing, so status tools may call it freely. It shows the
    /// group as the next purge will leave it (members whose session expired are left out and
    /// their buckets free), and sets [`GroupSnapshot::stale`] when the data may be stale.
    fn snapshot(
        &self,
        group: &GroupKey,
    ) -> impl Future<Output = Result<Option<GroupSnapshot>, Error>> + Send;

    /// What `session` holds as the store records it, read without changing anything; `None`
    /// when the session is not live in the store (it ended or expired, the group is gone, or
    /// its data is stale, as [`GroupSnapshot::stale`] tells). A member reads it to align
    /// itself after a lost reply. The default reads the whole [`Store::snapshot`], O(B); a
    /// store should read only the session's own buckets.
    fn holdings(
        &self,
        group: &GroupKey,
        session: &SessionRef,
    ) -> impl Future<Output = Result<Option<Holdings>, Error>> + Send {
        async move {
            let snapshot = self.snapshot(group).await?;
            Ok(snapshot.and_then(|s| s.holdings(session)))
        }
    }

    /// Subscribes to the group's change notices, or to one member's wake-ups.
    fn subscribe(
        &self,
        group: &GroupKey,
        channel: Channel<'_>,
    ) -> impl Future<Output = Result<Notifications, Error>> + Send;
}
