-- delete: ARGV[2] force ('1': also while sessions are live). An operator's call
-- (`redbuckets delete`), not a member's. Deletes every key of the group (wipe_group).
-- Returns {'absent'} when there is no group, {'live', n} when n sessions are live and force is
-- not given (nothing is deleted), else {'deleted', n} with the n live sessions it ended.
-- A live member keeps its leases until it learns (it is woken here; its session is gone at its
-- next call) or until its local deadline, which comes before its session's expiry (S3). So the
-- registration that re-creates the group must grant nothing before the latest expiry of those
-- sessions, whatever ttl it brings: that expiry is left in the requarantine key (kept if it is
-- later already), which register.lua takes as the floor of the new group's quarantine. Tokens
-- keep growing: a new group's tokens follow the server's clock (token_floor).
local force = ARGV[2] == '1'
local now = server_now_us()
local now_ms = idiv(now, 1000)
if redis.call('EXISTS', K_META) == 0 then
  return { 'absent' }
end
-- Foreign data under the sessions' key: no live session can be read from it.
local live = redis.pcall('ZRANGEBYSCORE', K_EXP, '(' .. fmt(now_ms), '+inf', 'WITHSCORES')
if type(live) ~= 'table' or live.err then
  live = {}
end
local n = #live / 2
if n > 0 and not force then
  return { 'live', n }
end
if n > 0 then
  raise_requarantine((tonumber(live[#live]) or now_ms) * 1000, now)
end
wipe_group()
for i = 1, #live, 2 do
  redis.call(PUBLISH, wake_channel(live[i]), 'act')
end
publish()
return { 'deleted', n }
