//! URL parsing: the `redis+sentinel://` form (which the redis crate does not read), the raw
//! password (to scrub it from messages), and the reason a URL was refused.

use redis::{IntoConnectionInfo, RedisError};

use super::errors::scrub;

/// What a `redis+sentinel://` URL says.
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

/// The password as written in the URL (before percent-decoding), to scrub it from messages.
pub(super) fn raw_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let password = &userinfo[userinfo.find(':').map_or(0, |i| i + 1)..];
    Some(password.to_string())
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
                format!("unsupported scheme {scheme:?}: use redis:// or rediss://")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn passwords_are_found() {
        assert_eq!(
            raw_password("redis://:s3cret@h:1/0").as_deref(),
            Some("s3cret")
        );
        assert_eq!(raw_password("redis://u:p@ss@h").as_deref(), Some("p@ss"));
        assert_eq!(raw_password("redis://tok@h").as_deref(), Some("tok"));
        assert_eq!(raw_password("redis://h:1"), None);
    }
}
