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
//! # Metrics
//! Recorded through the [`metrics`](::metrics) facade (install an exporter before starting members;
//! none installed, nothing is recorded). The names are constants in [`metrics`].
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `redbuckets_buckets_owned` | gauge | group | buckets this member owns now (members of one group in one process add up) |
//! | `redbuckets_buckets_share` | gauge | group | the most buckets the share rule lets this member keep, as its last rebalance step reported it (a grant the store pushes after a peer left does not carry it) |
//! | `redbuckets_members` | gauge | group | live members, as the last renewal or rebalance step saw them |
//! | `redbuckets_bucket_events_total` | counter | group, event (`acquired`, `revoked`, `released`, `lost`), reason (for `lost`: `deadline`, `session_expired`, `disowned`, `unreleased`) | ownership changes |
//! | `redbuckets_rebalance_duration_seconds` | histogram | group | from a change notice (or a registration, or a renewal that shows work to do) to this member's balanced state: no step wanted, nothing draining |
//! | `redbuckets_drain_duration_seconds` | histogram | group, result (`dropped`, `timeout`) | from a bucket's revoke to its release |
//! | `redbuckets_store_call_duration_seconds` | histogram | group, call (`register`, `heartbeat`, `rebalance`, `release`, `leave`, `deregister`, `holdings`, `subscribe`) | store round trip |
//! | `redbuckets_store_errors_total` | counter | group, call, kind (`timeout`, `unavailable`, `refused`, `corrupt_state`, ...) | failed calls |
//! | `redbuckets_lease_remaining_seconds` | gauge | group | time left to the local lease deadline, 0 without a session: the early warning before `Lost` (set at every renewal and every retry) |
//! | `redbuckets_quarantine_remaining_seconds` | gauge | group | time left in a new group's quarantine, 0 once it grants |
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
//! - [`metrics`] — the metric names, and the member's handles through the `metrics` facade.
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
mod member;
pub mod metrics;
mod session;
pub mod share;
pub mod store;

pub use config::{Config, DEFAULT_PREFIX, MAX_BUCKETS, MAX_WEIGHT, PROTOCOL_VERSION};
pub use error::Error;
pub use event::{instant_to_system, Event, Lease, LostReason};
pub use member::{ErrorHook, Events, Leases, Member, MemberBuilder, MemberHandle, Status};
pub use store::memory::MemoryStore;
pub use store::redis::{redact_url, scrub_password, RedisOptions, RedisStore};
pub use store::{Deletion, GroupKey, GroupSnapshot, Removal, Store};

/// The README's examples compile as doc-tests, so what it shows stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
