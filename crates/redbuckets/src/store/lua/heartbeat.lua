-- heartbeat: ARGV[2] member, [3] nonce, [4] ttl µs. Returns {alive 0|1, ver, free, next}, next
-- being the ms until the earliest other session expires (0 if some are left to purge; -1 if
-- there is no other session).
-- Steady state (nothing expired): O(log n) work, independent of the bucket count.
local member, nonce = ARGV[2], ARGV[3]
local ttl_us = uint(ARGV[4], 'ttl argument')

local meta = load_meta()
if not meta then
  return { 0, '0', 0, -1 }
end
check_types(nil)
local now = server_now_us()
local now_ms = idiv(now, 1000)
-- Bounded, so one heartbeat never stalls Redis; the rest goes on the next call.
local purged = purge(meta, now_ms, HEARTBEAT_PURGE)
local alive = 0
if live(member, nonce, now_ms) then
  -- Rounded up: the store never expires a session before the member's own deadline.
  redis.call('ZADD', K_EXP, fmt(idiv(now + ttl_us + 999, 1000)), member)
  alive = 1
end
if purged > 0 then
  publish()
end
local next_ms = -1
local first = redis.call('ZRANGE', K_EXP, 0, 1, 'WITHSCORES')
for i = 1, #first, 2 do
  if first[i] ~= member then
    local at = tonumber(first[i + 1])
    if at then
      next_ms = math.max(at - now_ms, 0)
    end
    break
  end
end
return { alive, fmt(meta.ver), redis.call('SCARD', K_FREE), fmt(next_ms) }
