//! The wire protocol between [`crate::RedisStore`] and its Lua scripts, in one place: the key
//! layout, the encoders that build each script's arguments, and pure decoders from a reply (or
//! a notice) to the store's types.
//!
//! Both directions are pure functions of values (no connection, no clock), so every layout,
//! good or malformed, is tested on hand-built values. A reply that does not have its documented
//! layout is a [`ReplyError`], which the store reports as [`Error::CorruptState`]; nothing here
//! indexes or unwraps what Redis sent.
//!
//! # Key layout
//! Every key of a group starts with its hash tag `{prefix:name}` ([`GroupKey::tag`]), so all of
//! them live on one Redis Cluster slot. The Rust side writes the names here once:
//! [`KEY_SUFFIXES`], the keys every script gets as `KEYS`, and [`TAG_SUFFIXES`], the names a
//! script builds from the tag. The Lua side writes them once too, in `common.lua` (`bind` takes
//! `KEYS` in this order; one helper per built name); a test here checks the two agree and that
//! no other script builds a name of its own.
//!
//! # Calling convention (every script)
//! `KEYS` are the group's tag followed by each of [`KEY_SUFFIXES`], in that order
//! (`KEYS[1]` = `<tag>:meta` ... `KEYS[8]` = `<tag>:free`); `ARGV[1]` is the tag itself, from
//! which a script builds the keys whose names hold a member or a weight (`:held:<member>`,
//! `:count:<weight>`), the keys `:ids`, `:grace` and `:parked`, and the channels `:events` and
//! `:wake:<member>`. The script's own
//! arguments follow from `ARGV[2]` (the encoders below build them). Numbers travel as decimal
//! text; durations are µs unless the name says ms.
//!
//! | script | `ARGV[2..]` | reply |
//! |---|---|---|
//! | register | member, nonce, weight, buckets, ttl µs, `1`/`0` (replaces given), replaced nonce, protocol, rejoin grace µs (`0`: none) | `{'registered', ver, token floor}` \| `{'inuse', expires_in_ms}` \| `{'mismatch', buckets, protocol}` \| `{'ttl', group_ttl_us}`; a claim of the id's parked buckets is a `grant` notice |
//! | heartbeat, heartbeat_fast | member, nonce, ttl µs, watch ms (`-1`: always) | `{alive 0\|1, ver, free, next_ms, committed, held, members}`, next_ms `-1` with no watched session or when no other session ends within the watch, counts 0 when not alive, members the live sessions; heartbeat_fast may instead answer `{'full'}`: run heartbeat |
//! | rebalance | member, nonce, max_take | `{kind, value, share_min, share_max, ver, free, committed, held, members, bucket...}`, kind `acquired` (value = token, buckets follow), `release` (value = count), `stay`, `wait` (value = µs left); or `{'lost'}` |
//! | release | member, nonce, known (highest token applied), bucket... | count freed (none granted under a higher token) |
//! | leave | member, nonce, bucket... | count of the named buckets freed (the session ends, freeing all it held) |
//! | deregister | member, nonce | `1` if removed, else `0` |
//! | holdings | member, nonce | `{}` (the session is not live, or the data is stale) or `{committed, bucket, token, ...}`: the buckets of the session's held set whose owner record names the member |
//! | delete | force `1`/`0` | `{'absent'}` \| `{'live', n}` (refused, nothing changed) \| `{'deleted', n}` (n live sessions ended) |
//! | remove | member | `{'removed', held}` (its session ended, whatever its nonce, as a deregistration) \| `{'absent'}` |
//! | snapshot | none | `{}` (no group) or `{buckets, protocol, ver, quarantine_us, members, owner_flat, stale 0\|1, ttl_us, age_us, renewed_ago_us, parked}` (renewed_ago_us `-1` without any session; parked missing from an older script: none): members = `{id, nonce, weight, held, committed, expires_in_ms, age_ms}...`, owner_flat = `bucket, "<token> <member>", ...` (parked buckets left out), parked = `{id, weight, held, grace_left_us}...` |
//!
//! Notices: the group's channel carries `changed`; a member's, `act` or
//! `grant <nonce> <token> <bucket>...` ([`notice`]).

use std::collections::BTreeMap;
use std::time::Duration;

use ::redis::Value;

use crate::config::{MAX_BUCKETS, PROTOCOL_VERSION};
use crate::error::Error;
use crate::store::{
    Action, Deletion, GroupKey, GroupSnapshot, HeartbeatReply, Holdings, MemberInfo, Notice, Owner,
    ParkedInfo, RebalanceReply, RegisterRequest, Removal, SessionRef,
};

/// The suffixes of the keys every script gets as `KEYS`, in order: `<tag>:<suffix>`. `meta`
/// (hash: buckets, protocol, ver, token, grant_after_us, created_us, ttl_us, seen_us, run_id,
/// parked_next_us), `exp` (zset: member → session expiry, server ms), `sess` (member → nonce),
/// `since` (member → start ms), `weight` (member → weight), `wcount` (weight → members), `owner`
/// (bucket → `"<token> <member>"`), `free` (set of free buckets). `common.lua` tells each in
/// full.
pub(crate) const KEY_SUFFIXES: [&str; 8] = [
    "meta", "exp", "sess", "since", "weight", "wcount", "owner", "free",
];

/// The names a script builds from the tag (`ARGV[1]`), each as `<tag>:<suffix>` followed by
/// what the comment says: keys of one member or weight, the expiring re-quarantine, the two
/// channels, and the two names only the tests' and the cluster's variants read. The store itself
/// builds only the channels' names; the list is what the test checks `common.lua` against.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const TAG_SUFFIXES: [&str; 10] = [
    // + member: the member's buckets (set).
    "held:",
    // + weight: member → committed count (zset).
    "count:",
    // The live members in id order (zset).
    "ids",
    // The floor of a re-created group's quarantine (string, expiring).
    "requarantine",
    // Member → its session's rejoin grace, µs (hash).
    "grace",
    // Parked id → the end of its grace, µs (zset).
    "parked",
    // Pub/sub: every change of the group.
    EVENTS,
    // + member, pub/sub: the member must act, or was granted buckets.
    WAKE,
    // The frozen clock (clock_frozen.lua, tests only).
    "test-clock",
    // A key that never exists, read first on a cluster (refused while the slot migrates).
    "migration-probe",
];

