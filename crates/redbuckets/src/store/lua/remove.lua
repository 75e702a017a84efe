-- remove: ARGV[2] member. An operator's call (`redbuckets remove-member`) for a member known to
-- be dead: ends its session now, whatever its nonce, as a deregistration would (its buckets are
-- freed and granted to the live members at once, with larger tokens: settle). The member is
-- woken too: if it is alive after all, its next call finds the session gone, it reports its
-- buckets lost and registers again; until then it may still use them (the operator was warned).
-- Buckets parked for the id (its session ended with a rejoin grace) are freed too: the operator
-- wants it gone. Returns {'removed', held} (the buckets its session held, or those parked for
-- it: an id is live or parked, never both) or {'absent'} (no group, no such session and nothing
-- parked, or it had expired and the purge this call runs first removed it).
local member = ARGV[2]

local meta = load_meta()
if not meta then
  return { 'absent' }
end
check_types(member)
local now = server_now_us()
local changed = purge(meta, now) > 0
local parked = nil
if redis.call('ZSCORE', parked_key(), member) then
  parked = redis.call('SCARD', held_key(member))
  unpark(meta, member)
  changed = true
end
if not redis.call('HGET', K_SESS, member) then
  if changed then
    publish()
    settle(meta, now, false, member)
  end
  if parked then
    return { 'removed', parked }
  end
  return { 'absent' }
end
local held = redis.call('SCARD', held_key(member))
remove_member(meta, member)
seen_leaving(meta, now)
redis.call(PUBLISH, wake_channel(member), 'act')
publish()
settle(meta, now, false, member)
return { 'removed', held }
