//! Spread a fixed set of buckets (shards, partitions, task slots `0..B`) over the live instances
//! of a service, with Redis as the shared state.
//!
//! Each bucket has at most one owner at a time, every grant carries a fencing token that only
//! grows, and when members join, leave or crash, the buckets move so that every bucket is owned
//! and the load is even, moving no more buckets than needed.
//!
//! # Example
//!
//! A member of group `orders` on the in-process [`MemoryStore`] (the same code runs on Redis
//! with [`RedisStore`]):
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
//! // A new group grants nothing during its first ttl (see below).
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
//! A service runs until it is told to stop, and then leaves the group, so that its buckets move
//! at once instead of when its session expires; workers read [`MemberHandle::leases`], a
//! [`Stream`](futures_util::Stream) with a [`Lease`] per grant (the README's example, also
//! `examples/worker.rs`):
//!
//! ```no_run
//! use futures_util::StreamExt as _;
//! use redbuckets::{Member, RedisStore};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), redbuckets::Error> {
//!     // Waits for a Redis that is not up yet (RedisOptions::connect_retry, 30 s).
//!     let store = RedisStore::connect("redis://127.0.0.1:6379/").await?;
//!     let member = Member::builder(store, "customer-partitions").start().await?;
//!     let mut leases = member.leases();
//!     tokio::spawn(async move {
//!         while let Some(lease) = leases.next().await {
//!             tokio::spawn(async move {
//!                 // Work on lease.bucket(), passing lease.token() to downstream writes,
//!                 // until it is revoked (a rebalance, the shutdown) or lost.
//!                 lease.cancelled().await;
//!             });
//!         }
//!     });
//!     // SIGTERM (Kubernetes, systemd, Docker) or Ctrl-C: revoke everything, let the leases
//!     // drain, release, deregister.
//!     member.run_until(redbuckets::shutdown_signal()).await
//! }
//! ```
//!
//! [`Member`] is the owner, which ends the member ([`Member::shutdown`], [`Member::run_until`],
//! [`Member::abort`]); dropping it without a shutdown is a crash for the group, and logs a WARN
//! saying so. Everything else is on the cheap, cloneable [`MemberHandle`] it dereferences to:
//! [`MemberHandle::buckets`], [`MemberHandle::owns`], [`MemberHandle::lease`],
//! [`MemberHandle::events`] (an [`Events`] stream), [`MemberHandle::status`].
//!
//! # What it guarantees
//!
//! Safety
//! - **One owner.** No two members tell their user "you own bucket b" at the same instant.
//! - **Fencing.** Every grant of a bucket has a larger token than every earlier grant of it, also
//!   after Redis lost its data: tokens are `max(server time in µs, last token + 1)`. Pass
//!   [`Lease::token`] to the stores you write to, so they can refuse a paused old owner.
//! - **Stop before expiry.** A member that cannot renew its session stops owning at its local
//!   deadline (the send time of its last successful renewal + ttl × (1 − drift) − margin),
//!   before Redis can expire the session and grant its buckets to anyone else. It then reports
//!   [`Event::Lost`] and cancels its [`Lease`]s. The deadline runs on the monotonic and the wall
//!   clock, whichever ends first, so a suspended host does not wake up believing it still owns
//!   anything.
//!
//! Liveness
//! - **Coverage.** Freed buckets are granted again as soon as the call that frees them runs (a
//!   leave, a release); a crashed member's buckets about a ttl after its last renewal.
//! - **Balance.** Once converged, members hold ⌊B/n⌋ or ⌈B/n⌉ buckets (with weights, their
//!   weighted share rounded down or up).
//! - **Minimal movement.** A join, leave or crash moves at most the optimal number of buckets
//!   + n.
//!
//! The README gives the details, the costs, and the measurements behind them.
//!
//! # A new group grants nothing during its first ttl
//!
//! A group that is created, or re-created because Redis lost its data (a restart without
//! persistence), grants nothing for one ttl. Members that held leases from before the loss
//! cannot be told, and keep them until their local deadline: waiting one ttl lets every such
//! deadline pass first. So a new group is silent for its first ttl (10 s at the defaults;
//! [`Status::quarantine`] says how long is left), and all members of a group must use the same
//! ttl ([`MemberBuilder::ttl`]). A member joining a running group takes its share at once.
//! Data another Redis process wrote (a failover to a replica, a restart that reloaded a file)
//! may be stale, so it counts as lost too, and waits two ttls: the old primary, back from a
//! hang, may still renew a session for one more ttl before it learns it was replaced. A group
//! nobody was seen in for a ttl (every member stopped) is re-created with its quarantine as
//! well. The README's "A primary that hangs and comes back" tells why.
//!
//! # Redis
//!
//! [`RedisStore::connect`] takes `redis://`, `rediss://` (TLS), `redis+sentinel://` and
//! `redis+cluster://` URLs, and waits for a Redis that is not up yet, with backoff, for
//! [`RedisOptions::connect_retry`] (30 s): instances often start before their Redis. A refused
//! password or a bad URL fails at once. [`MemberBuilder::start`] then retries its
//! registration, for [`MemberBuilder::start_timeout`] (30 s), while Redis is busy or failing
//! over. After that, members ride out outages by themselves and report them (below).
//!
//! # Logs and errors
//!
//! The library logs through [`tracing`](https://docs.rs/tracing): nothing shows until the
//! application installs a subscriber, for example with `tracing-subscriber`:
//!
//! ```ignore
//! tracing_subscriber::fmt()
//!     .with_env_filter("info,redbuckets=info") // or RUST_LOG, with EnvFilter::from_default_env()
//!     .init();
//! ```
//!
//! A member logs one WARN when a trouble begins (Redis unreachable, a session lost), a summary
//! every 10 s while it lasts, and an INFO when it is over; never a line per retry. Every error
//! also goes to [`MemberBuilder::on_error`], and [`Status::errors`] and [`Status::last_error`]
//! count them. Events of one member carry the span `redbuckets{group, member}`.
//!
//! # Tokio
//!
//! Members run on a tokio runtime (multi-threaded or current-thread) with its time and I/O
//! drivers enabled, which `#[tokio::main]` does, or `Builder::enable_all()`. The crate enables
//! the tokio features it needs itself (among them `signal`, for [`shutdown_signal`]); an
//! application adds what its own code uses, typically `tokio = { version = "1", features =
//! ["macros", "rt-multi-thread"] }`. Tests of code that uses a member can run on
//! [`MemoryStore`] with tokio's paused clock (`#[tokio::test(start_paused = true)]`, feature
//! `test-util`): a ttl passes in no time.
//!
//! The feature `testing` (off by default) makes public what the crate's own tests use: the
//! `MemoryStore` and Redis test clocks, the pure protocol model `store::model`,
//! `Member::freeze` and `Config::with_clock_rate`. It is
//! **unstable**, not for applications: any release may change it.
//!
//! How the crate is built, module by module, is in `CONTRIBUTING.md` at the repository's root.
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
#![deny(missing_docs, missing_debug_implementations)]
#![warn(clippy::unwrap_used)]

