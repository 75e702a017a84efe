//! Spread a fixed set of buckets (shards, partitions, task slots) over the live instances of a
//! service, with Redis as the shared state.
//!
//! Each bucket has at most one owner at a time, every grant carries a fencing token that only
//! grows, and when members join, leave or crash, the buckets move so that every bucket is owned
//! and the load is even, moving no more buckets than needed.
//!
//! ```
//! use std::time::Duration;
//! use redbuckets::{Member, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), redbuckets::Error> {
//! let store = MemoryStore::new(); // or RedisStore::connect("redis://127.0.0.1/").await?
//! let member = Member::builder(store, "orders")
//!     .buckets(64)
//!     .ttl(Duration::from_secs(3))
//!     .start()
//!     .await?;
//! // A new group grants nothing during its first ttl (see "Guarantees" in the README).
//! tokio::time::sleep(Duration::from_secs(4)).await;
//! assert_eq!(member.buckets().len(), 64);
//! if let Some(lease) = member.lease(7) {
//!     println!("bucket 7, token {}", lease.token());
//! }
//! member.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `config` — [`Config`] and its validation.
//! - `error` — [`Error`], one variant per cause.
//! - [`share`] — the share rule, pure arithmetic, property-tested.
//! - [`store`] — the [`Store`] protocol trait; [`MemoryStore`] and [`RedisStore`] implement it.
//! - `member` — the user's side: [`MemberBuilder`], [`Member`] (the owner, which ends it),
//!   [`MemberHandle`] (the cheap clone workers share), the [`Events`] and [`Leases`] streams,
//!   [`Status`].
//! - `session` — the member's session, `Registering` or `Live` with its lease deadline; pure.
//! - `driver` — the member's task: heartbeats, rebalancing, drains, the local deadline; a thin
//!   async loop over the session and the ledger.
//! - `event` — [`Event`]s and [`Lease`] handles.
//! - `backoff` — retry pacing: exponential backoff with jitter, seeded per member; pure.
//! - `ledger` — the held buckets (owned or draining) and the events each change emits; pure.
//! - [`check`] — the external S1/S2 checker over what members reported (the CLI's demo and the
//!   tests use it). Pure.
#![deny(missing_docs, missing_debug_implementations)]
#![warn(clippy::unwrap_used)]

mod backoff;
pub mod check;
mod config;
mod driver;
mod error;
mod event;
mod ledger;
mod logs;
mod member;
mod session;
pub mod share;
mod signal;
pub mod store;

pub use config::{Config, DEFAULT_PREFIX, MAX_BUCKETS, MAX_WEIGHT, PROTOCOL_VERSION};
pub use error::Error;
pub use event::{instant_to_system, Event, Lease, LostReason};
pub use member::{ErrorHook, Events, Leases, Member, MemberBuilder, MemberHandle, Status};
pub use signal::shutdown_signal;
pub use store::memory::MemoryStore;
pub use store::redis::{redact_url, scrub_password, RedisOptions, RedisStore};
pub use store::{GroupKey, GroupSnapshot, Store};

/// The README's examples compile as doc-tests, so what it shows stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
