//! Spread a fixed set of buckets (shards, partitions, task slots) over the live instances of a
//! service, with Redis as the shared state.
#![deny(missing_docs, missing_debug_implementations)]
#![warn(clippy::unwrap_used)]

mod config;
mod error;
pub mod share;
pub mod store;

pub use config::{Config, MAX_BUCKETS, MAX_WEIGHT, PROTOCOL_VERSION};
pub use error::{redact_url, Error};
pub use store::memory::MemoryStore;
