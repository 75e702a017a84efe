//! `RedisStore`: the store protocol as Lua scripts on Redis, one script per [`Store`] method.
//!
//! The scripts live in `store/lua/`: `clock.lua` (the server's clock, the one place a script
//! reads time) and `common.lua` (key layout, validation of stored data, purge, the share rule)
//! come before each method's body. They mirror
//! [`crate::MemoryStore`], the reference semantics, step for step; the share rule is a port of
//! [`crate::share`].
//!
//! # Functions, and EVALSHA where they are refused
//! `scripts.rs` composes them into one Redis function library, `redbuckets_<version>` (the version:
//! the first 12 hex digits of the SHA1 of its text), with one function `rb_<version>_<script>` per
//! script; `snapshot` and `holdings` are flagged `no-writes`, so Redis refuses any write in them. A
//! call is one `FCALL`. The prelude is compiled once, when the library loads, instead of on every
//! call (~11 µs of server time each as an EVAL script), and `server_run_id()`, the `INFO server`
//! (~13 µs) behind the staleness check, runs once per Redis process: the library's Lua state keeps
//! it, and a restart, a `FUNCTION FLUSH` or another server starts afresh. It is never sent by the
//! client, which could hold a restarted server's old id. When the server answers that the function
//! does not exist (a restart without persistence, `FUNCTION FLUSH`, a failover to a replica without
//! it) the store loads the library, taking "already exists" from a concurrent loader as success,
//! and calls once more. Versioned names let two redbuckets versions (a rolling upgrade) or the two
//! clock variants load side by side; old versions stay loaded until someone deletes them (`FUNCTION
//! DELETE`).
//!
//! Where functions are refused (FCALL or FUNCTION unknown or renamed, an ACL user without them,
//! any other refusal of `FUNCTION LOAD`), the store logs a warning and uses the EVAL form
//! of each script (prelude and body as one text, `EVALSHA`, loaded on `NOSCRIPT`) on that server
//! from then on; a server it moves to after a Sentinel failover is asked again. In that form the
//! run id is read on every granting call. A server that refuses both gets the usual clear error.
//!
//! # Time in tests
//! Lua reads `TIME`, which a test cannot control. A doc-hidden switch,
//! [`RedisOptions::frozen_clock_for_tests`], makes a store load the same scripts with
//! `clock_frozen.lua` instead of `clock.lua` (a library of its own, under another version): its
//! clock reads a µs value from `{prefix:group}:test-clock` when that key exists. `MemoryStore`
//! gets the same value (`MemoryStore::set_clock_us`), so both stores see the same time and every reply, tokens and
//! expiries included, can be compared exactly (`tests/differential.rs`). The default store loads
//! the normal variants: their text differs from before only by the clock function, and they
//! never read the test key. A time-offset argument was the other candidate; it would have put a
//! test input into every production call.
//!
//! # Keys and arguments
//! `wire.rs` holds the wire format in one place: the key layout (every key of a group starts
//! with its hash tag `{prefix:name}`, so all of them live on one Redis Cluster slot), the
//! encoders of each script's arguments and the decoders of its reply. Counts are kept per
//! weight so the share rule needs one `ZCOUNT` per distinct weight instead of a scan over the
//! members.
//!
//! # Connections
//! Calls go through one auto-reconnecting [`ConnectionManager`] with TCP keepalive and
//! `TCP_USER_TIMEOUT` set, so a half-open connection fails instead of hanging. The manager never
//! retries a failed call; the member does, and every script is safe to repeat.
//! [`Store::subscribe`] opens a dedicated pub/sub connection per subscription.
//!
//! The first connection is made by `retry_connect`, around the whole of one attempt (the
//! Sentinel lookup, the cluster's probe and slot table, the `PING`), so all three kinds of URL
//! wait the same way for a Redis that is not up yet ([`RedisOptions::connect_retry`]); what
//! no wait cures (`errors::worth_retrying_connect` says which) fails at once.
//!
//! # Redis Cluster
//! With a `redis+cluster://` URL (or [`RedisStore::connect_cluster`]) the store routes each
//! call to the primary of its group's slot (`cluster.rs`: its own slot table and one
//! connection per primary; why not the redis crate's cluster client is written there). The
//! scripts are the same but for one line: the library variant loaded on a cluster publishes
//! with `SPUBLISH` and first reads a key that never exists, which Redis refuses while the slot
//! migrates, so no script runs on a half-moved slot (an `ASK` is not followed either: the call
//! fails with an error naming the slot, and the member retries); and [`Store::subscribe`] opens a sharded subscription (`SSUBSCRIBE`) on the
//! slot's primary, which ends when the slot moves or the node fails, so members resubscribe.
//! A missing library is loaded on the node that answered "function not found". A replica
//! promoted after a failover is another Redis process, so the group is re-created there with
//! its quarantine, as through Sentinel; so is a group whose slot was migrated to another
//! primary.
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

#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
mod cluster;
mod errors;
mod options;
mod scripts;
#[cfg(feature = "sentinel")]
mod sentinel;
pub(crate) mod url;
pub(crate) mod wire;

pub use options::RedisOptions;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
#[cfg(feature = "sentinel")]
use redis::sentinel::SentinelClient;
#[cfg(feature = "tls")]
use redis::TlsCertificates;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError,
    Value,
};

use self::cluster::{key_slot, Cluster};
use self::errors::{
    connect_error, probe_protocol, refuses_functions, scrub, worth_retrying_connect,
};
use self::scripts::{Deployment, ScriptId, Scripts};
#[cfg(feature = "sentinel")]
use self::sentinel::{resolve_primary, watch_switches};
use self::url::{check_url, parse_cluster_url, parse_sentinel_url, password_secrets, url_reason};
pub use self::url::{redact_url, scrub_password};
use self::wire::RegisterReply;
use crate::config::PROTOCOL_VERSION;
use crate::error::Error;
use crate::store::{
    Channel, Deletion, GroupKey, GroupSnapshot, HeartbeatReply, Holdings, Notifications,
    RebalanceReply, RegisterRequest, Registration, Removal, SessionRef, Store,
};

