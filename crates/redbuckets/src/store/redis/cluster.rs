//! Redis Cluster: routing each call to the primary that owns its group's slot, loading the
//! function library there, and sharded subscriptions on a connection of their own to it.
//!
//! Every key of a group shares its hash tag, so a group lives on one slot. The store keeps
//! the slot table (`CLUSTER SLOTS`) and one auto-reconnecting [`ConnectionManager`] per
//! primary, and routes by itself: a call goes to its slot's primary; `MOVED` updates the table
//! and is followed once; `ASK` is not followed (see [`Cluster::query`]); a call that fails in a way a
//! failover or a resharding explains (connection lost, `CLUSTERDOWN`, `TRYAGAIN`, `READONLY`)
//! starts a background refresh of the table, at most one at a time, and the member retries.
//!
//! Why not the redis crate's cluster client (1.8, `cluster-async`): while it recovers (a slot
//! refresh after an error) it holds every request, for every node (its `poll_flush` returns
//! `Pending` until the refresh ends), and a refresh reconnects to each node of the old table,
//! the dead one included; after a connection error it reconnects to the same address and only
//! refreshes the slots on the next error. Tried here first: after a `kill -9` of a primary it
//! refreshed ~45 times in 20 s and the groups on the healthy primaries timed out too (that run
//! also had two faults of the test set-up, since fixed: replicas that had not synced, so no
//! failover, and `cluster-require-full-coverage yes`, so the comparison is not conclusive).
//! Routing here keeps a node's trouble to the calls for its slots, and the refresh is ours
//! to trigger.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use redis::aio::ConnectionManager;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    ProtocolVersion, PushKind, RedisError, RedisResult, ServerErrorKind, Value,
};

use super::errors::{connect_error, probe_protocol, scrub};
use super::url::{check_url, url_reason};
use super::RedisOptions;
use crate::error::Error;
use crate::store::Notice;

/// The oldest Redis a cluster store runs on: sharded pub/sub and functions came with 7.0.
const MIN_VERSION: (u32, u32) = (7, 0);

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;

/// The shortest pause between two refreshes of the slot table.
const REFRESH_PAUSE: Duration = Duration::from_millis(100);

/// A node's address as the cluster names it.
type Addr = (String, u16);

/// A Redis Cluster: its slot table and a connection per primary.
pub(super) struct Cluster {
    /// The seed nodes, asked for the table when no known node answers.
    seeds: Vec<Addr>,
    /// Credentials, database and TCP settings of a connection to one node; its address is
    /// replaced by the node's.
    template: ConnectionInfo,
    tls: bool,
    root_cert: Option<Vec<u8>>,
    options: RedisOptions,
    topology: RwLock<Topology>,
    /// Held while a refresh runs (one at a time), with the time the last one started.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
    /// Bumped whenever a slot's primary changes: a subscription on a node that no longer owns
    /// its channel's slot ends, and the member subscribes again on the new primary.
    changed: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Topology {
    /// The primary of each slot, as last learned.
    owners: Vec<Option<Arc<Addr>>>,
    /// One auto-reconnecting connection per node used so far.
    connections: HashMap<Addr, ConnectionManager>,
}

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key without one,
/// modulo 16384 (the cluster specification's `HASH_SLOT`).
pub(super) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// A `(major, minor)` version from `INFO server`'s `redis_version:` line.
fn redis_version(info: &str) -> Option<(u32, u32)> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

impl Cluster {
    /// Connects to the cluster that `nodes` (`redis://` or `rediss://` URLs of seed nodes) belong
    /// to. The first seed that answers is asked whether it is a cluster node on Redis ≥ 7.0, so
    /// a standalone server or an old one gives a clear error here; then the slot table is read.
    pub(super) async fn connect(
        nodes: &[String],
        options: &RedisOptions,
        redacted: &str,
        secrets: &[String],
    ) -> Result<Cluster, Error> {
        let bad_url = |reason| bad_url(redacted, reason);
        // No nodes at all: `connect_infos` says so.
        let mut infos = Vec::with_capacity(nodes.len());
        for node in nodes {
            check_url(node).map_err(|reason| bad_url(scrub(&reason, secrets)))?;
            let info = node
                .as_str()
                .into_connection_info()
                .map_err(|e| bad_url(url_reason(node, &e, secrets)))?;
            infos.push(info.set_tcp_settings(options.tcp_settings()));
        }
        Self::connect_infos(infos, options, redacted, secrets).await
    }

