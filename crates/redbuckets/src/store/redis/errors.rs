//! Error mapping: what a redis crate error means for a store call or the first connection,
//! with every secret scrubbed from the message.

use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::RedisStore;
use crate::error::Error;
use crate::store::GroupKey;

impl RedisStore {
    /// Maps an error of a store call. Expected server replies of our own scripts come first.
    pub(super) fn call_error(&self, group: &GroupKey, call: &'static str, e: &RedisError) -> Error {
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
pub(super) fn connect_error(url: &str, e: &RedisError, secrets: &[String]) -> Error {
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
    fn script_suffix_is_stripped() {
        assert_eq!(
            strip_script_suffix("meta.buckets bad script: abc, on @user_script:1."),
            "meta.buckets bad"
        );
    }
}