/// The server's clock: `TIME`.
const CLOCK: &str = include_str!("../lua/clock.lua");
/// Tests only: the clock that reads `<tag>:test-clock` ([`RedisOptions::frozen_clock_for_tests`]).
const FROZEN_CLOCK: &str = include_str!("../lua/clock_frozen.lua");

const CERT_PEM_HEADER: &[u8] = b"-----BEGIN CERTIFICATE-----";

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts::new(CLOCK, Deployment::Server));
/// Loaded only by a store made with [`RedisOptions::frozen_clock_for_tests`]: its own library.
static FROZEN_CLOCK_SCRIPTS: LazyLock<Scripts> =
    LazyLock::new(|| Scripts::new(FROZEN_CLOCK, Deployment::Server));
/// On a Redis Cluster: `SPUBLISH` on the group's slot.
static CLUSTER_SCRIPTS: LazyLock<Scripts> =
    LazyLock::new(|| Scripts::new(CLOCK, Deployment::Cluster));
static FROZEN_CLOCK_CLUSTER_SCRIPTS: LazyLock<Scripts> =
    LazyLock::new(|| Scripts::new(FROZEN_CLOCK, Deployment::Cluster));

/// The store on Redis (≥ 7.0): each [`Store`] call is one Lua function (or script), run
/// atomically with the server's clock. Clones share one connection.
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
    #[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
    sentinel: Option<tokio::sync::Mutex<Sentinels>>,
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

/// Where the calls go: one Redis server, or a Redis Cluster.
struct Node {
    link: Link,
    /// Set once the server refused functions: from then on this server gets EVALSHA. A new
    /// `Node` (after a Sentinel move) asks again.
    eval_only: AtomicBool,
    /// Set once the server failed to compile a script's `#!lua flags=` line (Redis < 7.0):
    /// from then on it gets the read-only scripts without it.
    no_script_flags: AtomicBool,
}

// One per store, behind an Arc: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Link {
    /// One server and the auto-reconnecting connection to it.
    Server {
        client: Client,
        manager: ConnectionManager,
    },
    /// A Redis Cluster: each call goes to the primary of its group's slot.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    Cluster(Arc<Cluster>),
}

impl Node {
    fn new(client: Client, manager: ConnectionManager) -> Self {
        Self::with(Link::Server { client, manager })
    }

    fn with(link: Link) -> Self {
        Node {
            link,
            eval_only: AtomicBool::new(false),
            no_script_flags: AtomicBool::new(false),
        }
    }

    /// The client of the one server (`None` on a cluster).
    #[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
    fn client(&self) -> Option<&Client> {
        match &self.link {
            Link::Server { client, .. } => Some(client),
            Link::Cluster(_) => None,
        }
    }

    /// Runs `cmd`; on a cluster, on the primary of `key`'s slot.
    async fn query(&self, cmd: &redis::Cmd, key: &str) -> Result<Value, RedisError> {
        match &self.link {
            Link::Server { manager, .. } => cmd.query_async(&mut manager.clone()).await,
            Link::Cluster(cluster) => cluster.query(cmd, key_slot(key)).await,
        }
    }

    /// `FUNCTION LOAD` where the call for `key` runs.
    async fn load_library(&self, text: &str, key: &str) -> Result<Value, RedisError> {
        match &self.link {
            Link::Server { manager, .. } => {
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg(text)
                    .query_async(&mut manager.clone())
                    .await
            }
            Link::Cluster(cluster) => {
                let mut load = redis::cmd("FUNCTION");
                load.arg("LOAD").arg(text);
                cluster.query(&load, key_slot(key)).await
            }
        }
    }

    /// `EVALSHA`, loading the script on `NOSCRIPT`; on a cluster, on `key`'s slot.
    async fn invoke_script(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        key: &str,
    ) -> Result<Value, RedisError> {
        match &self.link {
            Link::Server { manager, .. } => invocation.invoke_async(&mut manager.clone()).await,
            Link::Cluster(cluster) => cluster.invoke(invocation, key_slot(key)).await,
        }
    }
}

/// A connection's address for messages (`redis://host:port`, never a password), and its
/// password, to scrub from them.
fn describe(info: &ConnectionInfo) -> (String, Vec<String>) {
    let scheme = match info.addr() {
        ConnectionAddr::TcpTls { .. } => "rediss",
        ConnectionAddr::Unix(_) => "redis+unix",
        _ => "redis",
    };
    let secrets = info
        .redis_settings()
        .password()
        .map(|p| vec![p.to_string()])
        .unwrap_or_default();
    (format!("{scheme}://{}", info.addr()), secrets)
}

/// The sentinels' client (with the `sentinel` feature; none can exist without it).
#[cfg(feature = "sentinel")]
type Sentinels = SentinelClient;
#[cfg(not(feature = "sentinel"))]
type Sentinels = std::convert::Infallible;

/// The URL of a deployment this build cannot reach, and the feature that would.
#[cfg_attr(
    all(feature = "tls", feature = "sentinel", feature = "cluster"),
    allow(dead_code)
)]
fn missing_feature(redacted: &str, what: &str, feature: &str) -> Error {
    Error::Url {
        url: redacted.to_string(),
        reason: format!(
            "{what} needs the `{feature}` feature of redbuckets, which this build leaves out"
        ),
    }
}

/// An I/O timeout, as the redis crate reports one.
fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// Armed while a call runs: dropped with `node` still set, the call was cut by its caller
/// before any answer, which is reported as a timeout of that node.
struct Unanswered<'a> {
    store: &'a RedisStore,
    node: Option<Arc<Node>>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        // Not while the runtime shuts down (nothing to follow then, and no task to start).
        if let (Some(node), Ok(_)) = (self.node.take(), tokio::runtime::Handle::try_current()) {
            self.store.follow_primary_later(node, &timed_out());
        }
    }
}

