-- rebalance: ARGV[2] member, [3] nonce, [4] max_take.
-- Returns {kind, value, share_min, share_max, ver, free, committed, held, bucket...} where kind is
-- 'acquired' (value = token, then the buckets), 'release' (value = count), 'stay', 'wait'
-- (value = µs left), or {'lost'}.
-- The share rule is src/share.rs `step` / `target_range`; keep both in step.
local member, nonce = ARGV[2], ARGV[3]
local max_take = uint(ARGV[4], 'max_take argument')

local meta = load_current_meta()
if not meta then
  return { 'lost' }
end
check_types(member)
local now = server_now_us()
local now_ms = idiv(now, 1000)
local purged = purge(meta, now_ms) > 0
if not live(member, nonce, now_ms) then
  if purged then
    publish()
  end
  return { 'lost' }
end
if purged then
  publish()
end

local B = meta.buckets
local my_w = weight_of(member)
local count_k = count_key(my_w)
local mine = committed(member, my_w)

-- base_share(B, w, W) = floor(B·w/W); B·w ≤ 2^16 · 2^32 stays exact in a double.
local function base_share(w, total)
  if total == 0 then
    return 0
  end
  return idiv(B * w, total)
end

-- share.rs `step` over the members grouped by weight: every member of weight w has the same
-- base share, and those holding more than it are one ZCOUNT on that weight's count zset.
-- Work: O(d · log n) for d distinct weights (d = 1 in the common equal-weight case).
local by_weight = {}
local total = 0
local flat = redis.call('HGETALL', K_WCOUNT)
for i = 1, #flat, 2 do
  local w = uint(flat[i], 'weight in wcount')
  local c = uint(flat[i + 1], 'wcount of weight ' .. flat[i])
  by_weight[#by_weight + 1] = { flat[i], w, c }
  total = total + w * c
end
local assigned, others_with_extra = 0, 0
for _, e in ipairs(by_weight) do
  local base_w = base_share(e[2], total)
  assigned = assigned + e[3] * base_w
  others_with_extra = others_with_extra
      + redis.call('ZCOUNT', count_key(e[1]), '(' .. fmt(base_w), '+inf')
end
local base = base_share(tonumber(my_w), total)
if mine > base then
  others_with_extra = others_with_extra - 1
end
local remainder = math.max(B - assigned, 0)
local allowed = base
if others_with_extra < remainder then
  allowed = base + 1
end
local share_max = base
if B > assigned then
  share_max = base + 1
end

-- The reply's fixed part; the member's held count is read last, after any grant.
local function reply(kind, value, free, committed_count)
  return { kind, value, base, share_max, fmt(meta.ver), free, committed_count,
    redis.call('SCARD', held_key(member)) }
end

local free = redis.call('SCARD', K_FREE)
if now < meta.grant_after then
  return reply('wait', fmt(meta.grant_after - now), free, mine)
end

if mine > allowed then
  local k = mine - allowed
  redis.call('ZADD', count_k, fmt(allowed), member)
  return reply('release', k, free, allowed)
end

if mine < allowed and free > 0 then
  local k = math.min(allowed - mine, free, math.max(max_take, 1))
  local token = math.max(now, meta.token + 1)
  redis.call('HSET', K_META, 'token', fmt(token))
  local popped = redis.call('SPOP', K_FREE, k)
  local record = fmt(token) .. ' ' .. member
  local taken, pairs_ = {}, {}
  for i = 1, #popped, BATCH do
    local chunk = { unpack(popped, i, math.min(i + BATCH - 1, #popped)) }
    local owners = redis.call('HMGET', K_OWNER, unpack(chunk))
    for j, b in ipairs(chunk) do
      -- Garbage or already-owned ids in the free set (foreign edits) are dropped, not granted.
      if not owners[j] and string.match(b, '^%d+$') and #b <= 6 and tonumber(b) < B then
        taken[#taken + 1] = b
        pairs_[#pairs_ + 1] = b
        pairs_[#pairs_ + 1] = record
      end
    end
  end
  batched('HSET', K_OWNER, pairs_)
  batched('SADD', held_key(member), taken)
  redis.call('ZADD', count_k, fmt(mine + #taken), member)
  local granted = reply('acquired', fmt(token), redis.call('SCARD', K_FREE), mine + #taken)
  for _, b in ipairs(taken) do
    granted[#granted + 1] = b
  end
  return granted
end

return reply('stay', 0, free, mine)