    /// [`Cluster::connect`] through nodes given as connection infos (an application's own).
    pub(super) async fn connect_infos(
        infos: Vec<ConnectionInfo>,
        options: &RedisOptions,
        redacted: &str,
        secrets: &[String],
    ) -> Result<Cluster, Error> {
        let bad_url = |reason| bad_url(redacted, reason);
        if infos.is_empty() {
            return Err(bad_url("no node address".into()));
        }
        let mut seeds = Vec::with_capacity(infos.len());
        for info in &infos {
            match info.addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    seeds.push((host.clone(), *port));
                }
                _ => return Err(bad_url("a cluster node needs host:port".into())),
            }
        }
        let tls = matches!(infos[0].addr(), ConnectionAddr::TcpTls { .. });
        if infos
            .iter()
            .any(|i| matches!(i.addr(), ConnectionAddr::TcpTls { .. }) != tls)
        {
            return Err(bad_url("mixes TLS and plain nodes".into()));
        }
        if tls {
            #[cfg(not(feature = "tls"))]
            return Err(super::missing_feature(
                redacted,
                "a rediss:// cluster node (TLS)",
                "tls",
            ));
            #[cfg(feature = "tls")]
            super::install_tls_provider();
        }
        Self::probe(&infos, options, redacted, secrets, tls).await?;
        let cluster = Cluster {
            seeds,
            template: infos[0].clone(),
            tls,
            root_cert: options.tls_root_cert.clone(),
            options: options.clone(),
            topology: RwLock::new(Topology {
                owners: vec![None; SLOTS],
                connections: HashMap::new(),
            }),
            refreshing: tokio::sync::Mutex::new(None),
            changed: tokio::sync::watch::Sender::new(0),
        };
        let budget = options.call_budget();
        match tokio::time::timeout(budget, cluster.refresh()).await {
            Ok(Ok(())) => Ok(cluster),
            Ok(Err(e)) => Err(connect_error(redacted, &e, secrets, None)),
            Err(_) => Err(Error::Unavailable {
                detail: format!("no node of {redacted} named the slot owners within {budget:?}"),
            }),
        }
    }

    /// Asks the seeds in turn until one answers: it must be a cluster node on Redis ≥ 7.0.
    async fn probe(
        infos: &[ConnectionInfo],
        options: &RedisOptions,
        redacted: &str,
        secrets: &[String],
        tls: bool,
    ) -> Result<(), Error> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout));
        let mut last = None;
        for info in infos {
            let client = open_client(info.clone(), options.tls_root_cert.as_ref(), tls)?;
            let probe = async {
                let mut con = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let server: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut con)
                    .await?;
                let cluster: String = redis::cmd("INFO")
                    .arg("cluster")
                    .query_async(&mut con)
                    .await?;
                Ok::<_, RedisError>((server, cluster))
            };
            let (server, cluster) = match tokio::time::timeout(options.call_budget(), probe).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => {
                    last = Some((info.addr().clone(), Some(e)));
                    continue;
                }
                Err(_) => {
                    last = Some((info.addr().clone(), None));
                    continue;
                }
            };
            let addr = info.addr();
            if !cluster.contains("cluster_enabled:1") {
                return Err(Error::Url {
                    url: redacted.to_string(),
                    reason: format!(
                        "{addr} is not a Redis Cluster node (cluster_enabled:0): use \
                         redis://host:port for one server, or redis+sentinel:// through Sentinel"
                    ),
                });
            }
            return match redis_version(&server) {
                Some(version) if version >= MIN_VERSION => Ok(()),
                version => Err(Error::Refused {
                    detail: format!(
                        "{addr} runs Redis {}; a Redis Cluster store needs Redis ≥ 7.0 \
                         (sharded pub/sub and functions)",
                        version.map_or("of unknown version".to_string(), |(a, b)| format!(
                            "{a}.{b}"
                        ))
                    ),
                }),
            };
        }
        match last {
            Some((addr, Some(e))) => {
                let hint = probe_protocol(&addr, &e, options.connection_timeout).await;
                Err(connect_error(redacted, &e, secrets, hint))
            }
            _ => Err(Error::Unavailable {
                detail: format!(
                    "no node of {redacted} answered within {:?}",
                    options.call_budget()
                ),
            }),
        }
    }

    /// The connection info of the node at `addr`, with `protocol`.
    fn node_info(&self, (host, port): &Addr, protocol: ProtocolVersion) -> ConnectionInfo {
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.clone(), *port)
        };
        let redis = self
            .template
            .redis_settings()
            .clone()
            .set_protocol(protocol);
        self.template
            .clone()
            .set_addr(addr)
            .set_redis_settings(redis)
    }

    /// The connection to `addr`, made (lazily: it connects on first use) if there is none yet.
    fn connection(&self, addr: &Addr) -> RedisResult<ConnectionManager> {
        if let Some(con) = self.read().connections.get(addr) {
            return Ok(con.clone());
        }
        let info = self.node_info(addr, self.template.redis_settings().protocol());
        let client = open_client(info, self.root_cert.as_ref(), self.tls).map_err(|e| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "cannot build a client for a cluster node",
                e.to_string(),
            ))
        })?;
        let con = client.get_connection_manager_lazy(self.options.manager_config())?;
        let mut topology = self.write();
        Ok(topology
            .connections
            .entry(addr.clone())
            .or_insert(con)
            .clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Topology> {
        self.topology.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Topology> {
        self.topology.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary of `slot` as last learned.
    fn owner(&self, slot: u16) -> Option<Arc<Addr>> {
        self.read().owners[usize::from(slot)].clone()
    }

    /// Every primary of the slot table as last learned, each once, with a connection to it:
    /// what a `SCAN` of the whole cluster visits.
    pub(super) fn primaries(self: &Arc<Self>) -> RedisResult<Vec<ConnectionManager>> {
        let mut addrs: Vec<Arc<Addr>> = self.read().owners.iter().flatten().cloned().collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            self.refresh_later();
            return Err(RedisError::from((
                ErrorKind::ClusterConnectionNotFound,
                "no primary known yet",
            )));
        }
        addrs.iter().map(|a| self.connection(a)).collect()
    }

    /// The primary of `slot` as last learned, as `host:port`, for messages.
    pub(super) fn owner_name(&self, slot: u16) -> String {
        self.owner(slot).map_or_else(
            || "no known node".to_string(),
            |a| format!("{}:{}", a.0, a.1),
        )
    }

    /// Reads the slot table from the first node that answers (known primaries first, then the
    /// seeds), all asked at once so a dead node costs no wait.
    async fn refresh(&self) -> RedisResult<()> {
        let mut candidates: Vec<Addr> = {
            let topology = self.read();
            let mut known: Vec<Addr> = topology
                .owners
                .iter()
                .flatten()
                .map(|a| (**a).clone())
                .collect();
            known.sort();
            known.dedup();
            known
        };
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut asks = Vec::with_capacity(candidates.len());
        for addr in &candidates {
            let mut con = self.connection(addr)?;
            let budget = self.options.call_budget();
            asks.push(Box::pin(async move {
                let reply = tokio::time::timeout(
                    budget,
                    redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut con),
                )
                .await
                .map_err(|_| {
                    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })?;
                reply.and_then(|v: Value| parse_slots(&v))
            }));
        }
        let (owners, _) = futures_util::future::select_ok(asks).await?;
        let mut primaries: Vec<String> = owners
            .iter()
            .flatten()
            .map(|a| format!("{}:{}", a.0, a.1))
            .collect();
        primaries.dedup();
        tracing::debug!(?primaries, "read the cluster's slot table");
        let mut topology = self.write();
        if topology.owners != owners {
            self.changed.send_modify(|n| *n += 1);
        }
        topology.owners = owners;
        // Connections to nodes that own nothing now are dropped.
        let live: std::collections::HashSet<Addr> = topology
            .owners
            .iter()
            .flatten()
            .map(|a| (**a).clone())
            .collect();
        topology.connections.retain(|addr, _| live.contains(addr));
        Ok(())
    }

    /// Starts a refresh of the slot table in the background, unless one runs or one started
    /// less than [`REFRESH_PAUSE`] ago.
    pub(super) fn refresh_later(self: &Arc<Self>) {
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(mut last) = cluster.refreshing.try_lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < REFRESH_PAUSE) {
                return;
            }
            *last = Some(Instant::now());
            if let Err(e) = cluster.refresh().await {
                tracing::debug!(error = %e, "cannot refresh the cluster's slot table");
            }
        });
    }

    /// Runs `cmd` on the primary of `slot`, following one `MOVED`. An `ASK` (the slot is
    /// migrating and the call's keys are gone from here) is not followed: on the importing
    /// node a script would see the group's keys half moved. The call fails, naming the slot
    /// (`RedisStore::call_error`), and the member retries until the move ends.
    pub(super) async fn query(self: &Arc<Self>, cmd: &redis::Cmd, slot: u16) -> RedisResult<Value> {
        let Some(addr) = self.owner(slot) else {
            self.refresh_later();
            return Err(no_owner(slot));
        };
        let mut con = self.connection(&addr)?;
        let result = cmd.query_async::<Value>(&mut con).await;
        let Err(e) = result else {
            return result;
        };
        match e.kind() {
            ErrorKind::Server(ServerErrorKind::Moved) => {
                let Some(target) = redirect(&e) else {
                    return Err(e);
                };
                self.write().owners[usize::from(slot)] = Some(Arc::new(target.clone()));
                self.changed.send_modify(|n| *n += 1);
                // Other slots probably moved with it.
                self.refresh_later();
                cmd.query_async(&mut self.connection(&target)?).await
            }
            _ => {
                if moved_or_failed(&e) {
                    self.refresh_later();
                }
                Err(e)
            }
        }
    }

    /// `EVALSHA` (loading the script on `NOSCRIPT`) on the primary of `slot`.
    pub(super) async fn invoke(
        self: &Arc<Self>,
        invocation: &redis::ScriptInvocation<'_>,
        slot: u16,
    ) -> RedisResult<Value> {
        let Some(addr) = self.owner(slot) else {
            self.refresh_later();
            return Err(no_owner(slot));
        };
        let result = invocation.invoke_async(&mut self.connection(&addr)?).await;
        if let Err(e) = &result {
            if e.is_cluster_error() || moved_or_failed(e) {
                self.refresh_later();
            }
        }
        result
    }

    /// A sharded subscription to `channel` on a connection of its own to the primary of the
    /// channel's slot (RESP3, pushes into a channel). The stream yields once per notice and
    /// ends when that connection drops or the server unsubscribes it (the slot moved away).
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
    ) -> RedisResult<impl Stream<Item = Notice> + Send + 'static> {
        let slot = key_slot(channel);
        let Some(addr) = self.owner(slot) else {
            self.refresh_later();
            return Err(no_owner(slot));
        };
        let info = self.node_info(&addr, ProtocolVersion::RESP3);
        let client = open_client(info, self.root_cert.as_ref(), self.tls).map_err(|e| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "cannot build a client for the slot's primary",
                e.to_string(),
            ))
        })?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.options.connection_timeout))
            .set_response_timeout(Some(self.options.response_timeout))
            .set_push_sender(tx);
        let subscribed = async {
            let mut con = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            // The confirmation is a push that the connection takes as the command's reply; a
            // `MOVED` (the slot left that node) is an error, and the member retries.
            redis::cmd("SSUBSCRIBE")
                .arg(channel)
                .exec_async(&mut con)
                .await?;
            Ok::<_, RedisError>(con)
        };
        let con = match subscribed.await {
            Ok(con) => con,
            Err(e) => {
                if e.is_cluster_error() || moved_or_failed(&e) {
                    self.refresh_later();
                }
                return Err(e);
            }
        };
        // Ends when the slot table names another primary for the slot: a demoted node may keep
        // the subscription open without a word (seen after a primary hung and came back as a
        // replica), and notices are published on the new primary.
        let mut changes = self.changed.subscribe();
        let cluster = Arc::clone(self);
        let moved_away = async move {
            while changes.changed().await.is_ok() {
                if cluster.owner(slot).as_deref() != Some(&*addr) {
                    tracing::debug!(slot, "the slot has another primary; subscribing again");
                    return;
                }
            }
        };
        let stream = push_stream(rx)
            .take_until(moved_away)
            .take_while(|push| {
                std::future::ready(!matches!(
                    push.kind,
                    PushKind::SUnsubscribe | PushKind::Disconnection
                ))
            })
            .filter_map(move |push| {
                // Keeps the connection open as long as the stream lives.
                let _ = &con;
                let notice = match (&push.kind, push.data.get(1)) {
                    (PushKind::SMessage, Some(Value::BulkString(payload))) => {
                        Some(super::wire::notice(payload))
                    }
                    (PushKind::SMessage, _) => Some(Notice::Act),
                    _ => None,
                };
                std::future::ready(notice)
            });
        Ok(stream)
    }
}

