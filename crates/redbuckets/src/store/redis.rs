//! `RedisStore`: the store protocol as Lua scripts on Redis, one script per [`Store`] method.
//!
//! The scripts live in `store/lua/`: `common.lua` (key layout, validation of stored data, purge)
//! is prepended to each method's body. They mirror [`crate::MemoryStore`], the reference
//! semantics, step for step; the share rule is a port of [`crate::share`].
//!
//! # Keys
//! Every key of a group starts with the group's hash tag `{prefix:name}` so that all of them
//! live on one Redis Cluster slot: `:meta` (hash: buckets, protocol, ver, token,
//! grant_after_us, created_us), `:exp` (zset: member → session expiry, server ms), `:sess`
//! (member → nonce), `:since` (member → start ms), `:weight` (member → weight), `:wcount`
//! (weight → members), `:count:<weight>` (zset per weight: member → committed count),
//! `:owner` (hash: bucket → `"<token> <member>"`), `:free` (set), `:held:<member>` (set) and
//! the pub/sub channel `:events`. Counts are kept per weight so the share rule needs one
//! `ZCOUNT` per distinct weight instead of a scan over the members.
//!
//! # Connections
//! Calls go through one auto-reconnecting [`ConnectionManager`] with TCP keepalive and
//! `TCP_USER_TIMEOUT` set, so a half-open connection fails instead of hanging. The manager never
//! retries a failed call; the member does, and every script is safe to repeat.
//! [`Store::subscribe`] opens a dedicated pub/sub connection per subscription.
//!
//! # Sentinel
//! With a `redis+sentinel://` URL the store asks the sentinels for the primary at connect time,
//! again when they announce a new one (`+switch-master`, which a background task listens to),
//! and again (in the background, one lookup at a time) whenever a call or a subscription fails
//! in a way a failover explains: the server went read-only, or stopped answering. If they name
//! another server, the store moves its connection there and ends its open notification streams,
//! so members resubscribe on the new primary. The new primary runs as another Redis process, so
//! the group's data is treated as possibly stale and the group is re-created (see the crate's
//! guarantees): members re-register and re-acquire.
//!
//! Redis replicates asynchronously, so Sentinel cannot rule out a split brain: a member that
//! still reaches the old primary while the sentinels, cut off from it, promote a replica keeps
//! renewing there, while members on the new primary may be granted its buckets once the new
//! group's quarantine ends. Configure the primary with `min-replicas-to-write 1` and a
//! `min-replicas-max-lag` below Sentinel's `down-after-milliseconds`, so an isolated old primary
//! refuses the renewals and its members stop at their local deadline.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError,
    Script, ServerErrorKind, TlsCertificates, TlsMode, Value,
};

use crate::config::PROTOCOL_VERSION;
use crate::error::{redact_url, Error};
use crate::store::{
    Action, GroupKey, GroupSnapshot, HeartbeatReply, MemberInfo, Notifications, Owner,
    RebalanceReply, RegisterRequest, Registration, SessionRef, Store,
};

const COMMON: &str = include_str!("lua/common.lua");

const CERT_PEM_HEADER: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// The compiled scripts; their SHA1s are computed once per process.
struct Scripts {
    register: Script,
    heartbeat: Script,
    /// The steady-state heartbeat, standalone: it hands over to `heartbeat` when it must purge.
    heartbeat_fast: Script,
    rebalance: Script,
    release: Script,
    deregister: Script,
    snapshot: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    register: script(include_str!("lua/register.lua")),
    heartbeat: script(include_str!("lua/heartbeat.lua")),
    heartbeat_fast: Script::new(include_str!("lua/heartbeat_fast.lua")),
    rebalance: script(include_str!("lua/rebalance.lua")),
    release: script(include_str!("lua/release.lua")),
    deregister: script(include_str!("lua/deregister.lua")),
    snapshot: script(include_str!("lua/snapshot.lua")),
});

/// Connection settings of a [`RedisStore`]. Start from [`RedisOptions::default`] and change
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

    /// The longest one exchange may take, a reconnect included: connect plus response timeout.
    fn call_budget(&self) -> Duration {
        self.connection_timeout + self.response_timeout
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_max_delay(self.max_reconnect_delay)
    }

    fn tcp_settings(&self) -> TcpSettings {
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

/// The store on Redis (≥ 7.0): each [`Store`] call is one Lua script, run atomically with the
/// server's clock. Clones share one connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), redbuckets::Error> {
/// let store = redbuckets::RedisStore::connect("redis://127.0.0.1:6379").await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The server the calls go to; replaced when Sentinel names a new primary.
    node: std::sync::RwLock<Arc<Node>>,
    /// With `redis+sentinel://`: asked for the primary again after a failover-like error. The
    /// lock also makes concurrent failing calls ask once.
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    /// Bumped when the store moves to another server: ends the notification streams.
    moved: tokio::sync::watch::Sender<u64>,
    /// Stops the `+switch-master` listener when the store is dropped.
    _stop_watching: tokio_util::sync::DropGuard,
    /// The URL with its password masked, for messages.
    url: String,
    /// Secrets that must never appear in an error message (raw and decoded password).
    secrets: Vec<String>,
    options: RedisOptions,
}

