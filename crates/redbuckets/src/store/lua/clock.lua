-- The server's clock, in µs: the one place a script reads time (src/store/redis/scripts.rs prepends
-- this file to every script, heartbeat_fast.lua included). Tests swap in clock_frozen.lua.
local function server_now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