impl Inner {
    fn node(&self) -> Arc<Node> {
        Arc::clone(&self.node.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Runs `attempt` until it connects, fails in a way no retry cures, or `budget` has passed: the
/// first attempt always runs to its own end (a zero budget is one attempt); later ones are cut
/// at the deadline, and the pauses between them grow from 100 ms to 2 s, with jitter, so a fleet
/// that starts before its Redis does not hammer it in waves. Logs one WARN when it starts
/// retrying and one INFO when it gets through: one line per change of state, not per attempt.
async fn retry_connect<F, Fut>(
    url: &str,
    budget: Duration,
    mut attempt: F,
) -> Result<RedisStore, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<RedisStore, Error>>,
{
    let started = tokio::time::Instant::now();
    let deadline = started + budget;
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut jitter = crate::backoff::Jitter::new(crate::backoff::Jitter::seed_from(&[
        url,
        &std::process::id().to_string(),
        &nanos.to_string(),
    ]));
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let result = if attempts == 1 {
            attempt().await
        } else {
            // The last attempt, made at the deadline, still gets a moment to connect.
            let until = deadline.max(tokio::time::Instant::now() + Duration::from_millis(200));
            match tokio::time::timeout_at(until, attempt()).await {
                Ok(result) => result,
                Err(_) => Err(Error::Unavailable {
                    detail: format!("no answer from {url}"),
                }),
            }
        };
        let e = match result {
            Ok(store) => {
                if attempts > 1 {
                    tracing::info!(
                        url,
                        attempts,
                        after = ?started.elapsed(),
                        "connected to Redis"
                    );
                }
                return Ok(store);
            }
            Err(e) if worth_retrying_connect(&e) => e,
            Err(e) => return Err(e),
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(if attempts == 1 {
                e
            } else {
                Error::Unavailable {
                    detail: format!(
                        "{}; still failing after {attempts} attempts in {:?}",
                        e.to_string().trim_start_matches("store unavailable: "),
                        started.elapsed()
                    ),
                }
            });
        }
        if attempts == 1 {
            tracing::warn!(
                error = %e,
                "Redis is not reachable yet; retrying for up to {budget:?}"
            );
        } else {
            tracing::debug!(error = %e, attempts, "Redis is still not reachable");
        }
        tokio::time::sleep(backoff.next(&mut jitter).min(deadline - now)).await;
    }
}

/// rustls needs a process-wide crypto provider; without one the redis crate panics at the first
/// TLS handshake (rustls picks one by itself only when exactly one provider feature is enabled
/// in the whole build). Keeps the application's if it installed one; otherwise installs *ring*,
/// the provider this crate builds rustls with.
///
/// rustls 0.23.48 deprecates its *ring* provider ("no support for post-quantum algorithms")
/// without a *ring*-based replacement in 0.23; the other built-in one, aws-lc-rs, needs cmake
/// and a C toolchain. Hence the `allow`, here only: an application that wants post-quantum key
/// exchange installs aws-lc-rs's provider before connecting, and this keeps it.
#[cfg(feature = "tls")]
pub(super) fn install_tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_some() {
        return;
    }
    #[allow(deprecated)]
    let ring = rustls::crypto::ring::default_provider();
    // Another thread may have installed one meanwhile: then that one stays.
    let _ = ring.install_default();
}

impl RedisStore {
    /// After a failover-like error: on a cluster, reads the slot table again; through
    /// Sentinel, asks the sentinels for the primary in the background, so the lookup is not
    /// cut short with the call that failed.
    fn follow_primary_later(&self, failed: Arc<Node>, e: &RedisError) {
        // On a cluster: read the slot table again (a call cut by the store's deadline never
        // reached the cluster code with its error).
        if let Link::Cluster(cluster) = &failed.link {
            if cluster::moved_or_failed(e) {
                cluster.refresh_later();
            }
            return;
        }
        #[cfg(feature = "sentinel")]
        self.follow_sentinels_later(failed, e);
        #[cfg(not(feature = "sentinel"))]
        let _ = (failed, e);
    }
}

/// Every key on one server that matches `pattern`, by `SCAN` (never `KEYS`: a large keyspace
/// is walked in steps, so Redis stays responsive).
async fn scan(con: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>, RedisError> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
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
    /// The names of the groups under `prefix`, sorted: every `{prefix:NAME}:meta` key, found
    /// with `SCAN` (on a cluster, on every primary). Reads only; a key of that name that is not a
    /// group's shows as a group whose [`Store::snapshot`] reports the corrupt data.
    pub async fn groups(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let pattern = wire::meta_pattern(prefix);
        let node = self.inner.node();
        let mut keys = Vec::new();
        let result = match &node.link {
            Link::Server { manager, .. } => scan(&mut manager.clone(), &pattern).await,
            Link::Cluster(cluster) => match cluster.primaries() {
                Ok(primaries) => {
                    let mut all = Ok(Vec::new());
                    for mut con in primaries {
                        match scan(&mut con, &pattern).await {
                            Ok(found) => keys.extend(found),
                            Err(e) => {
                                all = Err(e);
                                break;
                            }
                        }
                    }
                    all
                }
                Err(e) => Err(e),
            },
        };
        keys.extend(result.map_err(|e| self.scan_error(&e))?);
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| wire::group_of_meta_key(prefix, k))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Deletes every key of `group` (an operator's call: `redbuckets delete`). While sessions
    /// are live it refuses unless `force`; see [`Deletion::Deleted`] for what the members then
    /// do. Never waits on the members.
    pub async fn delete_group(&self, group: &GroupKey, force: bool) -> Result<Deletion, Error> {
        let args = wire::delete_args(force);
        let reply = self.run(group, "delete", ScriptId::Delete, &args).await?;
        wire::delete(&reply).map_err(|e| e.into_error(group))
    }

    /// Ends `member`'s session in `group` now, whatever its nonce (an operator's call:
    /// `redbuckets remove-member`, for a member known to be dead): its buckets go to the live
    /// members at once, with larger tokens. See [`Removal::Removed`] for a member that was
    /// alive after all.
    pub async fn remove_member(&self, group: &GroupKey, member: &str) -> Result<Removal, Error> {
        let args = wire::remove_args(member);
        let reply = self.run(group, "remove", ScriptId::Remove, &args).await?;
        wire::remove(&reply).map_err(|e| e.into_error(group))
    }

    /// A failed `SCAN`, as the store's error.
    fn scan_error(&self, e: &RedisError) -> Error {
        Error::Unavailable {
            detail: scrub(
                &format!("listing groups on {}: {e}", self.inner.url),
                &self.inner.secrets,
            ),
        }
    }

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
    /// Or to a Redis Cluster (Redis ≥ 7.0) with
    /// `redis+cluster://[user:password@]host[:port][,host[:port]...]` (`rediss+cluster://` for
    /// TLS): some of its nodes (port 6379 by default), from which the client learns the rest;
    /// see [`RedisStore::connect_cluster`].
    ///
    /// It connects at once, and proves the connection with a `PING`. While Redis is not up yet
    /// (the connection is refused or times out, the server is loading, no sentinel names a
    /// primary yet during a failover, a cluster has no slot table yet), it keeps trying, with
    /// exponential backoff and jitter, for [`RedisOptions::connect_retry`] (default 30 s), so
    /// a service whose instances start before their Redis waits for it; then it fails with the
    /// last [`Error::Unavailable`]. A refused password fails at once with [`Error::Refused`]; a
    /// URL that does not parse, or the wrong kind of URL for the server (a plain URL at a
    /// cluster node, or the reverse), with [`Error::Url`]. After that the connection reconnects
    /// by itself, through Sentinel it follows the primary after a failover, and on a cluster
    /// it follows the slots.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<RedisStore, Error> {
        let budget = options.connect_retry;
        retry_connect(&redact_url(url), budget, || {
            Self::connect_once(url, options.clone())
        })
        .await
    }

    /// One attempt of [`RedisStore::connect_with`].
    async fn connect_once(url: &str, options: RedisOptions) -> Result<RedisStore, Error> {
        let redacted = redact_url(url);
        let secrets = password_secrets(url);
        if cfg!(not(feature = "tls")) && url.trim_start().starts_with("rediss") {
            return Err(missing_feature(&redacted, "a rediss URL (TLS)", "tls"));
        }
        let cluster = parse_cluster_url(url).map_err(|reason| Error::Url {
            url: redacted.clone(),
            reason: scrub(&reason, &secrets),
        })?;
        if let Some(nodes) = cluster {
            #[cfg(not(feature = "cluster"))]
            {
                let _ = nodes;
                return Err(missing_feature(&redacted, "a Redis Cluster URL", "cluster"));
            }
            #[cfg(feature = "cluster")]
            return Self::cluster_with(&nodes, options, redacted, secrets).await;
        }
        let sentinel = parse_sentinel_url(url).map_err(|reason| Error::Url {
            url: redacted.clone(),
            reason: scrub(&reason, &secrets),
        })?;
        let (client, sentinel) = match sentinel {
            #[cfg(feature = "sentinel")]
            Some(spec) => {
                let service = spec.service.clone();
                let (client, sentinel) =
                    Self::via_sentinel(spec, &options, &redacted, &secrets).await?;
                (client, Some((sentinel, service)))
            }
            #[cfg(not(feature = "sentinel"))]
            Some(_) => return Err(missing_feature(&redacted, "a Sentinel URL", "sentinel")),
            None => (Self::client(url, &options, &redacted, &secrets)?, None),
        };
        Self::from_parts(client, sentinel, redacted, secrets, options).await
    }

    /// A store over the application's own `redis::Client` (one server), so that one service
    /// keeps one Redis configuration: the client's address, credentials, database, TLS
    /// settings, RESP version and TCP settings are used as they are. The store's timeouts and
    /// reconnection come from `options` (it keeps its own auto-reconnecting connection, made
    /// from the client). Connecting, retries and errors as in [`RedisStore::connect_with`];
    /// a Sentinel or Cluster deployment has [`RedisStore::from_sentinel_client`] and
    /// [`RedisStore::from_cluster_nodes`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), redbuckets::Error> {
    /// use redbuckets::{RedisOptions, RedisStore};
    /// let client = redis::Client::open("redis://127.0.0.1:6379/?protocol=resp3").expect("url");
    /// let store = RedisStore::from_client(client, RedisOptions::default()).await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn from_client(client: Client, options: RedisOptions) -> Result<RedisStore, Error> {
        let (redacted, secrets) = describe(client.get_connection_info());
        retry_connect(&redacted.clone(), options.connect_retry, || {
            Self::from_parts(
                client.clone(),
                None,
                redacted.clone(),
                secrets.clone(),
                options.clone(),
            )
        })
        .await
    }

