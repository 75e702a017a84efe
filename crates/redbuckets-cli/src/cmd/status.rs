//! `redbuckets status`: one read of the group's state (`Store::snapshot`), as text or JSON, and
//! with `--check` an exit code saying whether every bucket is owned and the load is even.

use std::process::ExitCode;

use redbuckets::GroupSnapshot;
use serde_json::json;

use super::read_group;
use crate::analysis::{analyze, Analysis};
use crate::render::fmt_duration;
use crate::StatusArgs;

/// What `status` says of a group whose data another Redis process wrote
/// ([`GroupSnapshot::stale`]).
const STALE: &str = "stale: the group's data was written by another Redis process (a restart \
     that reloaded saved data, or a failover); its owners may be out of date. Nothing was \
     changed: the next registration or rebalance re-creates the group, with its quarantine";

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (_store, key, snapshot) = read_group(&args.group).await?;
    let analysis = analyze(&snapshot);
    if args.json {
        crate::out::println(&to_json(&key.name, &key.prefix, &snapshot, &analysis).to_string())?;
    } else {
        crate::out::print(&to_text(&key.name, &key.prefix, &snapshot, &analysis))?;
    }
    if args.check && (snapshot.stale || !analysis.problems.is_empty()) {
        if snapshot.stale {
            eprintln!("check failed: {STALE}");
        }
        for p in &analysis.problems {
            eprintln!("check failed: {p}");
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(group: &str, prefix: &str, s: &GroupSnapshot, a: &Analysis) -> serde_json::Value {
    json!({
        "group": group,
        "prefix": prefix,
        "buckets": s.buckets,
        "protocol": s.protocol,
        "version": s.version,
        "quarantine_ms": millis(s.quarantine),
        "stale": s.stale,
        "free": a.free,
        "balance": {
            "min": a.min.as_ref().map(|m| m.0),
            "max": a.max.as_ref().map(|m| m.0),
            "equal_weights": a.equal_weights,
        },
        "releasing": a.draining,
        "members": s.members.iter().map(|m| json!({
            "id": m.id,
            "session": m.session,
            "weight": m.weight,
            "held": m.held,
            "committed": m.committed,
            "expires_in_ms": millis(m.expires_in),
            "session_age_ms": millis(m.session_age),
        })).collect::<Vec<_>>(),
        "parked": s.parked.iter().map(|p| json!({
            "id": p.id,
            "weight": p.weight,
            "held": p.held,
            "grace_left_ms": millis(p.until),
        })).collect::<Vec<_>>(),
        "ok": !s.stale && a.problems.is_empty(),
        "problems": a.problems,
    })
}

fn to_text(group: &str, prefix: &str, s: &GroupSnapshot, a: &Analysis) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group {group:?} (prefix {prefix:?}): {} buckets, {} member{}, membership version {}",
        s.buckets,
        s.members.len(),
        if s.members.len() == 1 { "" } else { "s" },
        s.version
    );
    if s.stale {
        let _ = writeln!(out, "{STALE}");
    }
    if !s.quarantine.is_zero() {
        let _ = writeln!(
            out,
            "warming up: the group grants nothing for another {}",
            fmt_duration(s.quarantine)
        );
    }
    let _ = write!(out, "free buckets: {}", a.free);
    if let (Some((lo, _)), Some((hi, _))) = (&a.min, &a.max) {
        let _ = write!(out, "; held per member: min {lo}, max {hi}");
    }
    if a.draining > 0 {
        let _ = write!(out, "; {} being released", a.draining);
    }
    let _ = writeln!(out);
    if !s.members.is_empty() {
        let width = s
            .members
            .iter()
            .map(|m| m.id.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>6}  {:>10}  {:>11}",
            "MEMBER", "WEIGHT", "HELD", "EXPIRES_IN", "SESSION_AGE"
        );
        for m in &s.members {
            let _ = writeln!(
                out,
                "{:<width$}  {:>6}  {:>6}  {:>10}  {:>11}",
                m.id,
                m.weight,
                m.held,
                fmt_duration(m.expires_in),
                fmt_duration(m.session_age)
            );
        }
    }
    if !s.parked.is_empty() {
        let width = s
            .parked
            .iter()
            .map(|p| p.id.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let _ = writeln!(
            out,
            "parked (their buckets wait for the same id to come back):"
        );
        let _ = writeln!(
            out,
            "{:<width$}  {:>6}  {:>6}  {:>10}",
            "MEMBER", "WEIGHT", "HELD", "GRACE_LEFT"
        );
        for p in &s.parked {
            let _ = writeln!(
                out,
                "{:<width$}  {:>6}  {:>6}  {:>10}",
                p.id,
                p.weight,
                p.held,
                fmt_duration(p.until)
            );
        }
    }
    if s.stale {
        // Said above; "ok" would mislead.
    } else if a.problems.is_empty() {
        let _ = writeln!(out, "ok: every bucket is owned and the load is balanced");
    } else {
        for p in &a.problems {
            let _ = writeln!(out, "not converged: {p}");
        }
    }
    out
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
