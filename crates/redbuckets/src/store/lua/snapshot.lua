-- snapshot: no further arguments. Returns {} when the group does not exist, else
-- {buckets, protocol, ver, quarantine_us, {member, nonce, weight, held, committed,
--  expires_in_ms, age_ms}..., owner_flat, stale} where owner_flat is HGETALL of the owner hash
-- and stale is 0 (a stale group is wiped above).
local meta = load_current_meta()
if not meta then
  return {}
end
local now = server_now_us()
local now_ms = idiv(now, 1000)
if purge(meta, now_ms) > 0 then
  publish()
end

local members = {}
local flat = redis.call('ZRANGEBYSCORE', K_EXP, '(' .. fmt(now_ms), '+inf', 'WITHSCORES')
for i = 1, #flat, 2 do
  local m = flat[i]
  local w = weight_of(m)
  local since = redis.call('HGET', K_SINCE, m)
  local age = 0
  if since then
    age = math.max(now_ms - uint(since, 'since of ' .. m), 0)
  end
  members[#members + 1] = {
    m,
    redis.call('HGET', K_SESS, m) or '',
    w,
    redis.call('SCARD', held_key(m)),
    fmt(committed(m, w)),
    fmt(math.max(tonumber(flat[i + 1]) - now_ms, 0)),
    fmt(age),
  }
end
return {
  fmt(meta.buckets),
  fmt(meta.protocol),
  fmt(meta.ver),
  fmt(math.max(meta.grant_after - now, 0)),
  members,
  redis.call('HGETALL', K_OWNER),
  0,
}
