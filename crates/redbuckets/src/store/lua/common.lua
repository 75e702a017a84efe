-- Shared prelude of every redbuckets script but heartbeat_fast.lua (src/store/redis/scripts.rs
-- puts it before each body, after clock.lua, which defines server_now_us).
--
-- Mirrors src/store/memory.rs, the reference semantics. Keys (all share the group's hash tag):
--   KEYS[1] meta    hash: buckets, protocol, ver (membership version), token (last fencing
--                   token), grant_after_us (end of the quarantine), created_us, ttl_us (the
--                   group's one session ttl), seen_us (when a live session last left), run_id
--                   (the Redis process that wrote the group;
--                   another one means the data may be stale, see load_current_meta),
--                   parked_next_us (the earliest end of a grace in parked, if any: note_parked)
--   KEYS[2] exp     zset: member -> session expiry (server ms)
--   KEYS[3] sess    hash: member -> session nonce
--   KEYS[4] since   hash: member -> session start (server ms)
--   KEYS[5] weight  hash: member -> weight
--   KEYS[6] wcount  hash: weight -> number of members with that weight
--   KEYS[7] owner   hash: bucket -> "<token> <member>"
--   KEYS[8] free    set of free buckets
--   <tag>:count:<w>      zset per weight: member -> committed count (held minus committed
--                        releases). Per weight, so the share rule counts the members above
--                        their base share with one ZCOUNT per distinct weight, not a scan.
--   <tag>:held:<member>  set of the member's buckets
--   <tag>:ids            zset, every score 0: the live members in id order, so that each
--                        member watches the expiry of the next two (watched_next_ms)
--   <tag>:requarantine   string, expiring: the end of the quarantine (µs) of a group forgotten
--                        for stale data, for the call that re-creates it (load_current_meta)
--   <tag>:grace          hash: member -> its session's rejoin grace (µs), only when above zero
--                        (register.lua): the session is parked when it ends (end_session)
--   <tag>:parked         zset: parked id -> the end of its grace (µs). A parked id has no
--                        session (it is in none of exp, sess, since, ids, grace) but keeps its
--                        weight (weight, wcount, count:<w>), so the share rule counts it as
--                        present, and its held set with its owner records (the old token), so
--                        nobody else is granted its buckets and its next session claims them
--                        (register.lua, claim); purge frees them once the grace is over (unpark)
--   <tag>:events         pub/sub channel: every change, for tools that watch the group
--   <tag>:wake:<member>  pub/sub channel: the member must act (settle)
-- Keys built here from ARGV[1] (the tag) share the hash tag, so they are on the same slot.
-- This comment, bind() and the helpers below (held_key, count_key, ids_key, requarantine_key,
-- grace_key, parked_key, wake_channel) are the one place the Lua side names keys: the bodies
-- call the helpers, and src/store/redis/wire.rs (KEY_SUFFIXES, TAG_SUFFIXES) tests that the Rust
-- side agrees.
-- Every key of a group expires (keep_alive, seen_leaving): nothing of a group nobody uses stays.
--
-- Lua numbers are doubles: µs timestamps (~1.7e15) are exact, but tostring() and number
-- arguments to redis.call may print them with too few digits, so every number that is
-- stored or compared as text goes through fmt().

-- The call's keys and tag. Declared here and set by bind(), which every script runs first: as
-- an EVAL script (scripts.rs puts `bind(KEYS, ARGV)` before the body) and as a function of the
-- library, whose text is loaded once, when no call's KEYS and ARGV exist.
local K_META, K_EXP, K_SESS, K_SINCE
local K_WEIGHT, K_WCOUNT, K_OWNER, K_FREE
local TAG, CHANNEL
-- The buckets this call freed (free_buckets), not yet granted: valid ids with no owner record,
-- in the free set. grant() takes them first, and so skips the SPOP and the owner-record check
-- a bucket from the free set needs. Each bucket once (FRESH_SET): with foreign edits, two
-- members' held sets may name one bucket. Reset by bind(): a library's locals outlive its calls.
local FRESH, FRESH_SET = {}, {}
-- True in the variant loaded on a Redis Cluster (scripts.rs replaces this line; nothing else
-- differs). There, notices go out with SPUBLISH (a plain PUBLISH reaches every node; a sharded
-- channel stays on the group's slot), and every call first reads a key that never exists:
-- while the slot migrates, Redis refuses that read ("non local key") before the script has
-- written anything. Without it a script could write, then fail on a key of the group that
-- moved already, or on one it creates, and leave the group half changed.
local CLUSTER = false
local PUBLISH = CLUSTER and 'SPUBLISH' or 'PUBLISH'
local function bind(keys, argv)
  K_META, K_EXP, K_SESS, K_SINCE = keys[1], keys[2], keys[3], keys[4]
  K_WEIGHT, K_WCOUNT, K_OWNER, K_FREE = keys[5], keys[6], keys[7], keys[8]
  TAG = argv[1]
  CHANNEL = TAG .. ':events'
  FRESH, FRESH_SET = {}, {}
  if CLUSTER then
    redis.call('EXISTS', TAG .. ':migration-probe')
  end
end
-- The heartbeat purges at most this many expired sessions per call, so it never stalls Redis.
-- Every other script purges all of them (as MemoryStore does), so the per-weight counts it
-- reads describe exactly the live members; that work is proportional to the buckets freed.
local HEARTBEAT_PURGE = 100
-- Arguments per command when a list is unpacked (Lua's C stack allows ~8000).
local BATCH = 4000
local TWO_53 = 9007199254740992

local function fmt(x)
  return string.format('%.0f', x)
end

-- Raises a structured error; store/redis/errors.rs maps it to Error::CorruptState. Only raised before a
-- script writes, or after writes that leave the group consistent on their own.
local function corrupt(detail)
  error({ err = 'REDBUCKETS_CORRUPT ' .. detail })
end

-- A non-negative integer below 2^53 stored as decimal text, or a corrupt-state error.
local function uint(s, what)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') or #s > 16 then
    corrupt(what .. ' is not a non-negative integer: ' .. string.sub(tostring(s), 1, 40))
  end
  local n = tonumber(s)
  if n >= TWO_53 then
    corrupt(what .. ' is too large: ' .. s)
  end
  return n
end

-- floor(a / b) for non-negative integers below 2^53. Double division rounds, and a quotient
-- just below an integer may round up to it; the products below are exact, so correct it.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- share.rs `base_share`: floor(B·w/W). B·w ≤ 2^16 · 10^6 and W ≤ 10^6 · n stay exact in a double.
local function base_share(B, w, total)
  if total == 0 then
    return 0
  end
  return idiv(B * w, total)
end

-- The share rule of src/share.rs (`step` and `target_range`) as one pure function: no
-- redis.call, so tests/lua_share.rs runs it through EVAL against share.rs on random inputs.
-- The members come grouped by weight: every member of weight w has the same base share, so the
-- caller counts those above it with one ZCOUNT per distinct weight instead of a scan.
--   B       bucket count
--   groups  array of { weight, members of that weight, members of that weight whose committed
--           count is above base_share(B, weight, W) (the caller included) }
--   my_w    the caller's weight; mine its committed count; free the free buckets
-- Returns kind ('take' | 'release' | 'stay'), count (take: capped by free), share_min,
-- share_max. Work: O(d) for d distinct weights.
local function share_rule(B, groups, my_w, mine, free)
  local total = 0
  for _, g in ipairs(groups) do
    total = total + g[1] * g[2]
  end
  local assigned, others_with_extra = 0, 0
  for _, g in ipairs(groups) do
    assigned = assigned + g[2] * base_share(B, g[1], total)
    others_with_extra = others_with_extra + g[3]
  end
  local base = base_share(B, my_w, total)
  if mine > base then
    others_with_extra = others_with_extra - 1
  end
  -- The remainder buckets: at most this many members get one more than their base share.
  local remainder = math.max(B - assigned, 0)
  local share_max = base
  if remainder > 0 then
    share_max = base + 1
  end
  local allowed = base
  if others_with_extra < remainder then
    allowed = base + 1
  end
  if mine > allowed then
    return 'release', mine - allowed, base, share_max
  end
  if mine < allowed and free > 0 then
    return 'take', math.min(allowed - mine, free), base, share_max
  end
  return 'stay', 0, base, share_max
end

-- The group's parameters, validated; nil when the group does not exist. Also, as stored (not
-- validated here: a group written before them lacks them): ttl_text (the session ttl, µs), and
-- created and seen (µs) as numbers or nil, which is_unattended and the snapshot read.
local function load_meta()
  local v = redis.call('HMGET', K_META, 'buckets', 'protocol', 'ver', 'token', 'grant_after_us',
    'ttl_us', 'created_us', 'seen_us')
  if not v[1] and not v[2] and not v[3] and not v[4] and not v[5] then
    if redis.call('EXISTS', K_META) == 1 then
      corrupt('meta hash has none of the fields buckets, protocol, ver, token, grant_after_us')
    end
    return nil
  end
  local meta = {
    buckets = uint(v[1], 'meta.buckets'),
    protocol = uint(v[2], 'meta.protocol'),
    ver = uint(v[3], 'meta.ver'),
    token = uint(v[4], 'meta.token'),
    grant_after = uint(v[5], 'meta.grant_after_us'),
    ttl_text = v[6],
    ttl = tonumber(v[6] or ''),
    created = tonumber(v[7] or ''),
    seen = tonumber(v[8] or ''),
  }
  if meta.buckets < 1 or meta.buckets > 65536 then
    corrupt('meta.buckets out of range: ' .. v[1])
  end
  return meta
end

-- The id of this Redis process: it changes on every restart and on a failover. Cached in a
-- local of the text: in the function library that local lives as long as the library's Lua
-- state, which a restart, a FUNCTION FLUSH or a replica loads afresh, so INFO runs once per
-- Redis process; an EVAL script's locals are new on every call, so there it runs once per call.
-- Never taken from the client: one that reconnected to a restarted server would present the
-- old id and hide the very staleness the id is for.
local RUN_ID = nil
local function server_run_id()
  if not RUN_ID then
    RUN_ID = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
  end
  return RUN_ID
end

local function held_key(member)
  return TAG .. ':held:' .. member
end

-- The member's pub/sub channel: `act`, or `grant <nonce> <token> <bucket>...`.
local function wake_channel(member)
  return TAG .. ':wake:' .. member
end

-- `w` is the weight as stored (decimal text).
local function count_key(w)
  return TAG .. ':count:' .. w
end

local function ids_key()
  return TAG .. ':ids'
end

-- A key made between two refreshes of the group's expiry (keep_alive) takes the meta hash's, so
-- it goes with the group's other keys, also if every member crashes before its next renewal.
local function inherit_expiry(key)
  local left = redis.call('PTTL', K_META)
  -- Only a key without an expiry (PTTL -1): `PEXPIRE ... NX` says the same from Redis 7.0 on,
  -- and Redis 6.2 refuses it (the compatibility job found that).
  if left > 0 and redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, left)
  end
end

local function requarantine_key()
  return TAG .. ':requarantine'
end

local function grace_key()
  return TAG .. ':grace'
end

local function parked_key()
  return TAG .. ':parked'
end

local function publish()
  redis.call(PUBLISH, CHANNEL, 'changed')
end

local function bump(meta)
  meta.ver = meta.ver + 1
  redis.call('HSET', K_META, 'ver', fmt(meta.ver))
end

-- Calls redis.call(cmd, key, <items i..j>) in batches small enough to unpack.
local function batched(cmd, key, items)
  for i = 1, #items, BATCH do
    redis.call(cmd, key, unpack(items, i, math.min(i + BATCH - 1, #items)))
  end
end

-- Whether `b` (text) is a bucket id of a group of `buckets`: canonical decimal (no sign, no
-- leading zero: "07" would be a second owner record of bucket 7), below the bucket count.
local function bucket_id(b, buckets)
  return string.match(b, '^%d+$') and #b <= 6 and tonumber(b) < buckets
    and (#b == 1 or string.byte(b, 1) ~= 48)
end

-- The token (as text) and the member of an owner record "<token> <member>", or nil for
-- garbage or no record.
local function owner_record(record)
  if type(record) ~= 'string' then
    return nil
  end
  return string.match(record, '^(%d+) (.*)$')
end

-- The member named by an owner record, or nil for garbage.
local function owner_member(record)
  local _, member = owner_record(record)
  return member
end

-- The owner records of `buckets` (false for none), one HMGET per batch.
local function owner_records(buckets)
  local records = {}
  for i = 1, #buckets, BATCH do
    local got = redis.call('HMGET', K_OWNER, unpack(buckets, i, math.min(i + BATCH - 1, #buckets)))
    for j, record in ipairs(got) do
      records[i + j - 1] = record
    end
  end
  return records
end

-- Whether bucket `b` (text, owner record `record`) is a valid id whose record names `member`,
-- nobody, or garbage: one `member`'s held set may give up (free_buckets) or take back (claim).
-- A record naming another member is never touched (foreign edits).
local function mine_or_unowned(meta, member, b, record)
  local named = owner_member(record)
  return bucket_id(b, meta.buckets) and (not record or named == nil or named == member)
end

-- Frees buckets that left `member`'s held set: deletes the owner record and adds the bucket
-- to the free set, unless the owner record names another member (foreign edits must never
-- make one bucket free while someone else owns it). Garbage bucket ids are dropped.
-- `records`: the buckets' owner records (false for none), when the caller read them already.
local function free_buckets(meta, member, buckets, records)
  records = records or owner_records(buckets)
  local freed = {}
  for j, b in ipairs(buckets) do
    if mine_or_unowned(meta, member, b, records[j]) then
      freed[#freed + 1] = b
    end
  end
  batched('HDEL', K_OWNER, freed)
  batched('SADD', K_FREE, freed)
  if #freed > 0 then
    inherit_expiry(K_FREE)
  end
  for _, b in ipairs(freed) do
    if not FRESH_SET[b] then
      FRESH_SET[b] = true
      FRESH[#FRESH + 1] = b
    end
  end
  return #freed
end

-- Takes `member` out of the share rule's view: its weight, its weight's member count and its
-- committed count.
local function drop_weight(member)
  local w = redis.call('HGET', K_WEIGHT, member)
  if w then
    redis.call('ZREM', count_key(w), member)
    -- Not HINCRBY: on a garbage value it would raise halfway through this removal.
    local c = tonumber(redis.call('HGET', K_WCOUNT, w) or '0') or 0
    if c > 1 then
      redis.call('HSET', K_WCOUNT, w, fmt(c - 1))
    else
      redis.call('HDEL', K_WCOUNT, w)
    end
  end
  redis.call('HDEL', K_WEIGHT, member)
end

-- Frees `member`'s held set (`held`: its members, when the caller read them already), deletes
-- it, and takes the member out of the share rule (drop_weight).
local function free_held(meta, member, held)
  local hk = held_key(member)
  free_buckets(meta, member, held or redis.call('SMEMBERS', hk))
  redis.call('DEL', hk)
  drop_weight(member)
end

-- Takes `member` out of the live structures: its expiry, its place in the id order, its nonce,
-- its start and its grace.
local function drop_session(member)
  redis.call('ZREM', K_EXP, member)
  redis.call('ZREM', ids_key(), member)
  redis.call('HDEL', K_SESS, member)
  redis.call('HDEL', K_SINCE, member)
  redis.call('HDEL', grace_key(), member)
end

-- Removes a member and frees its buckets (model.rs `remove_member`). `held`: its held set's
-- members, when the caller read them already.
local function remove_member(meta, member, held)
  free_held(meta, member, held)
  drop_session(member)
  bump(meta)
end

-- Keeps the earliest end of a grace (µs) in the meta hash's parked_next_us, none when nothing is
-- parked: heartbeat_fast reads it with the version, so the steady renewal needs no command of
-- its own to see a grace end. Called after every change of the parked set.
local function note_parked()
  local first = redis.call('ZRANGE', parked_key(), 0, 0, 'WITHSCORES')
  if #first > 0 then
    redis.call('HSET', K_META, 'parked_next_us', fmt(tonumber(first[2]) or 0))
  else
    redis.call('HDEL', K_META, 'parked_next_us')
  end
end

-- Ends `member`'s session (model.rs `end_session`). With a grace (grace_key) it is parked until
-- `from` + the grace (µs; `from`: now for a leave or a replacement, the expiry for an expired
-- session): it leaves the live structures, and keeps its weight, committed count, held set and
-- owner records (see parked_key). Without one it is removed and its buckets freed
-- (remove_member, which takes `held`).
local function end_session(meta, member, from, held)
  local grace = tonumber(redis.call('HGET', grace_key(), member) or '') or 0
  if grace <= 0 then
    remove_member(meta, member, held)
    return
  end
  redis.call('ZADD', parked_key(), fmt(from + grace), member)
  inherit_expiry(parked_key())
  note_parked()
  drop_session(member)
  bump(meta)
end

-- Frees a parked id's buckets and forgets it: its grace is over, or an operator removed the id
-- (model.rs `unpark`).
local function unpark(meta, member)
  free_held(meta, member)
  redis.call('ZREM', parked_key(), member)
  note_parked()
  bump(meta)
end

local function check_type(key, want)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then
    t = t.ok
  end
  if t ~= 'none' and t ~= want then
    corrupt(key .. ' is a ' .. tostring(t) .. ', not a ' .. want)
  end
end

-- Redis keeps what a script wrote before it failed, so a script that writes first checks that
-- every key it may touch has the right type: a WRONGTYPE halfway would leave buckets in no set.
-- `member` adds that member's held set and the committed-count sets of every weight.
local function check_types(member)
  -- The type each key of the group must have (or not exist); one call each, no table built.
  check_type(K_META, 'hash')
  check_type(K_EXP, 'zset')
  check_type(K_SESS, 'hash')
  check_type(K_SINCE, 'hash')
  check_type(K_WEIGHT, 'hash')
  check_type(K_WCOUNT, 'hash')
  check_type(K_OWNER, 'hash')
  check_type(K_FREE, 'set')
  check_type(ids_key(), 'zset')
  check_type(grace_key(), 'hash')
  check_type(parked_key(), 'zset')
  if member then
    check_type(held_key(member), 'set')
  end
  for _, w in ipairs(redis.call('HKEYS', K_WCOUNT)) do
    check_type(count_key(w), 'zset')
  end
end

-- The group's meta when `member` still has session `nonce` (checking every key's type first, as
-- before any write); nil when there is nothing to do: no group, or another session.
local function own_session(member, nonce)
  local meta = load_meta()
  if not meta then
    return nil
  end
  check_types(member)
  if redis.call('HGET', K_SESS, member) ~= nonce then
    return nil
  end
  return meta
end

-- Ends the expired sessions at `now` (µs), oldest expiry first, each from its expiry
-- (end_session: parked with a grace, else removed), then frees the parked ids whose grace is
-- over, earliest first (unpark), those just parked included; at most `limit` of each if given.
-- Returns how many of both.
local function purge(meta, now, limit)
  local now_ms = idiv(now, 1000)
  local capped = {}
  if limit then
    capped = { 'LIMIT', 0, limit }
  end
  local dead = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', fmt(now_ms), 'WITHSCORES', unpack(capped))
  -- Check first: a WRONGTYPE halfway through would leave buckets in no set.
  for i = 1, #dead, 2 do
    check_type(held_key(dead[i]), 'set')
  end
  for i = 1, #dead, 2 do
    end_session(meta, dead[i], (tonumber(dead[i + 1]) or now_ms) * 1000)
  end
  local over = redis.call('ZRANGEBYSCORE', parked_key(), '-inf', fmt(now), unpack(capped))
  -- Checked before these writes; the ones above leave the group consistent on their own.
  for _, member in ipairs(over) do
    check_type(held_key(member), 'set')
  end
  for _, member in ipairs(over) do
    unpark(meta, member)
  end
  return #dead / 2 + #over
end

-- What a registration at `now` (µs) tells the member about tokens (memory.rs `token_floor`):
-- the group's last token, or now - 1 µs if later. Every grant to the session comes later with a
-- higher token; every grant to an earlier session under its nonce (lost with the store's data,
-- whose re-created group starts its tokens from 0) had one not higher.
local function token_floor(meta, now)
  return math.max(meta.token, now - 1)
end

-- The expiry, in server ms, of a session renewed at `now` (µs) for `ttl_us`: rounded up, so the
-- store never expires a session before the member's own deadline.
local function expiry_ms(now, ttl_us)
  return idiv(now + ttl_us + 999, 1000)
end

-- Expiry of a member's session in ms, or nil if it has none.
local function expiry(member)
  local s = redis.call('ZSCORE', K_EXP, member)
  if not s then
    return nil
  end
  return tonumber(s)
end

-- True when `member` has session `nonce` and it has not expired.
local function live(member, nonce, now_ms)
  if redis.call('HGET', K_SESS, member) ~= nonce then
    return false
  end
  local e = expiry(member)
  return e ~= nil and e > now_ms
end

-- The member's weight as stored (decimal text), validated.
local function weight_of(member)
  local w = redis.call('HGET', K_WEIGHT, member)
  uint(w, 'weight of ' .. member)
  return w
end

-- The member's committed count; `w` is its weight as stored.
local function committed(member, w)
  local s = redis.call('ZSCORE', count_key(w), member)
  if not s then
    return 0
  end
  return uint(s, 'count of ' .. member)
end

-- Every id with a held set: the sessions' and the parked ids' (keys of foreign types read as none).
local function member_ids()
  local ids = {}
  local members = redis.pcall('HKEYS', K_SESS)
  if type(members) == 'table' and not members.err then
    for _, m in ipairs(members) do
      ids[#ids + 1] = m
    end
  end
  local parked = redis.pcall('ZRANGE', parked_key(), 0, -1)
  if type(parked) == 'table' and not parked.err then
    for _, m in ipairs(parked) do
      ids[#ids + 1] = m
    end
  end
  return ids
end

-- Forgets every key of the group (its data is lost or stale; the next registration re-creates
-- it, with the quarantine).
local function wipe_group()
  for _, m in ipairs(member_ids()) do
    redis.call('DEL', held_key(m))
  end
  local weights = redis.pcall('HKEYS', K_WCOUNT)
  if type(weights) == 'table' and not weights.err then
    for _, w in ipairs(weights) do
      redis.call('DEL', count_key(w))
    end
  end
  redis.call('DEL', K_META, K_EXP, K_SESS, K_SINCE, K_WEIGHT, K_WCOUNT, K_OWNER, K_FREE, ids_key(),
    grace_key(), parked_key())
end

-- True when the group's data was written by another Redis process (see load_current_meta).
local function is_stale()
  return redis.call('HGET', K_META, 'run_id') ~= server_run_id()
end

-- True when nobody has been seen in the group for a ttl: no session is live at `now` (µs), and no
-- live session left (leave, deregister) within the group's ttl; created_us stands in for a group
-- nobody left yet. memory.rs `GroupState::unattended`. Either every member stopped, or this
-- Redis process was frozen or cut off (a hung VM, a stall, a black hole) for longer than a ttl
-- while its replica may have been promoted and granted the group's buckets: a primary that
-- comes back does not know yet that it was replaced, and the group's data, which it wrote
-- itself, passes is_stale. Its server clock went on, so every session has expired.
local function is_unattended(meta, now)
  local last = redis.call('ZRANGE', K_EXP, -1, -1, 'WITHSCORES')
  if #last > 0 and (tonumber(last[2]) or 0) > idiv(now, 1000) then
    return false
  end
  return (meta.seen or meta.created or 0) + (meta.ttl or 0) <= now
end

-- Keeps `until_us` as the earliest grant of the group's next creation (register.lua reads it),
-- unless a later one is kept already; the key expires when it no longer matters.
local function raise_requarantine(until_us, now)
  local floor = tonumber(redis.call('GET', requarantine_key()) or '') or 0
  if until_us > floor then
    redis.call('SET', requarantine_key(), fmt(until_us), 'PX', fmt(idiv(until_us - now, 1000) + 1))
  end
end

-- Every key of the group: the fixed ones, each weight's counts, each member's and each parked
-- id's held set (not the requarantine key, which expires by itself). O(members), read once per
-- keep_ms / 2.
local function group_keys()
  local keys = { K_META, K_EXP, K_SESS, K_SINCE, K_WEIGHT, K_WCOUNT, K_OWNER, K_FREE, ids_key(),
    grace_key(), parked_key() }
  local weights = redis.pcall('HKEYS', K_WCOUNT)
  if type(weights) == 'table' and not weights.err then
    for _, w in ipairs(weights) do
      keys[#keys + 1] = count_key(w)
    end
  end
  for _, m in ipairs(member_ids()) do
    keys[#keys + 1] = held_key(m)
  end
  return keys
end

-- Nothing of a group nobody uses stays behind: every key of a group expires KEEP after the last
-- renewal of any of its sessions (keep_ms), and sooner after its last member left
-- (seen_leaving). Members renewing refresh the expiry once it is half gone (keep_alive), so a
-- live group never loses a key: its members renew every ttl / 2 at most, far inside that half.
-- A group whose keys expired is gone, as after data loss: the next registration creates it with
-- its quarantine, and tokens go on growing (they follow the clock). The least time is a minute,
-- so a test's or a simulation's clock (clock_frozen.lua), which may run ahead of Redis's own,
-- never sees keys vanish in the middle of a run.
local KEEP_TTLS, KEEP_MIN_MS = 10, 60000

-- How long (ms) a group of session ttl `ttl_us` keeps its keys after its last renewal.
local function keep_ms(ttl_us)
  return math.max(idiv(KEEP_TTLS * ttl_us, 1000), KEEP_MIN_MS)
end

-- Sets every key of the group to expire in `ms`.
local function expire_group(ms)
  for _, k in ipairs(group_keys()) do
    redis.call('PEXPIRE', k, ms)
  end
end

-- A live member's renewal (or, with `all`, a registration) keeps the group: every key, once
-- less than half of keep_ms is left of the expiry the last refresh set (meta's kept_ms, server
-- ms; none: a group written before this). `kept` is that field as read by the caller
-- (heartbeat_fast reads it with the version: no call of its own), nil to read it here. A
-- registration sets them all (the keys of a new member or weight are made there); the free
-- set, the owner hash and a held set, which come and go with the buckets, take the meta hash's
-- expiry when they are made (inherit_expiry).
local function keep_alive(ttl_us, all, now_ms, kept)
  local keep = keep_ms(ttl_us)
  if not all then
    if kept == nil then
      kept = redis.call('HGET', K_META, 'kept_ms')
    end
    local until_ms = tonumber(kept or '')
    if until_ms and until_ms - now_ms >= keep / 2 then
      return
    end
  end
  expire_group(keep)
  redis.call('HSET', K_META, 'kept_ms', fmt(now_ms + keep))
end

-- Records that a live session left the group at `now` (µs): is_unattended counts from here. When
-- it was the last one, the group's keys expire max(2 ttl, KEEP_MIN_MS) from now unless a member
-- registers first (which keeps them, keep_alive). The group is unattended a ttl after this
-- leave anyway, and the next registration would re-create it: its keys going away changes no
-- outcome.
local function seen_leaving(meta, now)
  redis.call('HSET', K_META, 'seen_us', fmt(now))
  if redis.call('ZCARD', K_EXP) == 0 then
    expire_group(math.max(idiv(2 * (meta.ttl or 0), 1000), KEEP_MIN_MS))
  end
end

-- The group's parameters at `now` (µs), or nil and why not: 'absent' (no group), 'stale' (its
-- data was written by another Redis process) or 'unattended' (is_unattended). After a restart
-- that reloaded a snapshot or an append-only file, or a failover to a replica, the data may be
-- stale: members may hold leases it does not show, and granting from it could give one bucket to
-- two members (S1) with an older token (S2). A primary that hung for longer than a ttl and came
-- back may have been replaced meanwhile: what it grants before it learns so could overlap what
-- the new primary grants. Such a group is forgotten, so it is re-created with the quarantine
-- (twice the ttl after stale data, see register.lua), as after a total loss.
-- Checked on every path that can grant or adopt buckets: register, rebalance and snapshot
-- here, and settle before it grants freed buckets (the heartbeat, release, leave and
-- deregister reach it; a group with a live taker is never unattended); not on the steady
-- renewal, which grants nothing (INFO, cached per library, would cost about as much as the
-- renewal itself through EVALSHA).
local function load_current_meta(now)
  local meta = load_meta()
  if not meta then
    return nil, 'absent'
  end
  local why = nil
  if is_stale() then
    why = 'stale'
  elseif is_unattended(meta, now) then
    why = 'unattended'
  end
  if why then
    wipe_group()
    if why == 'stale' and meta.ttl then
      -- Kept past the wipe, for whichever call re-creates the group (register.lua): the
      -- rebalance or the heartbeat that finds stale data comes before the registration.
      raise_requarantine(now + 2 * meta.ttl, now)
    end
    publish()
    return nil, why
  end
  return meta
end

-- The live members grouped by weight, weights ascending (the order settle visits them in, as
-- share.rs does): { w, text (as stored), n (members), base (base share) }, and the remainder:
-- how many members may hold one bucket above their base share.
local function weight_groups(B)
  local flat = redis.call('HGETALL', K_WCOUNT)
  local groups, total = {}, 0
  for i = 1, #flat, 2 do
    local w = uint(flat[i], 'weight in wcount')
    local n = uint(flat[i + 1], 'wcount of weight ' .. flat[i])
    groups[#groups + 1] = { w = w, text = flat[i], n = n }
    total = total + w * n
  end
  table.sort(groups, function(a, b)
    return a.w < b.w
  end)
  local assigned = 0
  for _, g in ipairs(groups) do
    g.base = base_share(B, g.w, total)
    assigned = assigned + g.n * g.base
  end
  return groups, math.max(B - assigned, 0)
end

-- Members of `groups` whose committed count is above their base share.
local function count_above(groups)
  local above = 0
  for _, g in ipairs(groups) do
    above = above + redis.call('ZCOUNT', count_key(g.text), '(' .. fmt(g.base), '+inf')
  end
  return above
end

-- The weight groups (weight_groups) as share_rule takes them, with how many members of each
-- weight hold more than their base share now: one ZCOUNT per distinct weight.
local function rule_groups(wgroups)
  local groups = {}
  for _, g in ipairs(wgroups) do
    local above = redis.call('ZCOUNT', count_key(g.text), '(' .. fmt(g.base), '+inf')
    groups[#groups + 1] = { g.w, g.n, above }
  end
  return groups
end

-- A new fencing token at `now` (µs), kept as the group's last: above every earlier one, and
-- following the server's clock (token_floor).
local function next_token(meta, now)
  local token = math.max(now, meta.token + 1)
  meta.token = token
  redis.call('HSET', K_META, 'token', fmt(token))
  return token
end

-- Grants up to k free buckets to `member` (weight `w` as stored, committed count `mine`) under a
-- new token (memory.rs `GroupState::grant`). Returns the token, the bucket ids granted, and how
-- many left the free set (garbage ids popped from it are dropped, not granted).
local function grant(meta, member, w, mine, k, now)
  local token = next_token(meta, now)
  local record = fmt(token) .. ' ' .. member
  local taken, pairs_ = {}, {}
  -- First the buckets this call freed: they are known to be valid and unowned.
  while #taken < k and #FRESH > 0 do
    local b = table.remove(FRESH)
    taken[#taken + 1] = b
    pairs_[#pairs_ + 1] = b
    pairs_[#pairs_ + 1] = record
  end
  batched('SREM', K_FREE, taken)
  local fresh = #taken
  local popped = {}
  if #taken < k then
    popped = redis.call('SPOP', K_FREE, k - #taken)
  end
  for i = 1, #popped, BATCH do
    local chunk = { unpack(popped, i, math.min(i + BATCH - 1, #popped)) }
    local owners = redis.call('HMGET', K_OWNER, unpack(chunk))
    for j, b in ipairs(chunk) do
      -- Garbage or already-owned ids in the free set (foreign edits) are dropped, not granted.
      if not owners[j] and bucket_id(b, meta.buckets) then
        taken[#taken + 1] = b
        pairs_[#pairs_ + 1] = b
        pairs_[#pairs_ + 1] = record
      end
    end
  end
  batched('HSET', K_OWNER, pairs_)
  batched('SADD', held_key(member), taken)
  if #taken > 0 then
    inherit_expiry(held_key(member))
    inherit_expiry(K_OWNER)
  end
  redis.call('ZADD', count_key(w), fmt(mine + #taken), member)
  return token, taken, fresh + #popped
end

-- Gives `member`'s new session (nonce `nonce`, weight `w` as stored) the buckets parked for its id
-- (model.rs `claim`): `held`, the parked held set, and `count`, its committed count. They stay in
-- the held set; their owner records name the member with a new token, its committed count is
-- the parked one, and it is told as a grant is: 'grant <nonce> <token> <bucket>...', buckets
-- ascending. Ids a foreign edit left there (garbage, or owned by another member) leave the held
-- set instead. Nothing to claim: no token, no notice.
local function claim(meta, member, nonce, w, held, count, now)
  local records = owner_records(held)
  local claimed, dropped, unrecorded = {}, {}, false
  for j, b in ipairs(held) do
    if mine_or_unowned(meta, member, b, records[j]) then
      claimed[#claimed + 1] = tonumber(b)
      unrecorded = unrecorded or owner_member(records[j]) ~= member
    else
      dropped[#dropped + 1] = b
    end
  end
  batched('SREM', held_key(member), dropped)
  if #claimed == 0 then
    return
  end
  table.sort(claimed)
  local token = next_token(meta, now)
  local record = fmt(token) .. ' ' .. member
  local ids, pairs_ = {}, {}
  for _, b in ipairs(claimed) do
    local id = fmt(b)
    ids[#ids + 1] = id
    pairs_[#pairs_ + 1] = id
    pairs_[#pairs_ + 1] = record
  end
  batched('HSET', K_OWNER, pairs_)
  if unrecorded then
    -- A bucket with no owner record may sit in the free set (foreign edits): not any more.
    batched('SREM', K_FREE, ids)
  end
  redis.call('ZADD', count_key(w), fmt(math.min(count, #claimed)), member)
  redis.call(PUBLISH, wake_channel(member), 'grant ' .. nonce .. ' ' .. fmt(token) .. ' '
    .. table.concat(ids, ' '))
end

-- After a change, wakes the members that must act, and nobody else (memory.rs `settle`,
-- share.rs `givers` and `takers`): a change costs work in proportion to the members that give
-- or take, not to the group's size. Nobody during the quarantine.
-- `joined`: a member joined, so some may be above their new share. Their lower counts are
-- committed here: every member above base + 1 comes down to base + 1, then, while more members
-- hold one above their base than the remainder allows, the first at base + 1 in id order come
-- down to base. Then, if buckets are free, members below their base (fewest first) until their
-- room covers the free count, then members at their base while the remainder has room.
-- Those takers are not woken to call: each is granted, in that order, what the share rule lets
-- it take now, and its notice carries the grant ('grant <nonce> <token> <bucket>...'), so a
-- freed bucket has its next owner one round trip sooner. `caller`, the member whose call this
-- is, is woken ('act') instead: it is in the middle of its own call. A taker whose session
-- expired and is not purged yet gets nothing: it would never take the grant in.
-- A parked id (parked_key) counts as present, as the share rule does: after a join its count is
-- committed like anyone's, and as a taker it uses up the free count like anyone, but it is
-- neither woken nor granted anything (it has no session; its next one claims its buckets). Only
-- the caller is woken even when parked (a leave's own settle), as the model does.
local function settle(meta, now, joined, caller)
  if now < meta.grant_after then
    return
  end
  local groups, remainder = weight_groups(meta.buckets)
  local any_parked = redis.call('ZCARD', parked_key()) > 0
  local function parked(m)
    return any_parked and redis.call('ZSCORE', parked_key(), m) ~= false
  end
  local woken, seen, takers = {}, {}, {}
  local function add(m, taker)
    if not seen[m] then
      seen[m] = true
      if taker and m ~= caller then
        takers[#takers + 1] = m
      else
        woken[#woken + 1] = m
      end
    end
  end
  -- A giver after a join: its count is committed, and it is woken unless parked.
  local function give(m)
    if not parked(m) then
      add(m)
    end
  end
  if joined then
    for _, g in ipairs(groups) do
      local k = count_key(g.text)
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', k, '(' .. fmt(g.base + 1), '+inf')) do
        redis.call('ZADD', k, fmt(g.base + 1), m)
        give(m)
      end
    end
    local excess = count_above(groups) - remainder
    for _, g in ipairs(groups) do
      if excess <= 0 then
        break
      end
      local k = count_key(g.text)
      local top = fmt(g.base + 1)
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', k, top, top, 'LIMIT', 0, excess)) do
        redis.call('ZADD', k, fmt(g.base), m)
        give(m)
        excess = excess - 1
      end
    end
  end
  local need = redis.call('SCARD', K_FREE)
  if need > 0 then
    local extras = math.max(remainder - count_above(groups), 0)
    for _, g in ipairs(groups) do
      if need <= 0 then
        break
      end
      local below = redis.call('ZRANGEBYSCORE', count_key(g.text), '-inf', '(' .. fmt(g.base),
        'WITHSCORES', 'LIMIT', 0, need)
      for i = 1, #below, 2 do
        add(below[i], true)
        need = need - (g.base - (tonumber(below[i + 1]) or 0))
        if need <= 0 then
          break
        end
      end
    end
    for _, g in ipairs(groups) do
      if need <= 0 or extras <= 0 then
        break
      end
      local base = fmt(g.base)
      local at = redis.call('ZRANGEBYSCORE', count_key(g.text), base, base, 'LIMIT', 0,
        math.min(need, extras))
      for _, m in ipairs(at) do
        add(m, true)
        need = need - 1
        extras = extras - 1
      end
    end
  end
  for _, m in ipairs(woken) do
    redis.call(PUBLISH, wake_channel(m), 'act')
  end
  -- Data another Redis process wrote (a restart that reloaded a file, a failover) must not be
  -- granted from (load_current_meta): the takers are woken instead, and their steps re-create
  -- the group. Nor is a member whose records are odd (foreign edits) granted anything: this
  -- runs after the call's writes, so it must not raise.
  if #takers == 0 then
    return
  end
  local stale = is_stale()
  local now_ms = idiv(now, 1000)
  -- The share rule's view, read once and kept up to date as each taker is granted (as
  -- memory.rs keeps its loads): the free count, and per weight how many are above base.
  local rule = rule_groups(groups)
  local free = redis.call('SCARD', K_FREE)
  for _, m in ipairs(takers) do
    local w = redis.call('HGET', K_WEIGHT, m)
    local nonce = redis.call('HGET', K_SESS, m)
    local mine = w and tonumber(redis.call('ZSCORE', count_key(w), m) or '')
    local ends = tonumber(redis.call('ZSCORE', K_EXP, m) or '')
    if parked(m) then
      -- Parked: nothing for it now, and nobody to wake; its next session claims its buckets.
    elseif ends and ends <= now_ms then
      -- A session that expired and is not purged yet (the heartbeat's purge stopped at its
      -- cap): it will never take them in. Nothing for it, and nobody to wake; the buckets stay
      -- free for the live members, and its purge frees its own.
    elseif stale or not nonce or not mine or not tonumber(w) or not ends then
      redis.call(PUBLISH, wake_channel(m), 'act')
    else
      local kind, count = share_rule(meta.buckets, rule, tonumber(w), mine, free)
      if kind == 'take' then
        local token, taken, removed = grant(meta, m, w, mine, count, now)
        free = free - removed
        for i, g in ipairs(groups) do
          if g.text == w and mine <= g.base and mine + #taken > g.base then
            rule[i][3] = rule[i][3] + 1
          end
        end
        if #taken > 0 then
          redis.call(PUBLISH, wake_channel(m), 'grant ' .. nonce .. ' ' .. fmt(token) .. ' '
            .. table.concat(taken, ' '))
        end
      end
    end
  end
end

-- ms from now_ms until the earliest expiry of the sessions `member` watches: the next two
-- members after it in id order, wrapping around (memory.rs `watched`); -1 if there are none.
-- Each crashed member is checked by two peers when its session ends, not by all of them.
local function watched_next_ms(member, now_ms)
  local k = ids_key()
  local ids = redis.call('ZRANGEBYLEX', k, '(' .. member, '+', 'LIMIT', 0, 2)
  if #ids < 2 then
    for _, m in ipairs(redis.call('ZRANGEBYLEX', k, '-', '(' .. member, 'LIMIT', 0, 2 - #ids)) do
      ids[#ids + 1] = m
    end
  end
  local next_ms = -1
  if #ids == 0 then
    return next_ms
  end
  for _, e in ipairs(redis.call('ZMSCORE', K_EXP, unpack(ids))) do
    local at = tonumber(e)
    if at then
      local d = math.max(at - now_ms, 0)
      if next_ms < 0 or d < next_ms then
        next_ms = d
      end
    end
  end
  return next_ms
end

-- Whether a session other than `member`'s ends within `watch_ms` of now_ms (a negative
-- `watch_ms`: always true). `first` is K_EXP's first two entries with their scores, if the
-- caller read them already. Only then are the watched sessions looked up: otherwise all of
-- them end later than the member would check them (memory.rs heartbeat), and a healthy
-- group's renewal skips the lookup, most of its cost.
local function others_end_within(member, now_ms, watch_ms, first)
  if watch_ms < 0 then
    return true
  end
  first = first or redis.call('ZRANGE', K_EXP, 0, 1, 'WITHSCORES')
  for i = 1, #first, 2 do
    if first[i] ~= member then
      local at = tonumber(first[i + 1])
      return not at or math.max(at - now_ms, 0) < watch_ms
    end
  end
  return false
end

-- The heartbeat's reply, from heartbeat.lua and heartbeat_fast.lua: {alive, ver, free, next,
-- committed, held} (see heartbeat.lua). `watch_ms` and `first`: others_end_within.
-- The live sessions at `now_ms` (memory.rs counts the same): expired ones a capped purge left
-- are not counted. O(log n). For the member's `redbuckets_members` gauge.
local function live_count(now_ms)
  return redis.call('ZCOUNT', K_EXP, '(' .. fmt(now_ms), '+inf')
end

local function heartbeat_reply(alive, ver, member, now_ms, mine, held, watch_ms, first)
  local next_ms = -1
  if others_end_within(member, now_ms, watch_ms, first) then
    next_ms = watched_next_ms(member, now_ms)
  end
  return { alive, ver, redis.call('SCARD', K_FREE), fmt(next_ms), mine, held,
    live_count(now_ms) }
end
