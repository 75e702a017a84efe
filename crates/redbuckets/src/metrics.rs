//! The member's metrics, recorded through the [`metrics`] facade: the library records, the
//! application installs whichever exporter it likes (none installed: every call here does
//! nothing but check a pointer).
//!
//! One `Metrics` per member, made when it starts: the handles are registered then, with the
//! member's `group` label, so a renewal records into ready handles and builds no key. A
//! recorder installed after a member started does not see that member (install it first, as
//! the facade's own docs say).
//!
//! Names follow the Prometheus conventions: one `redbuckets_` prefix, base units in the name,
//! counters end in `_total`, a `group` label on every series and no per-bucket label. Several
//! members of one group in one process share their series: `buckets_owned` adds theirs up
//! (it moves by increments), the other gauges show the member that wrote last.
//!
//! This module owns the names and the labels; the driver and `member::Shared::apply` call it
//! where things happen.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, SharedString, Unit};

use crate::error::Error;
use crate::event::{Event, LostReason};

/// Gauge: buckets this member owns now (revoked and draining ones no longer count).
pub const BUCKETS_OWNED: &str = "redbuckets_buckets_owned";
/// Gauge: the most buckets the share rule lets this member keep (its share rounded up), as its
/// last rebalance step reported it, like [`Status::share`](crate::Status::share): a grant the
/// store pushes (after a peer left or crashed) does not carry it, so it may lag until the
/// member's next step.
pub const BUCKETS_SHARE: &str = "redbuckets_buckets_share";
/// Gauge: live members of the group, as the member's last heartbeat or rebalance step saw them.
pub const MEMBERS: &str = "redbuckets_members";
/// Counter: ownership changes, by `event` (`acquired`, `revoked`, `released`, `lost`) and, for
/// `lost`, `reason` ([`LostReason::as_str`]).
pub const BUCKET_EVENTS_TOTAL: &str = "redbuckets_bucket_events_total";
/// Histogram: from a change notice (or a registration, or a heartbeat that shows work to do)
/// to this member's balanced state: no rebalance step wanted and nothing draining.
pub const REBALANCE_DURATION_SECONDS: &str = "redbuckets_rebalance_duration_seconds";
/// Histogram: from a bucket's revoke to its release, by `result`: `dropped` (every lease
/// handle was dropped) or `timeout` (the drain time ran out).
pub const DRAIN_DURATION_SECONDS: &str = "redbuckets_drain_duration_seconds";
/// Histogram: the round trip of a store call, by `call`.
pub const STORE_CALL_DURATION_SECONDS: &str = "redbuckets_store_call_duration_seconds";
/// Counter: failed store calls, by `call` and `kind` (the error's variant in snake case: `timeout`, `unavailable`, `refused`, `corrupt_state`, ...).
pub const STORE_ERRORS_TOTAL: &str = "redbuckets_store_errors_total";
/// Gauge: time left to the local lease deadline (0 without a live session): the early warning
/// before `Lost`. Set at every turn of the member's loop: at each renewal, and at each retry
/// while renewals fail.
pub const LEASE_REMAINING_SECONDS: &str = "redbuckets_lease_remaining_seconds";
/// Gauge: time left in the group's quarantine (a new or re-created group grants nothing for a
/// ttl), 0 once grants begin.
pub const QUARANTINE_REMAINING_SECONDS: &str = "redbuckets_quarantine_remaining_seconds";

/// The store calls the member makes, the values of the `call` label.
const CALLS: [&str; 8] = [
    "register",
    "heartbeat",
    "rebalance",
    "release",
    "leave",
    "deregister",
    "holdings",
    "subscribe",
];

/// Every [`LostReason`], in the order of `Metrics::lost`.
const LOST: [LostReason; 4] = [
    LostReason::Deadline,
    LostReason::SessionExpired,
    LostReason::Disowned,
    LostReason::Unreleased,
];

/// The `kind` label of a failed call: the error's variant, in snake case.
pub(crate) fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Config { .. } => "config",
        Error::Url { .. } => "url",
        Error::GroupMismatch { .. } => "group_mismatch",
        Error::TtlMismatch { .. } => "ttl_mismatch",
        Error::CorruptState { .. } => "corrupt_state",
        Error::Refused { .. } => "refused",
        Error::Unavailable { .. } => "unavailable",
        Error::Timeout { .. } => "timeout",
        Error::StartTimeout { .. } => "start_timeout",
        Error::IdInUse { .. } => "id_in_use",
        Error::Shutdown => "shutdown",
    }
}

/// Registers the help text and unit of every metric with the installed recorder.
fn describe() {
    metrics::describe_gauge!(BUCKETS_OWNED, Unit::Count, "Buckets this member owns now.");
    metrics::describe_gauge!(
        BUCKETS_SHARE,
        Unit::Count,
        "The most buckets the share rule lets this member keep."
    );
    metrics::describe_gauge!(
        MEMBERS,
        Unit::Count,
        "Live members of the group, as last seen."
    );
    metrics::describe_counter!(
        BUCKET_EVENTS_TOTAL,
        Unit::Count,
        "Ownership changes, by event (acquired, revoked, released, lost) and reason for lost."
    );
    metrics::describe_histogram!(
        REBALANCE_DURATION_SECONDS,
        Unit::Seconds,
        "From a change notice to this member's balanced state."
    );
    metrics::describe_histogram!(
        DRAIN_DURATION_SECONDS,
        Unit::Seconds,
        "From a bucket's revoke to its release, by result (dropped, timeout)."
    );
    metrics::describe_histogram!(
        STORE_CALL_DURATION_SECONDS,
        Unit::Seconds,
        "Store call round trips, by call."
    );
    metrics::describe_counter!(
        STORE_ERRORS_TOTAL,
        Unit::Count,
        "Failed store calls, by call and kind."
    );
    metrics::describe_gauge!(
        LEASE_REMAINING_SECONDS,
        Unit::Seconds,
        "Time left to the local lease deadline: the early warning before Lost."
    );
    metrics::describe_gauge!(
        QUARANTINE_REMAINING_SECONDS,
        Unit::Seconds,
        "Time left in the group's quarantine (a new group grants nothing for a ttl)."
    );
}