    /// A store that finds its primary through the application's own `SentinelClient`
    /// (built for [`SentinelServerType::Master`](redis::sentinel::SentinelServerType)), which
    /// monitors the primary under `service`: the store asks it for the primary, follows the
    /// sentinels' `+switch-master` announcements for `service`, and asks again after a call
    /// meets a read-only server, a dead connection or a timeout. Connecting, retries and errors
    /// as in [`RedisStore::connect_with`].
    #[cfg(feature = "sentinel")]
    pub async fn from_sentinel_client(
        sentinel: SentinelClient,
        service: impl Into<String>,
        options: RedisOptions,
    ) -> Result<RedisStore, Error> {
        let service = service.into();
        let redacted = format!("sentinel service {service:?}");
        // Taken into the store by the attempt that connects.
        let sentinel = tokio::sync::Mutex::new(Some(sentinel));
        retry_connect(&redacted.clone(), options.connect_retry, || async {
            let mut guard = sentinel.lock().await;
            let Some(asking) = guard.as_mut() else {
                return Err(Error::Unavailable {
                    detail: format!("{redacted}: the sentinel client is gone"),
                });
            };
            let client = resolve_primary(asking, &options, &redacted, &[]).await?;
            let (_, secrets) = describe(client.get_connection_info());
            Self::probe(&client, &redacted, &secrets, &options).await?;
            let taken = guard.take().map(|s| (s, service.clone()));
            Self::assemble(client, taken, redacted.clone(), secrets, options.clone())
        })
        .await
    }

