//! Member configuration: every option of the Go library, plus weights, with validation.

use std::time::Duration;

use crate::error::Error;

/// The largest bucket count a group may have (C3).
pub const MAX_BUCKETS: u32 = 65_536;
/// The largest weight a member may have.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Version of the data layout and scripts; stored with the group so mixed versions are refused.
/// 2: targeted wake-ups (members listen on their own channel; a join commits the givers).
/// 3: the store grants freed buckets to the takers itself and tells them in their notice.
pub const PROTOCOL_VERSION: u32 = 3;
/// The longest ttl, heartbeat or timeout: keeps every deadline computation far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "red-buckets";
/// The longest group name, member id or key prefix.
pub const MAX_NAME_LEN: usize = 200;

/// The configuration of one member. Build it through [`crate::MemberBuilder`] or fill it in and
/// call [`Config::validate`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Group name. Required.
    pub group: String,
    /// Member id; stable across restarts if given. Default: a random UUID per process.
    pub member_id: String,
    /// Number of buckets `0..buckets` in the group. Default 1024; 1..=65,536.
    pub buckets: u32,
    /// Relative weight of this member; its share is `buckets × weight / Σ weights`. Default 1.
    pub weight: u32,
    /// How long a session (and with it every lease of the member) lives without a heartbeat.
    /// Default 10 s; at least 3 heartbeats.
    pub ttl: Duration,
    /// Heartbeat period: the poll period while the notification stream is down. It also paces
    /// retries: a failed call is retried with exponential backoff and jitter, from a quarter of
    /// it up to all of it (a registration up to half the ttl; a failed renewal always in time
    /// for one more attempt before the lease deadline). Default 1 s. While notifications flow, a healthy
    /// member needs no poll: it renews its session every [`Config::renew_interval`], and checks
    /// the group at the moment a peer's session would expire.
    pub heartbeat: Duration,
    /// How often a healthy member renews its session. Default `None`: half the ttl (5 s at the
    /// defaults), shortened if needed to leave a call timeout of lease time for a retry. At least
    /// the heartbeat, at most half the ttl, and at most the lease validity minus the call
    /// timeout. The leases last
    /// `ttl × (1 − drift) − margin` from the last renewal, so what is left after the interval is
    /// the time a failed renewal has to be retried (4.9 s at the defaults): a shorter interval
    /// survives longer Redis outages, at more Redis work (each round trip wakes Redis up).
    pub renew_interval: Option<Duration>,
    /// Deadline of each store call. Default 3 s; capped at a third of the ttl, and a call never
    /// runs past the local lease deadline.
    pub call_timeout: Duration,
    /// How long [`crate::MemberBuilder::start`] keeps retrying its registration while the store
    /// times out or is unavailable (connection refused or reset, `BUSY`, `LOADING`, a replica
    /// not yet promoted), with exponential backoff and jitter between attempts. Errors a retry
    /// cannot cure (configuration, auth, a group of another shape, corrupt data) fail at once.
    /// Default 30 s: longer than a Redis restart or a Sentinel failover usually takes, and than a
    /// thousand members starting at once keep one Redis busy; short enough that a deployment
    /// against a Redis that is down fails visibly within a typical readiness check.
    ///
    /// Connecting comes before, in the store: [`crate::RedisStore::connect`] waits the same
    /// way for a Redis that is not up yet, for [`crate::RedisOptions::connect_retry`] (also
    /// 30 s by default). To bound both by one budget, as `redbuckets join --start-timeout`
    /// does, give the connect the budget and `start` what is left of it.
    pub start_timeout: Duration,
    /// Graceful shutdown budget: drain, release everything, deregister. `Member::shutdown`
    /// returns within it, also when the store does not answer. The drain ends two call timeouts
    /// before it (at once if the budget is shorter), so the release and the deregistration keep
    /// their time. Default 10 s.
    pub shutdown_timeout: Duration,
    /// How long a revoked bucket waits for its lease handles to be dropped before it is released.
    /// Default 1 s. Buckets without live handles are released at once.
    pub drain_timeout: Duration,
    /// The longest drain a lease may ask for with [`crate::Lease::extend_drain`], counted from
    /// the revoke. Default 10 s; never below `drain_timeout`.
    pub max_drain: Duration,
    /// How long the store keeps this member's buckets for its id after its session ends, for
    /// members with a fixed id (a StatefulSet pod, a systemd unit) that restart. Default zero:
    /// off. With a grace, a graceful shutdown *parks* the buckets (revoked, drained and
    /// released as always, but handed to nobody else), and so does the expiry of the session
    /// of a member that crashed; the next session under the same id gets them back when it
    /// registers, with new tokens, and nothing moves. Parked buckets are owned by nobody, and
    /// the shares count the parked member as if it were there. Once the grace is over they are
    /// freed and spread as without it: a member that never returns costs the group at most
    /// grace + ttl of its buckets unowned. Choose it for warm per-bucket state (caches, local
    /// files); leave it off where every bucket must be owned as soon as possible. At most 24 h.
    pub rejoin_grace: Duration,
    /// Key prefix in the store. Default `red-buckets`.
    pub prefix: String,
    /// The largest relative clock-rate error between this host and the store (≥ 1%).
    /// The local lease deadline is shortened by this fraction of the ttl. Default 0.01.
    pub max_clock_drift: f64,
    /// Extra safety margin subtracted from the local lease deadline. Default 5 ms.
    pub safety_margin: Duration,
    /// For simulations only: the rate of this member's clock relative to the store's (1.01 runs
    /// 1% fast). The member measures its lease validity and heartbeat period on its own clock.
    /// Set with `Config::with_clock_rate` (the unstable `testing` feature); 1 otherwise.
    pub(crate) clock_rate: f64,
}

