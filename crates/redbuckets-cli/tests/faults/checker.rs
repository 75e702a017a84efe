//! The external checker: ownership intervals per bucket from every member process's JSON lines,
//! S1 (no two owners at once) and S2 (tokens of a bucket strictly increase) over them, and the
//! holdings the streams describe, for coverage and balance (L1/L2). Pure: lines go in, with the
//! kill times of SIGKILLed processes; nothing here reads a clock or a process.
//!
//! `at_us` is wall-clock Unix µs written by each member (all on one host, so comparable): when
//! ownership began (`acquired`) or ended (`revoked`, `lost` — for `lost` the lease deadline,
//! which may be earlier than the moment the line was written).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// One line of one member process, with the wall-clock time the test read it.
#[derive(Debug, Clone)]
pub struct Line {
    /// Which process wrote it (its index in the harness).
    pub proc: usize,
    /// `recv_us`: Unix µs when the reader thread got the line.
    pub recv_us: u64,
    pub value: Value,
}

impl Line {
    pub fn event(&self) -> &str {
        self.value["event"].as_str().unwrap_or("")
    }

    pub fn bucket(&self) -> Option<u32> {
        self.value["bucket"]
            .as_u64()
            .and_then(|b| u32::try_from(b).ok())
    }

    pub fn token(&self) -> Option<u64> {
        self.value["token"].as_u64()
    }

    pub fn at_us(&self) -> Option<u64> {
        self.value["at_us"].as_u64()
    }
}

/// One ownership of a bucket by one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub proc: usize,
    pub token: u64,
    pub start: u64,
    /// `None` while still owned.
    pub end: Option<u64>,
    /// How it ended: `revoked`, `lost`, `killed` (SIGKILL), or `open`.
    pub how: &'static str,
}

/// A process that was SIGKILLed: whatever it owned, it stopped owning at `dead_us` (taken after
/// the process was reaped, so no later instant can still belong to it).
#[derive(Debug, Clone, Copy)]
pub struct Kill {
    pub proc: usize,
    pub dead_us: u64,
}

/// Ownership intervals per bucket, each list sorted by start. Lines must be in the order each
/// process wrote them (how processes interleave does not matter). An error describes a stream
/// that makes no sense: an acquire of a bucket already owned, an end of one not owned, a token
/// that changes inside one ownership, a line without its fields.
pub fn intervals(lines: &[Line], kills: &[Kill]) -> Result<BTreeMap<u32, Vec<Interval>>, String> {
    let mut open: BTreeMap<(usize, u32), (u64, u64)> = BTreeMap::new();
    let mut out: BTreeMap<u32, Vec<Interval>> = BTreeMap::new();
    for line in lines {
        let kind = line.event();
        if matches!(kind, "joined" | "left") {
            continue;
        }
        let (Some(bucket), Some(token), Some(at)) = (line.bucket(), line.token(), line.at_us())
        else {
            return Err(format!("line without bucket/token/at_us: {}", line.value));
        };
        match kind {
            "acquired" => {
                if let Some((old, _)) = open.insert((line.proc, bucket), (token, at)) {
                    return Err(format!(
                        "process {} acquired bucket {bucket} (token {token}) while it still \
                         owned it (token {old}): {}",
                        line.proc, line.value
                    ));
                }
            }
            "revoked" | "lost" => {
                let Some((held, start)) = open.remove(&(line.proc, bucket)) else {
                    return Err(format!(
                        "process {} ended bucket {bucket} it did not own: {}",
                        line.proc, line.value
                    ));
                };
                if held != token {
                    return Err(format!(
                        "process {} owned bucket {bucket} with token {held} but ended token \
                         {token}: {}",
                        line.proc, line.value
                    ));
                }
                out.entry(bucket).or_default().push(Interval {
                    proc: line.proc,
                    token,
                    start,
                    end: Some(at),
                    how: if kind == "lost" { "lost" } else { "revoked" },
                });
            }
            // A release follows the revoke that ended ownership; it changes nothing here.
            "released" => {}
            other => return Err(format!("unknown event {other:?}: {}", line.value)),
        }
    }
    for ((proc, bucket), (token, start)) in open {
        let killed = kills.iter().find(|k| k.proc == proc);
        out.entry(bucket).or_default().push(Interval {
            proc,
            token,
            start,
            end: killed.map(|k| k.dead_us),
            how: if killed.is_some() { "killed" } else { "open" },
        });
    }
    for list in out.values_mut() {
        list.sort_by_key(|i| (i.start, i.token));
    }
    Ok(out)
}

