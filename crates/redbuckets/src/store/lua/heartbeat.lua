-- heartbeat: ARGV[2] member, [3] nonce, [4] ttl µs, [5] watch ms (-1: always). Returns
-- {alive 0|1, ver, free, next, committed, held, members}: next is the ms until the earliest expiry of the
-- sessions this member watches (the next two in id order; 0 if some are left to purge; -1 if
-- there are none, or if no other session ends within the watch ms); committed and
-- held are the member's counts (0 when not alive), so a member that missed a wake-up learns here
-- that it must release; members is the count of live sessions.
-- Steady state (nothing expired): O(log n) work, independent of the bucket count.
local member, nonce = ARGV[2], ARGV[3]
local ttl_us = uint(ARGV[4], 'ttl argument')
local watch_ms = tonumber(ARGV[5]) or -1

local meta = load_meta()
if not meta then
  return { 0, '0', 0, -1, 0, 0, 0 }
end
check_types(nil)
local now = server_now_us()
local now_ms = idiv(now, 1000)
-- Bounded, so one heartbeat never stalls Redis; the rest goes on the next call.
local purged = purge(meta, now, HEARTBEAT_PURGE)
if purged > 0 then
  publish()
  settle(meta, now, false, member)
end
local alive, mine, held = 0, 0, 0
if live(member, nonce, now_ms) then
  redis.call('ZADD', K_EXP, fmt(expiry_ms(now, ttl_us)), member)
  keep_alive(ttl_us, false, now_ms, nil)
  alive = 1
  mine = committed(member, weight_of(member))
  held = redis.call('SCARD', held_key(member))
end
return heartbeat_reply(alive, fmt(meta.ver), member, now_ms, mine, held, watch_ms)
