//! `redbuckets groups`: every group under a prefix (`RedisStore::groups`, a `SCAN`), each read
//! with its snapshot: buckets, live members, free buckets, age, and the time since any of its
//! sessions last renewed, so abandoned groups stand out. Reads only.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use redbuckets::{GroupKey, GroupSnapshot, Store};
use serde_json::{json, Value};

use super::{connect, scrub};
use crate::render::fmt_duration;
use crate::GroupsArgs;

/// One listed group: its snapshot, or why it could not be read (foreign data under its keys).
struct Listed {
    name: String,
    read: Result<Option<GroupSnapshot>, String>,
}

pub async fn run(args: GroupsArgs) -> anyhow::Result<ExitCode> {
    let url = &args.redis;
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| redbuckets::DEFAULT_PREFIX.to_string());
    let store = connect(url, Duration::ZERO).await?;
    let names = store
        .groups(&prefix)
        .await
        .map_err(|e| anyhow!("cannot list the groups: {}", scrub(&e.to_string(), url)))?;
    let mut listed = Vec::with_capacity(names.len());
    for name in names {
        let key = GroupKey::new(prefix.clone(), name.clone());
        let read = store
            .snapshot(&key)
            .await
            .map_err(|e| scrub(&e.to_string(), url));
        listed.push(Listed { name, read });
    }
    if args.json {
        let groups: Vec<Value> = listed.iter().map(to_json).collect();
        println!("{}", json!({ "prefix": prefix, "groups": groups }));
    } else {
        print!("{}", to_text(&prefix, &listed));
    }
    Ok(ExitCode::SUCCESS)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a group's snapshot says of its use: `abandoned` when no session is live (every
/// member left or stopped; the snapshot also calls such a group stale once nobody was seen in it
/// for a ttl, see `GroupSnapshot::stale`), `stale` when live sessions are listed in data not to
/// be trusted, else `live`.
fn state(s: &GroupSnapshot) -> &'static str {
    if s.members.is_empty() {
        "abandoned"
    } else if s.stale {
        "stale"
    } else {
        "live"
    }
}

fn to_json(g: &Listed) -> Value {
    match &g.read {
        Ok(Some(s)) => json!({
            "group": g.name,
            "state": state(s),
            "buckets": s.buckets,
            "members": s.members.len(),
            "free": s.free(),
            "ttl_ms": millis(s.ttl),
            "age_ms": millis(s.age),
            "renewed_ago_ms": s.renewed_ago.map(millis),
            "quarantine_ms": millis(s.quarantine),
        }),
        // Gone between the listing and the read.
        Ok(None) => json!({ "group": g.name, "state": "gone" }),
        Err(e) => json!({ "group": g.name, "state": "unreadable", "error": e }),
    }
}

fn to_text(prefix: &str, listed: &[Listed]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} group{} under prefix {prefix:?}",
        listed.len(),
        if listed.len() == 1 { "" } else { "s" }
    );
    if listed.is_empty() {
        return out;
    }
    let rows: Vec<[String; 7]> = listed
        .iter()
        .map(|g| match &g.read {
            Ok(Some(s)) => [
                g.name.clone(),
                state(s).to_string(),
                s.buckets.to_string(),
                s.members.len().to_string(),
                s.free().to_string(),
                fmt_duration(s.age),
                s.renewed_ago.map_or_else(|| "never".into(), fmt_duration),
            ],
            Ok(None) => [
                g.name.clone(),
                "gone".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
            Err(e) => [
                g.name.clone(),
                format!("unreadable: {e}"),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
        })
        .collect();
    let head = [
        "GROUP",
        "STATE",
        "BUCKETS",
        "MEMBERS",
        "FREE",
        "AGE",
        "RENEWED_AGO",
    ];
    let mut width = head.map(str::len);
    for row in &rows {
        // The state column may hold an error message: it does not set the width.
        for (i, cell) in row.iter().enumerate().filter(|(i, _)| *i != 1) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    width[1] = width[1].max("abandoned".len());
    let mut line = |cells: &[String]| {
        let mut l = format!(
            "{:<w0$}  {:<w1$}",
            cells[0],
            cells[1],
            w0 = width[0],
            w1 = width[1]
        );
        for (i, cell) in cells.iter().enumerate().skip(2) {
            let _ = write!(l, "  {cell:>w$}", w = width[i]);
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&head.map(String::from));
    for row in &rows {
        line(row);
    }
    out
}
