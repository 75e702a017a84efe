//! Ownership events: what the ledger emits and the user's event streams carry.

use std::time::SystemTime;

use tokio::time::Instant;

/// Why a member lost its buckets without releasing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// No heartbeat succeeded in time: the local lease deadline passed (S3).
    Deadline,
    /// The store no longer knows the session (it expired there, or the store lost its data).
    SessionExpired,
    /// The store no longer lists the bucket as this member's (its data was edited or lost).
    Disowned,
    /// A revoked bucket whose release the store did not confirm during the graceful leave (it
    /// did not answer in time). The store frees it with the session: at the deregistration, or
    /// when the session expires.
    Unreleased,
}

impl LostReason {
    /// A stable short name, for logs and machine-readable output: `"deadline"`,
    /// `"session_expired"`, `"disowned"` or `"unreleased"`. The [`Display`](std::fmt::Display) text is the
    /// sentence for people.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            LostReason::Deadline => "deadline",
            LostReason::SessionExpired => "session_expired",
            LostReason::Disowned => "disowned",
            LostReason::Unreleased => "unreleased",
        }
    }
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Deadline => "no heartbeat succeeded before the lease deadline",
            LostReason::SessionExpired => "the store no longer knows the session",
            LostReason::Disowned => "the store no longer lists the bucket as ours",
            LostReason::Unreleased => {
                "the store did not confirm the release; it frees the bucket with the session"
            }
        })
    }
}

/// A change of ownership seen by one member. `at` is tokio's clock; [`Event::at_system`] turns it
/// into wall-clock time.
///
/// A subscription ([`crate::MemberHandle::events`]) opens with an `Acquired` for every bucket
/// owned at that moment, then follows live: every grant it reports ends with `Revoked` (then
/// `Released`, or `Lost` if the release was not confirmed or the session was lost meanwhile)
/// or `Lost`; only an abort ([`crate::Member::abort`]) ends grants with nothing more. For
/// timelines, the end of ownership is `Revoked` or `Lost`: `Released` is when the store
/// confirmed the release, which can come after another member's `Acquired`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The member owns `bucket` from `at` on, with fencing token `token`.
    Acquired {
        /// Bucket id.
        bucket: u32,
        /// Fencing token; larger than every earlier grant of the bucket.
        token: u64,
        /// When the grant was seen (ownership begins).
        at: Instant,
    },
    /// The member gave the bucket up: from `at` on it no longer owns it; its lease handles are
    /// cancelled and it will release the bucket once they are dropped or the drain time is over.
    Revoked {
        /// Bucket id.
        bucket: u32,
        /// Token of the grant that ended.
        token: u64,
        /// When ownership ended.
        at: Instant,
    },
    /// The store freed the bucket for others. Ownership ended earlier, at the `Revoked`.
    Released {
        /// Bucket id.
        bucket: u32,
        /// Token of the grant that ended.
        token: u64,
        /// When the store confirmed the release: it can be after another member's `Acquired` of
        /// the bucket; ownership ended at the `Revoked`.
        at: Instant,
    },
    /// The member lost the bucket without releasing it. `at` is the local deadline at which the
    /// lease stopped being valid, which can be earlier than the moment the event is delivered.
    Lost {
        /// Bucket id.
        bucket: u32,
        /// Token of the grant that ended.
        token: u64,
        /// Why.
        reason: LostReason,
        /// When ownership ended.
        at: Instant,
    },
    /// The subscriber fell behind and `missed` events were dropped. What follows is a fresh
    /// snapshot: an `Acquired` for every bucket owned now (with its grant time). Forget what you
    /// believed was owned; buckets not in the snapshot are no longer owned.
    Lagged {
        /// How many events were dropped.
        missed: u64,
        /// When the lag was noticed.
        at: Instant,
    },
}

impl Event {
    /// The bucket the event is about (`None` for `Lagged`).
    #[must_use]
    pub fn bucket(&self) -> Option<u32> {
        match self {
            Event::Acquired { bucket, .. }
            | Event::Revoked { bucket, .. }
            | Event::Released { bucket, .. }
            | Event::Lost { bucket, .. } => Some(*bucket),
            Event::Lagged { .. } => None,
        }
    }

    /// The token of the grant the event is about (`None` for `Lagged`).
    #[must_use]
    pub fn token(&self) -> Option<u64> {
        match self {
            Event::Acquired { token, .. }
            | Event::Revoked { token, .. }
            | Event::Released { token, .. }
            | Event::Lost { token, .. } => Some(*token),
            Event::Lagged { .. } => None,
        }
    }

    /// When ownership began (`Acquired`) or ended (`Revoked`, `Lost`), when the release was
    /// confirmed (`Released`), or when the lag was noticed (`Lagged`).
    #[must_use]
    pub fn at(&self) -> Instant {
        match self {
            Event::Acquired { at, .. }
            | Event::Revoked { at, .. }
            | Event::Released { at, .. }
            | Event::Lost { at, .. }
            | Event::Lagged { at, .. } => *at,
        }
    }

    /// [`Event::at`] as wall-clock time.
    #[must_use]
    pub fn at_system(&self) -> SystemTime {
        instant_to_system(self.at())
    }
}

/// Converts a tokio instant to wall-clock time, through the present.
#[must_use]
pub fn instant_to_system(at: Instant) -> SystemTime {
    let now = Instant::now();
    let wall = SystemTime::now();
    if at <= now {
        wall.checked_sub(now - at).unwrap_or(wall)
    } else {
        wall.checked_add(at - now).unwrap_or(wall)
    }
}
