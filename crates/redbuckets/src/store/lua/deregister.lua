-- deregister: ARGV[2] member, [3] nonce. Ends the session if it is still this one.
-- Returns 1 if the member was removed.
local member, nonce = ARGV[2], ARGV[3]

local meta = load_meta()
if not meta then
  return 0
end
check_types(member)
if redis.call('HGET', K_SESS, member) ~= nonce then
  return 0
end
remove_member(meta, member)
publish()
return 1
