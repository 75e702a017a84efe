-- leave: ARGV[2] member, [3] nonce, [4..] buckets. The graceful leave's last step: frees the
-- given buckets if the session holds them and ends the session (freeing anything else it
-- held), as one step, so the members that take them are woken once, with the membership after
-- the leave. Returns how many of the given buckets left the session's held set (0 when the
-- session is not this one).
local member, nonce = ARGV[2], ARGV[3]

local meta = own_session(member, nonce)
if not meta then
  return 0
end
local hk = held_key(member)
-- How many of the named buckets (each counted once) the session holds: one SMISMEMBER per
-- batch, not a command per bucket.
local names, seen = {}, {}
for i = 4, #ARGV do
  if not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    names[#names + 1] = ARGV[i]
  end
end
local released = 0
for i = 1, #names, BATCH do
  local hits = redis.call('SMISMEMBER', hk, unpack(names, i, math.min(i + BATCH - 1, #names)))
  for _, hit in ipairs(hits) do
    released = released + hit
  end
end
-- Frees every bucket of the held set, checking each owner record as release does.
remove_member(meta, member)
publish()
settle(meta, server_now_us(), false, member)
return released