mod backoff;
pub mod check;
mod clock;
mod config;
mod driver;
mod error;
mod event;
#[cfg(test)]
mod explore;
mod ledger;
mod logs;
mod machine;
mod member;
pub mod metrics;
mod session;
pub mod share;
mod shared;
mod signal;
pub mod store;

pub use config::{Config, DEFAULT_PREFIX, MAX_BUCKETS, MAX_WEIGHT, PROTOCOL_VERSION};
pub use error::Error;
pub use event::{instant_to_system, Event, LostReason};
pub use member::{Events, Leases, Member, MemberBuilder, MemberHandle, Status};
pub use shared::{ErrorHook, Lease};
pub use signal::shutdown_signal;
pub use store::memory::MemoryStore;
pub use store::redis::{redact_url, scrub_password, RedisOptions, RedisStore};
pub use store::{Deletion, GroupKey, GroupSnapshot, Removal, Store};

/// The `redis` crate this one is built on: a `redis::Client`, `SentinelClient` or
/// `ConnectionInfo` for [`RedisStore::from_client`], [`RedisStore::from_sentinel_client`] or
/// [`RedisStore::from_cluster_nodes`] must come from this version (depend on the same 1.x,
/// or name it as `redbuckets::redis`).
pub use redis;

/// The README's examples compile as doc-tests, so what it shows stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
