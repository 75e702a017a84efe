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
-- Expired sessions first, so the freed buckets go by the live members' shares (and none to a
-- session that will never take them in). If this session itself had expired, the purge ended
-- it and freed what it held, and there is nothing more to free.
local now = server_now_us()
local purged = purge(meta, now) > 0

-- Frees the named buckets the session holds; returns how many.
local function free_named()
  local hk = held_key(member)
  -- The named buckets, each once, that were not granted to the session since under a token
  -- above `known`, with their owner records (free_buckets checks them, without a second read).
  local names, records, seen = {}, {}, {}
  for i = 5, #ARGV, BATCH do
    local chunk = { unpack(ARGV, i, math.min(i + BATCH - 1, #ARGV)) }
    local got = redis.call('HMGET', K_OWNER, unpack(chunk))
    for j, b in ipairs(chunk) do
      local t = tonumber(owner_record(got[j]) or '')
      if not seen[b] and not (t and t > known) then
        seen[b] = true
        names[#names + 1] = b
        records[#names] = got[j]
      end
    end
  end
  -- Of those, the ones the session holds: one SMISMEMBER and one SREM per batch, not a
  -- command per bucket.
  local released, released_records = {}, {}
  for i = 1, #names, BATCH do
    local hits = redis.call('SMISMEMBER', hk, unpack(names, i, math.min(i + BATCH - 1, #names)))
    for j, hit in ipairs(hits) do
      if hit == 1 then
        released[#released + 1] = names[i + j - 1]
        released_records[#released] = records[i + j - 1]
      end
    end
  end
  if #released == 0 then
    return 0
  end
  batched('SREM', hk, released)
  free_buckets(meta, member, released, released_records)
  local held = redis.call('SCARD', hk)
  local w = redis.call('HGET', K_WEIGHT, member)
  if w and committed(member, w) > held then
    redis.call('ZADD', count_key(w), fmt(held), member)
  end
  return #released
end

local freed = 0
if redis.call('HGET', K_SESS, member) == nonce then
  freed = free_named()
end
if purged or freed > 0 then
  publish()
  settle(meta, now, false, member)
end
return freed
