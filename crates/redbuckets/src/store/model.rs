//! The store protocol as a pure model: plain data with one method per store call, each taking
//! the call's arguments and the store's clock (`now`, µs since the Unix epoch, a value: nothing
//! here reads a clock) and returning the reply and the notices the call publishes. No lock, no
//! clock, no channel: [`crate::MemoryStore`] is this model behind a lock, a clock and broadcast
//! channels, and the Lua scripts (`store/lua/`) mirror it step for step (`tests/differential.rs`
//! compares them). A model checker drives it directly: [`Model`] is `Clone + Eq + Hash`, and no
//! result depends on a hash map's iteration order.
//!
//! **Unstable.** Public only with the crate's `testing` feature, for tests and model checkers;
//! it may change in any release.
//!
//! # How a call runs
//! Every call that writes first purges the expired sessions (freeing their buckets), then does
//! its own work, and then, if anything changed, *settles* the group and tells whom it concerns:
//! the group's channel gets [`Notice::Act`], the members above their new share after a join are
//! woken, and the free buckets go to the members below their share ([`Notice::Granted`]). That
//! epilogue is written once (`Group::epilogue`); where it runs in a call (before its own work,
//! as a heartbeat and a rebalance do, or after, as a release does) is part of the protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::config::PROTOCOL_VERSION;
use crate::error::Error;
use crate::share::{self, Load};
use crate::store::{
    Action, Call, Deletion, GroupKey, GroupSnapshot, HeartbeatReply, Holdings, MemberInfo, Notice,
    Owner, ParkedInfo, RebalanceReply, RegisterRequest, Registration, Removal, Reply, SessionRef,
};

/// Where a notice goes: the subscriptions of [`crate::store::Channel`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum To {
    /// The group's channel ([`crate::store::Channel::Group`]).
    Group,
    /// One member's channel ([`crate::store::Channel::Member`]).
    Member(String),
}

/// A call's reply and the notices it publishes, in the order it publishes them, all on the
/// channels of the group the call named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<R> {
    /// What the call returns.
    pub reply: R,
    /// What it publishes.
    pub notices: Vec<(To, Notice)>,
}

impl<R> Outcome<R> {
    fn new(reply: R, notices: Vec<(To, Notice)>) -> Self {
        Outcome { reply, notices }
    }

    /// The same notices with the reply mapped.
    fn map<T>(self, f: impl FnOnce(R) -> T) -> Outcome<T> {
        Outcome::new(f(self.reply), self.notices)
    }

    fn quiet(reply: R) -> Self {
        Self::new(reply, Vec::new())
    }
}

/// A group's key, ordered: `(prefix, name)`.
type Key = (String, String);

fn key(group: &GroupKey) -> Key {
    (group.prefix.clone(), group.name.clone())
}

/// Converts a duration to whole µs (saturating).
fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The whole store: every group, and the quarantine floors that outlive a deleted group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Model {
    groups: BTreeMap<Key, Group>,
    /// The earliest grant of a group re-created after a forced deletion: the latest expiry of
    /// the sessions it ended (delete.lua's requarantine key). Past ones are ignored.
    floors: BTreeMap<Key, u64>,
}

/// One group's state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    buckets: u32,
    ttl: Duration,
    version: u64,
    /// The end of the quarantine (µs).
    grant_after: u64,
    /// When a live session last left (leave, deregister), or the creation: see `unattended`.
    seen: u64,
    /// When the group was created (its snapshot's age).
    created: u64,
    last_token: u64,
    members: BTreeMap<String, Member>,
    /// Ids whose session ended with a grace ([`RegisterRequest::grace`]): their buckets wait
    /// for the id's next session. Never also in `members`.
    parked: BTreeMap<String, Parked>,
    owners: Vec<Option<(String, u64)>>,
    free: BTreeSet<u32>,
}

/// The buckets of an id whose session ended with a grace: owned by nobody (the session's leases
/// ended: released, or expired), granted to nobody else, and counted in the shares as if the
/// member were there. The id's next session gets them back at its registration (with a new
/// token); at `until` they are freed. Their owner records still name the id, with the token of
/// the grant that ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Parked {
    weight: u32,
    /// The end of the grace (µs): freed once the store's now reaches it.
    until: u64,
    held: BTreeSet<u32>,
    committed: u32,
}

impl Parked {
    /// The parked buckets.
    #[must_use]
    pub fn held(&self) -> &BTreeSet<u32> {
        &self.held
    }

    /// When the grace ends (µs).
    #[must_use]
    pub fn until(&self) -> u64 {
        self.until
    }

    /// The weight the member had.
    #[must_use]
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Its held count minus the releases the store expected when it parked.
    #[must_use]
    pub fn committed(&self) -> u32 {
        self.committed
    }
}

/// One member's session in a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    session: String,
    weight: u32,
    /// Session expiry (µs): live while `now < expires`.
    expires: u64,
    /// Registration time (µs).
    since: u64,
    held: BTreeSet<u32>,
    committed: u32,
    /// How long its buckets stay parked after the session ends (µs; 0: freed at once).
    grace: u64,
}

impl Member {
    /// The session nonce.
    #[must_use]
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The member's weight.
    #[must_use]
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// When the session expires (µs): it is live while the store's now is before it.
    #[must_use]
    pub fn expires(&self) -> u64 {
        self.expires
    }

    /// The buckets the store lists as the session's: owned, or committed for release and not
    /// yet released.
    #[must_use]
    pub fn held(&self) -> &BTreeSet<u32> {
        &self.held
    }

    /// Its held count minus the releases the store expects.
    #[must_use]
    pub fn committed(&self) -> u32 {
        self.committed
    }

    /// Its rejoin grace ([`RegisterRequest::grace`]).
    #[must_use]
    pub fn grace(&self) -> Duration {
        Duration::from_micros(self.grace)
    }
}

impl Model {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The group's state, if it exists.
    #[must_use]
    pub fn group(&self, group: &GroupKey) -> Option<&Group> {
        self.groups.get(&key(group))
    }