/// The cluster URL `redacted` is not usable, for `reason`.
fn bad_url(redacted: &str, reason: String) -> Error {
    Error::Url {
        url: redacted.to_string(),
        reason,
    }
}

/// The slot table in a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id], replicas...]...]`.
fn parse_slots(reply: &Value) -> RedisResult<Vec<Option<Arc<Addr>>>> {
    let bad = |what: &str| {
        RedisError::from((
            ErrorKind::Parse,
            "unexpected CLUSTER SLOTS reply",
            what.to_string(),
        ))
    };
    let Value::Array(ranges) = reply else {
        return Err(bad("not an array"));
    };
    let mut owners = vec![None; SLOTS];
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(bad("a range is not an array"));
        };
        let (Some(Value::Int(lo)), Some(Value::Int(hi)), Some(Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(bad("a range without first, last and primary"));
        };
        let host = match primary.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(bad("a primary without a host")),
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            return Err(bad("a primary without a port"));
        };
        let port = u16::try_from(*port).map_err(|_| bad("a port out of range"))?;
        if host.is_empty() || host == "?" {
            // "The address you reached me at", or unknown: leave those slots unowned, so a
            // call for them asks again instead of guessing.
            continue;
        }
        let addr = Arc::new((host, port));
        let lo = usize::try_from(*lo).map_err(|_| bad("a slot out of range"))?;
        let hi = usize::try_from(*hi).map_err(|_| bad("a slot out of range"))?;
        for owner in owners
            .get_mut(lo..=hi)
            .ok_or_else(|| bad("a slot out of range"))?
        {
            *owner = Some(Arc::clone(&addr));
        }
    }
    Ok(owners)
}