const EVENTS: &str = "events";
const WAKE: &str = "wake:";

/// The `KEYS` of every script for the group of hash tag `tag` (`GroupKey::tag`).
pub(crate) fn keys(tag: &str) -> [String; 8] {
    KEY_SUFFIXES.map(|suffix| format!("{tag}:{suffix}"))
}

/// The group's channel (`Channel::Group`).
pub(crate) fn events_channel(tag: &str) -> String {
    format!("{tag}:{EVENTS}")
}

/// A member's channel (`Channel::Member`).
pub(crate) fn wake_channel(tag: &str, member: &str) -> String {
    format!("{tag}:{WAKE}{member}")
}

/// The `SCAN` pattern of the `:meta` keys of every group under `prefix` (`{prefix:*}:meta`),
/// the prefix's glob characters escaped.
pub(crate) fn meta_pattern(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("{{{escaped}:*}}:{}", KEY_SUFFIXES[0])
}

/// The group named by the key `{prefix:name}:meta`, if it is one.
pub(crate) fn group_of_meta_key(prefix: &str, key: &str) -> Option<String> {
    let name = key
        .strip_prefix('{')?
        .strip_prefix(prefix)?
        .strip_prefix(':')?
        .strip_suffix(KEY_SUFFIXES[0])?
        .strip_suffix("}:")?;
    (!name.is_empty() && !name.contains(['{', '}'])).then(|| name.to_string())
}

// Encoders: each script's arguments from `ARGV[2]` on (the store puts the tag first).

/// The largest token the scripts take (below 2^53: Lua numbers are doubles): a release's `known`
/// above it means "any token".
const TOKEN_LIMIT: u64 = 9_007_199_254_740_991;

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The session's member and nonce: deregister and holdings, and the start of the others.
pub(crate) fn session_args(session: &SessionRef) -> Vec<String> {
    vec![session.member.clone(), session.session.clone()]
}

/// The longest rejoin grace the scripts take (µs, about 35 years): the end of a grace, a µs
/// timestamp plus it, stays below 2^53 (Lua numbers are doubles). A longer one is sent as this.
const GRACE_LIMIT: u64 = 1 << 50;

/// register: member, nonce, weight, buckets, ttl µs, replaces given, replaced nonce, protocol,
/// rejoin grace µs.
pub(crate) fn register_args(req: &RegisterRequest) -> Vec<String> {
    let mut args = session_args(&req.session);
    args.extend([
        req.weight.to_string(),
        req.buckets.to_string(),
        duration_us(req.ttl).to_string(),
        if req.replaces.is_some() { "1" } else { "0" }.to_string(),
        req.replaces.clone().unwrap_or_default(),
        PROTOCOL_VERSION.to_string(),
        duration_us(req.grace).min(GRACE_LIMIT).to_string(),
    ]);
    args
}

/// heartbeat and heartbeat_fast: member, nonce, ttl µs, watch in whole ms rounded up (the
/// scripts' expiries are ms), `-1` for "always look".
pub(crate) fn heartbeat_args(session: &SessionRef, ttl: Duration, watch: Duration) -> Vec<String> {
    let watch_ms = u64::try_from(watch.as_micros().div_ceil(1000))
        .ok()
        .filter(|ms| *ms < 1 << 53)
        .map_or_else(|| "-1".to_string(), |ms| ms.to_string());
    let mut args = session_args(session);
    args.extend([duration_us(ttl).to_string(), watch_ms]);
    args
}

/// rebalance: member, nonce, max_take.
pub(crate) fn rebalance_args(session: &SessionRef, max_take: u32) -> Vec<String> {
    let mut args = session_args(session);
    args.push(max_take.to_string());
    args
}

/// release: member, nonce, known, bucket... Tokens are below 2^53 (µs timestamps); `u64::MAX`
/// (any token) is sent as the largest the scripts take.
pub(crate) fn release_args(session: &SessionRef, buckets: &[u32], known: u64) -> Vec<String> {
    let mut args = Vec::with_capacity(buckets.len() + 3);
    args.extend(session_args(session));
    args.push(known.min(TOKEN_LIMIT).to_string());
    args.extend(buckets.iter().map(u32::to_string));
    args
}

/// leave: member, nonce, bucket...
pub(crate) fn leave_args(session: &SessionRef, buckets: &[u32]) -> Vec<String> {
    let mut args = Vec::with_capacity(buckets.len() + 2);
    args.extend(session_args(session));
    args.extend(buckets.iter().map(u32::to_string));
    args
}

/// delete: force `1`/`0`.
pub(crate) fn delete_args(force: bool) -> Vec<String> {
    vec![if force { "1" } else { "0" }.to_string()]
}

/// remove: member.
pub(crate) fn remove_args(member: &str) -> Vec<String> {
    vec![member.to_string()]
}

// Decoders.

/// A reply that does not say what its script's layout promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    /// The reply's shape is wrong: a field is missing or has the wrong type or range.
    #[error("unexpected reply from the {call} script: {what}")]
    Layout {
        /// The script.
        call: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The reply is well formed, but reports stored data redbuckets never writes.
    #[error("{detail}")]
    Data {
        /// What the stored data holds.
        detail: String,
    },
}

impl ReplyError {
    /// The store error: the group's data (or the script) is not what this library writes.
    pub(crate) fn into_error(self, group: &GroupKey) -> Error {
        Error::CorruptState {
            group: group.name.clone(),
            detail: self.to_string(),
        }
    }
}