    /// A store on a Redis Cluster (Redis ≥ 7.0) through some of its nodes, given as the
    /// application's own `redis::ConnectionInfo`s (credentials, TLS, RESP version, TCP
    /// settings): the code form of [`RedisStore::connect_cluster`] for an application that
    /// builds its connection settings itself. The store routes each call to the primary of
    /// its group's slot on its own (see [`RedisStore::connect_cluster`] for why it does not
    /// take the redis crate's cluster client).
    #[cfg(feature = "cluster")]
    pub async fn from_cluster_nodes(
        nodes: impl IntoIterator<Item = ConnectionInfo>,
        options: RedisOptions,
    ) -> Result<RedisStore, Error> {
        let nodes: Vec<ConnectionInfo> = nodes.into_iter().collect();
        let described: Vec<(String, Vec<String>)> = nodes.iter().map(describe).collect();
        let redacted = described
            .iter()
            .map(|(r, _)| r.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let secrets: Vec<String> = described.into_iter().flat_map(|(_, s)| s).collect();
        retry_connect(&redacted.clone(), options.connect_retry, || async {
            let cluster =
                Cluster::connect_infos(nodes.clone(), &options, &redacted, &secrets).await?;
            Ok(Self::on_cluster(
                cluster,
                options.clone(),
                redacted.clone(),
                secrets.clone(),
            ))
        })
        .await
    }

    /// The store over `client` (and the sentinels that named it), once `client` answers.
    async fn from_parts(
        client: Client,
        sentinel: Option<(Sentinels, String)>,
        redacted: String,
        secrets: Vec<String>,
        options: RedisOptions,
    ) -> Result<RedisStore, Error> {
        Self::probe(&client, &redacted, &secrets, &options).await?;
        Self::assemble(client, sentinel, redacted, secrets, options)
    }

    /// Checks that `client` answers, and is no cluster node.
    async fn probe(
        client: &Client,
        redacted: &str,
        secrets: &[String],
        options: &RedisOptions,
    ) -> Result<(), Error> {
        // Probe once, so a wrong address or password fails now with a clear error instead of
        // inside the manager's retry loop.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout));
        let probe = async {
            let mut con = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<Value>(&mut con).await?;
            // A cluster node would answer MOVED for most groups: say so now. A server that
            // refuses INFO is not a cluster node we can tell; let it be.
            let info = redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(&mut con)
                .await
                .unwrap_or_default();
            Ok::<bool, RedisError>(info.contains("cluster_enabled:1"))
        };
        let budget = options.call_budget();
        match tokio::time::timeout(budget, probe).await {
            Err(_) => Err(Error::Unavailable {
                detail: format!("no answer from {redacted} within {budget:?}"),
            }),
            Ok(Err(e)) => {
                let addr = client.get_connection_info().addr();
                let hint = probe_protocol(addr, &e, options.connection_timeout).await;
                Err(connect_error(redacted, &e, secrets, hint))
            }
            Ok(Ok(true)) => Err(Error::Url {
                url: redacted.to_string(),
                reason: "the server is a Redis Cluster node (cluster_enabled:1): use \
                         redis+cluster://host:port[,host:port...]"
                    .into(),
            }),
            Ok(Ok(false)) => Ok(()),
        }
    }

    /// The store over `client`, which answered (`probe`).
    fn assemble(
        client: Client,
        sentinel: Option<(Sentinels, String)>,
        redacted: String,
        secrets: Vec<String>,
        options: RedisOptions,
    ) -> Result<RedisStore, Error> {
        let manager = client
            .get_connection_manager_lazy(options.manager_config())
            .map_err(|e| connect_error(&redacted, &e, &secrets, None))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (sentinel, service) = sentinel.unzip();
        let inner = Arc::new(Inner {
            node: std::sync::RwLock::new(Arc::new(Node::new(client, manager))),
            sentinel: sentinel.map(tokio::sync::Mutex::new),
            moved: tokio::sync::watch::Sender::new(0),
            _stop_watching: stop.clone().drop_guard(),
            url: redacted,
            secrets,
            options,
        });
        #[cfg(feature = "sentinel")]
        if let Some(service) = service {
            tokio::spawn(watch_switches(Arc::downgrade(&inner), service, stop));
        }
        #[cfg(not(feature = "sentinel"))]
        let _ = (service, stop);
        Ok(RedisStore { inner })
    }

    /// Connects to a Redis Cluster (Redis ≥ 7.0) through some of its nodes, each a
    /// `redis://[user:password@]host:port` (or `rediss://`) URL with the same credentials; the
    /// client learns the other nodes from them. The code form of a `redis+cluster://` URL:
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), redbuckets::Error> {
    /// use redbuckets::{RedisOptions, RedisStore};
    /// let store = RedisStore::connect_cluster(
    ///     ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"],
    ///     RedisOptions::default(),
    /// )
    /// .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    ///
    /// Each group lives on the primary that owns its hash slot (its keys share the tag
    /// `{prefix:name}`); calls follow `MOVED` and `ASK` redirections and topology changes, and
    /// the scripts publish with `SPUBLISH` to subscribers on the slot's primary. A node that
    /// answers but is not a cluster node gives [`Error::Url`]; a node older than Redis 7.0
    /// gives [`Error::Refused`]. While no node answers yet, it retries as
    /// [`RedisStore::connect_with`] does, for [`RedisOptions::connect_retry`].
    #[cfg(feature = "cluster")]
    pub async fn connect_cluster<S: AsRef<str>>(
        nodes: impl IntoIterator<Item = S>,
        options: RedisOptions,
    ) -> Result<RedisStore, Error> {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_string()).collect();
        let redacted = nodes
            .iter()
            .map(|n| redact_url(n))
            .collect::<Vec<_>>()
            .join(",");
        let secrets: Vec<String> = nodes.iter().flat_map(|n| password_secrets(n)).collect();
        retry_connect(&redacted.clone(), options.connect_retry, || {
            Self::cluster_with(&nodes, options.clone(), redacted.clone(), secrets.clone())
        })
        .await
    }

