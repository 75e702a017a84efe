-- rebalance: ARGV[2] member, [3] nonce, [4] max_take.
-- Returns {kind, value, share_min, share_max, ver, free, committed, held, members, bucket...}
-- (members: the live sessions) where kind is
-- 'acquired' (value = token, then the buckets), 'release' (value = count), 'stay', 'wait'
-- (value = µs left), or {'lost'}.
-- The share rule is common.lua's share_rule, the pure twin of src/share.rs `step` /
-- `target_range` (tests/lua_share.rs checks them against each other).
local member, nonce = ARGV[2], ARGV[3]
local max_take = uint(ARGV[4], 'max_take argument')

local now = server_now_us()
local now_ms = idiv(now, 1000)
local meta = load_current_meta(now)
if not meta then
  return { 'lost' }
end
check_types(member)
local purged = purge(meta, now) > 0
if purged then
  publish()
  settle(meta, now, false, member)
end
if not live(member, nonce, now_ms) then
  return { 'lost' }
end

local B = meta.buckets
local my_w = weight_of(member)
local count_k = count_key(my_w)
local mine = committed(member, my_w)

-- The live members grouped by weight, with how many of each weight hold more than their base
-- share: one ZCOUNT per distinct weight (d = 1 in the common equal-weight case).
local groups = rule_groups(weight_groups(B))
local free = redis.call('SCARD', K_FREE)
local kind, count, base, share_max = share_rule(B, groups, tonumber(my_w), mine, free)

-- The reply's fixed part; the member's held count is read last, after any grant.
local function reply(kind, value, free, committed_count)
  return { kind, value, base, share_max, fmt(meta.ver), free, committed_count,
    redis.call('SCARD', held_key(member)), live_count(now_ms) }
end

if now < meta.grant_after then
  return reply('wait', fmt(meta.grant_after - now), free, mine)
end

if kind == 'release' then
  redis.call('ZADD', count_k, fmt(mine - count), member)
  return reply('release', count, free, mine - count)
end

if kind == 'take' then
  local token, taken = grant(meta, member, my_w, mine, math.min(count, math.max(max_take, 1)), now)
  local granted = reply('acquired', fmt(token), redis.call('SCARD', K_FREE), mine + #taken)
  for _, b in ipairs(taken) do
    granted[#granted + 1] = b
  end
  return granted
end

return reply('stay', 0, free, mine)
