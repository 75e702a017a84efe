//! URL parsing, the one place that reads a Redis URL by hand (the library and the CLI use it):
//! where the credentials end, so they can be masked ([`redact_url`]) and scrubbed from messages
//! ([`scrub_password`]); checks the redis crate would only answer vaguely (credentials it would
//! misread, a bad port); the `redis+sentinel://` form, which the redis crate does not read; and
//! the reason a URL was refused.
//!
//! The credentials end at the *last* `@` of the URL, whatever they hold: a raw `/`, `?`, `#`,
//! `:` or `@` in a password (common in base64 secrets) would otherwise be read as the start of
//! the path, and the password shown as the host. Masking too much is the safe side: an `@` in a
//! query hides the host in messages, never a password.

use redis::{IntoConnectionInfo, RedisError};

use super::errors::scrub;

/// What a `redis+sentinel://` URL says.
#[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
pub(super) struct SentinelUrl {
    /// `redis://host:port` (or `rediss://`) of each sentinel.
    pub(super) sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub(super) service: String,
    /// Credentials and database for the primary.
    pub(super) node: redis::RedisConnectionInfo,
    pub(super) tls: bool,
}

/// Parses `redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]`
/// (`rediss+sentinel://` for TLS); `Ok(None)` for any other scheme. Credentials are for the
/// primary; the sentinels are reached without them. The sentinel port defaults to 26379.
pub(super) fn parse_sentinel_url(url: &str) -> Result<Option<SentinelUrl>, String> {
    let Some(HostList {
        tls,
        userinfo,
        path,
        urls: sentinels,
    }) = parse_host_list(url, "sentinel", "sentinel", 26379, false)?
    else {
        return Ok(None);
    };
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

/// Parses `redis+cluster://[user:password@]host[:port][,host[:port]...]` (`rediss+cluster://`
/// for TLS) into one `redis://[user:password@]host:port` (or `rediss://`) URL per seed node;
/// `Ok(None)` for any other scheme. The port defaults to 6379. A cluster has one database, so
/// the only path allowed is an empty one, `/` or `/0`.
pub(super) fn parse_cluster_url(url: &str) -> Result<Option<Vec<String>>, String> {
    let Some(HostList { path, urls, .. }) = parse_host_list(url, "cluster", "node", 6379, true)?
    else {
        return Ok(None);
    };
    if !matches!(path, "" | "0") {
        return Err(format!(
            "a Redis Cluster has only database 0: remove {:?} after the node addresses",
            format!("/{path}")
        ));
    }
    Ok(Some(urls))
}

/// A URL naming several servers, `redis+<kind>://[user:password@]host[:port][,host[:port]...][/path]`
/// (`rediss+<kind>://` for TLS), taken apart.
struct HostList<'a> {
    tls: bool,
    /// Everything before the last `@`, raw (not percent-decoded).
    userinfo: Option<&'a str>,
    /// What follows the first `/` after the hosts.
    path: &'a str,
    /// One `redis://host:port` (or `rediss://`) URL per host, the default port filled in, each
    /// checked; with `with_credentials`, the userinfo goes into each.
    urls: Vec<String>,
}

/// Parses a [`HostList`] of scheme `redis+<kind>` or `rediss+<kind>`; `Ok(None)` for any other
/// scheme. `what` names one host in errors ("a sentinel address is empty").
fn parse_host_list<'a>(
    url: &'a str,
    kind: &str,
    what: &str,
    default_port: u16,
    with_credentials: bool,
) -> Result<Option<HostList<'a>>, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix(&format!("redis+{kind}://")) {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix(&format!("rediss+{kind}://")) {
        (true, rest)
    } else {
        return Ok(None);
    };
    // Credentials (up to the last '@') without a raw '/', '?' or '#', and good ports.
    check_url(url)?;
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    if rest.contains(['?', '#']) {
        return Err(format!(
            "query parameters and fragments are not supported in a {kind} URL"
        ));
    }
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let scheme = if tls { "rediss" } else { "redis" };
    let credentials = match userinfo {
        Some(u) if with_credentials => format!("{u}@"),
        _ => String::new(),
    };
    let mut urls = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(format!(
                "a {what} address is empty (expected host[:port],...)"
            ));
        }
        let has_port = if host.starts_with('[') {
            host.contains("]:")
        } else {
            host.contains(':')
        };
        let port = if has_port {
            String::new()
        } else {
            format!(":{default_port}")
        };
        let one = format!("{scheme}://{credentials}{host}{port}");
        one.as_str()
            .into_connection_info()
            .map_err(|e| format!("bad {what} address {host:?}: {e}"))?;
        urls.push(one);
    }
    Ok(Some(HostList {
        tls,
        userinfo,
        path,
        urls,
    }))
}