    #[cfg(feature = "cluster")]
    async fn cluster_with(
        nodes: &[String],
        options: RedisOptions,
        redacted: String,
        secrets: Vec<String>,
    ) -> Result<RedisStore, Error> {
        let cluster = Cluster::connect(nodes, &options, &redacted, &secrets).await?;
        Ok(Self::on_cluster(cluster, options, redacted, secrets))
    }

    #[cfg(feature = "cluster")]
    fn on_cluster(
        cluster: Cluster,
        options: RedisOptions,
        redacted: String,
        secrets: Vec<String>,
    ) -> RedisStore {
        RedisStore {
            inner: Arc::new(Inner {
                node: std::sync::RwLock::new(Arc::new(Node::with(Link::Cluster(Arc::new(
                    cluster,
                ))))),
                sentinel: None,
                moved: tokio::sync::watch::Sender::new(0),
                _stop_watching: tokio_util::sync::CancellationToken::new().drop_guard(),
                url: redacted,
                secrets,
                options,
            }),
        }
    }

    /// The client of a plain `redis://` or `rediss://` URL.
    fn client(
        url: &str,
        options: &RedisOptions,
        redacted: &str,
        secrets: &[String],
    ) -> Result<Client, Error> {
        check_url(url).map_err(|reason| Error::Url {
            url: redacted.to_string(),
            reason: scrub(&reason, secrets),
        })?;
        let info = url.into_connection_info().map_err(|e| Error::Url {
            url: redacted.to_string(),
            reason: url_reason(url, &e, secrets),
        })?;
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        if tls {
            #[cfg(not(feature = "tls"))]
            return Err(missing_feature(redacted, "a rediss:// URL (TLS)", "tls"));
            #[cfg(feature = "tls")]
            install_tls_provider();
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
            #[cfg(feature = "tls")]
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

    /// The scripts this store runs: the normal ones, or the frozen-clock variants in tests.
    fn scripts(&self) -> &'static Scripts {
        let cluster = matches!(self.inner.node().link, Link::Cluster(_));
        match (self.inner.options.frozen_clock, cluster) {
            (false, false) => &SCRIPTS,
            (true, false) => &FROZEN_CLOCK_SCRIPTS,
            (false, true) => &CLUSTER_SCRIPTS,
            (true, true) => &FROZEN_CLOCK_CLUSTER_SCRIPTS,
        }
    }

    /// Runs one script against the group's keys; `args` follow the tag (ARGV[1]). `call` names
    /// the store call in errors.
    async fn run(
        &self,
        group: &GroupKey,
        call: &'static str,
        script: ScriptId,
        args: &[String],
    ) -> Result<Value, Error> {
        let node = self.inner.node();
        // A call made while the manager reconnects waits through its backoff; cut it here so a
        // dead primary is noticed (and, through Sentinel, replaced) before the member's deadline.
        let budget = self.inner.options.call_budget();
        // The member cuts its calls at its own deadline (a third of the ttl at most), often
        // before this budget: a call dropped unanswered counts as a timeout too, or a primary
        // that hangs would never be abandoned (issue 17: no slot table read for a 5 s freeze).
        let mut unanswered = Unanswered {
            store: self,
            node: Some(Arc::clone(&node)),
        };
        let result = tokio::time::timeout(budget, self.invoke(&node, &group.tag(), script, args))
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        unanswered.node = None;
        result.map_err(|e| {
            self.follow_primary_later(Arc::clone(&node), &e);
            self.call_error(&node, group, call, &e)
        })
    }

    /// One script call: `FCALL` of the library's function, loading the library when the server
    /// does not have it (a restart without persistence, `FUNCTION FLUSH`, a failover to a
    /// replica without it) and retrying once; `EVALSHA` on a server that refuses functions.
    async fn invoke(
        &self,
        node: &Node,
        tag: &str,
        script: ScriptId,
        args: &[String],
    ) -> Result<Value, RedisError> {
        let scripts = self.scripts();
        let keys = wire::keys(tag);
        if !node.eval_only.load(Ordering::Relaxed) {
            let mut fcall = redis::cmd("FCALL");
            fcall
                .arg(scripts.function(script))
                .arg(keys.len())
                .arg(&keys)
                .arg(tag)
                .arg(args);
            let refusal = match node.query(&fcall, &keys[0]).await {
                Err(e) if is_missing_function(&e) => {
                    // On a cluster: the primary of the group's slot, which the FCALL reached.
                    match node.load_library(scripts.library(), &keys[0]).await {
                        Ok(_) => return node.query(&fcall, &keys[0]).await,
                        // Another call (or another member) loaded it first.
                        Err(e) if is_already_loaded(&e) => {
                            return node.query(&fcall, &keys[0]).await
                        }
                        Err(e) if refuses_functions(&e, true) => e,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if refuses_functions(&e, false) => e,
                other => return other,
            };
            if !node.eval_only.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    url = %self.inner.url,
                    library = scripts.library_name(),
                    reason = %scrub(&refusal.to_string(), &self.inner.secrets),
                    "Redis refused functions; this server gets EVALSHA from now on \
                     (more server time per call)"
                );
            }
        }
        let flagged = !node.no_script_flags.load(Ordering::Relaxed);
        let result = self
            .eval(node, scripts.eval(script, flagged), &keys, tag, args)
            .await;
        match result {
            // Redis < 7.0 knows no `#!lua flags=` line (a read-only script's first line):
            // the unflagged text reads the same, only Redis no longer enforces it.
            Err(e) if flagged && refuses_script_flags(&e) => {
                node.no_script_flags.store(true, Ordering::Relaxed);
                self.eval(node, scripts.eval(script, false), &keys, tag, args)
                    .await
            }
            other => other,
        }
    }

    /// `EVALSHA` of `script` (loading it on `NOSCRIPT`) with the group's keys, its tag and
    /// `args`.
    async fn eval(
        &self,
        node: &Node,
        script: &redis::Script,
        keys: &[String],
        tag: &str,
        args: &[String],
    ) -> Result<Value, RedisError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(tag);
        for arg in args {
            invocation.arg(arg);
        }
        node.invoke_script(&invocation, &keys[0]).await
    }
}