/// One member's metric handles, registered once with its `group` label.
pub(crate) struct Metrics {
    group: SharedString,
    owned: Gauge,
    share: Gauge,
    members: Gauge,
    lease_remaining: Gauge,
    quarantine_remaining: Gauge,
    acquired: Counter,
    revoked: Counter,
    released: Counter,
    /// By reason, in the order of [`LOST`].
    lost: [Counter; 4],
    rebalance: Histogram,
    drain_dropped: Histogram,
    drain_timeout: Histogram,
    /// By call, in the order of [`CALLS`].
    calls: [Histogram; 8],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new(group: &str) -> Self {
        describe();
        let group = SharedString::from(group.to_owned());
        let g = || group.clone();
        let event = |event: &'static str| metrics::counter!(BUCKET_EVENTS_TOTAL, "group" => g(), "event" => event);
        let drain = |result: &'static str| metrics::histogram!(DRAIN_DURATION_SECONDS, "group" => g(), "result" => result);
        Metrics {
            owned: metrics::gauge!(BUCKETS_OWNED, "group" => g()),
            share: metrics::gauge!(BUCKETS_SHARE, "group" => g()),
            members: metrics::gauge!(MEMBERS, "group" => g()),
            lease_remaining: metrics::gauge!(LEASE_REMAINING_SECONDS, "group" => g()),
            quarantine_remaining: metrics::gauge!(QUARANTINE_REMAINING_SECONDS, "group" => g()),
            acquired: event("acquired"),
            revoked: event("revoked"),
            released: event("released"),
            lost: LOST.map(|reason| {
                metrics::counter!(
                    BUCKET_EVENTS_TOTAL,
                    "group" => g(),
                    "event" => "lost",
                    "reason" => reason.as_str()
                )
            }),
            rebalance: metrics::histogram!(REBALANCE_DURATION_SECONDS, "group" => g()),
            drain_dropped: drain("dropped"),
            drain_timeout: drain("timeout"),
            calls: CALLS.map(|call| {
                metrics::histogram!(STORE_CALL_DURATION_SECONDS, "group" => g(), "call" => call)
            }),
            group,
        }
    }

    /// Counts the events of one ledger change, and moves the owned gauge from `before` to
    /// `after` buckets (by an increment, so members of one group in one process add up).
    pub(crate) fn ownership(&self, events: &[Event], before: usize, after: usize) {
        let (mut acquired, mut revoked, mut released, mut lost) = (0, 0, 0, [0u64; 4]);
        for event in events {
            match event {
                Event::Acquired { .. } => acquired += 1,
                Event::Revoked { .. } => revoked += 1,
                Event::Released { .. } => released += 1,
                Event::Lost { reason, .. } => {
                    if let Some(i) = LOST.iter().position(|r| r == reason) {
                        lost[i] += 1;
                    }
                }
                _ => {}
            }
        }
        for (counter, n) in [
            (&self.acquired, acquired),
            (&self.revoked, revoked),
            (&self.released, released),
        ]
        .into_iter()
        .chain(self.lost.iter().zip(lost))
        {
            if n > 0 {
                counter.increment(n);
            }
        }
        if after > before {
            self.owned.increment((after - before) as f64);
        } else if before > after {
            self.owned.decrement((before - after) as f64);
        }
    }

    /// What a store reply said: the share's upper bound and the live members.
    pub(crate) fn seen(&self, share_max: Option<u32>, members: u32) {
        if let Some(max) = share_max {
            self.share.set(f64::from(max));
        }
        self.members.set(f64::from(members));
    }

    /// The time left to the lease deadline and in the quarantine, at a turn of the loop.
    pub(crate) fn remaining(&self, lease: Duration, quarantine: Duration) {
        self.lease_remaining.set(lease.as_secs_f64());
        self.quarantine_remaining.set(quarantine.as_secs_f64());
    }

    /// A rebalance from its first cause to the balanced state.
    pub(crate) fn rebalanced(&self, took: Duration) {
        self.rebalance.record(took.as_secs_f64());
    }

    /// A bucket's drain, from its revoke to its release.
    pub(crate) fn drained(&self, took: Duration, timed_out: bool) {
        let h = if timed_out {
            &self.drain_timeout
        } else {
            &self.drain_dropped
        };
        h.record(took.as_secs_f64());
    }

    /// A store call's round trip, and its error if it failed (a call the shutdown dropped is
    /// no failure: not counted).
    pub(crate) fn call(&self, call: &'static str, took: Duration, error: Option<&Error>) {
        if let Some(i) = CALLS.iter().position(|c| *c == call) {
            self.calls[i].record(took.as_secs_f64());
        }
        if let Some(e) = error.filter(|e| !matches!(e, Error::Shutdown)) {
            metrics::counter!(
                STORE_ERRORS_TOTAL,
                "group" => self.group.clone(),
                "call" => call,
                "kind" => error_kind(e)
            )
            .increment(1);
        }
    }
}
