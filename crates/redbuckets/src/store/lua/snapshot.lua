-- snapshot: no further arguments. Read-only: it never purges, publishes or wipes (redis/mod.rs
-- runs it with the no-writes flag, so Redis refuses any write), because looking at a group
-- (`redbuckets status`, `watch`) must never change it.
-- Returns {} when the group does not exist, else
-- {buckets, protocol, ver, quarantine_us, {member, nonce, weight, held, committed,
--  expires_in_ms, age_ms}..., owner_flat, stale, ttl_us, age_us, renewed_ago_us,
--  {id, weight, held, grace_left_us}...} where
-- age_us is the time since the group was created, renewed_ago_us the time since the latest
-- renewal of any session (live or expired unpurged: its expiry less the ttl), -1 with no session
-- (0 for a group written before these fields existed), owner_flat is the owner hash as
-- bucket, record pairs, and the last list the parked ids (their buckets wait for the id's next
-- session) with the time left of their grace. It shows the group as the next purge would leave
-- it (common.lua purge): members whose session expired are left out, parked if they had a grace
-- (from their expiry), the parked ids whose grace is over are left out, the buckets that purge
-- would free or that are parked are left out of owner_flat (owned by nobody), and ver counts
-- each session ended and each parked id freed. stale is 1 when the group's data was written by
-- another Redis process or nobody was seen in it for a ttl (load_current_meta): the data is
-- shown as stored, and the next registration or rebalance re-creates the group.
local meta = load_meta()
if not meta then
  return {}
end
-- Check first, as the writing scripts do: a foreign type is a corrupt-state error.
check_types(nil)
local now = server_now_us()
local now_ms = idiv(now, 1000)
local stale = 0
if is_stale() or is_unattended(meta, now) then
  stale = 1
end

-- One read of the owner hash and of the sessions, each used twice below.
local all = redis.call('HGETALL', K_OWNER)
local record_of = {}
for i = 1, #all, 2 do
  record_of[all[i]] = all[i + 1]
end
local dead, live = {}, {}
local sessions = redis.call('ZRANGE', K_EXP, 0, -1, 'WITHSCORES')
for i = 1, #sessions, 2 do
  if tonumber(sessions[i + 1]) <= now_ms then
    dead[#dead + 1] = sessions[i]
    dead[#dead + 1] = sessions[i + 1]
  else
    live[#live + 1] = sessions[i]
    live[#live + 1] = sessions[i + 1]
  end
end

-- What purge() would do: each expired session ends (end_session), parked until its expiry + its
-- grace if it has one; then every parked id whose grace is over is freed (unpark). Both bump
-- the version.
-- The ids whose buckets nobody owns after that: { id, end of its grace (µs; nil: none) }.
local bumps = #dead / 2
local gone = {}
for i = 1, #dead, 2 do
  local grace = tonumber(redis.call('HGET', grace_key(), dead[i]) or '') or 0
  if grace > 0 then
    gone[#gone + 1] = { dead[i], tonumber(dead[i + 1]) * 1000 + grace }
  else
    gone[#gone + 1] = { dead[i], nil }
  end
end
local stored = redis.call('ZRANGE', parked_key(), 0, -1, 'WITHSCORES')
for i = 1, #stored, 2 do
  gone[#gone + 1] = { stored[i], tonumber(stored[i + 1]) or 0 }
end

-- The buckets shown with no owner: those purge() would free (common.lua free_buckets: each
-- held bucket whose owner record names its member, or nobody), and the parked ones; and the
-- ids still parked then.
local unowned = {}
local waiting = {}
for _, p in ipairs(gone) do
  local m, until_us = p[1], p[2]
  local hk = held_key(m)
  check_type(hk, 'set')
  local held = redis.call('SMEMBERS', hk)
  for _, b in ipairs(held) do
    local record = record_of[b]
    local named = owner_member(record)
    if not record or named == nil or named == m then
      unowned[b] = true
    end
  end
  if until_us and until_us <= now then
    bumps = bumps + 1
  elseif until_us then
    waiting[#waiting + 1] = { m, weight_of(m), #held, fmt(until_us - now) }
  end
end

local members = {}
for i = 1, #live, 2 do
  local m = live[i]
  local w = weight_of(m)
  local since = redis.call('HGET', K_SINCE, m)
  local age = 0
  if since then
    age = math.max(now_ms - uint(since, 'since of ' .. m), 0)
  end
  members[#members + 1] = {
    m,
    redis.call('HGET', K_SESS, m) or '',
    w,
    redis.call('SCARD', held_key(m)),
    fmt(committed(m, w)),
    fmt(math.max(tonumber(live[i + 1]) - now_ms, 0)),
    fmt(age),
  }
end

local owners = {}
for i = 1, #all, 2 do
  if not unowned[all[i]] then
    owners[#owners + 1] = all[i]
    owners[#owners + 1] = all[i + 1]
  end
end

local ttl_us = meta.ttl or 0
local created_us = meta.created or now
local renewed_ago = -1
if #sessions > 0 then
  -- Expiries are in ms, rounded up from the renewal's µs + ttl (expiry_ms).
  local latest = tonumber(sessions[#sessions]) or 0
  renewed_ago = math.max(now - (latest * 1000 - ttl_us), 0)
end

return {
  fmt(meta.buckets),
  fmt(meta.protocol),
  -- purge bumps the version once per session it ends and once per parked id it frees.
  fmt(meta.ver + bumps),
  fmt(math.max(meta.grant_after - now, 0)),
  members,
  owners,
  stale,
  fmt(ttl_us),
  fmt(math.max(now - created_us, 0)),
  fmt(renewed_ago),
  waiting,
}
