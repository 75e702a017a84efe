-- release: ARGV[2] member, [3] nonce, [4] known (the highest token the member has applied),
-- [5..] buckets. Returns how many buckets left the session's held set: only buckets the session
-- holds are freed, and not one whose owner record names a token above `known` (granted to the
-- session since: its notice may still be on its way, memory.rs release).
local member, nonce = ARGV[2], ARGV[3]
local known = uint(ARGV[4], 'known token argument')

local meta = own_session(member, nonce)
if not meta then
  return 0
end
local hk = held_key(member)
local released = {}
for i = 5, #ARGV, BATCH do
  local chunk = { unpack(ARGV, i, math.min(i + BATCH - 1, #ARGV)) }
  local records = redis.call('HMGET', K_OWNER, unpack(chunk))
  for j, b in ipairs(chunk) do
    local t = type(records[j]) == 'string' and tonumber(string.match(records[j], '^(%d+) '))
    if not (t and t > known) and redis.call('SREM', hk, b) == 1 then
      released[#released + 1] = b
    end
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
