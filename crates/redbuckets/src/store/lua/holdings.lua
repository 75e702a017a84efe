-- holdings: ARGV[2] member, [3] nonce. Read-only, like snapshot.lua. What a member reads to
-- align itself with the store after a lost reply: its own buckets, O(held), not the group's
-- whole owner hash, O(B). Returns {} when the session is not live in the store (no group, data
-- another Redis process wrote, another session, or an expired one: snapshot.lua leaves those
-- out too), else {committed, bucket, token, bucket, token, ...}: each bucket of the session's
-- held set whose owner record names the member, with the record's token (memory.rs holdings).
-- Garbage ids in the held set (foreign edits) are left out, as free_buckets drops them.
local member, nonce = ARGV[2], ARGV[3]

local meta = load_meta()
if not meta or is_stale() then
  return {}
end
check_types(member)
local now_ms = idiv(server_now_us(), 1000)
if not live(member, nonce, now_ms) then
  return {}
end
local out = { fmt(committed(member, weight_of(member))) }
local held = redis.call('SMEMBERS', held_key(member))
for i = 1, #held, BATCH do
  local last = math.min(i + BATCH - 1, #held)
  local records = redis.call('HMGET', K_OWNER, unpack(held, i, last))
  for j = i, last do
    local b = held[j]
    local token, named = owner_record(records[j - i + 1])
    if bucket_id(b, meta.buckets) and named == member then
      out[#out + 1] = b
      out[#out + 1] = token
    end
  end
end
return out
