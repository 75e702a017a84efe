-- deregister: ARGV[2] member, [3] nonce. Ends the session if it is still this one (parking its
-- buckets if it has a rejoin grace: end_session).
-- Returns 1 if the member was removed here (0 also when its session had expired, and the purge
-- this call runs first removed it).
local member, nonce = ARGV[2], ARGV[3]

local meta = own_session(member, nonce)
if not meta then
  return 0
end
-- Expired sessions first, so the takers are chosen by the live members' shares; this one
-- with them if it had expired.
local now = server_now_us()
purge(meta, now)
local removed = 0
if redis.call('HGET', K_SESS, member) == nonce then
  end_session(meta, member, now)
  seen_leaving(meta, now)
  removed = 1
end
publish()
settle(meta, now, false, member)
return removed