    /// The names of the groups under `prefix`, sorted.
    #[must_use]
    pub fn groups(&self, prefix: &str) -> Vec<String> {
        self.groups
            .keys()
            .filter(|(p, _)| p == prefix)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Forgets every group, as a Redis restart without persistence does (the quarantine
    /// floors of deleted groups stay). The caller tells every subscriber.
    pub fn wipe(&mut self) {
        self.groups.clear();
    }

    /// Joins `group` with a new session, creating the group if needed ([`crate::Store::register`],
    /// register.lua).
    pub fn register(
        &mut self,
        group: &GroupKey,
        req: &RegisterRequest,
        now: u64,
    ) -> Outcome<Result<Registration, Error>> {
        let k = key(group);
        let mut notices = Vec::new();
        // A group nobody was seen in for a ttl is forgotten and re-created (register.lua,
        // load_current_meta), its subscribers told.
        self.forget_if(&k, &mut notices, |g| g.unattended(now));
        // A group with no live session holds nothing (every lease ended before its session
        // did, S3): its next member sets its configuration. Another bucket count or ttl
        // re-creates it (register.lua) instead of being refused.
        self.forget_if(&k, &mut notices, |g| {
            g.live_count(now) == 0 && (g.buckets != req.buckets || g.ttl != req.ttl)
        });
        let floor = self.floors.get(&k).copied().filter(|at| *at > now);
        let state = self.groups.entry(k).or_insert_with(|| {
            let mut state = Group::new(req.buckets, now, req.ttl);
            state.grant_after = state.grant_after.max(floor.unwrap_or(now));
            state
        });
        if state.buckets != req.buckets {
            let e = Error::GroupMismatch {
                group: group.name.clone(),
                stored: state.buckets,
                configured: req.buckets,
                stored_protocol: PROTOCOL_VERSION,
                configured_protocol: PROTOCOL_VERSION,
            };
            return Outcome::new(Err(e), notices);
        }
        if state.ttl != req.ttl {
            let e = Error::TtlMismatch {
                group: group.name.clone(),
                stored: state.ttl,
                configured: req.ttl,
            };
            return Outcome::new(Err(e), notices);
        }
        // Sessions purged here free buckets and change the membership, whatever the outcome of
        // the registration: subscribers are told on every path (as register.lua publishes).
        let purged = state.purge(now);
        let id = &req.session.member;
        if let Some(existing) = state.members.get_mut(id) {
            let early = if existing.session == req.session.session {
                existing.expires = now.saturating_add(us(req.ttl));
                Some(Registration::Registered {
                    version: state.version,
                    token: 0,
                })
            } else if req.replaces.as_deref() != Some(existing.session.as_str()) {
                Some(Registration::InUse {
                    expires_in: Duration::from_micros(existing.expires.saturating_sub(now)),
                })
            } else {
                None
            };
            if let Some(mut outcome) = early {
                notices.extend(state.epilogue(purged, false, id, now, None));
                // The token after the grants the purge made, as register.lua reads it.
                if let Registration::Registered { token, .. } = &mut outcome {
                    *token = state.token_floor(now);
                }
                return Outcome::new(Ok(outcome), notices);
            }
            // Replaced: the earlier session gave up its leases locally. With a grace its
            // buckets are parked, and this session takes them back below.
            state.end_session(id, now);
        }
        let parked = state.parked.remove(id);
        state.members.insert(
            id.clone(),
            Member {
                session: req.session.session.clone(),
                weight: req.weight,
                expires: now.saturating_add(us(req.ttl)),
                since: now,
                held: BTreeSet::new(),
                committed: 0,
                grace: us(req.grace),
            },
        );
        state.version += 1;
        let version = state.version;
        // Every grant to this session comes after this floor, the claim's too.
        let floor = state.token_floor(now);
        if let Some(parked) = parked {
            notices.extend(state.claim(id, parked, now));
        }
        notices.extend(state.epilogue(true, true, id, now, None));
        Outcome::new(
            Ok(Registration::Registered {
                version,
                token: floor,
            }),
            notices,
        )
    }

    /// Runs `call` at `now`, as a store would answer it: the reply in the variant of the call's
    /// name, and the notices. `None` for [`Call::Subscribe`], which changes no state (the
    /// caller routes the notices itself).
    pub fn call(&mut self, call: Call, now: u64) -> Option<Outcome<Result<Reply, Error>>> {
        Some(match call {
            Call::Register { group, req } => self
                .register(&group, &req, now)
                .map(|r| r.map(Reply::Register)),
            Call::Heartbeat {
                group,
                session,
                ttl,
                watch,
            } => self
                .heartbeat(&group, &session, ttl, watch, now)
                .map(|r| Ok(Reply::Heartbeat(r))),
            Call::Rebalance {
                group,
                session,
                max_take,
            } => self
                .rebalance(&group, &session, max_take, now)
                .map(|r| Ok(Reply::Rebalance(r))),
            Call::Release {
                group,
                session,
                buckets,
                known,
            } => self
                .release(&group, &session, &buckets, known, now)
                .map(|r| Ok(Reply::Release(r))),
            Call::Leave {
                group,
                session,
                buckets,
            } => self
                .leave(&group, &session, &buckets, now)
                .map(|r| Ok(Reply::Release(r))),
            Call::Deregister { group, session } => self
                .deregister(&group, &session, now)
                .map(|()| Ok(Reply::Deregister(()))),
            Call::Holdings { group, session } => {
                Outcome::quiet(Ok(Reply::Holdings(self.holdings(&group, &session, now))))
            }
            Call::Snapshot { group } => {
                Outcome::quiet(Ok(Reply::Snapshot(self.snapshot(&group, now))))
            }
            Call::Subscribe { .. } => return None,
        })
    }

    /// Renews the session for `ttl` ([`crate::Store::heartbeat`], heartbeat.lua and
    /// heartbeat_fast.lua).
    pub fn heartbeat(
        &mut self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
        watch: Duration,
        now: u64,
    ) -> Outcome<HeartbeatReply> {
        let Some(state) = self.groups.get_mut(&key(group)) else {
            return Outcome::quiet(HeartbeatReply::default());
        };
        let purged = state.purge(now);
        let notices = state.epilogue(purged, false, &session.member, now, None);
        let (alive, committed, held) = match state.live(session, now) {
            Some(m) => {
                m.expires = now.saturating_add(us(ttl));
                (true, m.committed, count(m.held.len()))
            }
            None => (false, 0, 0),
        };
        // Only when some other session ends within `watch`: otherwise every watched one ends
        // later, and the caller would not check them before its next renewal.
        let left = |m: &Member| Duration::from_micros(m.expires.saturating_sub(now));
        let soon = state
            .members
            .iter()
            .any(|(id, m)| *id != session.member && left(m) < watch);
        let next_expiry = if soon {
            state.watched(&session.member).map(left).min()
        } else {
            None
        };
        let reply = HeartbeatReply {
            alive,
            version: state.version,
            free: count(state.free.len()),
            next_expiry,
            committed,
            held,
            members: state.live_count(now),
        };
        Outcome::new(reply, notices)
    }

    /// One step of the share rule for the session ([`crate::Store::rebalance`], rebalance.lua).
    pub fn rebalance(
        &mut self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
        now: u64,
    ) -> Outcome<RebalanceReply> {
        let k = key(group);
        let mut notices = Vec::new();
        self.forget_if(&k, &mut notices, |g| g.unattended(now));
        let Some(state) = self.groups.get_mut(&k) else {
            return Outcome::new(RebalanceReply::session_lost(), notices);
        };
        let purged = state.purge(now);
        notices.extend(state.epilogue(purged, false, &session.member, now, None));
        if state.live(session, now).is_none() {
            return Outcome::new(RebalanceReply::session_lost(), notices);
        }
        let (ids, loads) = state.loads();
        let me = ids
            .iter()
            .position(|id| **id == session.member)
            .unwrap_or(0);
        let free = count(state.free.len());
        let share = share::target_range(state.buckets, &loads, me);
        let action = if now < state.grant_after {
            Action::Wait(Duration::from_micros(state.grant_after - now))
        } else {
            match share::step(state.buckets, &loads, me, free) {
                share::Step::Stay => Action::Stay,
                share::Step::Release(k) => {
                    if let Some(m) = state.members.get_mut(&session.member) {
                        m.committed -= k;
                    }
                    Action::Release(k)
                }
                share::Step::Take(k) => {
                    let (token, buckets) =
                        state.grant(&session.member, k.min(max_take.max(1)), now);
                    Action::Acquired { buckets, token }
                }
            }
        };
        let (committed, held) = state
            .members
            .get(&session.member)
            .map_or((0, 0), |m| (m.committed, count(m.held.len())));
        let reply = RebalanceReply {
            action,
            share,
            version: state.version,
            free: count(state.free.len()),
            committed,
            held,
            members: state.live_count(now),
        };
        Outcome::new(reply, notices)
    }

    /// Frees the named buckets the session owns under a token not above `known`; the reply is
    /// how many ([`crate::Store::release`], release.lua).
    pub fn release(
        &mut self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        known: u64,
        now: u64,
    ) -> Outcome<u32> {
        let Some(state) = self.groups.get_mut(&key(group)) else {
            return Outcome::quiet(0);
        };
        // Nothing named: no call at all (RedisStore does not run the script either).
        if buckets.is_empty() || !state.is_session(session) {
            return Outcome::quiet(0);
        }
        // Expired sessions first, so the freed buckets go by the live members' shares; the
        // caller's own, if it expired, with them (release.lua).
        let purged = state.purge(now);
        let mut freed = Vec::new();
        if let Some(m) = state.members.get_mut(&session.member) {
            for &b in buckets {
                // Not a bucket granted since under a token the member has not seen.
                let newer = state
                    .owners
                    .get(b as usize)
                    .and_then(|o| o.as_ref())
                    .is_some_and(|(_, token)| *token > known);
                if !newer && m.held.remove(&b) {
                    freed.push(b);
                }
            }
            m.committed = m.committed.min(count(m.held.len()));
        }
        for &b in &freed {
            state.owners[b as usize] = None;
            state.free.insert(b);
        }
        let changed = purged || !freed.is_empty();
        let notices = state.epilogue(changed, false, &session.member, now, None);
        Outcome::new(count(freed.len()), notices)
    }

    /// Frees the named buckets the session owns and ends the session, in one step; the reply is
    /// how many of the named it freed ([`crate::Store::leave`], leave.lua).
    pub fn leave(
        &mut self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        now: u64,
    ) -> Outcome<u32> {
        let Some(state) = self.groups.get_mut(&key(group)) else {
            return Outcome::quiet(0);
        };
        if !state.is_session(session) {
            return Outcome::quiet(0);
        }
        // Expired sessions first (leave.lua); if the caller's own had expired, the purge ended
        // it and freed what it held, and the leave frees nothing more.
        state.purge(now);
        let freed = match state.members.get(&session.member) {
            Some(m) => {
                let mut held = m.held.clone();
                let freed = buckets.iter().filter(|b| held.remove(b)).count();
                state.session_left(&session.member, now, true);
                freed
            }
            None => 0,
        };
        let notices = state.epilogue(true, false, &session.member, now, None);
        Outcome::new(count(freed), notices)
    }

    /// Ends the session, freeing what it holds ([`crate::Store::deregister`], deregister.lua).
    pub fn deregister(&mut self, group: &GroupKey, session: &SessionRef, now: u64) -> Outcome<()> {
        let Some(state) = self.groups.get_mut(&key(group)) else {
            return Outcome::quiet(());
        };
        if !state.is_session(session) {
            return Outcome::quiet(());
        }
        // Expired sessions first (deregister.lua), the caller's own with them if it expired.
        let purged = state.purge(now);
        let removed = state.is_session(session) && state.session_left(&session.member, now, true);
        let notices = state.epilogue(purged || removed, false, &session.member, now, None);
        Outcome::new((), notices)
    }

    /// The session's held set with each owner record's token, read-only
    /// ([`crate::Store::holdings`], holdings.lua).
    #[must_use]
    pub fn holdings(&self, group: &GroupKey, session: &SessionRef, now: u64) -> Option<Holdings> {
        let state = self.groups.get(&key(group))?;
        let m = state
            .members
            .get(&session.member)
            .filter(|m| m.session == session.session && m.expires > now)?;
        let owned = m
            .held
            .iter()
            .filter_map(|&b| match state.owners.get(b as usize) {
                Some(Some((owner, token))) if *owner == session.member => Some((b, *token)),
                _ => None,
            })
            .collect();
        Some(Holdings {
            owned,
            committed: m.committed,
        })
    }

    /// The whole group, read-only, as snapshot.lua: nothing is purged and nobody notified; the
    /// group is shown as the next purge would leave it (expired members left out, their buckets
    /// free or parked, parked buckets whose grace is over free, the version bumped once per such
    /// change) ([`crate::Store::snapshot`]).
    #[must_use]
    pub fn snapshot(&self, group: &GroupKey, now: u64) -> Option<GroupSnapshot> {
        let stored = self.groups.get(&key(group))?;
        let since = |at: u64| Duration::from_micros(now.saturating_sub(at));
        let until = |at: u64| Duration::from_micros(at.saturating_sub(now));
        let mut state = stored.clone();
        state.purge(now);
        let members = state
            .members
            .iter()
            .map(|(id, m)| MemberInfo {
                id: id.clone(),
                session: m.session.clone(),
                weight: m.weight,
                held: count(m.held.len()),
                committed: m.committed,
                expires_in: until(m.expires),
                session_age: since(m.since),
            })
            .collect();
        let mut owners: Vec<Option<Owner>> = state
            .owners
            .iter()
            .map(|o| {
                o.as_ref().map(|(member, token)| Owner {
                    member: member.clone(),
                    token: *token,
                })
            })
            .collect();
        // Parked buckets are owned by nobody.
        for p in state.parked.values() {
            for &b in &p.held {
                if let Some(slot) = owners.get_mut(b as usize) {
                    *slot = None;
                }
            }
        }
        let parked = state
            .parked
            .iter()
            .map(|(id, p)| ParkedInfo {
                id: id.clone(),
                weight: p.weight,
                held: count(p.held.len()),
                until: until(p.until),
            })
            .collect();
        Some(GroupSnapshot {
            buckets: state.buckets,
            protocol: PROTOCOL_VERSION,
            version: state.version,
            members,
            owners,
            quarantine: until(state.grant_after),
            stale: stored.unattended(now),
            ttl: state.ttl,
            age: since(state.created),
            // Renewed at its expiry less the ttl; expired sessions count until purged.
            renewed_ago: stored
                .members
                .values()
                .map(|m| m.expires)
                .max()
                .map(|latest| {
                    Duration::from_micros(now.saturating_add(us(state.ttl)).saturating_sub(latest))
                }),
            parked,
        })
    }

    /// Deletes `group` (an operator's call, delete.lua): refused while sessions are live unless
    /// `force`; a forced deletion wakes the live members and keeps the latest expiry of their
    /// sessions as the floor of the re-created group's quarantine.
    pub fn delete(&mut self, group: &GroupKey, force: bool, now: u64) -> Outcome<Deletion> {
        let k = key(group);
        let Some(state) = self.groups.get(&k) else {
            return Outcome::quiet(Deletion::Absent);
        };
        let live: Vec<(String, u64)> = state
            .members
            .iter()
            .filter(|(_, m)| m.expires > now)
            .map(|(id, m)| (id.clone(), m.expires))
            .collect();
        let n = count(live.len());
        if n > 0 && !force {
            return Outcome::quiet(Deletion::Refused { live: n });
        }
        if let Some(until) = live.iter().map(|(_, at)| *at).max() {
            let floor = self.floors.entry(k.clone()).or_insert(until);
            *floor = (*floor).max(until);
        }
        self.groups.remove(&k);
        let notices = std::iter::once((To::Group, Notice::Act))
            .chain(
                live.into_iter()
                    .map(|(id, _)| (To::Member(id), Notice::Act)),
            )
            .collect();
        Outcome::new(Deletion::Deleted { live: n }, notices)
    }

    /// Ends `member`'s session now, whatever its nonce (an operator's call, remove.lua): a
    /// deregistration that also wakes the member.
    pub fn remove_member(&mut self, group: &GroupKey, member: &str, now: u64) -> Outcome<Removal> {
        let Some(state) = self.groups.get_mut(&key(group)) else {
            return Outcome::quiet(Removal::Absent);
        };
        let purged = state.purge(now);
        // Buckets parked for the id are freed too (the operator wants it gone): the reply
        // counts them as its held ones (an id is live or parked, never both).
        let parked = state.parked.get(member).map(|p| count(p.held.len()));
        let unparked = state.unpark(member);
        let held = state.members.get(member).map(|m| count(m.held.len()));
        let removed = held.is_some() && state.session_left(member, now, false);
        let woken = removed.then(|| (To::Member(member.to_string()), Notice::Act));
        let notices = state.epilogue(purged || unparked || removed, false, member, now, woken);
        let reply = match (held, parked) {
            (Some(held), _) if removed => Removal::Removed { held },
            (_, Some(held)) if unparked => Removal::Removed { held },
            _ => Removal::Absent,
        };
        Outcome::new(reply, notices)
    }

    /// The buckets the store lists as `member`'s in `group` (owned, or committed for release
    /// and not yet released) with their tokens, as `(token, bucket)` in ascending order,
    /// whether or not the session is still alive.
    #[must_use]
    pub fn held_buckets(&self, group: &GroupKey, member: &str) -> Vec<(u64, u32)> {
        let Some(g) = self.groups.get(&key(group)) else {
            return Vec::new();
        };
        let Some(m) = g.members.get(member) else {
            return Vec::new();
        };
        let mut held: Vec<(u64, u32)> = m
            .held
            .iter()
            .map(|&b| (g.owner(b).map_or(0, |(_, t)| t), b))
            .collect();
        held.sort_unstable();
        held
    }

    /// Checks every group's own invariants (see [`Group::check`]).
    ///
    /// # Errors
    /// The first broken invariant, with its group.
    pub fn check(&self) -> Result<(), String> {
        for ((prefix, name), g) in &self.groups {
            g.check().map_err(|e| format!("{{{prefix}:{name}}}: {e}"))?;
        }
        Ok(())
    }

    /// Forgets group `k` if `forget` says so (its data is lost, as in load_current_meta), and
    /// tells its channel.
    fn forget_if(
        &mut self,
        k: &Key,
        notices: &mut Vec<(To, Notice)>,
        forget: impl FnOnce(&Group) -> bool,
    ) {
        if self.groups.get(k).is_some_and(forget) {
            self.groups.remove(k);
            notices.push((To::Group, Notice::Act));
        }
    }
}

impl Group {
    fn new(buckets: u32, now: u64, ttl: Duration) -> Self {
        Group {
            buckets,
            ttl,
            version: 0,
            grant_after: now.saturating_add(us(ttl)),
            seen: now,
            created: now,
            last_token: 0,
            members: BTreeMap::new(),
            parked: BTreeMap::new(),
            owners: vec![None; buckets as usize],
            free: (0..buckets).collect(),
        }
    }

    /// The bucket count.
    #[must_use]
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// The membership version.
    #[must_use]
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The last fencing token granted.
    #[must_use]
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// When the group was created (µs): a group forgotten and made again has a new one.
    #[must_use]
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The end of the quarantine (µs): nothing is granted before it.
    #[must_use]
    pub fn grant_after(&self) -> u64 {
        self.grant_after
    }

    /// Every session, expired ones not purged yet included, by member id.
    #[must_use]
    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.members
    }

    /// The parked ids, with their buckets.
    #[must_use]
    pub fn parked(&self) -> &BTreeMap<String, Parked> {
        &self.parked
    }

    /// Bucket `b`'s owner record: member and token.
    #[must_use]
    pub fn owner(&self, b: u32) -> Option<(&str, u64)> {
        self.owners
            .get(b as usize)?
            .as_ref()
            .map(|(m, t)| (m.as_str(), *t))
    }

    /// The free buckets.
    #[must_use]
    pub fn free(&self) -> &BTreeSet<u32> {
        &self.free
    }

    /// The group's own invariants: the free buckets and the held ones partition `0..B`; every
    /// held bucket's owner record names its member, with a token not above the group's last;
    /// every owner record is in its member's held set; a committed count is at most the held
    /// count.
    ///
    /// # Errors
    /// The first broken invariant.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = self.free.clone();
        if let Some(b) = self.free.iter().find(|b| **b >= self.buckets) {
            return Err(format!("free bucket {b} is not below {}", self.buckets));
        }
        if let Some(b) = self.free.iter().find(|b| self.owner(**b).is_some()) {
            return Err(format!("free bucket {b} has an owner record"));
        }
        for (id, m) in &self.members {
            if m.committed > count(m.held.len()) {
                return Err(format!("{id} commits {} of {}", m.committed, m.held.len()));
            }
            for &b in &m.held {
                if !seen.insert(b) {
                    return Err(format!("bucket {b} is free or held twice ({id})"));
                }
                match self.owner(b) {
                    Some((owner, token)) if owner == id && token <= self.last_token => {}
                    other => return Err(format!("{id} holds {b}, recorded as {other:?}")),
                }
            }
        }
        for (id, p) in &self.parked {
            if self.members.contains_key(id) {
                return Err(format!("{id} is live and parked"));
            }
            if p.committed > count(p.held.len()) {
                return Err(format!(
                    "parked {id} commits {} of {}",
                    p.committed,
                    p.held.len()
                ));
            }
            for &b in &p.held {
                if !seen.insert(b) {
                    return Err(format!("bucket {b} is free or held twice (parked {id})"));
                }
                match self.owner(b) {
                    Some((owner, token)) if owner == id && token <= self.last_token => {}
                    other => return Err(format!("parked {id} holds {b}, recorded as {other:?}")),
                }
            }
        }
        if count(seen.len()) != self.buckets || seen.iter().any(|b| *b >= self.buckets) {
            return Err(format!("free and held are not 0..{}", self.buckets));
        }
        Ok(())
    }