/// One Redis server and the auto-reconnecting connection to it.
struct Node {
    client: Client,
    manager: ConnectionManager,
}

impl Inner {
    fn node(&self) -> Arc<Node> {
        Arc::clone(&self.node.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a `redis+sentinel://` URL says.
struct SentinelUrl {
    /// `redis://host:port` (or `rediss://`) of each sentinel.
    sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    service: String,
    /// Credentials and database for the primary.
    node: redis::RedisConnectionInfo,
    tls: bool,
}

/// Parses `redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]`
/// (`rediss+sentinel://` for TLS); `Ok(None)` for any other scheme. Credentials are for the
/// primary; the sentinels are reached without them. The sentinel port defaults to 26379.
fn parse_sentinel_url(url: &str) -> Result<Option<SentinelUrl>, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        (true, rest)
    } else {
        return Ok(None);
    };
    if rest.contains(['?', '#']) {
        return Err("query parameters and fragments are not supported in a sentinel URL".into());
    }
    // The credentials end at the last '@'; a raw '/' in them would be read as the path.
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    if userinfo.is_some_and(|u| u.contains('/')) {
        return Err("the credentials contain '/': percent-encode it as %2F".into());
    }
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let scheme = if tls { "rediss" } else { "redis" };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err("a sentinel address is empty (expected host[:port],...)".into());
        }
        let has_port = if host.starts_with('[') {
            host.contains("]:")
        } else {
            host.contains(':')
        };
        let sentinel = if has_port {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:26379")
        };
        sentinel
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("bad sentinel address {host:?}: {e}"))?;
        sentinels.push(sentinel);
    }
    let mut segments = path.split('/');
    let service = segments.next().unwrap_or("");
    if service.is_empty() {
        return Err("the primary's service name is missing \
             (e.g. redis+sentinel://127.0.0.1:26379/mymaster)"
            .into());
    }
    let db = match segments.next() {
        None | Some("") => "0",
        Some(db) => db,
    };
    if segments.any(|s| !s.is_empty()) {
        return Err("expected /service or /service/db after the sentinel addresses".into());
    }
    if db.parse::<i64>().is_err() {
        return Err(format!("the database {db:?} is not a number"));
    }
    // The redis crate decodes the credentials and the database; the host is a placeholder.
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let node = format!("redis://{userinfo}sentinel-primary/{db}")
        .as_str()
        .into_connection_info()
        .map_err(|e| e.to_string())?
        .redis_settings()
        .clone();
    Ok(Some(SentinelUrl {
        sentinels,
        service: service.to_string(),
        node,
        tls,
    }))
}

/// Whether a call's error may mean the primary moved: it went read-only or away.
fn primary_may_have_moved(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    ) || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
}

