-- release: ARGV[2] member, [3] nonce, [4..] buckets. Returns how many buckets left the
-- session's held set (only buckets the session holds are freed).
local member, nonce = ARGV[2], ARGV[3]

local meta = own_session(member, nonce)
if not meta then
  return 0
end
local hk = held_key(member)
local released = {}
for i = 4, #ARGV do
  if redis.call('SREM', hk, ARGV[i]) == 1 then
    released[#released + 1] = ARGV[i]
  end
end
if #released == 0 then
  return 0
end
free_buckets(meta, member, released)
local held = redis.call('SCARD', hk)
local w = redis.call('HGET', K_WEIGHT, member)
if w and committed(member, w) > held then
  redis.call('ZADD', count_key(w), fmt(held), member)
end
publish()
settle(meta, server_now_us(), false, member)
return #released