    /// True when nobody has been seen in the group for a ttl: no session is live at `now`, and
    /// no live session left within the ttl. Such a group is re-created with the quarantine by
    /// the next registration (and a rebalance finds no session), as after a total loss. Mirrors
    /// `is_unattended` in `common.lua`, whose comment tells why: a Redis primary that hung for
    /// longer than a ttl and came back may have been replaced meanwhile.
    fn unattended(&self, now: u64) -> bool {
        self.members.values().all(|m| m.expires <= now)
            && self.seen.saturating_add(us(self.ttl)) <= now
    }

    /// A live session left (leave, deregister: `park`, so with a grace its buckets are parked;
    /// an operator's removal: freed), and `unattended` counts from now (common.lua's
    /// `seen_leaving`).
    fn session_left(&mut self, id: &str, now: u64, park: bool) -> bool {
        let ended = if park {
            self.end_session(id, now)
        } else {
            self.remove_member(id)
        };
        if ended {
            self.seen = now;
        }
        ended
    }

    /// Ends `id`'s session: with a grace, its buckets are parked until `from` + the grace
    /// (common.lua's `end_session`), else it is removed and its buckets freed.
    fn end_session(&mut self, id: &str, from: u64) -> bool {
        let Some(m) = self.members.remove(id) else {
            return false;
        };
        if m.grace == 0 {
            self.free_all(m.held);
        } else {
            let parked = Parked {
                weight: m.weight,
                until: from.saturating_add(m.grace),
                held: m.held,
                committed: m.committed,
            };
            self.parked.insert(id.to_string(), parked);
        }
        self.version += 1;
        true
    }