/// Listens to the sentinels' `+switch-master` announcements and moves the store as soon as
/// they name a new primary for `service`: after a planned failover the old primary goes on
/// answering for a while, so no call would fail to tell. Reconnects after errors; ends when the
/// store is dropped (`stop`).
async fn watch_switches(
    inner: std::sync::Weak<Inner>,
    service: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let listen = async {
        loop {
            let (pause, outcome) = {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                let store = RedisStore { inner: strong };
                (
                    store.inner.options.max_reconnect_delay,
                    store.sentinel_announcements().await,
                )
            };
            match outcome {
                Ok(mut announcements) => {
                    while let Some(msg) = announcements.next().await {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        // "<service> <old ip> <old port> <new ip> <new port>"
                        if payload.split(' ').next() != Some(service.as_str()) {
                            continue;
                        }
                        let Some(strong) = inner.upgrade() else {
                            return;
                        };
                        let store = RedisStore { inner: strong };
                        tracing::info!(%payload, "Sentinel announced a new primary");
                        store.follow_primary(&store.inner.node()).await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot listen to Sentinel"),
            }
            tokio::time::sleep(pause).await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = listen => {}
    }
}

/// Asks the sentinels which server is the primary, within the connect and response budget.
async fn resolve_primary(
    sentinel: &mut SentinelClient,
    options: &RedisOptions,
    redacted: &str,
    secrets: &[String],
) -> Result<Client, Error> {
    let budget = options.call_budget();
    match tokio::time::timeout(budget, sentinel.async_get_client()).await {
        Err(_) => Err(Error::Unavailable {
            detail: format!("no sentinel of {redacted} named the primary within {budget:?}"),
        }),
        Ok(Err(e)) => Err(Error::Unavailable {
            detail: format!(
                "no sentinel of {redacted} named a primary: {}",
                scrub(&e.to_string(), secrets)
            ),
        }),
        Ok(Ok(client)) => Ok(client),
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects with the default [`RedisOptions`]. See [`RedisStore::connect_with`].
    pub async fn connect(url: &str) -> Result<RedisStore, Error> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to `redis://[user:password@]host[:port][/db]` (or `rediss://` for TLS), or
    /// through Redis Sentinel to
    /// `redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]` (or
    /// `rediss+sentinel://`): the sentinels' addresses (port 26379 by default) and the name
    /// they monitor the primary under. The credentials are the primary's; the sentinels are
    /// reached without them. A custom [`RedisOptions::tls_root_cert`] is not supported there.
    ///
    /// One connection attempt is made at once, so a wrong address or password fails here with
    /// [`Error::Unavailable`] or [`Error::Refused`]; a URL that does not parse gives
    /// [`Error::Url`]. After that the connection reconnects by itself, and through Sentinel it
    /// follows the primary after a failover.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<RedisStore, Error> {
        let redacted = redact_url(url);
        let mut secrets: Vec<String> = raw_password(url).into_iter().collect();
        let sentinel = parse_sentinel_url(url).map_err(|reason| Error::Url {
            url: redacted.clone(),
            reason: scrub(&reason, &secrets),
        })?;
        let (client, sentinel) = match sentinel {
            Some(spec) => {
                let service = spec.service.clone();
                let (client, sentinel) =
                    Self::via_sentinel(spec, &options, &redacted, &mut secrets).await?;
                (client, Some((sentinel, service)))
            }
            None => (Self::client(url, &options, &redacted, &mut secrets)?, None),
        };

        // Probe once, so a wrong address or password fails now with a clear error instead of
        // inside the manager's retry loop.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout));
        let probe = async {
            let mut con = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<Value>(&mut con).await
        };
        let budget = options.call_budget();
        match tokio::time::timeout(budget, probe).await {
            Err(_) => {
                return Err(Error::Unavailable {
                    detail: format!("no answer from {redacted} within {budget:?}"),
                })
            }
            Ok(Err(e)) => return Err(connect_error(&redacted, &e, &secrets)),
            Ok(Ok(_)) => {}
        }

        let manager = client
            .get_connection_manager_lazy(options.manager_config())
            .map_err(|e| connect_error(&redacted, &e, &secrets))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (sentinel, service) = sentinel.unzip();
        let inner = Arc::new(Inner {
            node: std::sync::RwLock::new(Arc::new(Node { client, manager })),
            sentinel: sentinel.map(tokio::sync::Mutex::new),
            moved: tokio::sync::watch::Sender::new(0),
            _stop_watching: stop.clone().drop_guard(),
            url: redacted,
            secrets,
            options,
        });
        if let Some(service) = service {
            tokio::spawn(watch_switches(Arc::downgrade(&inner), service, stop));
        }
        Ok(RedisStore { inner })
    }

    /// The client of a plain `redis://` or `rediss://` URL.
    fn client(
        url: &str,
        options: &RedisOptions,
        redacted: &str,
        secrets: &mut Vec<String>,
    ) -> Result<Client, Error> {
        let info = url.into_connection_info().map_err(|e| Error::Url {
            url: redacted.to_string(),
            reason: url_reason(url, &e, secrets),
        })?;
        if let Some(password) = info.redis_settings().password() {
            secrets.push(password.to_string());
        }
        secrets.retain(|s| !s.is_empty());
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        if tls {
            // rustls needs a process-wide crypto provider; without one the redis crate panics
            // at the first TLS handshake. Keep the application's if it installed one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let info = info.set_tcp_settings(options.tcp_settings());
        if let Some(pem) = &options.tls_root_cert {
            // An empty trust store would only show up later as "UnknownIssuer".
            if !pem
                .windows(CERT_PEM_HEADER.len())
                .any(|w| w == CERT_PEM_HEADER)
            {
                return Err(Error::config(
                    "tls_root_cert",
                    "contains no PEM certificate (-----BEGIN CERTIFICATE-----)",
                ));
            }
        }
        match (&options.tls_root_cert, tls) {
            (Some(pem), true) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )
            .map_err(|e| Error::config("tls_root_cert", e.to_string())),
            _ => Client::open(info).map_err(|e| Error::Url {
                url: redacted.to_string(),
                reason: scrub(&e.to_string(), secrets),
            }),
        }
    }

    /// The sentinels of a `redis+sentinel://` URL, and a client of the primary they name.
    async fn via_sentinel(
        spec: SentinelUrl,
        options: &RedisOptions,
        redacted: &str,
        secrets: &mut Vec<String>,
    ) -> Result<(Client, SentinelClient), Error> {
        if let Some(password) = spec.node.password() {
            secrets.push(password.to_string());
        }
        secrets.retain(|s| !s.is_empty());
        if options.tls_root_cert.is_some() {
            return Err(Error::config(
                "tls_root_cert",
                "is not supported with a sentinel URL",
            ));
        }
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(spec.node)
            .set_tcp_settings(options.tcp_settings());
        if spec.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            node = node.set_tls_mode(TlsMode::Secure);
        }
        let mut sentinel = SentinelClient::build(
            spec.sentinels,
            spec.service,
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(|e| Error::Url {
            url: redacted.to_string(),
            reason: scrub(&e.to_string(), secrets),
        })?;
        let client = resolve_primary(&mut sentinel, options, redacted, secrets).await?;
        Ok((client, sentinel))
    }

    /// Asks the sentinels for the primary again after a call to `failed` went wrong in a way a
    /// failover explains, and moves the store there if they name another server. Errors are
    /// logged: the call's own error is what the member sees, and its retry asks again.
    async fn follow_primary(&self, failed: &Arc<Node>) {
        let Some(sentinel) = &self.inner.sentinel else {
            return;
        };
        // Another failed call is asking already.
        let Ok(mut sentinel) = sentinel.try_lock() else {
            return;
        };
        if !Arc::ptr_eq(&self.inner.node(), failed) {
            // A concurrent call moved already.
            return;
        }
        let inner = &self.inner;
        let client = match resolve_primary(
            &mut sentinel,
            &inner.options,
            &inner.url,
            &inner.secrets,
        )
        .await
        {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask Sentinel for the primary");
                return;
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        if addr == failed.client.get_connection_info().addr().to_string() {
            return;
        }
        let manager = match client.get_connection_manager_lazy(inner.options.manager_config()) {
            Ok(manager) => manager,
            Err(e) => {
                let e = scrub(&e.to_string(), &inner.secrets);
                tracing::warn!(error = %e, "cannot connect to the new primary");
                return;
            }
        };
        tracing::warn!(primary = %addr, "Sentinel names another primary; moving there");
        *inner.node.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Node { client, manager });
        inner.moved.send_modify(|n| *n += 1);
    }

    /// A subscription to `+switch-master` on the first sentinel that answers.
    async fn sentinel_announcements(&self) -> Result<redis::aio::PubSubStream, Error> {
        let Some(sentinel) = &self.inner.sentinel else {
            return Err(Error::Unavailable {
                detail: "not a sentinel URL".into(),
            });
        };
        let budget = self.inner.options.call_budget();
        let open = async {
            let client = sentinel.lock().await.async_get_sentinel_client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(budget, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(classify(&self.inner.url, &e, &self.inner.secrets)),
            Err(_) => Err(Error::Timeout {
                call: "subscribe to +switch-master",
                after: budget,
            }),
        }
    }

    /// Starts [`RedisStore::follow_primary`] in the background after a failover-like error, so
    /// the lookup is not cut short with the call that failed.
    fn follow_primary_later(&self, failed: Arc<Node>, e: &RedisError) {
        if self.inner.sentinel.is_none() || !primary_may_have_moved(e) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move { store.follow_primary(&failed).await });
    }

    /// Runs one script against the group's keys; `args` follow the tag (ARGV[1]).
    async fn run(
        &self,
        group: &GroupKey,
        call: &'static str,
        script: &Script,
        args: &[String],
    ) -> Result<Value, Error> {
        let tag = group.tag();
        let keys = [
            "meta", "exp", "sess", "since", "weight", "wcount", "owner", "free",
        ]
        .map(|suffix| format!("{tag}:{suffix}"));
        let mut invocation = script.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation.arg(&tag);
        for arg in args {
            invocation.arg(arg);
        }
        let node = self.inner.node();
        let mut con = node.manager.clone();
        // A call made while the manager reconnects waits through its backoff; cut it here so a
        // dead primary is noticed (and, through Sentinel, replaced) before the member's deadline.
        let budget = self.inner.options.call_budget();
        let result = tokio::time::timeout(budget, invocation.invoke_async::<Value>(&mut con))
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            });
        result.map_err(|e| {
            self.follow_primary_later(node, &e);
            self.call_error(group, call, &e)
        })
    }

    /// Maps an error of a store call. Expected server replies of our own scripts come first.
    fn call_error(&self, group: &GroupKey, call: &'static str, e: &RedisError) -> Error {
        let secrets = &self.inner.secrets;
        let detail = || scrub(&strip_script_suffix(e.detail().unwrap_or("")), secrets);
        match e.code() {
            Some("REDBUCKETS_CORRUPT") => {
                return Error::CorruptState {
                    group: group.name.clone(),
                    detail: detail(),
                }
            }
            Some("WRONGTYPE") => {
                return Error::CorruptState {
                    group: group.name.clone(),
                    detail: format!(
                        "a key under {} holds a different type than redbuckets writes: {}",
                        group.tag(),
                        detail()
                    ),
                }
            }
            _ => {}
        }
        if e.is_timeout() {
            return Error::Timeout {
                call,
                after: self.inner.options.response_timeout,
            };
        }
        classify(&self.inner.url, e, secrets)
    }
}

/// Maps a failure of the first connection.
fn connect_error(url: &str, e: &RedisError, secrets: &[String]) -> Error {
    let tls_hint = if url.starts_with("rediss://") || url.starts_with("valkeys://") {
        " (does the server speak TLS on this port?)"
    } else {
        " (a TLS port needs rediss://)"
    };
    if e.is_timeout() {
        return Error::Unavailable {
            detail: format!("cannot connect to {url}: timed out{tls_hint}"),
        };
    }
    if e.kind() == ErrorKind::InvalidClientConfig {
        // E.g. `rediss://...#insecure`, which this build refuses to honour.
        return Error::Url {
            url: url.to_string(),
            reason: scrub(&e.to_string(), secrets),
        };
    }
    if e.kind() == ErrorKind::Parse {
        return Error::Unavailable {
            detail: format!(
                "{url} did not answer in the Redis protocol{tls_hint}: {}",
                scrub(&e.to_string(), secrets).replace('\n', " ")
            ),
        };
    }
    classify(url, e, secrets)
}

/// Maps any error that is not specific to one call. Messages never carry the password.
fn classify(url: &str, e: &RedisError, secrets: &[String]) -> Error {
    let detail = scrub(&strip_script_suffix(&e.to_string()), secrets);
    let code = e.code().unwrap_or("");
    let refused = |what: &str| Error::Refused {
        detail: format!("{what} ({url}): {detail}"),
    };
    match e.kind() {
        ErrorKind::AuthenticationFailed => {
            return refused("authentication failed: wrong user or password (WRONGPASS)")
        }
        ErrorKind::Server(ServerErrorKind::NoPerm) => {
            return refused(
                "the ACL user may not run this command (NOPERM); it needs EVALSHA, \
                            SCRIPT LOAD, PUBLISH and SUBSCRIBE on the group's keys",
            )
        }
        ErrorKind::Server(ServerErrorKind::NoScript) => {
            return refused("the server did not keep the script after SCRIPT LOAD (NOSCRIPT)")
        }
        ErrorKind::Server(ServerErrorKind::ReadOnly) => {
            return Error::Unavailable {
                detail: format!(
                    "{url} is a read-only replica (READONLY); waiting for a writable primary"
                ),
            }
        }
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown,
        ) => {
            return Error::Unavailable {
                detail: format!("{url}: {detail}"),
            }
        }
        _ => {}
    }
    match code {
        "WRONGPASS" => return refused("authentication failed: wrong user or password"),
        "NOAUTH" => return refused("the server requires a password and the URL has none"),
        "NOPERM" => return refused("the ACL user may not run this command (NOPERM)"),
        "BUSY" | "OOM" | "LOADING" | "MASTERDOWN" => {
            return Error::Unavailable {
                detail: format!("{url}: {detail}"),
            }
        }
        _ => {}
    }
    let lower = detail.to_ascii_lowercase();
    if lower.contains("unknown command") && (lower.contains("eval") || lower.contains("script")) {
        return refused("scripts are disabled or renamed on this server");
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        return Error::Unavailable {
            detail: format!("{url}: {detail}"),
        };
    }
    match e.kind() {
        ErrorKind::Server(_) | ErrorKind::Extension => refused("Redis answered with an error"),
        _ => Error::Unavailable {
            detail: format!("{url}: {detail}"),
        },
    }
}

