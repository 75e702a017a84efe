-- deregister: ARGV[2] member, [3] nonce. Ends the session if it is still this one.
-- Returns 1 if the member was removed.
local member, nonce = ARGV[2], ARGV[3]

local meta = own_session(member, nonce)
if not meta then
  return 0
end
remove_member(meta, member)
publish()
settle(meta, server_now_us(), false, member)
return 1
