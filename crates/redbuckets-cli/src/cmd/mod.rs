//! One module per subcommand, and what they share: connecting to Redis without ever showing a
//! password, waiting for SIGTERM/Ctrl-C, wall-clock conversions.

pub mod delete;
pub mod demo;
pub mod groups;
pub mod join;
pub mod remove;
pub mod status;
pub mod watch;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _};
use redbuckets::{redact_url, Config, GroupKey, RedisOptions, RedisStore, Store as _};

use crate::GroupArgs;

/// How long connecting may take beyond its retry budget before we give up (the client's own
/// timeout covers one attempt; this bounds everything, DNS included).
const CONNECT_BUDGET: Duration = Duration::from_secs(10);

/// Connects to the Redis at `url`, retrying for `retry` while Redis is not up yet (`join`: its
/// start timeout; the commands that only look: zero, they report at once). Errors name the URL
/// with its password replaced by `***`.
pub async fn connect(url: &str, retry: Duration) -> anyhow::Result<RedisStore> {
    let shown = redact_url(url);
    let options = RedisOptions::default().connect_retry(retry);
    let budget = retry + CONNECT_BUDGET;
    match tokio::time::timeout(budget, RedisStore::connect_with(url, options)).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => {
            let message = scrub(&e.to_string(), url);
            Err(match e {
                // It names the URL and says what is wrong with it.
                redbuckets::Error::Url { .. } => anyhow!("{message}"),
                _ if message.contains(&shown) => anyhow!("cannot connect: {message}"),
                _ => anyhow!("cannot connect to {shown}: {message}"),
            })
        }
        Err(_) => Err(anyhow!(
            "cannot connect to {shown}: no answer within {}",
            crate::render::fmt_duration(budget)
        )),
    }
}

/// Connects to `args`'s Redis without retrying (a command that looks reports at once) and reads
/// its group: the store, the group's key and its snapshot, or an error that names the group
/// and, when it does not exist, why that may be.
pub async fn read_group(
    args: &GroupArgs,
) -> anyhow::Result<(RedisStore, GroupKey, redbuckets::GroupSnapshot)> {
    let key = group_key(args)?;
    let url = &args.redis;
    let store = connect(url, Duration::ZERO).await?;
    let snapshot = store
        .snapshot(&key)
        .await
        .map_err(|e| {
            anyhow!(
                "cannot read group {:?}: {}",
                key.name,
                scrub(&e.to_string(), url)
            )
        })?
        .ok_or_else(|| {
            anyhow!(
                "group {:?} (prefix {:?}) does not exist at {}: no member has joined it, it \
                 was deleted, or its keys expired after its last member left (`redbuckets \
                 groups` lists the groups under a prefix)",
                key.name,
                key.prefix,
                redact_url(url)
            )
        })?;
    Ok((store, key, snapshot))
}

/// The group key from the command line, with the library's default prefix. The name and the
/// prefix are checked as `join` checks them, so every command refuses an empty or bad name
/// with the same words.
pub fn group_key(args: &GroupArgs) -> anyhow::Result<GroupKey> {
    let mut config = Config::new(args.group.clone());
    if let Some(prefix) = &args.prefix {
        config.prefix = prefix.clone();
    }
    config.validate()?;
    Ok(GroupKey::new(config.prefix, args.group.clone()))
}

/// Removes the password of `url` from a message, should any layer below have quoted it: the
/// library's parser, so the CLI and the library agree on where a password ends.
pub fn scrub(message: &str, url: &str) -> String {
    redbuckets::scrub_password(message, url)
}

/// The signals that stop a command: SIGTERM and SIGINT (Ctrl-C), as the library's
/// [`redbuckets::shutdown_signal`], and SIGHUP (the terminal closed), which would otherwise kill
/// a `join` without leaving. Unlike that future it names the signal and sees a second one
/// (`join` stops without releasing on it).
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers. From here on the signals no longer kill the process.
    pub fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
                hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next signal; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.hup.recv() => "SIGHUP",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// Unix time in microseconds.
pub fn unix_us(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::scrub;

    #[test]
    fn scrubs_passwords_from_messages() {
        let url = "redis://user:hunter2@h:1/0";
        assert_eq!(scrub("auth hunter2 failed", url), "auth *** failed");
        assert_eq!(scrub("x", "redis://h:1"), "x");
        assert_eq!(scrub("bad tok3n", "redis://tok3n@h"), "bad ***");
        // A raw '/' in the password (base64), and its percent-encoded form decoded.
        assert_eq!(scrub("x ab/s3cret y", "redis://:ab/s3cret@h:1/"), "x *** y");
        assert_eq!(scrub("x a/b@c y", "redis://u:a%2Fb%40c@h"), "x *** y");
    }
}
