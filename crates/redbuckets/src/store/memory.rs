//! `MemoryStore`: the store protocol in-process, with the same semantics as the Redis scripts.
//!
//! Time is tokio's clock, so tests on a paused runtime control session expiry exactly.
//! A std `Mutex`, not a tokio one: nothing async happens while it is held.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::PROTOCOL_VERSION;
use crate::error::Error;
use crate::share::{self, Load};
use crate::store::{
    Action, Channel, Deletion, GroupKey, GroupSnapshot, HeartbeatReply, Holdings, MemberInfo,
    Notice, Notifications, Owner, RebalanceReply, RegisterRequest, Registration, Removal,
    SessionRef, Store,
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
    groups: HashMap<GroupKey, GroupState>,
    /// The earliest grant of a group re-created after a forced deletion: the latest expiry of
    /// the sessions it ended (delete.lua's requarantine key). Past ones are ignored.
    floors: HashMap<GroupKey, Instant>,
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
            groups: HashMap::new(),
            floors: HashMap::new(),
            channels: HashMap::new(),
            base_us,
            epoch: Instant::now(),
        }
    }
}

#[derive(Debug)]
struct GroupState {
    buckets: u32,
    ttl: Duration,
    version: u64,
    grant_after: Instant,
    /// When a live session last left (leave, deregister), or the creation: see `unattended`.
    seen: Instant,
    /// When the group was created (its snapshot's age).
    created: Instant,
    last_token: u64,
    members: BTreeMap<String, MemberState>,
    owners: Vec<Option<(String, u64)>>,
    free: BTreeSet<u32>,
}

#[derive(Debug)]
struct MemberState {
    session: String,
    weight: u32,
    expires: Instant,
    since: Instant,
    held: BTreeSet<u32>,
    committed: u32,
}

impl GroupState {
    fn new(buckets: u32, now: Instant, ttl: Duration) -> Self {
        GroupState {
            buckets,
            ttl,
            version: 0,
            grant_after: now + ttl,
            seen: now,
            created: now,
            last_token: 0,
            members: BTreeMap::new(),
            owners: vec![None; buckets as usize],
            free: (0..buckets).collect(),
        }
    }

    /// True when nobody has been seen in the group for a ttl: no session is live at `now`, and
    /// no live session left within the ttl. Such a group is re-created with the quarantine by
    /// the next registration (and a rebalance finds no session), as after a total loss. Mirrors
    /// `is_unattended` in `common.lua`, whose comment tells why: a Redis primary that hung for
    /// longer than a ttl and came back may have been replaced meanwhile.
    fn unattended(&self, now: Instant) -> bool {
        self.members.values().all(|m| m.expires <= now) && self.seen + self.ttl <= now
    }

    /// A live session left (leave, deregister, an operator's removal): it is removed with its
    /// buckets, and `unattended` counts from now (common.lua's `seen_leaving`).
    fn remove_leaving(&mut self, id: &str, now: Instant) -> bool {
        let removed = self.remove_member(id);
        if removed {
            self.seen = now;
        }
        removed
    }

    /// Removes a member and frees its buckets.
    fn remove_member(&mut self, id: &str) -> bool {
        let Some(member) = self.members.remove(id) else {
            return false;
        };
        for b in member.held {
            self.owners[b as usize] = None;
            self.free.insert(b);
        }
        self.version += 1;
        true
    }

    /// Every live member's load in id order, with the ids.
    fn loads(&self) -> (Vec<&String>, Vec<Load>) {
        self.members
            .iter()
            .map(|(id, m)| {
                (
                    id,
                    Load {
                        weight: m.weight,
                        held: m.committed,
                    },
                )
            })
            .unzip()
    }

    /// What a registration tells the member about tokens (`Registration::Registered::token`):
    /// every grant to the session comes later with a higher token, and every grant to an
    /// earlier session under its nonce came before with one not higher. The group's last token,
    /// or the server's now - 1 µs if later: tokens follow the server's clock (`grant`), and a
    /// group re-created after a data loss starts again from 0, where grants to the sessions
    /// it lost had tokens of their time. Mirrors register.lua.
    fn token_floor(&self, now_us: u64) -> u64 {
        self.last_token.max(now_us.saturating_sub(1))
    }