/// S1 and S2: per bucket, each ownership ends no later than the next one starts, and each grant
/// carries a larger token than the one before. Returns every violation found.
pub fn violations(all: &BTreeMap<u32, Vec<Interval>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (bucket, list) in all {
        for pair in list.windows(2) {
            let (x, y) = (&pair[0], &pair[1]);
            match x.end {
                None => bad.push(format!(
                    "S1 bucket {bucket}: process {} still owned it (token {}, since {}) when \
                     process {} acquired it at {} (token {})",
                    x.proc, x.token, x.start, y.proc, y.start, y.token
                )),
                Some(end) if end > y.start => bad.push(format!(
                    "S1 bucket {bucket}: {x:?} overlaps {y:?} by {} µs",
                    end - y.start
                )),
                Some(_) => {}
            }
            if y.token <= x.token {
                bad.push(format!(
                    "S2 bucket {bucket}: token {} granted after token {}: {x:?} then {y:?}",
                    y.token, x.token
                ));
            }
        }
    }
    bad
}

/// What each process holds after all of `lines` (killed processes hold nothing).
pub fn holdings(lines: &[Line], kills: &[Kill]) -> BTreeMap<usize, BTreeSet<u32>> {
    let mut held: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for line in lines {
        let set = held.entry(line.proc).or_default();
        match (line.event(), line.bucket()) {
            ("acquired", Some(b)) => {
                set.insert(b);
            }
            ("revoked" | "lost", Some(b)) => {
                set.remove(&b);
            }
            _ => {}
        }
    }
    for k in kills {
        held.remove(&k.proc);
    }
    held
}

/// L1 and L2 over the processes `live`: every bucket of `0..buckets` is held by exactly one of
/// them, and each holds ⌊B/n⌋ or ⌈B/n⌉. Others are ignored (a stopped process still believes
/// what it last said). `Err` says what is missing.
pub fn converged(
    held: &BTreeMap<usize, BTreeSet<u32>>,
    live: &[usize],
    buckets: u32,
) -> Result<(), String> {
    let n = u32::try_from(live.len()).expect("few members");
    assert!(n > 0, "no live member");
    let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
    let mut counts = Vec::new();
    for &p in live {
        let set = held.get(&p).cloned().unwrap_or_default();
        counts.push((p, set.len()));
        for b in set {
            if let Some(other) = owner.insert(b, p) {
                return Err(format!("bucket {b} held by both {other} and {p}"));
            }
        }
    }
    let unowned = (0..buckets).filter(|b| !owner.contains_key(b)).count();
    if unowned > 0 {
        return Err(format!("{unowned} buckets unowned; counts {counts:?}"));
    }
    let (lo, hi) = (buckets / n, buckets.div_ceil(n));
    let lo = usize::try_from(lo).expect("fits");
    let hi = usize::try_from(hi).expect("fits");
    if counts.iter().any(|(_, c)| *c < lo || *c > hi) {
        return Err(format!("not balanced ({lo}..={hi}): {counts:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(proc: usize, event: &str, bucket: u32, token: u64, at: u64) -> Line {
        Line {
            proc,
            recv_us: at,
            value: json!({"event": event, "bucket": bucket, "token": token, "at_us": at}),
        }
    }

    #[test]
    fn the_checker_catches_overlaps_stale_tokens_and_imbalance() {
        // Handed over cleanly: no violation.
        let ok = [
            line(0, "acquired", 0, 5, 100),
            line(0, "revoked", 0, 5, 200),
            line(0, "released", 0, 5, 201),
            line(1, "acquired", 0, 6, 200),
        ];
        assert!(violations(&intervals(&ok, &[]).unwrap()).is_empty());
        // Acquired before the other lost it.
        let overlap = [
            line(0, "acquired", 0, 5, 100),
            line(1, "acquired", 0, 6, 150),
            line(0, "lost", 0, 5, 160),
        ];
        let v = violations(&intervals(&overlap, &[]).unwrap());
        assert!(v.len() == 1 && v[0].starts_with("S1"), "{v:?}");
        // Never ended, and a smaller token.
        let stale = [
            line(0, "acquired", 0, 5, 100),
            line(1, "acquired", 0, 4, 150),
        ];
        let v = violations(&intervals(&stale, &[]).unwrap());
        assert_eq!(v.len(), 2, "{v:?}");
        // A kill ends ownership at the kill time.
        let killed = [
            line(0, "acquired", 0, 5, 100),
            line(1, "acquired", 0, 6, 150),
        ];
        let all = intervals(
            &killed,
            &[Kill {
                proc: 0,
                dead_us: 140,
            }],
        )
        .unwrap();
        assert!(violations(&all).is_empty());
        assert_eq!(all[&0][0].how, "killed");
        // Nonsense streams.
        assert!(intervals(&[line(0, "lost", 1, 1, 1)], &[]).is_err());
        assert!(intervals(
            &[line(0, "acquired", 1, 1, 1), line(0, "acquired", 1, 2, 2)],
            &[]
        )
        .is_err());
        // Balance: 3 buckets over 2 processes.
        let held = holdings(
            &[
                line(0, "acquired", 0, 1, 1),
                line(0, "acquired", 1, 1, 1),
                line(1, "acquired", 2, 1, 1),
            ],
            &[],
        );
        assert!(converged(&held, &[0, 1], 3).is_ok());
        assert!(converged(&held, &[0, 1, 2], 3).is_err());
        assert!(converged(&held, &[0, 1], 4).is_err());
    }
}
