//! Error mapping: what a redis crate error means for a store call or the first connection,
//! with every secret scrubbed from the message.

use std::time::Duration;

use redis::{ConnectionAddr, ErrorKind, RedisError, ServerErrorKind};

use super::cluster::key_slot;
use super::{Link, Node, RedisStore};
use crate::error::Error;
use crate::store::GroupKey;

impl RedisStore {
    /// Maps an error of a store call. Expected server replies of our own scripts come first.
    pub(super) fn call_error(
        &self,
        node: &Node,
        group: &GroupKey,
        call: &'static str,
        e: &RedisError,
    ) -> Error {
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
            if let Link::Cluster(cluster) = &node.link {
                // Which node hangs, and for which slot: a cluster has several.
                let slot = key_slot(&group.tag());
                return Error::Unavailable {
                    detail: format!(
                        "store call {call} timed out after {:?} at {}, the primary of slot \
                         {slot} of group {:?} as last read from the cluster; the store reads \
                         the slot table again",
                        self.inner.options.call_budget(),
                        cluster.owner_name(slot),
                        group.name,
                    ),
                };
            }
            return Error::Timeout {
                call,
                after: self.inner.options.response_timeout,
            };
        }
        // A redirection that could not be followed (the slot moved again, or is half moved):
        // name the slot, so a resharding shows in the error.
        let message = e.to_string();
        if e.is_cluster_error()
            // "non local key": a cluster script's first read, refused in a migrating slot.
            || ["TryAgain", "TRYAGAIN", "Moved:", "MOVED ", "Ask:", "ASK ", "non local key"]
                .iter()
                .any(|m| message.contains(m))
        {
            return Error::Unavailable {
                detail: format!(
                    "{}: slot {} of group {:?} is moving between primaries or has none \
                     serving it: {}",
                    self.inner.url,
                    key_slot(&group.tag()),
                    group.name,
                    scrub(&strip_script_suffix(&message), secrets)
                ),
            };
        }
        classify(&self.inner.url, e, secrets)
    }
}

/// The server refuses to run redbuckets as a function library, so the store must use EVALSHA:
/// FCALL or FUNCTION is unknown (Redis < 7.0, or renamed), or the ACL user may not run it. With
/// `loading`, the error answered `FUNCTION LOAD`: then any refusal counts but a passing state
/// (a replica, loading, busy, out of memory, ...), which EVALSHA would meet as well.
pub(super) fn refuses_functions(e: &RedisError, loading: bool) -> bool {
    let message = e.to_string().to_ascii_lowercase();
    // "unknown command 'FCALL'" (`FCALL` before Redis 7), "no permissions to run the
    // 'function|load' command"; not a command the function itself calls, nor a key.
    let names_ours = ["'fcall", "`fcall", "'function", "`function"]
        .iter()
        .any(|name| message.contains(name));
    if message.contains("unknown command") {
        return names_ours;
    }
    let no_perm = e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || e.code() == Some("NOPERM")
        || message.contains("no permissions");
    if no_perm {
        return names_ours;
    }
    if !loading || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return false;
    }
    let passing = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::ReadOnly
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
        )
    ) || matches!(
        e.code(),
        Some("READONLY" | "LOADING" | "BUSY" | "OOM" | "MASTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK")
    );
    !passing && matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

/// What [`probe_protocol`] adds when a plain URL's port answered in TLS.
const HINT_NEEDS_TLS: &str = " (the port answered in TLS: a TLS port needs rediss://)";
/// What [`probe_protocol`] adds when a TLS URL's port answered without TLS.
const HINT_NEEDS_PLAIN: &str = " (the port answered without TLS: it needs redis://, not rediss://)";
/// The start of what [`connect_error`] says of a port that answered but not in RESP.
const NOT_RESP: &str = "did not answer in the Redis protocol";

/// Whether a failed first connection is worth another attempt: Redis may not be up yet (refused,
/// timed out, loading, no primary named yet). A wrong protocol (a TLS port for a plain URL, or
/// the reverse, or a port that does not speak RESP) and a certificate that does not verify are
/// not cured by waiting; neither are refused credentials or a bad URL (not transient at all).
pub(super) fn worth_retrying_connect(e: &Error) -> bool {
    match e {
        Error::Timeout { .. } => true,
        Error::Unavailable { detail } => {
            let lower = detail.to_ascii_lowercase();
            ![HINT_NEEDS_TLS, HINT_NEEDS_PLAIN, NOT_RESP]
                .iter()
                .any(|m| detail.contains(m))
                && !lower.contains("certificate")
        }
        _ => false,
    }
}

/// Maps a failure of the first connection. `hint` comes from [`probe_protocol`]: what the
/// port answered when asked in the other protocol (TLS for a plain URL, or the reverse).
pub(super) fn connect_error(
    url: &str,
    e: &RedisError,
    secrets: &[String],
    hint: Option<&str>,
) -> Error {
    let hint = hint.unwrap_or("");
    if e.is_timeout() {
        // Without a hint this says nothing about TLS: a busy server times out as well.
        return Error::Unavailable {
            detail: format!("cannot connect to {url}: timed out{hint}"),
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
                "{url} {NOT_RESP}{hint}: {}",
                scrub(&e.to_string(), secrets).replace('\n', " ")
            ),
        };
    }
    match classify(url, e, secrets) {
        Error::Unavailable { detail } => Error::Unavailable {
            detail: format!("{detail}{hint}"),
        },
        other => other,
    }
}