    /// Frees `id`'s parked buckets, if any (the grace ended, or an operator removed the id).
    fn unpark(&mut self, id: &str) -> bool {
        let Some(parked) = self.parked.remove(id) else {
            return false;
        };
        self.free_all(parked.held);
        self.version += 1;
        true
    }

    /// Gives `id`'s new session the buckets parked for it, under a new token, and tells it
    /// (common.lua's `claim`). Returns the grant notice (none if nothing was parked).
    fn claim(&mut self, id: &str, parked: Parked, now: u64) -> Vec<(To, Notice)> {
        let Some(session) = self.members.get(id).map(|m| m.session.clone()) else {
            return Vec::new();
        };
        if parked.held.is_empty() {
            return Vec::new();
        }
        let token = self.next_token(now);
        for &b in &parked.held {
            self.owners[b as usize] = Some((id.to_string(), token));
        }
        let buckets = parked.held.iter().copied().collect();
        if let Some(m) = self.members.get_mut(id) {
            m.committed = parked.committed;
            m.held = parked.held;
        }
        let notice = Notice::Granted {
            session,
            token,
            buckets,
        };
        vec![(To::Member(id.to_string()), notice)]
    }

    /// Removes a member and frees its buckets.
    fn remove_member(&mut self, id: &str) -> bool {
        let Some(member) = self.members.remove(id) else {
            return false;
        };
        self.free_all(member.held);
        self.version += 1;
        true
    }