impl Config {
    /// For simulations only (the unstable `testing` feature, not covered by semver): this
    /// member's clock runs at `rate` times the store's (1.01 runs 1% fast), within [0.5, 2].
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn with_clock_rate(mut self, rate: f64) -> Self {
        self.clock_rate = rate;
        self
    }

    /// A configuration with the defaults and the given group name.
    #[must_use]
    pub fn new(group: impl Into<String>) -> Self {
        Config {
            group: group.into(),
            member_id: uuid::Uuid::new_v4().to_string(),
            buckets: 1024,
            weight: 1,
            ttl: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            renew_interval: None,
            call_timeout: Duration::from_secs(3),
            start_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(1),
            max_drain: Duration::from_secs(10),
            rejoin_grace: Duration::ZERO,
            prefix: DEFAULT_PREFIX.to_string(),
            max_clock_drift: 0.01,
            safety_margin: Duration::from_millis(5),
            clock_rate: 1.0,
        }
    }

    /// Checks every option, returning the first problem found.
    pub fn validate(&self) -> Result<(), Error> {
        check_name("group", &self.group)?;
        check_name("prefix", &self.prefix)?;
        check_name("member_id", &self.member_id)?;
        if self.buckets == 0 || self.buckets > MAX_BUCKETS {
            return Err(Error::config(
                "buckets",
                format!("must be in 1..={MAX_BUCKETS}, got {}", self.buckets),
            ));
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(Error::config(
                "weight",
                format!("must be in 1..={MAX_WEIGHT}, got {}", self.weight),
            ));
        }
        if self.heartbeat < Duration::from_millis(10) {
            return Err(Error::config(
                "heartbeat",
                format!("must be at least 10ms, got {}", human(self.heartbeat)),
            ));
        }
        for (field, value) in [
            ("heartbeat", self.heartbeat),
            ("call_timeout", self.call_timeout),
            ("start_timeout", self.start_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("drain_timeout", self.drain_timeout),
            ("max_drain", self.max_drain),
            ("rejoin_grace", self.rejoin_grace),
            ("safety_margin", self.safety_margin),
        ] {
            if value > MAX_DURATION {
                return Err(Error::config(
                    field,
                    format!("must be at most 24h, got {}", human(value)),
                ));
            }
        }
        if self.ttl < self.heartbeat * 3 {
            return Err(Error::config(
                "ttl",
                format!(
                    "must be at least 3 × heartbeat ({:?}) so one lost heartbeat does not lose the \
                     leases, got {}",
                    self.heartbeat * 3,
                    human(self.ttl)
                ),
            ));
        }
        if self.ttl > MAX_DURATION {
            return Err(Error::config(
                "ttl",
                format!("must be at most 24h, got {}", human(self.ttl)),
            ));
        }
        if !(0.01..0.5).contains(&self.max_clock_drift) {
            return Err(Error::config(
                "max_clock_drift",
                format!("must be in [0.01, 0.5), got {}", self.max_clock_drift),
            ));
        }
        if self.call_timeout.is_zero() {
            return Err(Error::config("call_timeout", "must be above zero"));
        }
        if self.start_timeout.is_zero() {
            return Err(Error::config("start_timeout", "must be above zero"));
        }
        if self.lease_validity().is_zero() {
            return Err(Error::config(
                "safety_margin",
                format!(
                    "leaves no lease time: ttl {:?}, margin {:?}",
                    self.ttl, self.safety_margin
                ),
            ));
        }
        if let Some(renew) = self.renew_interval {
            if renew < self.heartbeat || renew > self.ttl / 2 {
                return Err(Error::config(
                    "renew_interval",
                    format!(
                        "must be between the heartbeat ({:?}) and half the ttl ({:?}), got {}",
                        self.heartbeat,
                        self.ttl / 2,
                        human(renew)
                    ),
                ));
            }
        }
        let latest = self.latest_renewal();
        if self.effective_renew_interval() > latest {
            return Err(Error::config(
                "renew_interval",
                format!(
                    "{:?} leaves no time to retry a failed renewal: the leases last {:?} \
                     (ttl × (1 − max_clock_drift) − safety_margin) and a call may take {:?}, so \
                     renew within {latest:?} (or lengthen the ttl)",
                    self.effective_renew_interval(),
                    self.lease_validity(),
                    self.effective_call_timeout()
                ),
            ));
        }
        if !(0.5..=2.0).contains(&self.clock_rate) {
            return Err(Error::config(
                "clock_rate",
                format!("must be in [0.5, 2], got {}", self.clock_rate),
            ));
        }
        if self.shutdown_timeout.is_zero() {
            return Err(Error::config("shutdown_timeout", "must be above zero"));
        }
        Ok(())
    }

    /// How often a healthy member renews its session: [`Config::renew_interval`], or half the
    /// ttl shortened to leave one call timeout of lease time for a retry, never below the
    /// heartbeat.
    #[must_use]
    pub fn effective_renew_interval(&self) -> Duration {
        self.renew_interval
            .unwrap_or_else(|| (self.ttl / 2).min(self.latest_renewal()))
            .max(self.heartbeat)
    }

    /// The longest renewal interval that leaves one call timeout of lease time for a retry.
    pub(crate) fn latest_renewal(&self) -> Duration {
        self.lease_validity()
            .saturating_sub(self.effective_call_timeout())
    }

    /// The longest drain a lease may ask for: `max_drain`, and never below `drain_timeout`.
    #[must_use]
    pub fn effective_max_drain(&self) -> Duration {
        self.max_drain.max(self.drain_timeout)
    }

    /// The deadline of one store call: the call timeout, capped at a third of the ttl.
    #[must_use]
    pub fn effective_call_timeout(&self) -> Duration {
        self.call_timeout.min(self.ttl / 3)
    }

    /// How long after the *send* time of a successful heartbeat the member may still consider
    /// its leases valid (S3): `ttl × (1 − drift) − margin`.
    #[must_use]
    pub fn lease_validity(&self) -> Duration {
        let shortened = self
            .ttl
            .mul_f64(1.0 - self.max_clock_drift.clamp(0.0, 0.99));
        shortened.saturating_sub(self.safety_margin)
    }
}

/// Group names, prefixes and member ids: 1..=200 bytes, printable, and without `{`/`}` (they
/// would break the Redis Cluster hash tag that keeps one group on one slot).
fn check_name(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::config(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::config(
            field,
            format!("must be at most {MAX_NAME_LEN} bytes, got {}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_control() || *c == '{' || *c == '}')
    {
        return Err(Error::config(
            field,
            format!("must not contain {c:?} (control characters and braces are refused)"),
        ));
    }
    Ok(())
}

/// A duration in an error message: `Debug`'s form (`1.5s`, `200ms`), but zero as `0s`, the way
/// it was written, rather than `0ns`.
fn human(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_string()
    } else {
        format!("{d:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::new("g");
        f(&mut c);
        c
    }

    #[test]
    fn defaults_are_valid() {
        Config::new("orders").validate().unwrap();
        let c = Config::new("orders");
        assert_eq!(c.buckets, 1024);
        assert_eq!(c.ttl, Duration::from_secs(10));
        assert_eq!(c.heartbeat, Duration::from_secs(1));
        assert_eq!(c.prefix, "red-buckets");
        assert_eq!(c.start_timeout, Duration::from_secs(30));
        assert_eq!(c.lease_validity(), Duration::from_millis(9895));
        assert_eq!(c.effective_renew_interval(), Duration::from_secs(5));
        let c = with(|c| c.renew_interval = Some(Duration::from_secs(1)));
        c.validate().unwrap();
        assert_eq!(c.effective_renew_interval(), Duration::from_secs(1));
        // A large margin shortens the default so a failed renewal can still be retried.
        let c = with(|c| c.safety_margin = Duration::from_secs(5));
        c.validate().unwrap();
        assert_eq!(c.effective_renew_interval(), Duration::from_millis(1900));
    }

    #[test]
    fn every_error_names_its_field() {
        let table: Vec<(Config, &str, &str)> = vec![
            (with(|c| c.buckets = 0), "buckets", "1..=65536"),
            (with(|c| c.buckets = 65_537), "buckets", "65537"),
            (with(|c| c.weight = 0), "weight", "1..="),
            (with(|c| c.group = String::new()), "group", "empty"),
            (with(|c| c.group = "a{b}".into()), "group", "'{'"),
            (with(|c| c.prefix = "x\ny".into()), "prefix", "'\\n'"),
            (with(|c| c.member_id = "m".repeat(201)), "member_id", "200"),
            (
                with(|c| c.ttl = Duration::from_secs(2)),
                "ttl",
                "3 × heartbeat",
            ),
            (
                with(|c| c.heartbeat = Duration::from_millis(1)),
                "heartbeat",
                "10ms",
            ),
            (
                with(|c| c.call_timeout = Duration::ZERO),
                "call_timeout",
                "above zero",
            ),
            (
                with(|c| c.start_timeout = Duration::ZERO),
                "start_timeout",
                "above zero",
            ),
            (
                with(|c| c.start_timeout = Duration::MAX),
                "start_timeout",
                "24h",
            ),
            (with(|c| c.max_clock_drift = 0.0), "max_clock_drift", "0.01"),
            (with(|c| c.heartbeat = Duration::MAX), "heartbeat", "24h"),
            (
                with(|c| c.drain_timeout = Duration::MAX),
                "drain_timeout",
                "24h",
            ),
            (
                with(|c| c.shutdown_timeout = Duration::MAX),
                "shutdown_timeout",
                "24h",
            ),
            (with(|c| c.ttl = Duration::MAX), "ttl", "24h"),
            (
                with(|c| c.renew_interval = Some(Duration::from_millis(500))),
                "renew_interval",
                "between the heartbeat (1s)",
            ),
            (
                with(|c| c.renew_interval = Some(Duration::from_secs(6))),
                "renew_interval",
                "half the ttl (5s)",
            ),
            (
                with(|c| {
                    c.renew_interval = Some(Duration::from_secs(5));
                    c.safety_margin = Duration::from_secs(3);
                }),
                "renew_interval",
                "leaves no time to retry",
            ),
            (
                with(|c| {
                    c.ttl = Duration::from_secs(3);
                    c.safety_margin = Duration::from_millis(1500);
                }),
                "renew_interval",
                "leaves no time to retry",
            ),
            (
                with(|c| c.shutdown_timeout = Duration::ZERO),
                "shutdown_timeout",
                "above zero",
            ),
        ];
        for (config, field, needle) in table {
            match config.validate() {
                Err(Error::Config { field: f, reason }) => {
                    assert_eq!(f, field);
                    let msg = format!("{}", Error::config(f, reason.clone()));
                    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
                }
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn odd_and_extreme_bucket_counts_are_fine() {
        for b in [1, 3, 1023, 65_536] {
            with(|c| c.buckets = b).validate().unwrap();
        }
    }
}
