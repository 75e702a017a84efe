-- heartbeat, the steady-state path: no validation of the group's keys and nothing that grows
-- with the group. ARGV[2] member, [3] nonce, [4] ttl µs.
-- Returns the reply of heartbeat.lua when the session is renewed, or {'full'} when heartbeat.lua
-- must run: a session has expired or a rejoin grace has ended (parked buckets to free), which
-- must be purged, the session is not ours, or the group's data is missing or odd (the full
-- script validates it and says what is wrong). ARGV[5] watch ms, as in heartbeat.lua.
local member, nonce = ARGV[2], ARGV[3]
local ttl_us = tonumber(ARGV[4])
local watch_ms = tonumber(ARGV[5])
if not ttl_us or not watch_ms then
  return { 'full' }
end
local now = server_now_us()
local now_ms = idiv(now, 1000)
-- The earliest session: if it has expired, purge (full script). Otherwise every session is
-- live, so the nonce alone says the session is ours. The second is the earliest of the others'
-- when the first is ours (heartbeat_reply).
local first = redis.call('ZRANGE', K_EXP, 0, 1, 'WITHSCORES')
if #first > 0 then
  local at = tonumber(first[2])
  if not at or at <= now_ms then
    return { 'full' }
  end
end
local meta_fields = redis.call('HMGET', K_META, 'ver', 'kept_ms', 'parked_next_us')
-- The earliest end of a grace (µs, note_parked): once reached, the full script frees those
-- parked buckets, so they are spread within one renewal after it.
local grace_end = meta_fields[3]
if grace_end and not (tonumber(grace_end) and tonumber(grace_end) > now) then
  return { 'full' }
end
local ver = meta_fields[1]
if not ver or not string.match(ver, '^%d+$') or #ver > 15 then
  return { 'full' }
end
if redis.call('HGET', K_SESS, member) ~= nonce then
  return { 'full' }
end
local w = redis.call('HGET', K_WEIGHT, member)
if not w then
  return { 'full' }
end
local mine = tonumber(redis.call('ZSCORE', count_key(w), member) or '')
if not mine then
  return { 'full' }
end
redis.call('ZADD', K_EXP, fmt(expiry_ms(now, ttl_us)), member)
keep_alive(ttl_us, false, now_ms, meta_fields[2])
return heartbeat_reply(1, ver, member, now_ms, mine, redis.call('SCARD', held_key(member)),
  watch_ms, first)