    /// Deletes the owner records of `held` and adds them to the free buckets.
    fn free_all(&mut self, held: BTreeSet<u32>) {
        for &b in &held {
            self.owners[b as usize] = None;
        }
        self.free.extend(held);
    }

    /// A new fencing token at `now`, kept as the group's last: above every earlier one, and
    /// following the server's clock (common.lua's `next_token`).
    fn next_token(&mut self, now: u64) -> u64 {
        self.last_token = now.max(self.last_token + 1);
        self.last_token
    }

    /// Every member's load in id order, with the ids: the live ones and the parked ones (which
    /// count as if they were there).
    fn loads(&self) -> (Vec<&String>, Vec<Load>) {
        let live = self
            .members
            .iter()
            .map(|(id, m)| (id, m.weight, m.committed));
        let parked = self
            .parked
            .iter()
            .map(|(id, p)| (id, p.weight, p.committed));
        let mut all: Vec<_> = live.chain(parked).collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
            .map(|(id, weight, held)| (id, Load { weight, held }))
            .unzip()
    }

    /// What a registration tells the member about tokens (`Registration::Registered::token`):
    /// every grant to the session comes later with a higher token, and every grant to an
    /// earlier session under its nonce came before with one not higher. The group's last token,
    /// or the server's now - 1 µs if later: tokens follow the server's clock (`grant`), and a
    /// group re-created after a data loss starts again from 0, where grants to the sessions
    /// it lost had tokens of their time. Mirrors register.lua.
    fn token_floor(&self, now: u64) -> u64 {
        self.last_token.max(now.saturating_sub(1))
    }

    /// Grants up to `k` free buckets (the lowest) to member `id` under a new token. Returns
    /// the token and the buckets. Mirrors `grant` in `common.lua`.
    fn grant(&mut self, id: &str, k: u32, now: u64) -> (u64, Vec<u32>) {
        let token = self.next_token(now);
        let mut taken = Vec::with_capacity(k as usize);
        for _ in 0..k {
            let Some(b) = self.free.pop_first() else {
                break;
            };
            self.owners[b as usize] = Some((id.to_string(), token));
            taken.push(b);
        }
        if let Some(m) = self.members.get_mut(id) {
            m.held.extend(taken.iter().copied());
            m.committed += count(taken.len());
        }
        (token, taken)
    }

    /// The end of every call that may have changed the group: nothing if it did not
    /// (`changed`); else the group's channel is told, then `first` (a wake-up the call sends of
    /// its own), then whatever [`Group::settle`] decides.
    fn epilogue(
        &mut self,
        changed: bool,
        joined: bool,
        caller: &str,
        now: u64,
        first: Option<(To, Notice)>,
    ) -> Vec<(To, Notice)> {
        if !changed {
            return Vec::new();
        }
        let mut told = vec![(To::Group, Notice::Act)];
        told.extend(first);
        told.extend(
            self.settle(now, joined, caller)
                .into_iter()
                .map(|(id, notice)| (To::Member(id), notice)),
        );
        told
    }

    /// After a change: the members that must act, and what each is told (see the module docs
    /// of `store`). `joined`: a member joined, so some may be above their new share; their
    /// lower counts are committed here, and they are woken ([`Notice::Act`]). Then, if buckets
    /// are free, the members to take them ([`share::takers`]), in that order, are each granted
    /// what [`share::step`] lets them take now, and told the grant ([`Notice::Granted`]):
    /// a freed bucket gets its next owner without a call of its own. `caller`, the member whose
    /// call this is, is woken instead of granted: it is in the middle of its call. Nobody during
    /// the quarantine. Mirrors `settle` in `common.lua`.
    fn settle(&mut self, now: u64, joined: bool, caller: &str) -> Vec<(String, Notice)> {
        if now < self.grant_after {
            return Vec::new();
        }
        let mut woken: Vec<String> = Vec::new();
        if joined {
            let (ids, loads) = self.loads();
            let commits: Vec<(String, u32)> = share::givers(self.buckets, &loads)
                .into_iter()
                .map(|(i, count)| (ids[i].clone(), count))
                .collect();
            for (id, count) in commits {
                if let Some(m) = self.members.get_mut(&id) {
                    m.committed = count;
                    woken.push(id);
                } else if let Some(p) = self.parked.get_mut(&id) {
                    // Committed, as a present member's count would be; nobody to wake.
                    p.committed = count;
                }
            }
        }
        // The loads once (after the commits above), in id order, kept up to date as each taker
        // is granted.
        let (ids, mut loads) = self.loads();
        let ids: Vec<String> = ids.into_iter().cloned().collect();
        let mut takers: Vec<usize> = Vec::new();
        let free = count(self.free.len());
        if free > 0 {
            for i in share::takers(self.buckets, &loads, free) {
                if woken.contains(&ids[i]) || takers.contains(&i) {
                    continue;
                }
                if ids[i] == caller {
                    woken.push(ids[i].clone());
                } else {
                    takers.push(i);
                }
            }
        }
        let mut told: Vec<(String, Notice)> =
            woken.into_iter().map(|id| (id, Notice::Act)).collect();
        // Every call purges expired sessions before it settles here, so no taker has expired
        // (common.lua's settle skips one: a renewal's purge there stops at 100). A parked id
        // takes its share when its next session comes: nothing for it now.
        for me in takers {
            if self.parked.contains_key(&ids[me]) {
                continue;
            }
            let free = count(self.free.len());
            if let share::Step::Take(k) = share::step(self.buckets, &loads, me, free) {
                let id = &ids[me];
                let (token, buckets) = self.grant(id, k, now);
                loads[me].held += count(buckets.len());
                let session = self.members.get(id).map(|m| m.session.clone());
                if let (false, Some(session)) = (buckets.is_empty(), session) {
                    told.push((
                        id.clone(),
                        Notice::Granted {
                            session,
                            token,
                            buckets,
                        },
                    ));
                }
            }
        }
        told
    }