/// Redis appends " script: <sha>, on @user_script:<line>." to errors raised in scripts.
fn strip_script_suffix(message: &str) -> String {
    match message.find(" script: ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// Masks every secret in a message.
fn scrub(message: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(message.to_string(), |m, s| m.replace(s.as_str(), "***"))
}

/// The password as written in the URL (before percent-decoding), to scrub it from messages.
fn raw_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':').map_or(0, |i| i + 1)..];
    Some(password.to_string())
}

fn url_reason(url: &str, e: &RedisError, secrets: &[String]) -> String {
    match url.find("://") {
        None => "expected redis://host[:port][/db] or rediss://... (no scheme found)".to_string(),
        Some(end) => {
            let scheme = &url[..end];
            let known = [
                "redis",
                "rediss",
                "valkey",
                "valkeys",
                "redis+unix",
                "valkey+unix",
                "unix",
            ];
            if known.contains(&scheme) {
                scrub(&e.to_string(), secrets)
            } else {
                format!("unsupported scheme {scheme:?}: use redis:// or rediss://")
            }
        }
    }
}

// ---- Reply parsing: defensive, no indexing or unwrap on what Redis sent. ----

fn uint(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn uint32(v: &Value) -> Option<u32> {
    uint(v).and_then(|n| u32::try_from(n).ok())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

fn bad_reply(group: &GroupKey, call: &str, what: &str) -> Error {
    Error::CorruptState {
        group: group.name.clone(),
        detail: format!("unexpected reply from the {call} script: {what}"),
    }
}

/// Parses an owner record `"<token> <member>"` (member ids may contain spaces).
fn parse_owner(record: &str) -> Option<Owner> {
    let (token, member) = record.split_once(' ')?;
    if token.is_empty() || !token.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(Owner {
        member: member.to_string(),
        token: token.parse().ok()?,
    })
}

impl Store for RedisStore {
    async fn register(
        &self,
        group: &GroupKey,
        req: &RegisterRequest,
    ) -> Result<Registration, Error> {
        const CALL: &str = "register";
        let (has_replaces, replaces) = match &req.replaces {
            Some(nonce) => ("1", nonce.clone()),
            None => ("0", String::new()),
        };
        let args = [
            req.session.member.clone(),
            req.session.session.clone(),
            req.weight.to_string(),
            req.buckets.to_string(),
            duration_us(req.ttl).to_string(),
            has_replaces.to_string(),
            replaces,
            PROTOCOL_VERSION.to_string(),
        ];
        let reply = self.run(group, CALL, &SCRIPTS.register, &args).await?;
        let bad = |what: &str| bad_reply(group, CALL, what);
        let items = array(&reply).ok_or_else(|| bad("not an array"))?;
        let kind = items.first().and_then(text).ok_or_else(|| bad("no kind"))?;
        let field = |i: usize| items.get(i).and_then(uint);
        match kind.as_str() {
            "registered" => Ok(Registration::Registered {
                version: field(1).ok_or_else(|| bad("version"))?,
            }),
            "inuse" => Ok(Registration::InUse {
                expires_in: Duration::from_millis(field(1).ok_or_else(|| bad("expires_in"))?),
            }),
            "ttl" => Err(Error::TtlMismatch {
                group: group.name.clone(),
                stored: Duration::from_micros(field(1).ok_or_else(|| bad("stored ttl"))?),
                configured: req.ttl,
            }),
            "mismatch" => Err(Error::GroupMismatch {
                group: group.name.clone(),
                stored: field(1)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad("stored buckets"))?,
                configured: req.buckets,
                stored_protocol: field(2)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad("stored protocol"))?,
                configured_protocol: PROTOCOL_VERSION,
            }),
            other => Err(bad(&format!("unknown kind {other:?}"))),
        }
    }

    async fn heartbeat(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
    ) -> Result<HeartbeatReply, Error> {
        const CALL: &str = "heartbeat";
        let args = [
            session.member.clone(),
            session.session.clone(),
            duration_us(ttl).to_string(),
        ];
        let bad = |what: &str| bad_reply(group, CALL, what);
        // Both scripts are safe to run in a row: each renews the session only if it is ours.
        let mut reply = self
            .run(group, CALL, &SCRIPTS.heartbeat_fast, &args)
            .await?;
        let full = array(&reply)
            .and_then(|items| items.first())
            .and_then(text)
            .is_some_and(|kind| kind == "full");
        if full {
            reply = self.run(group, CALL, &SCRIPTS.heartbeat, &args).await?;
        }
        let items = array(&reply).ok_or_else(|| bad("not an array"))?;
        let field = |i: usize| items.get(i).and_then(uint);
        Ok(HeartbeatReply {
            alive: field(0).ok_or_else(|| bad("alive"))? == 1,
            version: field(1).ok_or_else(|| bad("version"))?,
            free: field(2)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .ok_or_else(|| bad("free"))?,
            // -1 (no other session) does not parse as a count.
            next_expiry: field(3).map(Duration::from_millis),
        })
    }

    async fn rebalance(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
    ) -> Result<RebalanceReply, Error> {
        const CALL: &str = "rebalance";
        let args = [
            session.member.clone(),
            session.session.clone(),
            max_take.to_string(),
        ];
        let reply = self.run(group, CALL, &SCRIPTS.rebalance, &args).await?;
        let bad = |what: &str| bad_reply(group, CALL, what);
        let items = array(&reply).ok_or_else(|| bad("not an array"))?;
        let kind = items.first().and_then(text).ok_or_else(|| bad("no kind"))?;
        if kind == "lost" {
            return Ok(RebalanceReply {
                action: Action::SessionLost,
                share: (0, 0),
                version: 0,
                free: 0,
                committed: 0,
                held: 0,
            });
        }
        let field = |i: usize| items.get(i).and_then(uint);
        let field32 = |i: usize, what: &str| items.get(i).and_then(uint32).ok_or_else(|| bad(what));
        let value = field(1).ok_or_else(|| bad("value"))?;
        let share = (field32(2, "share min")?, field32(3, "share max")?);
        let version = field(4).ok_or_else(|| bad("version"))?;
        let free = field32(5, "free")?;
        let committed = field32(6, "committed")?;
        let held = field32(7, "held")?;
        let action = match kind.as_str() {
            "acquired" => {
                let buckets = items
                    .get(8..)
                    .unwrap_or(&[])
                    .iter()
                    .map(|v| uint32(v).ok_or_else(|| bad("bucket id")))
                    .collect::<Result<Vec<u32>, Error>>()?;
                Action::Acquired {
                    buckets,
                    token: value,
                }
            }
            "release" => Action::Release(u32::try_from(value).map_err(|_| bad("release count"))?),
            "stay" => Action::Stay,
            "wait" => Action::Wait(Duration::from_micros(value)),
            other => return Err(bad(&format!("unknown kind {other:?}"))),
        };
        Ok(RebalanceReply {
            action,
            share,
            version,
            free,
            committed,
            held,
        })
    }

    async fn release(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
    ) -> Result<u32, Error> {
        const CALL: &str = "release";
        if buckets.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(buckets.len() + 2);
        args.push(session.member.clone());
        args.push(session.session.clone());
        args.extend(buckets.iter().map(u32::to_string));
        let reply = self.run(group, CALL, &SCRIPTS.release, &args).await?;
        uint32(&reply).ok_or_else(|| bad_reply(group, CALL, "not a count"))
    }

    async fn deregister(&self, group: &GroupKey, session: &SessionRef) -> Result<(), Error> {
        let args = [session.member.clone(), session.session.clone()];
        self.run(group, "deregister", &SCRIPTS.deregister, &args)
            .await
            .map(|_| ())
    }

    async fn snapshot(&self, group: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        const CALL: &str = "snapshot";
        let reply = self.run(group, CALL, &SCRIPTS.snapshot, &[]).await?;
        let bad = |what: &str| bad_reply(group, CALL, what);
        let corrupt = |detail: String| Error::CorruptState {
            group: group.name.clone(),
            detail,
        };
        let items = array(&reply).ok_or_else(|| bad("not an array"))?;
        if items.is_empty() {
            return Ok(None);
        }
        let field = |i: usize, what: &str| items.get(i).and_then(uint).ok_or_else(|| bad(what));
        let buckets = u32::try_from(field(0, "buckets")?).map_err(|_| bad("buckets"))?;
        let protocol = u32::try_from(field(1, "protocol")?).map_err(|_| bad("protocol"))?;
        let version = field(2, "version")?;
        let quarantine = Duration::from_micros(field(3, "quarantine")?);

        let mut members = Vec::new();
        for entry in items.get(4).and_then(array).ok_or_else(|| bad("members"))? {
            let entry = array(entry).ok_or_else(|| bad("member entry"))?;
            let at = |i: usize| entry.get(i);
            let id = at(0).and_then(text).ok_or_else(|| bad("member id"))?;
            let weight = at(2)
                .and_then(uint32)
                .ok_or_else(|| corrupt(format!("weight of member {id:?} is not a number")))?;
            members.push(MemberInfo {
                session: at(1).and_then(text).ok_or_else(|| bad("session"))?,
                weight,
                held: at(3).and_then(uint32).ok_or_else(|| bad("held"))?,
                committed: at(4).and_then(uint32).ok_or_else(|| bad("committed"))?,
                expires_in: Duration::from_millis(
                    at(5).and_then(uint).ok_or_else(|| bad("expiry"))?,
                ),
                session_age: Duration::from_millis(at(6).and_then(uint).ok_or_else(|| bad("age"))?),
                id,
            });
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));

        let mut owners: Vec<Option<Owner>> = vec![None; buckets as usize];
        let flat = items.get(5).and_then(array).ok_or_else(|| bad("owners"))?;
        for pair in flat.chunks(2) {
            let [field, value] = pair else {
                return Err(bad("odd owner list"));
            };
            let bucket = text(field).unwrap_or_default();
            let record = text(value).unwrap_or_default();
            let slot = bucket
                .parse::<usize>()
                .ok()
                .and_then(|b| owners.get_mut(b))
                .ok_or_else(|| corrupt(format!("owner hash names bucket {bucket:?}")))?;
            let owner = parse_owner(&record).ok_or_else(|| {
                corrupt(format!(
                    "owner record of bucket {bucket} is not \"<token> <member>\": {:?}",
                    record.chars().take(60).collect::<String>()
                ))
            })?;
            *slot = Some(owner);
        }
        Ok(Some(GroupSnapshot {
            buckets,
            protocol,
            version,
            members,
            owners,
            quarantine,
        }))
    }

    async fn subscribe(&self, group: &GroupKey) -> Result<Notifications, Error> {
        let channel = format!("{}:events", group.tag());
        let node = self.inner.node();
        let mut moved = self.inner.moved.subscribe();
        let open = async {
            let mut pubsub = node.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let budget = self.inner.options.call_budget();
        let pubsub = tokio::time::timeout(budget, open)
            .await
            .map_err(|_| Error::Timeout {
                call: "subscribe",
                after: budget,
            })?
            .map_err(|e| {
                self.follow_primary_later(Arc::clone(&node), &e);
                self.call_error(group, "subscribe", &e)
            })?;
        // The stream ends when the connection drops, or when the store moves to another server;
        // the member then resynchronises and subscribes again.
        let stream = pubsub.into_on_message().map(|_| ()).take_until(async move {
            let _ = moved.changed().await;
        });
        Ok(Notifications::new(stream))
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_records_parse_token_first() {
        assert_eq!(
            parse_owner("17 a b c"),
            Some(Owner {
                member: "a b c".into(),
                token: 17
            })
        );
        assert_eq!(parse_owner("x y"), None);
        assert_eq!(parse_owner("17"), None);
        assert_eq!(parse_owner(" 17 a"), None);
    }

    #[test]
    fn sentinel_urls_parse() {
        let spec = parse_sentinel_url("redis+sentinel://u:p%40ss@10.0.0.1,h2:26380/mymaster/3")
            .unwrap()
            .unwrap();
        assert_eq!(
            spec.sentinels,
            ["redis://10.0.0.1:26379", "redis://h2:26380"]
        );
        assert_eq!(spec.service, "mymaster");
        assert_eq!(spec.node.username(), Some("u"));
        assert_eq!(spec.node.password(), Some("p@ss"));
        assert_eq!(spec.node.db(), 3);
        assert!(!spec.tls);
        let spec = parse_sentinel_url("rediss+sentinel://[::1]:5000/svc")
            .unwrap()
            .unwrap();
        assert_eq!(spec.sentinels, ["rediss://[::1]:5000"]);
        assert!(spec.tls);
        assert!(parse_sentinel_url("redis://h:1").unwrap().is_none());
        for (bad, needle) in [
            ("redis+sentinel://h:1", "service name is missing"),
            ("redis+sentinel://h:1/", "service name is missing"),
            ("redis+sentinel://h:1,,h:2/m", "empty"),
            ("redis+sentinel:///m", "empty"),
            ("redis+sentinel://h:1/m/x", "not a number"),
            ("redis+sentinel://h:1/m/0/more", "expected /service"),
            ("redis+sentinel://h:1/m?x=1", "not supported"),
            ("redis+sentinel://h:notaport/m", "bad sentinel address"),
            ("redis+sentinel://u:pa/ss@h/m", "percent-encode"),
        ] {
            match parse_sentinel_url(bad) {
                Err(reason) => assert!(reason.contains(needle), "{bad}: {reason}"),
                Ok(_) => panic!("{bad} parsed"),
            }
        }
    }

    #[tokio::test]
    async fn an_unreachable_sentinel_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        // Nothing listens there any more.
        let url = format!("redis+sentinel://:secret@127.0.0.1:{port}/mymaster");
        match RedisStore::connect(&url).await {
            Err(Error::Unavailable { detail }) => {
                assert!(detail.contains("no sentinel of"), "{detail}");
                assert!(!detail.contains("secret"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        match RedisStore::connect("redis+sentinel://127.0.0.1:1").await {
            Err(Error::Url { reason, .. }) => assert!(reason.contains("service name"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn passwords_are_found_and_scrubbed() {
        assert_eq!(
            raw_password("redis://:s3cret@h:1/0").as_deref(),
            Some("s3cret")
        );
        assert_eq!(raw_password("redis://u:p@ss@h").as_deref(), Some("p@ss"));
        assert_eq!(raw_password("redis://tok@h").as_deref(), Some("tok"));
        assert_eq!(raw_password("redis://h:1"), None);
        assert_eq!(
            scrub("bad s3cret here", &["s3cret".to_string()]),
            "bad *** here"
        );
    }

    #[test]
    fn script_suffix_is_stripped() {
        assert_eq!(
            strip_script_suffix("meta.buckets bad script: abc, on @user_script:1."),
            "meta.buckets bad"
        );
    }

    #[test]
    fn scripts_compile_into_distinct_hashes() {
        let s = &*SCRIPTS;
        let mut hashes = [
            s.register.get_hash(),
            s.heartbeat.get_hash(),
            s.rebalance.get_hash(),
            s.release.get_hash(),
            s.deregister.get_hash(),
            s.snapshot.get_hash(),
        ];
        hashes.sort_unstable();
        assert!(hashes.windows(2).all(|w| w[0] != w[1]));
    }
}
