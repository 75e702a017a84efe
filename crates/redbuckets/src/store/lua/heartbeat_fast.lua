-- heartbeat, the steady-state path: standalone (no common.lua), six commands, nothing that
-- grows with the group. KEYS and ARGV as for every script: KEYS[1] meta, [2] exp, [3] sess,
-- [8] free; ARGV[2] member, [3] nonce, [4] ttl µs.
-- Returns {1, ver, free} when the session is renewed, or {'full'} when heartbeat.lua must run:
-- a session has expired and must be purged, the session is not ours, or the group's data is
-- missing or odd (the full script validates it and says what is wrong).
local ttl_us = tonumber(ARGV[4])
if not ttl_us then
  return { 'full' }
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
-- Every session left after this check is live, so the nonce alone says the session is ours.
if #redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now_ms), 'LIMIT', 0, 1) > 0 then
  return { 'full' }
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
return { 1, ver, redis.call('SCARD', KEYS[8]) }