/// A server older than Redis 7.0 failed to compile a script that starts with `#!lua flags=`.
fn refuses_script_flags(e: &RedisError) -> bool {
    e.to_string().contains("unexpected symbol near '#'")
}

/// Redis does not know the function: the library is not loaded on this server.
fn is_missing_function(e: &RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.to_ascii_lowercase().starts_with("function not found"))
}

/// `FUNCTION LOAD` of a library that a concurrent call loaded first.
fn is_already_loaded(e: &RedisError) -> bool {
    e.detail()
        .is_some_and(|d| d.to_ascii_lowercase().contains("already exists"))
}

impl Store for RedisStore {
    async fn register(
        &self,
        group: &GroupKey,
        req: &RegisterRequest,
    ) -> Result<Registration, Error> {
        let args = wire::register_args(req);
        let reply = self
            .run(group, "register", ScriptId::Register, &args)
            .await?;
        match wire::register(&reply).map_err(|e| e.into_error(group))? {
            RegisterReply::Registered { version, token } => {
                Ok(Registration::Registered { version, token })
            }
            RegisterReply::InUse { expires_in } => Ok(Registration::InUse { expires_in }),
            RegisterReply::Ttl { stored } => Err(Error::TtlMismatch {
                group: group.name.clone(),
                stored,
                configured: req.ttl,
            }),
            RegisterReply::Mismatch { buckets, protocol } => Err(Error::GroupMismatch {
                group: group.name.clone(),
                stored: buckets,
                configured: req.buckets,
                stored_protocol: protocol,
                configured_protocol: PROTOCOL_VERSION,
            }),
        }
    }

    async fn heartbeat(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        ttl: Duration,
        watch: Duration,
    ) -> Result<HeartbeatReply, Error> {
        const CALL: &str = "heartbeat";
        let args = wire::heartbeat_args(session, ttl, watch);
        // Both scripts are safe to run in a row: each renews the session only if it is ours.
        let mut reply = self
            .run(group, CALL, ScriptId::HeartbeatFast, &args)
            .await?;
        if wire::heartbeat_wants_full(&reply) {
            reply = self.run(group, CALL, ScriptId::Heartbeat, &args).await?;
        }
        wire::heartbeat(&reply).map_err(|e| e.into_error(group))
    }

    async fn rebalance(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        max_take: u32,
    ) -> Result<RebalanceReply, Error> {
        let args = wire::rebalance_args(session, max_take);
        let reply = self
            .run(group, "rebalance", ScriptId::Rebalance, &args)
            .await?;
        wire::rebalance(&reply).map_err(|e| e.into_error(group))
    }

    async fn release(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
        known: u64,
    ) -> Result<u32, Error> {
        if buckets.is_empty() {
            return Ok(0);
        }
        let args = wire::release_args(session, buckets, known);
        let reply = self.run(group, "release", ScriptId::Release, &args).await?;
        wire::release(&reply).map_err(|e| e.into_error(group))
    }

    async fn leave(
        &self,
        group: &GroupKey,
        session: &SessionRef,
        buckets: &[u32],
    ) -> Result<u32, Error> {
        let args = wire::leave_args(session, buckets);
        let reply = self.run(group, "leave", ScriptId::Leave, &args).await?;
        wire::release(&reply).map_err(|e| e.into_error(group))
    }

    async fn deregister(&self, group: &GroupKey, session: &SessionRef) -> Result<(), Error> {
        let args = wire::session_args(session);
        self.run(group, "deregister", ScriptId::Deregister, &args)
            .await
            .map(|_| ())
    }

    async fn holdings(
        &self,
        group: &GroupKey,
        session: &SessionRef,
    ) -> Result<Option<Holdings>, Error> {
        let args = wire::session_args(session);
        let reply = self
            .run(group, "holdings", ScriptId::Holdings, &args)
            .await?;
        wire::holdings(&reply).map_err(|e| e.into_error(group))
    }

    async fn snapshot(&self, group: &GroupKey) -> Result<Option<GroupSnapshot>, Error> {
        let reply = self.run(group, "snapshot", ScriptId::Snapshot, &[]).await?;
        wire::snapshot(&reply).map_err(|e| e.into_error(group))
    }

