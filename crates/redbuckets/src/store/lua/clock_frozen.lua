-- The server's clock for tests only (RedisOptions::frozen_clock_for_tests): a µs value the test
-- writes to `<tag>:test-clock` (ARGV[1] is the group's tag in every script), else TIME.
-- The default store loads clock.lua instead, so production scripts never read this key.
local function server_now_us()
  local frozen = redis.call('GET', ARGV[1] .. ':test-clock')
  if frozen then
    return tonumber(frozen)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
