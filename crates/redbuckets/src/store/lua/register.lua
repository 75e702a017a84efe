-- register: ARGV[2] member, [3] nonce, [4] weight, [5] buckets, [6] ttl µs,
-- [7] '1' if [8] is a session this registration may replace, [9] protocol, [10] rejoin grace µs
-- (0: none; absent from an older caller: none).
-- Returns {'registered', ver, token floor (token_floor)} | {'inuse', expires_in_ms} | {'mismatch', buckets, protocol}
-- | {'ttl', group_ttl_us} (the group exists with another session ttl).
-- When the id's buckets are parked (an earlier session ended with a grace), this session claims
-- them (claim): a grant notice on its channel, after the token floor the reply carries.
local member, nonce = ARGV[2], ARGV[3]
local weight = uint(ARGV[4], 'weight argument')
local buckets = uint(ARGV[5], 'buckets argument')
local ttl_us = uint(ARGV[6], 'ttl argument')
local replaces = nil
if ARGV[7] == '1' then
  replaces = ARGV[8]
end
local protocol = uint(ARGV[9], 'protocol argument')
local grace_us = uint(ARGV[10] or '0', 'grace argument')

local now = server_now_us()
local now_ms = idiv(now, 1000)
local exp_ms = expiry_ms(now, ttl_us)

local meta = load_current_meta(now)
if meta and live_count(now_ms) == 0 then
  -- A group with no live session holds nothing (every lease ended before its session did,
  -- S3): its next member sets its configuration. Another bucket count, protocol or ttl
  -- re-creates the group (with its quarantine; tokens go on growing, they follow the clock)
  -- instead of being refused. memory.rs `register` does the same.
  if meta.buckets ~= buckets or meta.protocol ~= protocol or meta.ttl ~= ttl_us then
    wipe_group()
    publish()
    meta = nil
  end
end
if not meta then
  -- (Re)create the group. Anything left under its other keys belongs to a group that no longer
  -- exists; clear it so no stale owner record survives next to a full free set.
  wipe_group()
  local ids = {}
  for b = 0, buckets - 1 do
    ids[#ids + 1] = tostring(b)
    if #ids == BATCH then
      redis.call('SADD', K_FREE, unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then
    redis.call('SADD', K_FREE, unpack(ids))
  end
  -- grant_after: the quarantine. After data loss, members that still hold leases from before
  -- reach their local deadline (S3) before any bucket is granted again. After stale data (a
  -- failover, a restart that reloaded a file) twice the ttl, from when it was found stale
  -- (load_current_meta): the old primary may come back and, until it learns it was replaced,
  -- renew a session that was live when it stopped (for up to a ttl after its last renewal)
  -- for one more ttl.
  local grant_after = now + ttl_us
  local floor = tonumber(redis.call('GET', requarantine_key()) or '')
  if floor and floor > grant_after then
    grant_after = floor
  end
  redis.call('HSET', K_META, 'buckets', fmt(buckets), 'protocol', fmt(protocol), 'ver', '0',
    'token', '0', 'grant_after_us', fmt(grant_after), 'created_us', fmt(now),
    'ttl_us', fmt(ttl_us), 'run_id', server_run_id())
  meta = { buckets = buckets, protocol = protocol, ver = 0, token = 0, grant_after = grant_after,
    ttl_text = fmt(ttl_us), ttl = ttl_us, created = now }
end

check_types(member)
if meta.buckets ~= buckets or meta.protocol ~= protocol then
  return { 'mismatch', fmt(meta.buckets), fmt(meta.protocol) }
end
-- One ttl for the whole group: the quarantine after data loss lasts the ttl of whoever
-- re-creates the group, so a member with a longer ttl could still hold leases after it.
local group_ttl = uint(meta.ttl_text or '', 'meta.ttl_us')
if group_ttl ~= ttl_us then
  return { 'ttl', fmt(group_ttl) }
end
local changed = purge(meta, now) > 0

local existing = redis.call('HGET', K_SESS, member)
if existing then
  local e = expiry(member)
  local alive = e ~= nil and e > now_ms
  if alive and existing == nonce then
    -- The same registration again (a retry after a timeout): refresh it.
    redis.call('ZADD', K_EXP, fmt(exp_ms), member)
    keep_alive(ttl_us, false, now_ms, nil)
    if changed then
      publish()
      settle(meta, now, false, member)
    end
    return { 'registered', fmt(meta.ver), fmt(token_floor(meta, now)) }
  end
  if alive and existing ~= replaces then
    if changed then
      publish()
      settle(meta, now, false, member)
    end
    return { 'inuse', fmt(e - now_ms) }
  end
  -- Replaced: the earlier session gave up its leases locally. With a grace its buckets are
  -- parked, and this session claims them below.
  end_session(meta, member, now)
end

-- Validate before writing: an error must not leave a half-inserted member.
local w = fmt(weight)
local same_weight = redis.call('HGET', K_WCOUNT, w)
if same_weight then
  uint(same_weight, 'wcount of weight ' .. w)
end

local hk = held_key(member)
local parked, parked_count = nil, 0
if redis.call('ZSCORE', parked_key(), member) then
  -- The id's buckets are parked: this session claims them below. The parked entry goes, with its
  -- weight (this session brings its own); its held set and owner records stay for the claim.
  local parked_w = redis.call('HGET', K_WEIGHT, member)
  if parked_w then
    parked_count = tonumber(redis.call('ZSCORE', count_key(parked_w), member) or '') or 0
  end
  parked = redis.call('SMEMBERS', hk)
  redis.call('ZREM', parked_key(), member)
  note_parked()
  drop_weight(member)
  same_weight = redis.call('HGET', K_WCOUNT, w)
else
  -- A held set without a session is a leftover of foreign edits: free what it names.
  local stale = redis.call('SMEMBERS', hk)
  if #stale > 0 then
    free_buckets(meta, member, stale)
    redis.call('DEL', hk)
  end
end

-- No other live session: the group's keys may be expiring (its last member left), or new.
local first = redis.call('ZCARD', K_EXP) == 0
redis.call('ZADD', K_EXP, fmt(exp_ms), member)
redis.call('ZADD', ids_key(), 0, member)
redis.call('HSET', K_SESS, member, nonce)
redis.call('HSET', K_SINCE, member, fmt(now_ms))
redis.call('HSET', K_WEIGHT, member, w)
redis.call('HSET', K_WCOUNT, w, fmt((tonumber(same_weight or '0') or 0) + 1))
redis.call('ZADD', count_key(w), '0', member)
if grace_us > 0 then
  redis.call('HSET', grace_key(), member, fmt(grace_us))
else
  redis.call('HDEL', grace_key(), member)
end
-- The group is in use: its keys are kept. The first member sets every key's expiry (lifting
-- the one the last member's leave set); a later one, its weight's counts and the grace hash if
-- it made them, and the rest as a renewal does.
keep_alive(ttl_us, first, now_ms, nil)
inherit_expiry(count_key(w))
if grace_us > 0 then
  inherit_expiry(grace_key())
end
bump(meta)
-- Every grant to this session comes after this floor, the claim's too.
local floor = token_floor(meta, now)
if parked then
  claim(meta, member, nonce, w, parked, parked_count, now)
end
publish()
-- Members above their new share are committed to release and woken; free buckets find takers.
settle(meta, now, true, member)
return { 'registered', fmt(meta.ver), fmt(floor) }