/// Splits `url` at the end of its credentials: `(scheme, userinfo, rest)`, the userinfo being
/// everything between `://` and the last `@` (raw, not percent-decoded). `None` without `://`.
fn split(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let scheme_end = url.find("://")?;
    let scheme = &url[..scheme_end];
    let rest = &url[scheme_end + 3..];
    Some(match rest.rfind('@') {
        Some(at) => (scheme, Some(&rest[..at]), &rest[at + 1..]),
        None => (scheme, None, rest),
    })
}

/// The password as written in the URL (before percent-decoding): after the first `:` of the
/// credentials, or all of them when there is no `:` (`redis://token@host`).
pub(super) fn raw_password(url: &str) -> Option<&str> {
    let (_, userinfo, _) = split(url)?;
    let userinfo = userinfo?;
    Some(userinfo.split_once(':').map_or(userinfo, |(_, pw)| pw))
}

/// Replaces the credentials of a Redis URL by `***` (keeping the user name), so the URL can be
/// shown: everything from the scheme to the last `@` before the host, whatever the password
/// holds. Works for every form: `redis://`, `rediss://`, `redis+sentinel://`,
/// `rediss+sentinel://`, `redis+cluster://`, `rediss+cluster://` (and any `scheme://user:password@hosts...`). Without `://`, everything
/// before the last `@` is masked.
///
/// ```
/// assert_eq!(
///     redbuckets::redact_url("redis://app:ab/s3cret@10.0.0.1:6379/0"),
///     "redis://app:***@10.0.0.1:6379/0"
/// );
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    match split(url) {
        None => match url.rfind('@') {
            Some(at) => format!("***@{}", &url[at + 1..]),
            None => url.to_string(),
        },
        Some((_, None, _)) => url.to_string(),
        Some((scheme, Some(userinfo), rest)) => {
            let masked = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            format!("{scheme}://{masked}@{rest}")
        }
    }
}

/// Replaces the password of `url` in `message` by `***`, as written in the URL and
/// percent-decoded, should any layer have quoted it. For messages about a URL that come from
/// elsewhere (the CLI passes every error through it).
#[must_use]
pub fn scrub_password(message: &str, url: &str) -> String {
    scrub(message, &password_secrets(url))
}

