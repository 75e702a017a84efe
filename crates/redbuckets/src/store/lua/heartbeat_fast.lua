-- heartbeat, the steady-state path: standalone (clock.lua only, no common.lua), six commands,
-- nothing that grows with the group. KEYS and ARGV as for every script: KEYS[1] meta, [2] exp,
-- [3] sess, [8] free; ARGV[2] member, [3] nonce, [4] ttl µs.
-- Returns {1, ver, free, next} when the session is renewed (next: ms until the earliest other
-- session expires, -1 if there is none), or {'full'} when heartbeat.lua must run:
-- a session has expired and must be purged, the session is not ours, or the group's data is
-- missing or odd (the full script validates it and says what is wrong).
local ttl_us = tonumber(ARGV[4])
if not ttl_us then
  return { 'full' }
end
local now = server_now_us()
local now_ms = math.floor(now / 1000)
-- The two earliest sessions: if the first has expired, purge (full script). Otherwise every
-- session is live, so the nonce alone says the session is ours.
local first = redis.call('ZRANGE', KEYS[2], 0, 1, 'WITHSCORES')
local next_ms = -1
if #first > 0 then
  local at = tonumber(first[2])
  if not at or at <= now_ms then
    return { 'full' }
  end
  if first[1] == ARGV[2] then
    at = tonumber(first[4])
  end
  if at then
    next_ms = at - now_ms
  end
end
local ver = redis.call('HGET', KEYS[1], 'ver')
if not ver or not string.match(ver, '^%d+$') or #ver > 15 then
  return { 'full' }
end
if redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3] then
  return { 'full' }
end
-- Rounded up: the store never expires a session before the member's own deadline.
redis.call('ZADD', KEYS[2], string.format('%.0f', math.floor((now + ttl_us + 999) / 1000)), ARGV[2])
return { 1, ver, redis.call('SCARD', KEYS[8]), string.format('%.0f', next_ms) }
