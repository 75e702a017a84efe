//! Test support for redbuckets, in a crate of its own so that every test suite (the library's,
//! the CLI's) uses one implementation of each thing instead of copies or `#[path]` includes.
//!
//! # Layout
//! - `redis` — [`RedisServer`], [`Sentinel`] and [`RedisCluster`]: real `redis-server` processes on free ports,
//!   with plain fault verbs (`stop`, `restart`, `pause`, `resume`), killed on drop. Without
//!   `redis-server` on the PATH they panic with how to install it: tests never skip silently.
//! - `events` — [`EventLog`]: members' events in arrival order, checked for S1/S2 by the
//!   library's one checker, [`redbuckets::check`] (the CLI's demo runs it too, which is why it
//!   lives in the library and not here).
//! - `info` — [`RedisInfo`]: the fields of an `INFO` reply the benchmarks and tests read.
//! - `intercept` — [`Intercepted`]: one generic [`redbuckets::Store`] wrapper that hands each of
//!   the seven calls to a test's [`Intercept`] hook (fail, delay, count, lose or rewrite).
#![deny(missing_docs, missing_debug_implementations)]

mod events;
mod info;
mod intercept;
mod redis;

pub use events::EventLog;
pub use info::{RedisInfo, SCRIPT_COMMANDS};
pub use intercept::{Call, Intercept, Intercepted, Reply};
pub use redis::{RedisCluster, RedisServer, Sentinel};
