//! The one error type of the crate, and the store errors it wraps.
//!
//! Every cause has its own variant with structured fields and one clear message. Nothing that comes
//! from outside the process (configuration, Redis replies, data under the group's keys) panics: it
//! ends up here.

use std::time::Duration;

/// Everything that can go wrong in redbuckets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The option that is wrong (`buckets`, `ttl`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A Redis URL that does not parse or names an unsupported scheme.
    #[error("invalid Redis URL {url}: {reason}")]
    Url {
        /// The URL with any password replaced by `***`.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// The group exists with parameters that differ from this member's configuration.
    #[error(
        "group {group:?} has {stored} buckets (protocol {stored_protocol}); this member is \
         configured with {configured} buckets (protocol {configured_protocol})"
    )]
    GroupMismatch {
        /// Group name.
        group: String,
        /// Bucket count stored with the group.
        stored: u32,
        /// Bucket count this member was configured with.
        configured: u32,
        /// Protocol version stored with the group.
        stored_protocol: u32,
        /// Protocol version of this library.
        configured_protocol: u32,
    },

    /// The group exists with another ttl. All members of a group share one ttl: after the store
    /// loses its data, the group waits one ttl (of whoever re-creates it) before granting, which
    /// only protects members whose leases last no longer than that.
    #[error(
        "group {group:?} uses a ttl of {stored:?}; this member is configured with {configured:?} \
         (all members of a group must use the same ttl)"
    )]
    TtlMismatch {
        /// Group name.
        group: String,
        /// The group's ttl.
        stored: Duration,
        /// This member's ttl.
        configured: Duration,
    },

    /// The store's data for the group is not what this library wrote (wrong types, garbage).
    #[error("foreign or corrupt data under the keys of group {group:?}: {detail}")]
    CorruptState {
        /// Group name.
        group: String,
        /// What was found.
        detail: String,
    },

    /// Redis refused the credentials or the command (auth, ACL, scripts disabled).
    #[error("Redis refused the request: {detail}")]
    Refused {
        /// Redis's own message (credentials are never part of it).
        detail: String,
    },

    /// The store could not be reached, or the connection broke.
    #[error("store unavailable: {detail}")]
    Unavailable {
        /// What happened.
        detail: String,
    },

    /// A store call did not answer within its deadline. It may still have run on the server.
    #[error("store call {call} timed out after {after:?}")]
    Timeout {
        /// Which call (`heartbeat`, `rebalance`, ...).
        call: &'static str,
        /// The deadline it missed.
        after: Duration,
    },

    /// `start` could not register within [`crate::Config::start_timeout`]: every attempt timed
    /// out or found the store unavailable.
    #[error("could not join within the start timeout of {after:?}; last error: {last}")]
    StartTimeout {
        /// The start timeout.
        after: Duration,
        /// The error of the last attempt.
        last: Box<Error>,
    },

    /// Another live session uses this member id.
    #[error(
        "member id {member:?} is in use by another live session in group {group:?} \
         (expires in {expires_in:?}); give each process its own id"
    )]
    IdInUse {
        /// Group name.
        group: String,
        /// The member id.
        member: String,
        /// When the other session expires if it stops heartbeating.
        expires_in: Duration,
    },

    /// The member has shut down; the call cannot be served.
    #[error("the member has shut down")]
    Shutdown,
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    /// True for errors that a retry may cure (connection trouble, timeouts).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }
}