/// The node a `MOVED` or `ASK` names.
fn redirect(e: &RedisError) -> Option<Addr> {
    let (addr, _) = e.redirect_node()?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port.parse().ok()?,
    ))
}

/// Errors a failover or a resharding explains: the slot table may be out of date.
pub(super) fn moved_or_failed(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// No primary is known for `slot` (the table is being read again).
fn no_owner(slot: u16) -> RedisError {
    RedisError::from((
        ErrorKind::Server(ServerErrorKind::ClusterDown),
        "no known primary for the slot",
        format!("slot {slot}: the store is reading the cluster's slot table again"),
    ))
}

#[cfg(feature = "tls")]
use redis::TlsCertificates;

/// A client of one node, with the custom CA when one is set.
fn open_client(
    info: ConnectionInfo,
    root_cert: Option<&Vec<u8>>,
    tls: bool,
) -> Result<Client, Error> {
    match (root_cert, tls) {
        #[cfg(feature = "tls")]
        (Some(pem), true) => Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        )
        .map_err(|e| Error::config("tls_root_cert", e.to_string())),
        _ => Client::open(info).map_err(|e| Error::Unavailable {
            detail: e.to_string(),
        }),
    }
}

/// The receiving end of a push channel as a stream.
fn push_stream(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
) -> impl Stream<Item = redis::PushInfo> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from the cluster specification and `CLUSTER KEYSLOT`.
    #[test]
    fn key_slots_follow_the_specification() {
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        // An empty tag hashes the whole key.
        assert_ne!(key_slot("{}foo"), key_slot(""));
        assert_eq!(key_slot("{red-buckets:g}:meta"), key_slot("red-buckets:g"));
    }

    #[test]
    fn versions_are_read() {
        assert_eq!(
            redis_version("# Server\r\nredis_version:7.0.15\r\n"),
            Some((7, 0))
        );
        assert_eq!(redis_version("redis_version:6.2.1"), Some((6, 2)));
        assert_eq!(redis_version("nothing"), None);
    }
}