    /// Grants up to `k` free buckets (the lowest) to member `id` under a new token. Returns
    /// the token and the buckets. Mirrors `grant` in `common.lua`.
    fn grant(&mut self, id: &str, k: u32, now_us: u64) -> (u64, Vec<u32>) {
        let token = now_us.max(self.last_token + 1);
        self.last_token = token;
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
            m.committed += u32::try_from(taken.len()).unwrap_or(0);
        }
        (token, taken)
    }

    /// After a change: the members that must act, and what each is told (see the module docs
    /// of `store`). `joined`: a member joined, so some may be above their new share; their
    /// lower counts are committed here, and they are woken ([`Notice::Act`]). Then, if buckets
    /// are free, the members to take them ([`share::takers`]), in that order, are each granted
    /// what [`share::step`] lets them take now, and told the grant ([`Notice::Granted`]):
    /// a freed bucket gets its next owner without a call of its own. `caller`, the member whose
    /// call this is, is woken instead of granted: it is in the middle of its call. Nobody during
    /// the quarantine. Mirrors `settle` in `common.lua`.
    fn settle(
        &mut self,
        now: Instant,
        now_us: u64,
        joined: bool,
        caller: &str,
    ) -> Vec<(String, Notice)> {
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
                }
                woken.push(id);
            }
        }
        // The loads once (after the commits above), in id order, kept up to date as each taker
        // is granted.
        let (ids, mut loads) = self.loads();
        let ids: Vec<String> = ids.into_iter().cloned().collect();
        let mut takers: Vec<usize> = Vec::new();
        let free = u32::try_from(self.free.len()).unwrap_or(u32::MAX);
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
        // (common.lua's settle skips one: a renewal's purge there stops at 100).
        for me in takers {
            let free = u32::try_from(self.free.len()).unwrap_or(u32::MAX);
            if let share::Step::Take(k) = share::step(self.buckets, &loads, me, free) {
                let id = &ids[me];
                let (token, buckets) = self.grant(id, k, now_us);
                loads[me].held += u32::try_from(buckets.len()).unwrap_or(0);
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
    fn watched(&self, member: &str) -> impl Iterator<Item = &MemberState> {
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

    /// Purges expired sessions; returns true if any was removed.
    fn purge(&mut self, now: Instant) -> bool {
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.remove_member(id);
        }
        !expired.is_empty()
    }

    /// The live sessions at `now` (common.lua's `live_count`).
    fn live_count(&self, now: Instant) -> u32 {
        let live = self.members.values().filter(|m| m.expires > now).count();
        u32::try_from(live).unwrap_or(u32::MAX)
    }

    fn live<'a>(&'a mut self, s: &SessionRef, now: Instant) -> Option<&'a mut MemberState> {
        self.members
            .get_mut(&s.member)
            .filter(|m| m.session == s.session && m.expires > now)
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
        let mut names: Vec<String> = self
            .lock()
            .groups
            .keys()
            .filter(|g| g.prefix == prefix)
            .map(|g| g.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Deletes `group` (as [`crate::RedisStore::delete_group`], delete.lua): refused while
    /// sessions are live unless `force`; a forced deletion wakes the live members and keeps the
    /// latest expiry of their sessions as the floor of the re-created group's quarantine.
    pub fn delete_group(&self, group: &GroupKey, force: bool) -> Deletion {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(state) = inner.groups.get(group) else {
            return Deletion::Absent;
        };
        let live: Vec<(String, Instant)> = state
            .members
            .iter()
            .filter(|(_, m)| m.expires > now)
            .map(|(id, m)| (id.clone(), m.expires))
            .collect();
        let count = u32::try_from(live.len()).unwrap_or(u32::MAX);
        if count > 0 && !force {
            return Deletion::Refused { live: count };
        }
        if let Some(until) = live.iter().map(|(_, at)| *at).max() {
            let floor = inner.floors.entry(group.clone()).or_insert(until);
            *floor = (*floor).max(until);
        }
        inner.groups.remove(group);
        let woken: Vec<(String, Notice)> =
            live.into_iter().map(|(id, _)| (id, Notice::Act)).collect();
        inner.notify(group, &woken);
        Deletion::Deleted { live: count }
    }

    /// Ends `member`'s session now, whatever its nonce (as [`crate::RedisStore::remove_member`],
    /// remove.lua): a deregistration that also wakes the member.
    pub fn remove_member(&self, group: &GroupKey, member: &str) -> Removal {
        let mut inner = self.lock();
        let now = Instant::now();
        let now_us = inner.now_us(now);
        let Some(state) = inner.groups.get_mut(group) else {
            return Removal::Absent;
        };
        let purged = state.purge(now);
        let held = state
            .members
            .get(member)
            .map(|m| u32::try_from(m.held.len()).unwrap_or(u32::MAX));
        let removed = held.is_some() && state.remove_leaving(member, now);
        if !removed {
            if purged {
                let woken = state.settle(now, now_us, false, member);
                inner.notify(group, &woken);
            }
            return Removal::Absent;
        }
        let mut woken = vec![(member.to_string(), Notice::Act)];
        woken.extend(state.settle(now, now_us, false, member));
        inner.notify(group, &woken);
        Removal::Removed {
            held: held.unwrap_or_default(),
        }
    }

    /// Forgets every group, as a Redis restart without persistence does. Subscribers are told.
    pub fn wipe(&self) {
        let mut inner = self.lock();
        inner.groups.clear();
        for tx in inner.channels.values() {
            let _ = tx.send(Notice::Act);
        }
    }

    /// Tests only: sets the store's server clock so that it reads `unix_us` (µs since the Unix
    /// epoch) now; it goes on advancing with tokio's clock. The differential test
    /// (`tests/differential.rs`) sets it to the value it freezes the Redis scripts' clock at
    /// (see [`crate::RedisOptions::frozen_clock_for_tests`]), so that both stores read the same
    /// time and tokens, expiries and waits compare exactly.
    #[doc(hidden)]
    pub fn set_clock_us(&self, unix_us: u64) {
        let mut inner = self.lock();
        inner.base_us = unix_us;
        inner.epoch = Instant::now();
    }

    /// Tests only: the buckets the store lists as `member`'s in `group` (owned, or committed for
    /// release and not yet released) with their tokens, as `(token, bucket)` in ascending order,
    /// whether or not the session is still alive, without reading the whole group.
    #[doc(hidden)]
    #[must_use]
    pub fn held_buckets(&self, group: &GroupKey, member: &str) -> Vec<(u64, u32)> {
        let inner = self.lock();
        let Some(g) = inner.groups.get(group) else {
            return Vec::new();
        };
        let Some(m) = g.members.get(member) else {
            return Vec::new();
        };
        let mut held: Vec<(u64, u32)> = m
            .held
            .iter()
            .map(|&b| {
                let token = g.owners.get(b as usize).and_then(|o| o.as_ref());
                (token.map_or(0, |(_, t)| *t), b)
            })
            .collect();
        held.sort_unstable();
        held
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-written in a way later
        // calls would misread more than the panic itself did; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn now_us(&self, now: Instant) -> u64 {
        let elapsed = u64::try_from(now.duration_since(self.epoch).as_micros()).unwrap_or(0);
        self.base_us.saturating_add(elapsed)
    }

    /// Forgets `group` if `forget` says so (its data is lost, as in load_current_meta), and
    /// tells its channel.
    fn forget_if(&mut self, group: &GroupKey, forget: impl FnOnce(&GroupState) -> bool) {
        if self.groups.get(group).is_some_and(forget) {
            self.groups.remove(group);
            self.notify(group, &[]);
        }
    }

    /// A change of `group`: a notice on its channel, and a wake-up for each of `woken`.
    fn notify(&mut self, group: &GroupKey, woken: &[(String, Notice)]) {
        let mut key = (group.clone(), None);
        if let Some(tx) = self.channels.get(&key) {
            let _ = tx.send(Notice::Act);
        }
        for (member, notice) in woken {
            key.1 = Some(member.clone());
            if let Some(tx) = self.channels.get(&key) {
                let _ = tx.send(notice.clone());
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
        let now = Instant::now();
        let mut inner = self.lock();
        let now_us = inner.now_us(now);
        // A group nobody was seen in for a ttl is forgotten and re-created (register.lua,
        // load_current_meta), its subscribers told.
        inner.forget_if(group, |g| g.unattended(now));
        // A group with no live session holds nothing (every lease ended before its session
        // did, S3): its next member sets its configuration. Another bucket count or ttl
        // re-creates it (register.lua) instead of being refused.
        inner.forget_if(group, |g| {
            g.live_count(now) == 0 && (g.buckets != req.buckets || g.ttl != req.ttl)
        });
        let floor = inner.floors.get(group).copied().filter(|at| *at > now);
        let state = inner.groups.entry(group.clone()).or_insert_with(|| {
            let mut state = GroupState::new(req.buckets, now, req.ttl);
            state.grant_after = state.grant_after.max(floor.unwrap_or(now));
            state
        });
        if state.buckets != req.buckets {
            return Err(Error::GroupMismatch {
                group: group.name.clone(),
                stored: state.buckets,
                configured: req.buckets,
                stored_protocol: PROTOCOL_VERSION,
                configured_protocol: PROTOCOL_VERSION,
            });
        }
        if state.ttl != req.ttl {
            return Err(Error::TtlMismatch {
                group: group.name.clone(),
                stored: state.ttl,
                configured: req.ttl,
            });
        }
        // Sessions purged here free buckets and change the membership, whatever the outcome of
        // the registration: subscribers are told on every path (as register.lua publishes).
        let purged = state.purge(now);
        let id = &req.session.member;
        if let Some(existing) = state.members.get_mut(id) {
            let early = if existing.session == req.session.session {
                existing.expires = now + req.ttl;
                Some(Registration::Registered {
                    version: state.version,
                    token: state.token_floor(now_us),
                })
            } else if req.replaces.as_deref() != Some(existing.session.as_str()) {
                Some(Registration::InUse {
                    expires_in: existing.expires.saturating_duration_since(now),
                })
            } else {
                None
            };
            if let Some(mut outcome) = early {
                if purged {
                    let woken = state.settle(now, now_us, false, id);
                    // The token after the grants the purge made, as register.lua reads it.
                    if let Registration::Registered { token, .. } = &mut outcome {
                        *token = state.token_floor(now_us);
                    }
                    inner.notify(group, &woken);
                }
                return Ok(outcome);
            }
            state.remove_member(id);
        }
        state.members.insert(
            id.clone(),
            MemberState {
                session: req.session.session.clone(),
                weight: req.weight,
                expires: now + req.ttl,
                since: now,
                held: BTreeSet::new(),
                committed: 0,
            },
        );
        state.version += 1;
        let version = state.version;
        let woken = state.settle(now, now_us, true, &req.session.member);
        let token = state.token_floor(now_us);
        inner.notify(group, &woken);
        Ok(Registration::Registered { version, token })
    }

    async fn heartbeat(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
        watch: Duration,
    ) -> Result<HeartbeatReply, Error> {
        let now = Instant::now();
        let mut inner = self.lock();
        let now_us = inner.now_us(now);
        let Some(state) = inner.groups.get_mut(group) else {
            return Ok(HeartbeatReply {
                alive: false,
                version: 0,
                free: 0,
                next_expiry: None,
                committed: 0,
                held: 0,
                members: 0,
            });
        };
        let purged = state.purge(now);
        let woken = if purged {
            state.settle(now, now_us, false, &session.member)
        } else {
            Vec::new()
        };
        let (alive, committed, held) = match state.live(session, now) {
            Some(m) => {
                m.expires = now + ttl;
                let held = u32::try_from(m.held.len()).unwrap_or(u32::MAX);
                (true, m.committed, held)
            }
            None => (false, 0, 0),
        };
        // Only when some other session ends within `watch`: otherwise every watched one ends
        // later, and the caller would not check them before its next renewal.
        let soon = state.members.iter().any(|(id, m)| {
            *id != session.member && m.expires.saturating_duration_since(now) < watch
        });
        let next_expiry = if soon {
            state
                .watched(&session.member)
                .map(|m| m.expires.saturating_duration_since(now))
                .min()
        } else {
            None
        };
        let reply = HeartbeatReply {
            alive,
            version: state.version,
            free: u32::try_from(state.free.len()).unwrap_or(u32::MAX),
            next_expiry,
            committed,
            held,
            members: state.live_count(now),
        };
        if purged {
            inner.notify(group, &woken);
        }
        Ok(reply)
    }

    async fn rebalance(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
    ) -> Result<RebalanceReply, Error> {
        let now = Instant::now();
        let mut inner = self.lock();
        let now_us = inner.now_us(now);
        inner.forget_if(group, |g| g.unattended(now));
        let Some(state) = inner.groups.get_mut(group) else {
            return Ok(RebalanceReply::session_lost());
        };
        let purged = state.purge(now);
        let woken = if purged {
            state.settle(now, now_us, false, &session.member)
        } else {
            Vec::new()
        };
        if state.live(session, now).is_none() {
            if purged {
                inner.notify(group, &woken);
            }
            return Ok(RebalanceReply::session_lost());
        }
        let ids: Vec<&String> = state.members.keys().collect();
        let me = ids
            .iter()
            .position(|id| **id == session.member)
            .unwrap_or(0);
        let loads: Vec<Load> = state
            .members
            .values()
            .map(|m| Load {
                weight: m.weight,
                held: m.committed,
            })
            .collect();
        let free = u32::try_from(state.free.len()).unwrap_or(u32::MAX);
        let share = share::target_range(state.buckets, &loads, me);
        let notify = purged;
        let action = if now < state.grant_after {
            Action::Wait(state.grant_after - now)
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
                        state.grant(&session.member, k.min(max_take.max(1)), now_us);
                    Action::Acquired { buckets, token }
                }
            }
        };
        let (committed, held) = state.members.get(&session.member).map_or((0, 0), |m| {
            (m.committed, u32::try_from(m.held.len()).unwrap_or(u32::MAX))
        });
        let reply = RebalanceReply {
            action,
            share,
            version: state.version,
            free: u32::try_from(state.free.len()).unwrap_or(u32::MAX),
            committed,
            held,
            members: state.live_count(now),
        };
        if notify {
            inner.notify(group, &woken);
        }
        Ok(reply)
    }

    async fn release(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        known: u64,
    ) -> Result<u32, Error> {
        let mut inner = self.lock();
        let now = Instant::now();
        let now_us = inner.now_us(now);
        let Some(state) = inner.groups.get_mut(group) else {
            return Ok(0);
        };
        // Nothing named: no call at all (RedisStore does not run the script either).
        if buckets.is_empty() || !state.is_session(session) {
            return Ok(0);
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
            m.committed = m
                .committed
                .min(u32::try_from(m.held.len()).unwrap_or(u32::MAX));
        }
        for &b in &freed {
            state.owners[b as usize] = None;
            state.free.insert(b);
        }
        if purged || !freed.is_empty() {
            let woken = state.settle(now, now_us, false, &session.member);
            inner.notify(group, &woken);
        }
        Ok(u32::try_from(freed.len()).unwrap_or(u32::MAX))
    }

    async fn leave(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
    ) -> Result<u32, Error> {
        let mut inner = self.lock();
        let now = Instant::now();
        let now_us = inner.now_us(now);
        let Some(state) = inner.groups.get_mut(group) else {
            return Ok(0);
        };
        if !state.is_session(session) {
            return Ok(0);
        }
        // Expired sessions first (leave.lua); if the caller's own had expired, the purge ended
        // it and freed what it held, and the leave frees nothing more.
        state.purge(now);
        let freed = match state.members.get(&session.member) {
            Some(m) => {
                let mut held = m.held.clone();
                let freed = buckets.iter().filter(|b| held.remove(b)).count();
                state.remove_leaving(&session.member, now);
                freed
            }
            None => 0,
        };
        let woken = state.settle(now, now_us, false, &session.member);
        inner.notify(group, &woken);
        Ok(u32::try_from(freed).unwrap_or(u32::MAX))
    }

    async fn deregister(&self, group: &GroupKey, session: &SessionRef) -> Result<(), Error> {
        let mut inner = self.lock();
        let now = Instant::now();
        let now_us = inner.now_us(now);
        let Some(state) = inner.groups.get_mut(group) else {
            return Ok(());
        };
        if !state.is_session(session) {
            return Ok(());
        }
        // Expired sessions first (deregister.lua), the caller's own with them if it expired.
        let purged = state.purge(now);
        let removed = state.is_session(session) && state.remove_leaving(&session.member, now);
        if purged || removed {
            let woken = state.settle(now, now_us, false, &session.member);
            inner.notify(group, &woken);
        }
        Ok(())
    }

    /// The session's held set with each owner record's token, O(held) (mirrors `holdings.lua`).
    async fn holdings(
        &self,
        group: &GroupKey,
        session: &SessionRef,
    ) -> Result<Option<Holdings>, Error> {
        let now = Instant::now();
        let inner = self.lock();
        let Some(state) = inner.groups.get(group) else {
            return Ok(None);
        };
        let Some(m) = state
            .members
            .get(&session.member)
            .filter(|m| m.session == session.session && m.expires > now)
        else {
            return Ok(None);
        };
        let owned = m
            .held
            .iter()
            .filter_map(|&b| match state.owners.get(b as usize) {
                Some(Some((owner, token))) if *owner == session.member => Some((b, *token)),
                _ => None,
            })
            .collect();
        Ok(Some(Holdings {
            owned,
            committed: m.committed,
        }))
    }

    /// Read-only, as snapshot.lua: nothing is purged and nobody notified; the group is shown as
    /// the next purge would leave it (expired members left out, their buckets free, the version
    /// bumped once per such member).
    async fn snapshot(&self, group: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        let now = Instant::now();
        let inner = self.lock();
        let Some(state) = inner.groups.get(group) else {
            return Ok(None);
        };
        let (live, dead): (Vec<_>, Vec<_>) =
            state.members.iter().partition(|(_, m)| m.expires > now);
        let members = live
            .into_iter()
            .map(|(id, m)| MemberInfo {
                id: id.clone(),
                session: m.session.clone(),
                weight: m.weight,
                held: u32::try_from(m.held.len()).unwrap_or(u32::MAX),
                committed: m.committed,
                expires_in: m.expires.saturating_duration_since(now),
                session_age: now.saturating_duration_since(m.since),
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
        for (_, m) in &dead {
            for &b in &m.held {
                if let Some(slot) = owners.get_mut(b as usize) {
                    *slot = None;
                }
            }
        }
        Ok(Some(GroupSnapshot {
            buckets: state.buckets,
            protocol: PROTOCOL_VERSION,
            version: state.version + dead.len() as u64,
            members,
            owners,
            quarantine: state.grant_after.saturating_duration_since(now),
            stale: state.unattended(now),
            ttl: state.ttl,
            age: now.saturating_duration_since(state.created),
            // Renewed at its expiry less the ttl; expired sessions count until purged.
            renewed_ago: state
                .members
                .values()
                .map(|m| m.expires)
                .max()
                .map(|latest| (now + state.ttl).saturating_duration_since(latest)),
        }))
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
        let before = store.lock().groups[&g].version;

        let seen = store.snapshot(&g).await.unwrap().unwrap();
        assert_eq!(store.snapshot(&g).await.unwrap().as_ref(), Some(&seen));
        assert_eq!(drain(&mut notices), 0, "a snapshot notified");
        {
            let inner = store.lock();
            let state = &inner.groups[&g];
            assert!(state.members.contains_key("b"), "a snapshot purged b");
            assert_eq!(state.version, before);
            assert_eq!(state.free.len(), 0);
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
