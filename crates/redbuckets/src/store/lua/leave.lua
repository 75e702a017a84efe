-- leave: ARGV[2] member, [3] nonce, [4..] buckets. The graceful leave's last step: frees the
-- given buckets if the session holds them and ends the session (freeing anything else it
-- held), as one step, so the members that take them are woken once, with the membership after
-- the leave. A session with a rejoin grace parks all it held instead (end_session): freed for
-- nobody else, claimed by the id's next session. Returns how many of the given buckets left the
-- session's held set, parked ones included (0 when the session is not this one).
local member, nonce = ARGV[2], ARGV[3]

local meta = own_session(member, nonce)
if not meta then
  return 0
end
-- Expired sessions first, so the takers are chosen by the live members' shares. If this
-- session itself had expired, the purge ended it and freed what it held: nothing more to free.
local now = server_now_us()
purge(meta, now)
local released = 0
if redis.call('HGET', K_SESS, member) == nonce then
  -- How many of the named buckets (each counted once) the session holds, from its held set,
  -- which the removal reads anyway: no command per bucket, nor a second read of the set.
  local held = redis.call('SMEMBERS', held_key(member))
  local holds = {}
  for _, b in ipairs(held) do
    holds[b] = true
  end
  for i = 4, #ARGV do
    if holds[ARGV[i]] then
      holds[ARGV[i]] = false
      released = released + 1
    end
  end
  -- Frees every bucket of the held set, checking each owner record as release does (or parks
  -- them all).
  end_session(meta, member, now, held)
  seen_leaving(meta, now)
end
publish()
settle(meta, now, false, member)
return released