/// What the register script answered. The two refusals become errors in the store, where the
/// configured values they are compared with are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegisterReply {
    /// The session is live at this membership version; the floor of its grant tokens.
    Registered { version: u64, token: u64 },
    /// Another live session holds the member id.
    InUse { expires_in: Duration },
    /// The group exists with another bucket count or protocol.
    Mismatch { buckets: u32, protocol: u32 },
    /// The group exists with another session ttl.
    Ttl { stored: Duration },
}

/// Reads the fields of one reply array, naming the script in every error.
#[derive(Clone, Copy)]
struct Fields<'a> {
    call: &'static str,
    items: &'a [Value],
}

impl<'a> Fields<'a> {
    fn of(call: &'static str, value: &'a Value) -> Result<Self, ReplyError> {
        match value {
            Value::Array(items) | Value::Set(items) => Ok(Fields { call, items }),
            other => Err(layout(call, format!("not an array but {}", kind(other)))),
        }
    }

    fn get(&self, i: usize, what: &str) -> Result<&'a Value, ReplyError> {
        self.items
            .get(i)
            .ok_or_else(|| layout(self.call, format!("{what} (field {i}) is missing")))
    }

    fn u64(&self, i: usize, what: &str) -> Result<u64, ReplyError> {
        let v = self.get(i, what)?;
        uint(v).ok_or_else(|| {
            layout(
                self.call,
                format!(
                    "{what} (field {i}) is not a non-negative integer: {}",
                    short(v)
                ),
            )
        })
    }

    fn u32(&self, i: usize, what: &str) -> Result<u32, ReplyError> {
        let n = self.u64(i, what)?;
        u32::try_from(n)
            .map_err(|_| layout(self.call, format!("{what} (field {i}) is too large: {n}")))
    }

    fn text(&self, i: usize, what: &str) -> Result<String, ReplyError> {
        let v = self.get(i, what)?;
        text(v).ok_or_else(|| {
            layout(
                self.call,
                format!("{what} (field {i}) is not text: {}", short(v)),
            )
        })
    }

    fn array(&self, i: usize, what: &str) -> Result<Fields<'a>, ReplyError> {
        let v = self.get(i, what)?;
        match v {
            Value::Array(items) | Value::Set(items) => Ok(Fields {
                call: self.call,
                items,
            }),
            other => Err(layout(
                self.call,
                format!("{what} (field {i}) is not an array but {}", kind(other)),
            )),
        }
    }
}

fn layout(call: &'static str, what: String) -> ReplyError {
    ReplyError::Layout { call, what }
}

/// A non-negative integer, sent as an integer or as decimal text.
fn uint(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// UTF-8 text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The kind of a value, for messages (an array may be large).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) => "text",
        Value::Array(_) | Value::Set(_) => "an array",
        _ => "another type",
    }
}

/// A scalar value as it reads, cut short; the kind of anything else.
fn short(v: &Value) -> String {
    match v {
        Value::Int(i) => i.to_string(),
        Value::BulkString(_) | Value::SimpleString(_) => {
            format!(
                "{:?}",
                text(v)
                    .unwrap_or_default()
                    .chars()
                    .take(40)
                    .collect::<String>()
            )
        }
        other => kind(other).to_string(),
    }
}

/// Decodes the register script's reply.
pub(crate) fn register(reply: &Value) -> Result<RegisterReply, ReplyError> {
    let f = Fields::of("register", reply)?;
    match f.text(0, "kind")?.as_str() {
        "registered" => Ok(RegisterReply::Registered {
            version: f.u64(1, "version")?,
            token: f.u64(2, "token")?,
        }),
        "inuse" => Ok(RegisterReply::InUse {
            expires_in: Duration::from_millis(f.u64(1, "expires_in")?),
        }),
        "ttl" => Ok(RegisterReply::Ttl {
            stored: Duration::from_micros(f.u64(1, "stored ttl")?),
        }),
        "mismatch" => Ok(RegisterReply::Mismatch {
            buckets: f.u32(1, "stored buckets")?,
            protocol: f.u32(2, "stored protocol")?,
        }),
        other => Err(layout("register", format!("unknown kind {other:?}"))),
    }
}

/// Whether heartbeat_fast handed over to the full heartbeat script (`{'full'}`).
pub(crate) fn heartbeat_wants_full(reply: &Value) -> bool {
    matches!(reply, Value::Array(items) if items.first().and_then(text).as_deref() == Some("full"))
}

/// Decodes a heartbeat reply (of either heartbeat script, once it did not hand over).
pub(crate) fn heartbeat(reply: &Value) -> Result<HeartbeatReply, ReplyError> {
    let f = Fields::of("heartbeat", reply)?;
    let alive = match f.u64(0, "alive")? {
        0 => false,
        1 => true,
        n => {
            return Err(layout(
                "heartbeat",
                format!("alive (field 0) is {n}, not 0 or 1"),
            ))
        }
    };
    let next = f.get(3, "next expiry")?;
    // -1: no other session.
    let next_expiry = match (uint(next), text(next).as_deref(), next) {
        (Some(ms), _, _) => Some(Duration::from_millis(ms)),
        (None, Some("-1"), _) | (None, None, Value::Int(-1)) => None,
        _ => {
            return Err(layout(
                "heartbeat",
                format!(
                    "next expiry (field 3) is not a count of ms or -1: {}",
                    short(next)
                ),
            ))
        }
    };
    Ok(HeartbeatReply {
        alive,
        version: f.u64(1, "version")?,
        // The free count cannot exceed MAX_BUCKETS in a sound group; never wrap it.
        free: f.u32(2, "free")?,
        next_expiry,
        committed: f.u32(4, "committed")?,
        held: f.u32(5, "held")?,
        members: f.u32(6, "members")?,
    })
}