/// The password of `url` as written and percent-decoded (what the redis crate uses), without
/// empty ones: every form of it an error message might quote.
pub(super) fn password_secrets(url: &str) -> Vec<String> {
    let Some(raw) = raw_password(url) else {
        return Vec::new();
    };
    let mut secrets = vec![raw.to_string()];
    secrets.extend(percent_decode(raw).filter(|d| d != raw));
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `%XX` sequences decoded; `None` when that is not UTF-8 (the redis crate refuses such a URL).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Checks what the redis crate would refuse with a vague message, or misread: credentials that
/// hold a raw `/`, `?` or `#` (the crate would take them for the path and the password for the
/// host), and a port that is not a number in 1..=65535. Unix-socket URLs are left to the crate.
pub(super) fn check_url(url: &str) -> Result<(), String> {
    let Some((scheme, userinfo, rest)) = split(url) else {
        return Ok(());
    };
    if scheme.ends_with("unix") {
        return Ok(());
    }
    // Every such character at once, so a password is fixed in one try.
    let mut bad: Vec<char> = userinfo
        .map(|u| u.chars().filter(|c| matches!(c, '/' | '?' | '#')).collect())
        .unwrap_or_default();
    bad.sort_unstable();
    bad.dedup();
    if !bad.is_empty() {
        let list = |parts: Vec<String>| match &parts[..] {
            [one] => one.clone(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
            [] => String::new(),
        };
        let chars = list(bad.iter().map(|c| format!("{c:?}")).collect());
        let codes = list(
            bad.iter()
                .map(|c| format!("%{:02X}", u32::from(*c)))
                .collect(),
        );
        let it = if bad.len() == 1 { "it" } else { "them" };
        return Err(format!(
            "the credentials contain {chars}: percent-encode {it} as {codes}"
        ));
    }
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    for host in rest[..host_end].split(',') {
        check_port(host)?;
    }
    Ok(())
}

/// `host[:port]` or `[v6][:port]`: the port, when given, is a number in 1..=65535.
fn check_port(host: &str) -> Result<(), String> {
    let port = if host.starts_with('[') {
        host.split_once("]:").map(|(_, p)| p)
    } else {
        host.rsplit_once(':').map(|(_, p)| p)
    };
    match port {
        None => Ok(()),
        Some(p) if p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        Some(p) => Err(format!(
            "bad port {:?}: expected a number in 1..=65535",
            p.chars().take(20).collect::<String>()
        )),
    }
}

pub(super) fn url_reason(url: &str, e: &RedisError, secrets: &[String]) -> String {
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
                format!(
                    "unsupported scheme {scheme:?}: use redis://, rediss://, \
                     redis+sentinel:// or redis+cluster://"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every URL form, with user names and passwords holding each character that could be read
    /// as the end of the credentials.
    #[test]
    fn redact_url_masks_every_password() {
        let passwords = [
            "s3cret",
            "ab/s3cret",
            "a#b",
            "a?b",
            "a@b",
            "a:b",
            "/@:?#",
            "a%2Fb",
            "ab/c@d:e",
        ];
        let forms = [
            ("redis", "127.0.0.1:6379/0"),
            ("rediss", "h:6380"),
            ("redis+sentinel", "s1:26379,s2/mymaster/1"),
            ("rediss+sentinel", "[::1]:5000/svc"),
            ("redis+cluster", "10.0.0.1:7000,10.0.0.2:7001"),
            ("rediss+cluster", "[::1]:7000"),
        ];
        for (scheme, hosts) in forms {
            for pw in passwords {
                for (user, shown_user) in [("", ""), ("app", "app"), ("a/b@c", "a/b@c")] {
                    let url = format!("{scheme}://{user}:{pw}@{hosts}");
                    let want = format!("{scheme}://{shown_user}:***@{hosts}");
                    let got = redact_url(&url);
                    assert_eq!(got, want, "{url}");
                    assert_eq!(raw_password(&url), Some(pw), "{url}");
                    assert_eq!(scrub_password(&format!("e {pw} e"), &url), "e *** e");
                }
                // A token without a user name (with a ':' it reads as user:password).
                if !pw.contains(':') {
                    let url = format!("{scheme}://{pw}@{hosts}");
                    assert_eq!(redact_url(&url), format!("{scheme}://***@{hosts}"), "{url}");
                    assert_eq!(scrub_password(&format!("e {pw} e"), &url), "e *** e");
                }
            }
            let url = format!("{scheme}://{hosts}");
            assert_eq!(redact_url(&url), url);
            assert_eq!(raw_password(&url), None);
        }
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("h:pw@host"), "***@host");
        assert_eq!(scrub_password("no p@ss", "redis://u:p%40ss@h"), "no ***");
    }

    #[test]
    fn check_url_names_the_problem() {
        for good in [
            "redis://h",
            "redis://:p%2F@h:6379/0",
            "rediss://u:p@[::1]:6380",
            "redis+unix:///tmp/r.sock",
            "redis://h:1/0?protocol=resp3",
        ] {
            assert_eq!(check_url(good), Ok(()), "{good}");
        }
        for (bad, needle) in [
            (
                "redis://:ab/s3cret@127.0.0.1:6379/",
                "contain '/': percent-encode it as %2F",
            ),
            ("redis://:a#b@h", "contain '#': percent-encode it as %23"),
            ("redis://u:a?b@h", "contain '?': percent-encode it as %3F"),
            (
                "redis://:a/b?c#d/e@h",
                "contain '#', '/' and '?': percent-encode them as %23, %2F and %3F",
            ),
            ("redis://h:notaport", "bad port \"notaport\""),
            ("redis://:pw@127.0.0.1:99999/0", "bad port \"99999\""),
            ("redis://h:0", "bad port \"0\""),
            ("redis://h:", "bad port \"\""),
            ("redis://[::1]:x", "bad port \"x\""),
        ] {
            match check_url(bad) {
                Err(reason) => {
                    assert!(reason.contains(needle), "{bad}: {reason}");
                    assert!(!reason.contains("s3cret"), "{reason}");
                }
                Ok(()) => panic!("{bad} passed"),
            }
        }
    }

    // rediss:// among them: the redis crate parses those only with TLS.
    #[cfg(feature = "tls")]
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
            ("redis+sentinel://h:notaport/m", "bad port \"notaport\""),
            ("redis+sentinel://h:1,h:99999/m", "bad port \"99999\""),
            ("redis+sentinel://u:p#w@h/m", "percent-encode it as %23"),
            ("redis+sentinel://u:pa/ss@h/m", "percent-encode"),
        ] {
            match parse_sentinel_url(bad) {
                Err(reason) => assert!(reason.contains(needle), "{bad}: {reason}"),
                Ok(_) => panic!("{bad} parsed"),
            }
        }
    }

    // rediss:// among them: the redis crate parses those only with TLS.
    #[cfg(feature = "tls")]
    #[test]
    fn cluster_urls_parse() {
        let nodes = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1,h2:7001/")
            .unwrap()
            .unwrap();
        assert_eq!(
            nodes,
            ["redis://u:p%40ss@10.0.0.1:6379", "redis://u:p%40ss@h2:7001"]
        );
        let nodes = parse_cluster_url("rediss+cluster://[::1]:7000/0")
            .unwrap()
            .unwrap();
        assert_eq!(nodes, ["rediss://[::1]:7000"]);
        assert!(parse_cluster_url("redis://h:1").unwrap().is_none());
        assert!(parse_cluster_url("redis+sentinel://h:1/m")
            .unwrap()
            .is_none());
        for (bad, needle) in [
            ("redis+cluster://h:1,,h:2", "empty"),
            ("redis+cluster://", "empty"),
            ("redis+cluster://h:1/3", "only database 0"),
            ("redis+cluster://h:1?x=1", "not supported"),
            ("redis+cluster://h:notaport", "bad port \"notaport\""),
            ("redis+cluster://h:1,h:99999", "bad port \"99999\""),
            ("redis+cluster://u:p#w@h", "percent-encode it as %23"),
            ("rediss+cluster://u:pa/ss@h", "percent-encode"),
        ] {
            match parse_cluster_url(bad) {
                Err(reason) => {
                    assert!(reason.contains(needle), "{bad}: {reason}");
                    assert!(!reason.contains("pa/ss"), "{reason}");
                }
                Ok(_) => panic!("{bad} parsed"),
            }
        }
    }

    #[test]
    fn passwords_are_found() {
        assert_eq!(raw_password("redis://:s3cret@h:1/0"), Some("s3cret"));
        assert_eq!(raw_password("redis://u:p@ss@h"), Some("p@ss"));
        assert_eq!(raw_password("redis://tok@h"), Some("tok"));
        assert_eq!(raw_password("redis://h:1"), None);
    }
}
