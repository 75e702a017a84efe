//! `RedisStore`: the store protocol as Lua scripts on Redis. (Being written.)