/// After a first connection failed in a way a wrong protocol explains, asks the port in the
/// other one: a plain URL's port with a TLS hello, a TLS URL's port with a plain `PING`. Returns
/// the hint to add when, and only when, the port answered that way.
pub(super) async fn probe_protocol(
    addr: &ConnectionAddr,
    e: &RedisError,
    timeout: Duration,
) -> Option<&'static str> {
    // A refusal, or an answer in RESP (a wrong password, an error code): no protocol to blame,
    // and a TLS hello to a Redis port would only wait out `timeout` unanswered.
    if e.is_connection_refusal()
        || e.kind() == ErrorKind::AuthenticationFailed
        || e.code().is_some()
    {
        return None;
    }
    match addr {
        // A plain connection to a TLS port is dropped or answered with bytes that are not
        // RESP; never probe after a timeout, which a busy server explains.
        ConnectionAddr::Tcp(host, port) if !e.is_timeout() => {
            let first = first_byte(host, *port, &client_hello(), timeout).await;
            matches!(first, Some(0x15 | 0x16)).then_some(HINT_NEEDS_TLS)
        }
        // A TLS hello to a plain Redis port gets no answer (a timeout) or garbage.
        ConnectionAddr::TcpTls { host, port, .. } => {
            let first = first_byte(host, *port, b"PING\r\n", timeout).await;
            matches!(first, Some(b'+' | b'-')).then_some(HINT_NEEDS_PLAIN)
        }
        _ => None,
    }
}

/// The first byte `host:port` answers to `hello`, within `timeout`.
async fn first_byte(host: &str, port: u16, hello: &[u8], timeout: Duration) -> Option<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.write_all(hello).await?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        Ok::<u8, std::io::Error>(first[0])
    };
    tokio::time::timeout(timeout, probe).await.ok()?.ok()
}

/// A TLS 1.2 ClientHello (one ECDHE-RSA/AES-GCM suite set, P-256): any TLS server answers it
/// with a handshake record (0x16) or an alert (0x15); a Redis server does not.
fn client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x03]; // TLS 1.2
    body.extend([0u8; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x08, 0xc0, 0x2f, 0xc0, 0x30, 0x13, 0x01, 0x00, 0x9c]); // cipher suites
    body.extend([0x01, 0x00]); // no compression
    let extensions: [u8; 22] = [
        0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17, // supported groups: P-256
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // EC point formats: uncompressed
        0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x01, // signatures: RSA PKCS#1 SHA-256
    ];
    body.extend([0x00, 22]);
    body.extend(extensions);
    let len = body.len(); // < 256
    let mut handshake = vec![0x01, 0x00, 0x00, len as u8];
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend(handshake);
    record
}

/// Maps any error that is not specific to one call. Messages never carry the password.
pub(super) fn classify(url: &str, e: &RedisError, secrets: &[String]) -> Error {
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
                "the ACL user may not run this command (NOPERM); it needs FCALL and \
                 FUNCTION LOAD (or EVALSHA and SCRIPT LOAD), PUBLISH and SUBSCRIBE on the \
                 group's keys",
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
pub(super) fn strip_script_suffix(message: &str) -> String {
    match message.find(" script: ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// Masks every secret in a message.
pub(super) fn scrub(message: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(message.to_string(), |m, s| m.replace(s.as_str(), "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_scrubbed() {
        assert_eq!(
            scrub("bad s3cret here", &["s3cret".to_string()]),
            "bad *** here"
        );
    }

    #[test]
    fn only_refusals_of_functions_fall_back() {
        let server = |code: &str, detail: &str| {
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ResponseError),
                "server",
                format!("{code} {detail}"),
            ))
        };
        let refused = [
            server(
                "ERR",
                "unknown command 'fcall', with args beginning with: 'rb_x' '8'",
            ),
            server(
                "ERR",
                "unknown command `FCALL`, with args beginning with: `rb_x`",
            ),
            server(
                "NOPERM",
                "this user has no permissions to run the 'fcall' command",
            ),
        ];
        for e in &refused {
            assert!(refuses_functions(e, false), "{e}");
        }
        let ours = [
            server("NOPERM", "this user has no permissions to run the 'publish' command script: rb_x_register, on @user_function:3."),
            server("NOPERM", "No permissions to access a key"),
            server("ERR", "Function not found"),
        ];
        for e in &ours {
            assert!(!refuses_functions(e, false), "{e}");
        }
        assert!(refuses_functions(
            &server("ERR", "Error compiling function: too many upvalues"),
            true
        ));
    }

    #[test]
    fn script_suffix_is_stripped() {
        assert_eq!(
            strip_script_suffix("meta.buckets bad script: abc, on @user_script:1."),
            "meta.buckets bad"
        );
    }
}
