//! [`RedisOptions`]: the connection settings of a [`RedisStore`](super::RedisStore), and how
//! they turn into the redis crate's manager and TCP settings.

use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};

/// Connection settings of a [`RedisStore`](super::RedisStore). Start from [`RedisOptions::default`] and change
/// what you need with the setters.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisOptions {
    /// How long one connection attempt may take.
    pub connection_timeout: Duration,
    /// How long one command may wait for its reply.
    pub response_timeout: Duration,
    /// Idle time before TCP keepalive probes start, and the interval between probes.
    pub tcp_keepalive: Duration,
    /// How long sent data may stay unacknowledged before the connection is dropped
    /// (`TCP_USER_TIMEOUT`; Linux, Android and Fuchsia only).
    pub tcp_user_timeout: Duration,
    /// The longest pause between two reconnection attempts.
    pub max_reconnect_delay: Duration,
    /// PEM certificate(s) of the CA that signed the server's certificate, for `rediss://` to a
    /// server whose certificate is not signed by a public CA. `None`: the webpki roots.
    pub tls_root_cert: Option<Vec<u8>>,
    /// How long [`RedisStore::connect`](super::RedisStore::connect) keeps retrying, with
    /// backoff, while Redis is not up yet (see [`RedisOptions::connect_retry`]).
    pub connect_retry: Duration,
    /// Tests only: load the scripts whose clock reads `<tag>:test-clock` (see
    /// [`RedisOptions::frozen_clock_for_tests`]).
    pub(super) frozen_clock: bool,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .field("tcp_user_timeout", &self.tcp_user_timeout)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("tls_root_cert", &self.tls_root_cert.as_ref().map(|_| "set"))
            .field("connect_retry", &self.connect_retry)
            .field("frozen_clock", &self.frozen_clock)
            .finish()
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            tcp_keepalive: Duration::from_secs(5),
            tcp_user_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(1),
            tls_root_cert: None,
            connect_retry: Duration::from_secs(30),
            frozen_clock: false,
        }
    }
}

impl RedisOptions {
    /// How long one connection attempt may take. Default 1 s.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long one command may wait for its reply. Default 2 s.
    #[must_use]
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Idle time before TCP keepalive probes start, and the interval between them. Default 5 s.
    #[must_use]
    pub fn tcp_keepalive(mut self, interval: Duration) -> Self {
        self.tcp_keepalive = interval;
        self
    }

    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged before the connection is
    /// dropped. Default 5 s. Only Linux, Android and Fuchsia have it.
    #[must_use]
    pub fn tcp_user_timeout(mut self, timeout: Duration) -> Self {
        self.tcp_user_timeout = timeout;
        self
    }

    /// The longest pause between two reconnection attempts. Default 1 s.
    #[must_use]
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// Trusts the CA in `pem` (PEM certificates) for `rediss://` instead of the public webpki
    /// roots. Default: not set.
    #[must_use]
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }

    /// How long connecting keeps trying, with exponential backoff and jitter, while Redis is not
    /// up yet: the connection is refused or times out, the server answers `LOADING` or
    /// `MASTERDOWN`, the name does not resolve yet, no sentinel names a primary yet (a failover),
    /// or the cluster has no slot table yet. Default 30 s, the same as
    /// [`Config::start_timeout`](crate::Config::start_timeout), so a service whose instances
    /// start before their Redis (Docker Compose, Kubernetes) waits for it. Zero: one attempt.
    ///
    /// A refused password, a URL that does not parse, the wrong kind of URL or the wrong
    /// protocol (TLS or not) fail at once: no retry cures them. While it retries, connecting
    /// logs one WARN, then an INFO when it gets through.
    #[must_use]
    pub fn connect_retry(mut self, budget: Duration) -> Self {
        self.connect_retry = budget;
        self
    }

    /// **Unstable, for tests** (feature `testing`), never in production: the store loads
    /// variants of its scripts whose clock reads a frozen time, in µs since the Unix epoch,
    /// from the key `{prefix:group}:test-clock` when it exists (the server's `TIME` otherwise).
    /// The default store loads the normal scripts, which never read that key. The differential
    /// test sets the key and `MemoryStore`'s clock (`MemoryStore::set_clock_us`) to the same
    /// value, so replies with tokens and expiries compare exactly.
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn frozen_clock_for_tests(mut self) -> Self {
        self.frozen_clock = true;
        self
    }

    /// The longest one exchange may take, a reconnect included: connect plus response timeout.
    pub(super) fn call_budget(&self) -> Duration {
        self.connection_timeout + self.response_timeout
    }

    pub(super) fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_max_delay(self.max_reconnect_delay)
    }

    pub(super) fn tcp_settings(&self) -> TcpSettings {
        let keepalive = TcpKeepalive::new()
            .with_time(self.tcp_keepalive)
            .with_interval(self.tcp_keepalive);
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        let keepalive = keepalive.with_retries(3);
        // Requests are small and latency matters more than packet count: no Nagle.
        let settings = TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(keepalive);
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        let settings = settings.set_user_timeout(self.tcp_user_timeout);
        settings
    }
}