    /// The sessions `member` watches for expiry: the next two members after it in id order,
    /// wrapping around. Mirrors `watched` in `common.lua`.
    fn watched(&self, member: &str) -> impl Iterator<Item = &Member> {
        use std::ops::Bound::{Excluded, Unbounded};
        let after = self
            .members
            .range::<str, _>((Excluded(member), Unbounded))
            .chain(self.members.range::<str, _>((Unbounded, Excluded(member))));
        after.take(2).map(|(_, m)| m)
    }

    /// Whether `s` is the member's current session (expired or not: what the scripts' nonce
    /// check sees).
    fn is_session(&self, s: &SessionRef) -> bool {
        self.members
            .get(&s.member)
            .is_some_and(|m| m.session == s.session)
    }

    /// Ends expired sessions (parking the buckets of those with a grace, from their expiry),
    /// then frees the parked buckets whose grace is over; returns true if anything changed.
    fn purge(&mut self, now: u64) -> bool {
        let expired: Vec<(String, u64)> = self
            .members
            .iter()
            .filter(|(_, m)| m.expires <= now)
            .map(|(id, m)| (id.clone(), m.expires))
            .collect();
        for (id, expires) in &expired {
            self.end_session(id, *expires);
        }
        let over: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| p.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &over {
            self.unpark(id);
        }
        !expired.is_empty() || !over.is_empty()
    }

    /// The live sessions at `now` (common.lua's `live_count`).
    fn live_count(&self, now: u64) -> u32 {
        count(self.members.values().filter(|m| m.expires > now).count())
    }

    fn live<'a>(&'a mut self, s: &SessionRef, now: u64) -> Option<&'a mut Member> {
        self.members
            .get_mut(&s.member)
            .filter(|m| m.session == s.session && m.expires > now)
    }
}

/// Parking checked from outside, on one group's state before and after each call, against
/// what the sessions seen to end say (not against the model's own parked records): what a
/// session with a grace held when it ended (left, replaced, or expired: then from its expiry)
/// keeps its owner record — the id and the old token — until the grace ends: granted to nobody
/// else, and not freed; the id's next session claims all of it at its registration, under one
/// token above each old one; once the grace is over, the next call that purges expired
/// sessions (a registration, a heartbeat, a rebalance step) frees what is still parked. A
/// group forgotten or lost (a wipe) takes its parked buckets with it.
///
/// For model checkers and simulations (`explore`, `tests/simulation.rs`): feed it every call
/// that writes, in the order the store ran them.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Default)]
pub struct ParkingCheck {
    /// The creation time of the group the expectations are about.
    created: Option<u64>,
    expected: BTreeMap<String, Expected>,
    /// An id an operator removes in the next call observed.
    removing: Option<String>,
    claims: u64,
}

/// What [`ParkingCheck::observe`] needs of a group before a call ([`ParkingCheck::before`]):
/// its creation, and the sessions with a grace that hold buckets and may end in the call, with
/// their tokens. Small next to the group: a simulation takes one before every call.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Default)]
pub struct Before {
    created: Option<u64>,
    sessions: Vec<Ending>,
}

/// A session that may end in the call: id, nonce, expiry (µs), grace (µs), and each held
/// bucket's token.
#[cfg(any(test, feature = "testing"))]
type Ending = (String, String, u64, u64, BTreeMap<u32, u64>);

/// Buckets expected parked for an id: with the tokens they had, until the grace ends (µs).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Expected {
    tokens: BTreeMap<u32, u64>,
    until: u64,
}

/// What later checks depend on: the claims counted are left out.
#[cfg(any(test, feature = "testing"))]
impl std::hash::Hash for ParkingCheck {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (self.created, &self.expected).hash(h);
    }
}

#[cfg(any(test, feature = "testing"))]
impl ParkingCheck {
    /// Nothing expected yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// What [`ParkingCheck::observe`] needs of the group as it is before a call at `now` (µs)
    /// made for member `caller`: the sessions that may end in it are the expired ones and the
    /// caller's (a leave, a deregistration, a replacement, an operator's removal).
    #[must_use]
    pub fn before(group: Option<&Group>, now: u64, caller: &str) -> Before {
        let Some(g) = group else {
            return Before::default();
        };
        let sessions = g
            .members
            .iter()
            .filter(|(id, m)| (m.expires <= now || *id == caller) && m.grace > 0)
            .filter(|(_, m)| !m.held.is_empty())
            .map(|(id, m)| {
                let tokens = m
                    .held
                    .iter()
                    .map(|&b| (b, g.owner(b).map_or(0, |(_, token)| token)))
                    .collect();
                (id.clone(), m.session.clone(), m.expires, m.grace, tokens)
            })
            .collect();
        Before {
            created: Some(g.created),
            sessions,
        }
    }

    /// One call that ran at `now` (µs): the group as it was `before` it ([`ParkingCheck::before`])
    /// and as it is `after`. `purges`: the call ends expired sessions and graces first, whatever
    /// it finds (a registration, a heartbeat, a rebalance step; a release or a leave only for a
    /// live session of its own). Returns what broke, as text.
    pub fn observe(
        &mut self,
        before: &Before,
        after: Option<&Group>,
        now: u64,
        purges: bool,
    ) -> Vec<String> {
        let removing = self.removing.take();
        let created = after.map(Group::created);
        if before.created != self.created || created != self.created {
            // Another group (forgotten or lost, and made again): nothing parked carries over.
            self.expected.clear();
            self.created = created;
            if before.created != created {
                return Vec::new();
            }
        }
        let Some(after) = after else {
            return Vec::new();
        };
        for (id, nonce, expires, grace, tokens) in &before.sessions {
            let ended = after.members().get(id).is_none_or(|n| n.session() != nonce);
            let until = (*expires).min(now).saturating_add(*grace);
            let removed = removing.as_ref() == Some(id);
            if !ended || removed || until <= now {
                continue;
            }
            let e = Expected {
                tokens: tokens.clone(),
                until,
            };
            self.expected.insert(id.clone(), e);
        }
        let mut broken = Vec::new();
        let mut done = Vec::new();
        for (id, e) in &self.expected {
            let next = after.members().get(id);
            if now >= e.until {
                // The grace is over: a call that purges frees what is still parked.
                if purges {
                    let kept: Vec<u32> = e
                        .tokens
                        .iter()
                        .filter(|&(&b, &old)| after.owner(b) == Some((id.as_str(), old)))
                        .map(|(&b, _)| b)
                        .collect();
                    if !kept.is_empty() {
                        broken.push(format!(
                            "{kept:?} still parked for {id} {} µs after its grace ended",
                            now - e.until
                        ));
                    }
                    done.push(id.clone());
                }
                continue;
            }
            let mut claimed = BTreeSet::new();
            for (&b, &old) in &e.tokens {
                let owner = after.owner(b);
                let fine = match (owner, next) {
                    (Some((o, token)), None) => o == id && token == old,
                    (Some((o, token)), Some(m)) => {
                        claimed.insert(token);
                        o == id && token > old && m.held().contains(&b)
                    }
                    (None, _) => false,
                };
                if !fine {
                    broken.push(format!(
                        "bucket {b}, parked for {id} (token {old}) for {} µs more, is now \
                         {owner:?}{}",
                        e.until - now,
                        if next.is_some() {
                            ", its next session registered"
                        } else {
                            ""
                        }
                    ));
                }
            }
            if next.is_some() {
                if claimed.len() > 1 {
                    broken.push(format!("{id} claimed its buckets under tokens {claimed:?}"));
                }
                self.claims += 1;
                done.push(id.clone());
            }
        }
        for id in done {
            self.expected.remove(&id);
        }
        broken
    }