/// Decodes the rebalance script's reply.
pub(crate) fn rebalance(reply: &Value) -> Result<RebalanceReply, ReplyError> {
    const CALL: &str = "rebalance";
    let f = Fields::of(CALL, reply)?;
    let kind = f.text(0, "kind")?;
    if kind == "lost" {
        return Ok(RebalanceReply::session_lost());
    }
    let value = f.u64(1, "value")?;
    let share = (f.u32(2, "share min")?, f.u32(3, "share max")?);
    let version = f.u64(4, "version")?;
    let free = f.u32(5, "free")?;
    let committed = f.u32(6, "committed")?;
    let held = f.u32(7, "held")?;
    let members = f.u32(8, "members")?;
    let action = match kind.as_str() {
        "acquired" => {
            let buckets = (9..f.items.len())
                .map(|i| f.u32(i, "bucket id"))
                .collect::<Result<Vec<u32>, _>>()?;
            Action::Acquired {
                buckets,
                token: value,
            }
        }
        "release" => Action::Release(
            u32::try_from(value)
                .map_err(|_| layout(CALL, format!("release count {value} is too large")))?,
        ),
        "stay" => Action::Stay,
        "wait" => Action::Wait(Duration::from_micros(value)),
        other => return Err(layout(CALL, format!("unknown kind {other:?}"))),
    };
    if kind != "acquired" && f.items.len() > 9 {
        return Err(layout(CALL, format!("{kind} reply carries bucket ids")));
    }
    Ok(RebalanceReply {
        action,
        share,
        version,
        free,
        committed,
        held,
        members,
    })
}

/// Decodes the release script's reply: how many buckets it freed.
pub(crate) fn release(reply: &Value) -> Result<u32, ReplyError> {
    uint(reply)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| layout("release", format!("not a count: {}", short(reply))))
}

/// Decodes the delete script's reply.
pub(crate) fn delete(reply: &Value) -> Result<Deletion, ReplyError> {
    const CALL: &str = "delete";
    let f = Fields::of(CALL, reply)?;
    match f.text(0, "kind")?.as_str() {
        "absent" => Ok(Deletion::Absent),
        "live" => Ok(Deletion::Refused {
            live: f.u32(1, "live")?,
        }),
        "deleted" => Ok(Deletion::Deleted {
            live: f.u32(1, "live")?,
        }),
        other => Err(layout(CALL, format!("unknown kind {other:?}"))),
    }
}

/// Decodes the remove script's reply.
pub(crate) fn remove(reply: &Value) -> Result<Removal, ReplyError> {
    const CALL: &str = "remove";
    let f = Fields::of(CALL, reply)?;
    match f.text(0, "kind")?.as_str() {
        "absent" => Ok(Removal::Absent),
        "removed" => Ok(Removal::Removed {
            held: f.u32(1, "held")?,
        }),
        other => Err(layout(CALL, format!("unknown kind {other:?}"))),
    }
}

/// Decodes the holdings script's reply; `None` when the session is not live in the store.
pub(crate) fn holdings(reply: &Value) -> Result<Option<Holdings>, ReplyError> {
    const CALL: &str = "holdings";
    let f = Fields::of(CALL, reply)?;
    if f.items.is_empty() {
        return Ok(None);
    }
    let committed = f.u32(0, "committed")?;
    if f.items.len() % 2 != 1 {
        return Err(layout(CALL, "odd bucket list".into()));
    }
    let mut owned = BTreeMap::new();
    for i in (1..f.items.len()).step_by(2) {
        let bucket = f.u32(i, "bucket")?;
        if bucket >= MAX_BUCKETS {
            return Err(layout(CALL, format!("bucket {bucket} is out of range")));
        }
        owned.insert(bucket, f.u64(i + 1, "token")?);
    }
    Ok(Some(Holdings { owned, committed }))
}