    async fn subscribe(
        &self,
        group: &GroupKey,
        channel: Channel<'_>,
    ) -> Result<Notifications, Error> {
        let channel = match channel {
            Channel::Group => wire::events_channel(&group.tag()),
            Channel::Member(member) => wire::wake_channel(&group.tag(), member),
        };
        let node = self.inner.node();
        let mut moved = self.inner.moved.subscribe();
        let budget = self.inner.options.call_budget();
        let client = match &node.link {
            Link::Server { client, .. } => client,
            Link::Cluster(cluster) => {
                // Sharded: on the slot's primary, ending when the slot moves or the node fails.
                let stream = tokio::time::timeout(budget, cluster.subscribe(&channel))
                    .await
                    .map_err(|_| {
                        cluster.refresh_later();
                        Error::Timeout {
                            call: "subscribe",
                            after: budget,
                        }
                    })?
                    .map_err(|e| self.call_error(&node, group, "subscribe", &e))?;
                return Ok(Notifications::new(stream));
            }
        };
        let open = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(budget, open)
            .await
            .map_err(|_| Error::Timeout {
                call: "subscribe",
                after: budget,
            })?
            .map_err(|e| {
                self.follow_primary_later(Arc::clone(&node), &e);
                self.call_error(&node, group, "subscribe", &e)
            })?;
        // The stream ends when the connection drops, or when the store moves to another server;
        // the member then resynchronises and subscribes again.
        let stream = pubsub
            .into_on_message()
            .map(|msg| wire::notice(msg.get_payload_bytes()))
            .take_until(async move {
                let _ = moved.changed().await;
            });
        Ok(Notifications::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9, item 5: a raw '/' in the password (base64) used to end the credentials early,
    /// so the password was shown as the host; and a bad port said "did not parse".
    #[tokio::test]
    async fn bad_urls_never_show_the_password() {
        for (url, needle) in [
            (
                "redis://:ab/s3cretPW@127.0.0.1:6379/",
                "percent-encode it as %2F",
            ),
            (
                "redis://u:s3cretPW@127.0.0.1:notaport/",
                "bad port \"notaport\"",
            ),
            ("rediss://:s3cretPW@127.0.0.1:70000", "bad port \"70000\""),
            (
                "redis+sentinel://:ab/s3cretPW@127.0.0.1/m",
                "percent-encode it as %2F",
            ),
            ("redis+sentinel://:s3cretPW@h:port/m", "bad port \"port\""),
        ] {
            match RedisStore::connect(url).await {
                Err(e @ Error::Url { .. }) => {
                    let shown = format!("{e} {e:?}");
                    assert!(!shown.contains("s3cretPW"), "password leaked: {shown}");
                    // A build without the URL's feature refuses it for that reason first.
                    let built = (!url.starts_with("rediss") || cfg!(feature = "tls"))
                        && (!url.contains("sentinel") || cfg!(feature = "sentinel"));
                    assert!(!built || shown.contains(needle), "{shown}");
                    assert!(!shown.contains("did not parse"), "{shown}");
                }
                other => panic!("{url}: expected Error::Url, got {other:?}"),
            }
        }
    }

    /// Each EVAL script's hash (what EVALSHA sends) is the SHA1 Redis computes of the exact
    /// text it loads, and no two scripts share one, in both clock variants. Each library loads
    /// under the name its text carries and registers one function per script; the two clock
    /// variants are two libraries that coexist.
    #[tokio::test]
    async fn every_script_hash_is_the_sha1_of_its_text() {
        let server = redbuckets_testkit::RedisServer::start();
        let mut con = Client::open(server.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let mut seen = std::collections::BTreeMap::new();
        for scripts in [&*SCRIPTS, &*FROZEN_CLOCK_SCRIPTS] {
            for (name, script) in scripts.all_eval() {
                let loaded = script.load_async(&mut con).await.expect(name);
                assert_eq!(
                    loaded,
                    script.get_hash(),
                    "{name}: the hash is not the text's SHA1"
                );
                if let Some(other) = seen.insert(loaded, name) {
                    panic!("{name} and {other} have the same text");
                }
            }
            let loaded: String = redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg(scripts.library())
                .query_async(&mut con)
                .await
                .expect("FUNCTION LOAD");
            assert_eq!(loaded, scripts.library_name());
        }
        assert_eq!(seen.len(), 2 * ScriptId::ALL.len());
        assert_ne!(SCRIPTS.library_name(), FROZEN_CLOCK_SCRIPTS.library_name());

        let libraries: Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .query_async(&mut con)
            .await
            .expect("FUNCTION LIST");
        let listed = format!("{libraries:?}");
        for scripts in [&*SCRIPTS, &*FROZEN_CLOCK_SCRIPTS] {
            for id in ScriptId::ALL {
                let name = scripts.function(id);
                assert!(name.starts_with(&format!("rb_{}_", &scripts.library_name()[11..])));
                assert!(listed.contains(name), "{name} not registered: {listed}");
            }
        }
    }

    /// The frozen clock is for tests: no production script may read its key, and each of them
    /// reads time through the one clock function.
    #[test]
    fn production_scripts_never_read_the_test_clock() {
        assert!(!CLOCK.contains("test-clock"));
        assert!(FROZEN_CLOCK.contains("test-clock"));
        for body in Scripts::bodies().chain([scripts::COMMON]) {
            assert!(!body.contains("test-clock"));
            assert!(!body.contains("'TIME'"), "TIME outside clock.lua");
        }
        assert!(!SCRIPTS.library().contains("test-clock"));
        assert!(FROZEN_CLOCK_SCRIPTS.library().contains("test-clock"));
    }
}

/// Without a feature, its URLs are refused at once, naming the feature.
#[cfg(all(
    test,
    not(feature = "tls"),
    not(feature = "sentinel"),
    not(feature = "cluster")
))]
mod without_features {
    use super::*;

    #[tokio::test]
    async fn urls_of_a_left_out_feature_name_it() {
        for (url, feature) in [
            ("rediss://127.0.0.1:1/", "`tls`"),
            ("redis+sentinel://127.0.0.1:1/mymaster", "`sentinel`"),
            ("redis+cluster://127.0.0.1:1", "`cluster`"),
        ] {
            match RedisStore::connect(url).await {
                Err(Error::Url { reason, .. }) => assert!(reason.contains(feature), "{reason}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