    /// An operator removes `id` (`Model::remove_member`): its session ends without parking,
    /// and what is parked for it is freed. Call it before observing the removal.
    pub fn removed(&mut self, id: &str) {
        self.expected.remove(id);
        self.removing = Some(id.to_string());
    }

    /// The store lost its data (a wipe): nothing parked carries over.
    pub fn forget(&mut self) {
        self.expected.clear();
        self.created = None;
    }

    /// The ids whose buckets must stay parked at `now` (µs), each with its buckets and the end
    /// of its grace.
    pub fn parked(&self, now: u64) -> impl Iterator<Item = (&str, Vec<u32>, u64)> {
        self.expected
            .iter()
            .filter(move |(_, e)| now < e.until)
            .map(|(id, e)| (id.as_str(), e.tokens.keys().copied().collect(), e.until))
    }

    /// How many claims it saw: a parked id's next session registering within the grace.
    #[must_use]
    pub fn claims(&self) -> u64 {
        self.claims
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    use proptest::prelude::*;

    use super::*;

    const TTL: Duration = Duration::from_secs(1);
    const T0: u64 = 1_700_000_000_000_000;

    /// One call, with the member it is made for (0..3).
    #[derive(Debug, Clone)]
    enum Op {
        Register {
            m: usize,
            fresh: bool,
            weight: u32,
            /// With a rejoin grace (parks its buckets when the session ends).
            grace: bool,
        },
        Heartbeat {
            m: usize,
        },
        Rebalance {
            m: usize,
            max_take: u32,
        },
        /// The i-th bucket the member holds (and one it may not), under the highest token.
        Release {
            m: usize,
            i: usize,
        },
        Leave {
            m: usize,
        },
        Deregister {
            m: usize,
        },
        Remove {
            m: usize,
        },
        Delete {
            force: bool,
        },
        /// Time passes by this many ms.
        Advance(u64),
        /// Time jumps to the earliest session expiry exactly (its boundary).
        ToExpiry,
    }

    fn op() -> impl Strategy<Value = Op> {
        let m = 0..3usize;
        prop_oneof![
            3 => (m.clone(), any::<bool>(), 1..4u32, any::<bool>())
                .prop_map(|(m, fresh, weight, grace)| Op::Register { m, fresh, weight, grace }),
            4 => m.clone().prop_map(|m| Op::Heartbeat { m }),
            4 => (m.clone(), 0..4u32).prop_map(|(m, max_take)| Op::Rebalance { m, max_take }),
            2 => (m.clone(), 0..4usize).prop_map(|(m, i)| Op::Release { m, i }),
            1 => m.clone().prop_map(|m| Op::Leave { m }),
            1 => m.clone().prop_map(|m| Op::Deregister { m }),
            1 => m.prop_map(|m| Op::Remove { m }),
            1 => any::<bool>().prop_map(|force| Op::Delete { force }),
            3 => (0..1200u64).prop_map(Op::Advance),
            1 => Just(Op::ToExpiry),
        ]
    }

    fn hash(model: &Model) -> u64 {
        let mut h = DefaultHasher::new();
        model.hash(&mut h);
        h.finish()
    }

    fn reg(
        model: &mut Model,
        g: &GroupKey,
        m: &str,
        n: &str,
        grace_ms: u64,
        now: u64,
    ) -> Outcome<Result<Registration, Error>> {
        let mut req = RegisterRequest::new(
            SessionRef {
                member: m.into(),
                session: n.into(),
            },
            1,
            8,
            TTL,
        );
        req.grace = Duration::from_millis(grace_ms);
        model.register(g, &req, now)
    }

    fn sref(m: &str, n: &str) -> SessionRef {
        SessionRef {
            member: m.into(),
            session: n.into(),
        }
    }

    fn granted_to(notices: &[(To, Notice)], id: &str) -> Vec<(u64, Vec<u32>)> {
        notices
            .iter()
            .filter_map(|(to, n)| match (to, n) {
                (To::Member(m), Notice::Granted { token, buckets, .. }) if m == id => {
                    Some((*token, buckets.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Two members of 8 buckets, balanced, a with a grace: a's graceful leave parks its 4
    /// buckets (nobody is granted them, b stays at its share), a's next session gets exactly
    /// those back at its registration under a larger token, told by a grant notice.
    #[test]
    fn a_graceful_leave_parks_and_the_same_id_takes_its_buckets_back() {
        let g = GroupKey::new("p", "g");
        let mut model = Model::new();
        let now = T0;
        reg(&mut model, &g, "a", "a1", 2000, now).reply.unwrap();
        reg(&mut model, &g, "b", "b1", 0, now).reply.unwrap();
        model.heartbeat(&g, &sref("a", "a1"), TTL, Duration::MAX, now + 900_000);
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, now + 900_000);
        let now = now + 1_001_000;
        model.rebalance(&g, &sref("a", "a1"), 8, now);
        model.rebalance(&g, &sref("b", "b1"), 8, now);
        let a_held: Vec<u32> = model
            .held_buckets(&g, "a")
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let a_token = model.held_buckets(&g, "a")[0].0;
        assert_eq!(a_held.len(), 4);
        let left = model.leave(&g, &sref("a", "a1"), &a_held, now + 10);
        assert_eq!(left.reply, 4);
        assert!(
            granted_to(&left.notices, "b").is_empty(),
            "{:?}",
            left.notices
        );
        let state = model.group(&g).unwrap();
        assert_eq!(state.parked()["a"].held().len(), 4);
        assert!(state.free().is_empty());
        // b is at its share, counted against a's: it takes nothing.
        let step = model.rebalance(&g, &sref("b", "b1"), 8, now + 20).reply;
        assert_eq!(step.action, Action::Stay);
        let snap = model.snapshot(&g, now + 20).unwrap();
        assert_eq!(snap.parked.len(), 1);
        assert_eq!(snap.free(), 4, "parked buckets are owned by nobody");
        // a comes back within the grace.
        let back = reg(&mut model, &g, "a", "a2", 2000, now + 1_000_000);
        let Ok(Registration::Registered { token: floor, .. }) = back.reply else {
            panic!("{:?}", back.reply)
        };
        let grants = granted_to(&back.notices, "a");
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].1, a_held);
        assert!(grants[0].0 > a_token && grants[0].0 > floor);
        assert!(model.group(&g).unwrap().parked().is_empty());
        assert_eq!(model.check(), Ok(()));
    }

    /// A crashed member's session expires into parked buckets; unclaimed, they are freed at
    /// the grace's end and go to the live member.
    #[test]
    fn a_crash_parks_from_the_expiry_and_the_grace_end_frees() {
        let g = GroupKey::new("p", "g");
        let mut model = Model::new();
        let now = T0;
        reg(&mut model, &g, "a", "a1", 2000, now).reply.unwrap();
        reg(&mut model, &g, "b", "b1", 0, now).reply.unwrap();
        model.heartbeat(&g, &sref("a", "a1"), TTL, Duration::MAX, now + 900_000);
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, now + 900_000);
        let now = now + 1_001_000;
        model.rebalance(&g, &sref("a", "a1"), 8, now);
        model.rebalance(&g, &sref("b", "b1"), 8, now);
        // a crashed: its session (renewed at T0 + 0.9 s) ends at T0 + 1.9 s; b renews.
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, T0 + 1_500_000);
        let hb = model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, T0 + 2_000_000);
        assert!(granted_to(&hb.notices, "b").is_empty());
        let parked = &model.group(&g).unwrap().parked()["a"];
        assert_eq!(parked.held().len(), 4);
        assert_eq!(parked.until(), T0 + 1_900_000 + 2_000_000);
        // Still parked just before the grace ends, freed at it, and b takes them.
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, T0 + 2_800_000);
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, T0 + 3_500_000);
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, T0 + 3_899_999);
        assert_eq!(model.group(&g).unwrap().parked().len(), 1);
        model.heartbeat(&g, &sref("b", "b1"), TTL, Duration::MAX, T0 + 3_900_000);
        let step = model
            .rebalance(&g, &sref("b", "b1"), 8, T0 + 3_900_000)
            .reply;
        assert!(
            matches!(step.action, Action::Acquired { ref buckets, .. } if buckets.len() == 4),
            "{step:?}"
        );
        assert_eq!(model.check(), Ok(()));
    }

    proptest! {
        /// On random calls: the group's invariants hold after every one (`Model::check`); an
        /// owner record's token only grows (S2, also across a deletion and re-creation); every
        /// grant notice names buckets now recorded to its member under its token; a clone is
        /// equal and hashes the same; snapshots and holdings change nothing.
        #[test]
        fn invariants_hold_on_random_calls(
            buckets in 1..7u32,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let g = GroupKey::new("p", "g");
            let mut model = Model::new();
            let mut now = T0;
            let mut nonces = [0u32; 3];
            let session = |m: usize, nonces: &[u32; 3]| SessionRef {
                member: format!("m{m}"),
                session: format!("n{}", nonces[m]),
            };
            let mut last_token: BTreeMap<u32, u64> = BTreeMap::new();
            let mut parking = ParkingCheck::new();
            for op in ops {
                let caller = match op {
                    Op::Register { m, .. }
                    | Op::Heartbeat { m }
                    | Op::Rebalance { m, .. }
                    | Op::Release { m, .. }
                    | Op::Leave { m }
                    | Op::Deregister { m }
                    | Op::Remove { m } => format!("m{m}"),
                    _ => String::new(),
                };
                let before = ParkingCheck::before(model.group(&g), now, &caller);
                let purges = matches!(
                    op,
                    Op::Register { .. } | Op::Heartbeat { .. } | Op::Rebalance { .. } | Op::Remove { .. }
                );
                if let Op::Remove { m } = op {
                    parking.removed(&format!("m{m}"));
                }
                let notices = match op {
                    Op::Register { m, fresh, weight, grace } => {
                        let old = session(m, &nonces);
                        if fresh {
                            nonces[m] += 1;
                        }
                        let mut req = RegisterRequest::new(session(m, &nonces), weight, buckets, TTL);
                        req.replaces = fresh.then_some(old.session);
                        if grace {
                            req.grace = Duration::from_millis(700);
                        }
                        model.register(&g, &req, now).notices
                    }
                    Op::Heartbeat { m } => {
                        model.heartbeat(&g, &session(m, &nonces), TTL, Duration::MAX, now).notices
                    }
                    Op::Rebalance { m, max_take } => {
                        model.rebalance(&g, &session(m, &nonces), max_take, now).notices
                    }
                    Op::Release { m, i } => {
                        let held = model.held_buckets(&g, &format!("m{m}"));
                        let named: Vec<u32> = held.get(i).map(|(_, b)| *b).into_iter().chain([i as u32]).collect();
                        model.release(&g, &session(m, &nonces), &named, u64::MAX, now).notices
                    }
                    Op::Leave { m } => {
                        let held: Vec<u32> = model.held_buckets(&g, &format!("m{m}")).into_iter().map(|(_, b)| b).collect();
                        model.leave(&g, &session(m, &nonces), &held, now).notices
                    }
                    Op::Deregister { m } => model.deregister(&g, &session(m, &nonces), now).notices,
                    Op::Remove { m } => model.remove_member(&g, &format!("m{m}"), now).notices,
                    Op::Delete { force } => model.delete(&g, force, now).notices,
                    Op::Advance(ms) => {
                        now += ms * 1000;
                        Vec::new()
                    }
                    Op::ToExpiry => {
                        let earliest = model.group(&g).and_then(|s| {
                            let parked = s.parked().values().map(Parked::until);
                            s.members().values().map(Member::expires).chain(parked).min()
                        });
                        now = now.max(earliest.unwrap_or(now));
                        Vec::new()
                    }
                };
                prop_assert_eq!(model.check(), Ok(()));
                let broken = parking.observe(&before, model.group(&g), now, purges);
                prop_assert!(broken.is_empty(), "parking: {:?}", broken);
                let snapshot = model.snapshot(&g, now);
                let unchanged = model.clone();
                prop_assert_eq!(&unchanged, &model);
                prop_assert_eq!(hash(&unchanged), hash(&model));
                for m in 0..3 {
                    let _ = model.holdings(&g, &session(m, &nonces), now);
                }
                prop_assert_eq!(model.snapshot(&g, now), snapshot);
                prop_assert_eq!(&unchanged, &model);
                if let Some(state) = model.group(&g) {
                    for b in 0..state.buckets() {
                        if let Some((_, token)) = state.owner(b) {
                            let last = last_token.entry(b).or_insert(token);
                            prop_assert!(token >= *last, "bucket {} token went back", b);
                            *last = token;
                        }
                    }
                }
                for (to, notice) in &notices {
                    if let (To::Member(id), Notice::Granted { session, token, buckets }) = (to, notice) {
                        let state = model.group(&g).expect("a grant in a group");
                        prop_assert_eq!(state.members().get(id).map(Member::session), Some(session.as_str()));
                        for b in buckets {
                            prop_assert_eq!(state.owner(*b), Some((id.as_str(), *token)));
                        }
                    }
                }
            }
        }
    }
}