/// Decodes the snapshot script's reply; `None` when the group does not exist.
pub(crate) fn snapshot(reply: &Value) -> Result<Option<GroupSnapshot>, ReplyError> {
    const CALL: &str = "snapshot";
    let f = Fields::of(CALL, reply)?;
    if f.items.is_empty() {
        return Ok(None);
    }
    let buckets = f.u32(0, "buckets")?;
    if buckets == 0 || buckets > MAX_BUCKETS {
        // Checked before the owner table is sized from it.
        return Err(layout(
            CALL,
            format!("buckets {buckets} is outside 1..={MAX_BUCKETS}"),
        ));
    }
    let protocol = f.u32(1, "protocol")?;
    let version = f.u64(2, "version")?;
    let quarantine = Duration::from_micros(f.u64(3, "quarantine")?);

    let list = f.array(4, "members")?;
    let mut members = Vec::with_capacity(list.items.len());
    for i in 0..list.items.len() {
        let m = list.array(i, "member entry")?;
        let id = m.text(0, "member id")?;
        let weight = m.u32(2, "weight").map_err(|_| ReplyError::Data {
            detail: format!("weight of member {id:?} is not a number"),
        })?;
        members.push(MemberInfo {
            session: m.text(1, "session")?,
            weight,
            held: m.u32(3, "held")?,
            committed: m.u32(4, "committed")?,
            expires_in: Duration::from_millis(m.u64(5, "expiry")?),
            session_age: Duration::from_millis(m.u64(6, "age")?),
            id,
        });
    }
    members.sort_by(|a, b| a.id.cmp(&b.id));

    let mut owners: Vec<Option<Owner>> = vec![None; buckets as usize];
    let flat = f.array(5, "owners")?;
    if flat.items.len() % 2 != 0 {
        return Err(layout(CALL, "odd owner list".into()));
    }
    for pair in flat.items.chunks_exact(2) {
        let [field, value] = pair else {
            continue;
        };
        let bucket = text(field).unwrap_or_default();
        let record = text(value).unwrap_or_default();
        let slot = bucket
            .parse::<usize>()
            .ok()
            .and_then(|b| owners.get_mut(b))
            .ok_or_else(|| ReplyError::Data {
                detail: format!(
                    "owner hash names bucket {:?}",
                    bucket.chars().take(40).collect::<String>()
                ),
            })?;
        let owner = parse_owner(&record).ok_or_else(|| ReplyError::Data {
            detail: format!(
                "owner record of bucket {bucket} is not \"<token> <member>\": {:?}",
                record.chars().take(60).collect::<String>()
            ),
        })?;
        *slot = Some(owner);
    }
    let stale = match f.u64(6, "stale")? {
        0 => false,
        1 => true,
        n => return Err(layout(CALL, format!("stale (field 6) is {n}, not 0 or 1"))),
    };
    let ttl = Duration::from_micros(f.u64(7, "ttl")?);
    let age = Duration::from_micros(f.u64(8, "age")?);
    let renewed = f.get(9, "last renewal")?;
    // -1: no session at all.
    let renewed_ago = match (uint(renewed), text(renewed).as_deref(), renewed) {
        (Some(us), _, _) => Some(Duration::from_micros(us)),
        (None, Some("-1"), _) | (None, None, Value::Int(-1)) => None,
        _ => {
            return Err(layout(
                CALL,
                format!(
                    "last renewal (field 9) is not a count of µs or -1: {}",
                    short(renewed)
                ),
            ))
        }
    };
    // Missing (a script from before parking): nothing parked.
    let mut parked = Vec::new();
    if f.items.len() > 10 {
        let list = f.array(10, "parked")?;
        for i in 0..list.items.len() {
            let p = list.array(i, "parked entry")?;
            let id = p.text(0, "parked id")?;
            let weight = p.u32(1, "weight").map_err(|_| ReplyError::Data {
                detail: format!("weight of parked id {id:?} is not a number"),
            })?;
            parked.push(ParkedInfo {
                weight,
                held: p.u32(2, "held")?,
                until: Duration::from_micros(p.u64(3, "grace left")?),
                id,
            });
        }
        parked.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(Some(GroupSnapshot {
        buckets,
        protocol,
        version,
        members,
        owners,
        quarantine,
        stale,
        ttl,
        age,
        renewed_ago,
        parked,
    }))
}

/// Parses an owner record `"<token> <member>"` (member ids may contain spaces).
fn parse_owner(record: &str) -> Option<Owner> {
    let (token, member) = record.split_once(' ')?;
    if token.is_empty() || !token.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(Owner {
        member: member.to_string(),
        token: token.parse().ok()?,
    })
}

/// Decodes a notice on a member's channel: `act`, or `grant <nonce> <token> <bucket>...`
/// (common.lua `settle`). Anything else, from a foreign publisher or a newer version, counts as
/// `act`: the member then calls the store, whose replies settle whatever the notice meant.
pub(crate) fn notice(payload: &[u8]) -> Notice {
    let granted = || {
        let text = std::str::from_utf8(payload).ok()?;
        let mut words = text.split(' ');
        if words.next()? != "grant" {
            return None;
        }
        let session = words.next()?.to_string();
        let token = words.next()?.parse().ok()?;
        let buckets = words
            .map(|w| w.parse::<u32>().ok().filter(|b| *b < MAX_BUCKETS))
            .collect::<Option<Vec<u32>>>()?;
        (!session.is_empty() && !buckets.is_empty()).then_some(Notice::Granted {
            session,
            token,
            buckets,
        })
    };
    granted().unwrap_or(Notice::Act)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::BulkString(x.as_bytes().to_vec())
    }

    fn a(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    fn int(i: i64) -> Value {
        Value::Int(i)
    }

    /// The message of a decode error, which must be a layout or data error, never a panic.
    fn message<T: std::fmt::Debug>(r: Result<T, ReplyError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(v) => panic!("decoded {v:?}"),
        }
    }

    #[test]
    fn keys_follow_the_suffix_list() {
        let keys = keys(&GroupKey::new("p", "g").tag());
        assert_eq!(keys[0], "{p:g}:meta");
        assert_eq!(keys[7], "{p:g}:free");
    }

    #[test]
    fn names_built_from_the_tag() {
        let tag = GroupKey::new("p", "g").tag();
        assert_eq!(events_channel(&tag), "{p:g}:events");
        assert_eq!(wake_channel(&tag, "a b"), "{p:g}:wake:a b");
        assert_eq!(meta_pattern("a*b"), r"{a\*b:*}:meta");
        assert_eq!(group_of_meta_key("p", "{p:g}:meta"), Some("g".into()));
        assert_eq!(group_of_meta_key("p", "{p:g}:free"), None);
        assert_eq!(group_of_meta_key("p", "{p:}:meta"), None);
        assert_eq!(group_of_meta_key("p", "{q:g}:meta"), None);
    }

    /// The key layout is written once per side: `bind` in common.lua takes `KEYS` in the order
    /// of [`KEY_SUFFIXES`] (`K_<SUFFIX>` = `keys[i]`), and every name a script builds from the
    /// tag is one of [`TAG_SUFFIXES`], built in common.lua (or, for the test clock, in
    /// clock_frozen.lua) and nowhere else; each of them is built somewhere.
    #[test]
    fn the_lua_side_names_the_same_keys() {
        use super::super::scripts::{Scripts, COMMON};
        use super::super::{CLOCK, FROZEN_CLOCK};

        let mut bound = Vec::new();
        for line in COMMON.lines().map(str::trim) {
            if let Some((names, values)) = line.split_once(" = keys[") {
                let values = format!("keys[{values}");
                for (name, value) in names.split(", ").zip(values.split(", ")) {
                    bound.push((name.to_string(), value.to_string()));
                }
            }
        }
        let expected: Vec<(String, String)> = (1..)
            .zip(KEY_SUFFIXES)
            .map(|(i, suffix)| (format!("K_{}", suffix.to_uppercase()), format!("keys[{i}]")))
            .collect();
        assert_eq!(bound, expected, "bind() in common.lua");
        for (i, suffix) in (1..).zip(KEY_SUFFIXES) {
            let documented = format!("KEYS[{i}] {suffix} ");
            assert!(
                COMMON.contains(&documented),
                "common.lua's layout lacks {documented}"
            );
        }

        // Every `TAG .. ':<name>` (or `ARGV[1] .. ':<name>`) in the Lua, by file.
        let built = |text: &str| -> Vec<String> {
            ["TAG .. ':", "ARGV[1] .. ':"]
                .iter()
                .flat_map(|start| text.match_indices(start).map(|(i, m)| &text[i + m.len()..]))
                .map(|rest| rest.split('\'').next().unwrap_or_default().to_string())
                .collect()
        };
        let mut seen = std::collections::BTreeSet::new();
        for (file, text) in [("common.lua", COMMON), ("clock_frozen.lua", FROZEN_CLOCK)] {
            for name in built(text) {
                assert!(
                    TAG_SUFFIXES.contains(&name.as_str()),
                    "{file} builds {name:?}"
                );
                seen.insert(name);
            }
        }
        let unbuilt: Vec<_> = TAG_SUFFIXES
            .iter()
            .filter(|s| !seen.contains(**s))
            .collect();
        assert!(unbuilt.is_empty(), "never built in Lua: {unbuilt:?}");
        for body in Scripts::bodies().chain([CLOCK]) {
            assert_eq!(
                built(body),
                Vec::<String>::new(),
                "a body names a key: {body}"
            );
        }
    }

    fn session() -> SessionRef {
        SessionRef {
            member: "m 1".into(),
            session: "n".into(),
        }
    }

    #[test]
    fn arguments() {
        let mut req = RegisterRequest::new(session(), 3, 64, Duration::from_millis(1500));
        assert_eq!(
            register_args(&req),
            [
                "m 1",
                "n",
                "3",
                "64",
                "1500000",
                "0",
                "",
                &PROTOCOL_VERSION.to_string(),
                "0"
            ]
        );
        req.replaces = Some("old".into());
        assert_eq!(register_args(&req)[5..7], ["1", "old"]);
        req.grace = Duration::from_millis(2500);
        assert_eq!(register_args(&req)[8], "2500000");
        req.grace = Duration::MAX;
        assert_eq!(register_args(&req)[8], GRACE_LIMIT.to_string(), "capped");

        let ttl = Duration::from_secs(2);
        let watch = |w| heartbeat_args(&session(), ttl, w)[3].clone();
        assert_eq!(
            heartbeat_args(&session(), ttl, Duration::ZERO),
            ["m 1", "n", "2000000", "0"]
        );
        assert_eq!(
            watch(Duration::from_micros(1001)),
            "2",
            "rounded up to whole ms"
        );
        assert_eq!(watch(Duration::from_millis(600)), "600");
        assert_eq!(watch(Duration::MAX), "-1", "always look");

        assert_eq!(rebalance_args(&session(), 7), ["m 1", "n", "7"]);
        assert_eq!(
            release_args(&session(), &[4, 2], 17),
            ["m 1", "n", "17", "4", "2"]
        );
        assert_eq!(
            release_args(&session(), &[1], u64::MAX)[2],
            TOKEN_LIMIT.to_string()
        );
        assert_eq!(leave_args(&session(), &[9]), ["m 1", "n", "9"]);
        assert_eq!(session_args(&session()), ["m 1", "n"]);
        assert_eq!(delete_args(true), ["1"]);
        assert_eq!(delete_args(false), ["0"]);
        assert_eq!(remove_args("x"), ["x"]);
    }

    #[test]
    fn owner_records_parse_token_first() {
        assert_eq!(
            parse_owner("17 a b c"),
            Some(Owner {
                member: "a b c".into(),
                token: 17
            })
        );
        assert_eq!(parse_owner("x y"), None);
        assert_eq!(parse_owner("17"), None);
        assert_eq!(parse_owner(" 17 a"), None);
        assert_eq!(parse_owner("99999999999999999999999 a"), None);
    }

    #[test]
    fn register_replies() {
        assert_eq!(
            register(&a(vec![s("registered"), s("7"), s("1700000000000000")])),
            Ok(RegisterReply::Registered {
                version: 7,
                token: 1_700_000_000_000_000
            })
        );
        assert_eq!(
            register(&a(vec![s("inuse"), s("1500")])),
            Ok(RegisterReply::InUse {
                expires_in: Duration::from_millis(1500)
            })
        );
        assert_eq!(
            register(&a(vec![s("ttl"), s("2000000")])),
            Ok(RegisterReply::Ttl {
                stored: Duration::from_secs(2)
            })
        );
        assert_eq!(
            register(&a(vec![s("mismatch"), s("64"), int(1)])),
            Ok(RegisterReply::Mismatch {
                buckets: 64,
                protocol: 1
            })
        );
        for (bad, needle) in [
            (int(1), "not an array"),
            (a(vec![]), "kind (field 0) is missing"),
            (a(vec![int(3)]), "kind (field 0) is not text"),
            (a(vec![s("registered")]), "version (field 1) is missing"),
            (
                a(vec![s("registered"), int(-1)]),
                "not a non-negative integer: -1",
            ),
            (a(vec![s("inuse"), s("soon")]), "not a non-negative integer"),
            (
                a(vec![s("mismatch"), s("64")]),
                "stored protocol (field 2) is missing",
            ),
            (a(vec![s("mismatch"), s("5000000000"), s("1")]), "too large"),
            (a(vec![s("hello")]), "unknown kind \"hello\""),
        ] {
            let m = message(register(&bad));
            assert!(m.contains("register script") && m.contains(needle), "{m}");
        }
    }

    #[test]
    fn notices() {
        assert_eq!(notice(b"act"), Notice::Act);
        assert_eq!(
            notice(b"grant 9f2c 1700000000000001 5 17 3"),
            Notice::Granted {
                session: "9f2c".into(),
                token: 1_700_000_000_000_001,
                buckets: vec![5, 17, 3],
            }
        );
        for odd in [
            &b"grant"[..],
            b"grant n 12",
            b"grant n x 1",
            b"grant n 12 1 y",
            b"grant n 12 70000",
            b"grant  12 1",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(notice(odd), Notice::Act, "{odd:?}");
        }
    }

    #[test]
    fn heartbeat_replies() {
        assert_eq!(
            heartbeat(&a(vec![
                int(1),
                s("4"),
                int(3),
                s("250"),
                int(7),
                int(8),
                int(5)
            ])),
            Ok(HeartbeatReply {
                alive: true,
                version: 4,
                free: 3,
                next_expiry: Some(Duration::from_millis(250)),
                committed: 7,
                held: 8,
                members: 5,
            })
        );
        let lone = heartbeat(&a(vec![
            int(0),
            s("0"),
            int(0),
            s("-1"),
            int(0),
            int(0),
            int(0),
        ]))
        .unwrap();
        assert!(!lone.alive);
        assert_eq!(lone.next_expiry, None);
        assert_eq!(
            heartbeat(&a(vec![
                int(0),
                s("0"),
                int(0),
                int(-1),
                int(0),
                int(0),
                int(1)
            ]))
            .unwrap()
            .next_expiry,
            None
        );
        assert!(heartbeat_wants_full(&a(vec![s("full")])));
        assert!(!heartbeat_wants_full(&a(vec![
            int(1),
            s("4"),
            int(3),
            s("-1")
        ])));
        assert!(!heartbeat_wants_full(&int(1)));
        for (bad, needle) in [
            (a(vec![s("full")]), "alive (field 0)"),
            (a(vec![int(2), s("1"), int(0), s("-1")]), "not 0 or 1"),
            (
                a(vec![int(1), s("-4"), int(0), s("-1")]),
                "version (field 1)",
            ),
            (a(vec![int(1), s("4"), int(-2), s("-1")]), "free (field 2)"),
            (
                a(vec![int(1), s("4"), int(0)]),
                "next expiry (field 3) is missing",
            ),
            (
                a(vec![int(1), s("4"), int(0), s("-7")]),
                "not a count of ms or -1",
            ),
            (
                a(vec![int(1), s("4"), int(0), s("-1"), int(3)]),
                "held (field 5) is missing",
            ),
            (
                a(vec![int(1), s("4"), int(0), s("-1"), int(3), int(3)]),
                "members (field 6) is missing",
            ),
            (s("OK"), "not an array but text"),
        ] {
            let m = message(heartbeat(&bad));
            assert!(m.contains(needle), "{m}");
        }
    }

    fn fixed(kind: &str, value: &str) -> Vec<Value> {
        vec![
            s(kind),
            s(value),
            int(2),
            int(3),
            s("9"),
            int(4),
            int(2),
            int(2),
            int(6),
        ]
    }

    #[test]
    fn rebalance_replies() {
        let mut acquired = fixed("acquired", "1700000000000001");
        acquired.extend([s("5"), s("11")]);
        assert_eq!(
            rebalance(&a(acquired)),
            Ok(RebalanceReply {
                action: Action::Acquired {
                    buckets: vec![5, 11],
                    token: 1_700_000_000_000_001
                },
                share: (2, 3),
                version: 9,
                free: 4,
                committed: 2,
                held: 2,
                members: 6,
            })
        );
        let action = |r: Result<RebalanceReply, ReplyError>| r.map(|r| r.action);
        assert_eq!(
            action(rebalance(&a(fixed("release", "2")))),
            Ok(Action::Release(2))
        );
        assert_eq!(action(rebalance(&a(fixed("stay", "0")))), Ok(Action::Stay));
        assert_eq!(
            action(rebalance(&a(fixed("wait", "1500")))),
            Ok(Action::Wait(Duration::from_micros(1500)))
        );
        assert_eq!(
            action(rebalance(&a(vec![s("lost")]))),
            Ok(Action::SessionLost)
        );

        let mut bad_bucket = fixed("acquired", "1");
        bad_bucket.push(s("-3"));
        let mut stay_with_buckets = fixed("stay", "0");
        stay_with_buckets.push(s("3"));
        let mut short_reply = fixed("stay", "0");
        short_reply.truncate(8);
        for (bad, needle) in [
            (a(bad_bucket), "bucket id (field 9)"),
            (a(stay_with_buckets), "carries bucket ids"),
            (a(short_reply), "members (field 8) is missing"),
            (a(fixed("release", "5000000000")), "release count"),
            (a(fixed("give", "0")), "unknown kind"),
            (a(vec![Value::Nil]), "kind (field 0) is not text"),
            (Value::Nil, "not an array but nil"),
        ] {
            let m = message(rebalance(&bad));
            assert!(m.contains("rebalance script") && m.contains(needle), "{m}");
        }
    }

    #[test]
    fn release_replies() {
        assert_eq!(release(&int(3)), Ok(3));
        assert!(message(release(&int(-1))).contains("not a count: -1"));
        assert!(message(release(&a(vec![]))).contains("not a count: an array"));
    }

    fn member(id: &str, weight: &str) -> Value {
        a(vec![
            s(id),
            s("nonce"),
            s(weight),
            int(1),
            s("1"),
            s("900"),
            s("100"),
        ])
    }

    fn group(members: Vec<Value>, owners: Vec<Value>, stale: i64) -> Value {
        a(vec![
            s("4"),
            s("1"),
            s("6"),
            s("0"),
            a(members),
            a(owners),
            int(stale),
            s("3000000"),
            s("60000000"),
            s("-1"),
        ])
    }

    #[test]
    fn holdings_replies() {
        assert_eq!(holdings(&a(vec![])), Ok(None));
        let h = holdings(&a(vec![s("1"), s("5"), s("17"), int(9), s("18")]))
            .unwrap()
            .unwrap();
        assert_eq!(h.committed, 1);
        assert_eq!(h.owned, BTreeMap::from([(5, 17), (9, 18)]));
        assert!(message(holdings(&a(vec![s("1"), s("5")]))).contains("odd bucket list"));
        assert!(message(holdings(&a(vec![s("1"), s("70000"), s("3")]))).contains("out of range"));
        assert!(message(holdings(&a(vec![s("1"), s("x"), s("3")]))).contains("bucket"));
        assert!(message(holdings(&a(vec![s("-1")]))).contains("committed"));
        assert!(message(holdings(&s("lost"))).contains("not an array"));
    }

    #[test]
    fn snapshot_replies() {
        assert_eq!(snapshot(&a(vec![])), Ok(None));
        let snap = snapshot(&group(
            vec![member("b", "1"), member("a", "2")],
            vec![s("2"), s("17 a"), s("0"), s("18 b")],
            0,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(snap.buckets, 4);
        assert_eq!(snap.version, 6);
        assert!(!snap.stale);
        assert_eq!(
            snap.members
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(snap.members[0].weight, 2);
        assert_eq!(snap.members[0].expires_in, Duration::from_millis(900));
        assert_eq!(snap.owners[1], None);
        assert_eq!(
            snap.owners[2],
            Some(Owner {
                member: "a".into(),
                token: 17
            })
        );
        assert_eq!(snap.free(), 2);
        assert!(snapshot(&group(vec![], vec![], 1)).unwrap().unwrap().stale);
    }

    /// The parked ids (field 10), sorted; a reply without the field (a script from before
    /// parking) has none.
    #[test]
    fn snapshot_parked_ids() {
        let with = |parked: Vec<Value>| {
            let Value::Array(mut items) = group(vec![], vec![], 0) else {
                unreachable!()
            };
            items.push(a(parked));
            snapshot(&a(items))
        };
        let entry =
            |id: &str, w: &str, held: i64, left: &str| a(vec![s(id), s(w), int(held), s(left)]);
        let snap = with(vec![entry("z", "3", 2, "1500000"), entry("b", "1", 0, "0")])
            .unwrap()
            .unwrap();
        let mut b = ParkedInfo::new("b");
        b.weight = 1;
        let mut z = ParkedInfo::new("z");
        z.weight = 3;
        z.held = 2;
        z.until = Duration::from_millis(1500);
        assert_eq!(snap.parked, [b, z]);
        assert!(with(vec![]).unwrap().unwrap().parked.is_empty());
        let old = snapshot(&group(vec![], vec![], 0)).unwrap().unwrap();
        assert!(old.parked.is_empty(), "no field 10: nothing parked");
        for (bad, needle) in [
            (with(vec![s("x")]), "parked entry (field 0) is not an array"),
            (
                with(vec![a(vec![s("x"), s("1"), int(1)])]),
                "grace left (field 3) is missing",
            ),
            (
                with(vec![entry("x", "heavy", 1, "5")]),
                "weight of parked id \"x\"",
            ),
            (with(vec![entry("x", "1", -1, "5")]), "held (field 2)"),
        ] {
            let m = message(bad);
            assert!(m.contains(needle), "{m}");
        }
        let Value::Array(mut items) = group(vec![], vec![], 0) else {
            unreachable!()
        };
        items.push(s("parked"));
        assert!(message(snapshot(&a(items))).contains("parked (field 10) is not an array"));
    }

    #[test]
    fn malformed_snapshots_are_corrupt_state_not_panics() {
        let corrupt = |v: Value| match snapshot(&v) {
            Err(e) => match e.into_error(&GroupKey::new("p", "g")) {
                Error::CorruptState { group, detail } => {
                    assert_eq!(group, "g");
                    detail
                }
                other => panic!("{other:?}"),
            },
            Ok(v) => panic!("decoded {v:?}"),
        };
        let mut huge = match group(vec![], vec![], 0) {
            Value::Array(items) => items,
            _ => unreachable!(),
        };
        huge[0] = s("4294967295");
        for (bad, needle) in [
            (a(huge), "outside 1..=65536"),
            (a(vec![s("4"), s("1")]), "version (field 2) is missing"),
            (group(vec![], vec![s("1")], 0), "odd owner list"),
            (
                group(vec![], vec![s("9"), s("1 a")], 0),
                "names bucket \"9\"",
            ),
            (
                group(vec![], vec![s("-1"), s("1 a")], 0),
                "names bucket \"-1\"",
            ),
            (
                group(vec![], vec![s("1"), s("a 1")], 0),
                "is not \"<token> <member>\"",
            ),
            (
                group(vec![], vec![s("1"), int(5)], 0),
                "is not \"<token> <member>\"",
            ),
            (
                group(vec![member("a", "x")], vec![], 0),
                "weight of member \"a\"",
            ),
            (
                group(vec![member("a", "-1")], vec![], 0),
                "weight of member \"a\"",
            ),
            (
                group(vec![s("a")], vec![], 0),
                "member entry (field 0) is not an array",
            ),
            (
                group(vec![a(vec![s("a"), s("n"), s("1")])], vec![], 0),
                "held (field 3) is missing",
            ),
            (group(vec![], vec![], 2), "stale (field 6) is 2"),
            (group(vec![], vec![], -1), "stale (field 6)"),
            (
                a(vec![s("4"), s("1"), s("6"), s("0"), s("members")]),
                "members (field 4) is not an array",
            ),
        ] {
            let detail = corrupt(bad);
            assert!(detail.contains(needle), "{detail}");
        }
    }
}
