//! Test support for redbuckets, in a crate of its own so that every test suite (the library's,
//! the CLI's) uses one implementation of each thing instead of copies or `#[path]` includes.
//!
//! # Layout
//! - `redis` — [`RedisServer`] and [`Sentinel`]: real `redis-server` processes on free ports,
//!   with plain fault verbs (`stop`, `restart`, `pause`, `resume`), killed on drop. Without
//!   `redis-server` on the PATH they panic with how to install it: tests never skip silently.
#![deny(missing_docs, missing_debug_implementations)]

mod redis;

pub use redis::{RedisServer, Sentinel};
