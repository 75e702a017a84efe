//! Redis Sentinel: asking the sentinels for the primary, listening to their `+switch-master`
//! announcements, and moving the store to a new primary after a failover.

use std::sync::Arc;

use futures_util::StreamExt;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, ErrorKind, RedisError, ServerErrorKind, TlsMode};

use super::errors::{classify, scrub};
use super::url::SentinelUrl;
use super::{Inner, Node, RedisOptions, RedisStore};
use crate::error::Error;

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
pub(super) async fn watch_switches(
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
pub(super) async fn resolve_primary(
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

impl RedisStore {
    /// The sentinels of a `redis+sentinel://` URL, and a client of the primary they name.
    pub(super) async fn via_sentinel(
        spec: SentinelUrl,
        options: &RedisOptions,
        redacted: &str,
        secrets: &[String],
    ) -> Result<(Client, SentinelClient), Error> {
        if options.tls_root_cert.is_some() {
            return Err(Error::config(
                "tls_root_cert",
                "is not supported with a sentinel URL",
            ));
        }
        if spec.tls && cfg!(not(feature = "tls")) {
            return Err(super::missing_feature(
                redacted,
                "a rediss+sentinel:// URL (TLS)",
                "tls",
            ));
        }
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(spec.node)
            .set_tcp_settings(options.tcp_settings());
        if spec.tls {
            #[cfg(feature = "tls")]
            super::install_tls_provider();
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
        if failed
            .client()
            .is_some_and(|c| addr == c.get_connection_info().addr().to_string())
        {
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
        *inner.node.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Node::new(client, manager));
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

    /// Starts [`RedisStore::follow_primary`] in the background after a failover-like error.
    pub(super) fn follow_sentinels_later(&self, failed: Arc<Node>, e: &RedisError) {
        if self.inner.sentinel.is_none() || !primary_may_have_moved(e) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move { store.follow_primary(&failed).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
