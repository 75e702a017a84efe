//! An external checker over the event streams of every member of a group (the demo collects
//! them): S1 (no bucket has two owners at once), S2 (each grant of a bucket carries a larger
//! token than the grant before), and how long buckets stayed unowned. Pure: events go in, with
//! their instants; nothing here reads a clock.

use std::collections::BTreeMap;
use std::time::Duration;

use redbuckets::Event;
use tokio::time::Instant;

/// One ownership: `member` held `bucket` with `token` from `start` until `end` (`None`: still).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub member: String,
    pub token: u64,
    pub start: Instant,
    pub end: Option<Instant>,
}

fn close(
    out: &mut BTreeMap<u32, Vec<Interval>>,
    member: &str,
    bucket: u32,
    (token, start): (u64, Instant),
    end: Instant,
) {
    out.entry(bucket).or_default().push(Interval {
        member: member.to_string(),
        token,
        start,
        end: Some(end),
    });
}

/// Every event of every member. Each member's events must be in the order it emitted them;
/// how different members' events interleave does not matter (their instants do).
#[derive(Debug, Default)]
pub struct Timeline {
    events: Vec<(String, Event)>,
    /// Members that stopped without telling anyone (`Member::abort`), and when.
    crashes: BTreeMap<String, Instant>,
}

impl Timeline {
    /// Records one event of `member`.
    pub fn push(&mut self, member: &str, event: Event) {
        self.events.push((member.to_string(), event));
    }

    /// Records that `member` crashed at `at`: whatever it owned, it stopped owning then, even if
    /// its last events are recorded later.
    pub fn crash(&mut self, member: &str, at: Instant) {
        self.crashes.insert(member.to_string(), at);
    }

    /// Number of events recorded.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Ownership intervals per bucket, and anything that makes no sense as a stream (a member
    /// acquiring a bucket it already owns).
    pub fn intervals(&self) -> (BTreeMap<u32, Vec<Interval>>, Vec<String>) {
        let mut open: BTreeMap<(String, u32), (u64, Instant)> = BTreeMap::new();
        let mut out: BTreeMap<u32, Vec<Interval>> = BTreeMap::new();
        let mut odd = Vec::new();
        for (member, event) in &self.events {
            let crashed = self.crashes.get(member).copied();
            match event {
                Event::Acquired { bucket, token, at } => {
                    if crashed.is_some_and(|c| *at > c) {
                        odd.push(format!(
                            "{member} acquired bucket {bucket} (token {token}) after it crashed"
                        ));
                    }
                    if let Some(prev) = open.insert((member.clone(), *bucket), (*token, *at)) {
                        odd.push(format!(
                            "{member} acquired bucket {bucket} (token {token}) while it still \
                             owned it (token {})",
                            prev.0
                        ));
                        close(&mut out, member, *bucket, prev, *at);
                    }
                }
                Event::Revoked { bucket, at, .. } | Event::Lost { bucket, at, .. } => {
                    if let Some(prev) = open.remove(&(member.clone(), *bucket)) {
                        let end = crashed.map_or(*at, |c| c.min(*at));
                        close(&mut out, member, *bucket, prev, end);
                    }
                }
                // Released follows Revoked: ownership already ended there.
                _ => {}
            }
        }
        for ((member, bucket), (token, start)) in open {
            let end = self.crashes.get(&member).map(|c| (*c).max(start));
            out.entry(bucket).or_default().push(Interval {
                member,
                token,
                start,
                end,
            });
        }
        (out, odd)
    }

    /// Every violation of S1 (two owners at once) and S2 (tokens not increasing), as text.
    /// Empty means safe.
    pub fn violations(&self) -> Vec<String> {
        let (intervals, mut found) = self.intervals();
        for (bucket, mut list) in intervals {
            list.sort_by_key(|i| (i.start, i.token));
            for pair in list.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if b.token <= a.token {
                    found.push(format!(
                        "bucket {bucket}: {} got token {} after {} had token {}",
                        b.member, b.token, a.member, a.token
                    ));
                }
                match a.end {
                    None => found.push(format!(
                        "bucket {bucket}: {} acquired it while {} still owned it",
                        b.member, a.member
                    )),
                    Some(end) if end > b.start => found.push(format!(
                        "bucket {bucket}: {} owned it until {:?} after {} acquired it",
                        a.member,
                        end - b.start,
                        b.member
                    )),
                    Some(_) => {}
                }
            }
        }
        found
    }

    /// Grants seen in `[from, to]`.
    pub fn acquisitions(&self, from: Instant, to: Instant) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Acquired { at, .. } if *at >= from && *at <= to))
            .count()
    }

    /// Total time buckets `0..buckets` spent without an owner during `[from, to]` (bucket-time:
    /// two buckets unowned for one second count two seconds), and the longest single gap.
    pub fn unowned(&self, buckets: u32, from: Instant, to: Instant) -> (Duration, Duration) {
        if to <= from {
            return (Duration::ZERO, Duration::ZERO);
        }
        let (intervals, _) = self.intervals();
        let mut total = Duration::ZERO;
        let mut longest = Duration::ZERO;
        for bucket in 0..buckets {
            let mut owned: Vec<(Instant, Instant)> = intervals
                .get(&bucket)
                .into_iter()
                .flatten()
                .map(|i| (i.start.max(from), i.end.unwrap_or(to).min(to)))
                .filter(|(s, e)| s < e)
                .collect();
            owned.sort();
            let mut cursor = from;
            for (start, end) in owned {
                if start > cursor {
                    total += start - cursor;
                    longest = longest.max(start - cursor);
                }
                cursor = cursor.max(end);
            }
            if to > cursor {
                total += to - cursor;
                longest = longest.max(to - cursor);
            }
        }
        (total, longest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redbuckets::LostReason;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    fn acquired(bucket: u32, token: u64, at: Instant) -> Event {
        Event::Acquired { bucket, token, at }
    }

    fn revoked(bucket: u32, token: u64, at: Instant) -> Event {
        Event::Revoked { bucket, token, at }
    }

    #[test]
    fn a_clean_handover_is_safe_and_counts_its_gap() {
        let t = Instant::now();
        let mut tl = Timeline::default();
        tl.push("a", acquired(0, 10, ms(t, 0)));
        tl.push("a", revoked(0, 10, ms(t, 100)));
        tl.push(
            "a",
            Event::Released {
                bucket: 0,
                token: 10,
                at: ms(t, 105),
            },
        );
        tl.push("b", acquired(0, 11, ms(t, 110)));
        assert!(tl.violations().is_empty(), "{:?}", tl.violations());
        assert_eq!(tl.acquisitions(ms(t, 50), ms(t, 200)), 1);
        // Bucket 0 is unowned 100..110; bucket 1 is never owned in 0..200.
        let (total, longest) = tl.unowned(2, t, ms(t, 200));
        assert_eq!(total, Duration::from_millis(210));
        assert_eq!(longest, Duration::from_millis(200));
    }

    #[test]
    fn overlap_and_stale_tokens_are_reported() {
        let t = Instant::now();
        let mut tl = Timeline::default();
        tl.push("a", acquired(3, 10, ms(t, 0)));
        tl.push("b", acquired(3, 9, ms(t, 50)));
        let v = tl.violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("token 9 after a had token 10"), "{v:?}");
        assert!(v[1].contains("while a still owned it"), "{v:?}");

        let mut tl = Timeline::default();
        tl.push("a", acquired(3, 10, ms(t, 0)));
        tl.push("b", acquired(3, 11, ms(t, 50)));
        tl.push("a", revoked(3, 10, ms(t, 60)));
        let v = tl.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("a owned it until 10ms after b acquired it"),
            "{v:?}"
        );
    }

    #[test]
    fn a_crash_ends_ownership_and_lost_too() {
        let t = Instant::now();
        let mut tl = Timeline::default();
        tl.push("a", acquired(0, 1, ms(t, 0)));
        tl.push("a", acquired(1, 1, ms(t, 0)));
        tl.crash("a", ms(t, 100));
        // Recorded after the crash, emitted before it.
        tl.push("c", acquired(2, 1, ms(t, 0)));
        tl.push(
            "c",
            Event::Lost {
                bucket: 2,
                token: 1,
                reason: LostReason::Deadline,
                at: ms(t, 100),
            },
        );
        tl.push("b", acquired(0, 2, ms(t, 1100)));
        tl.push("b", acquired(1, 2, ms(t, 1100)));
        tl.push("b", acquired(2, 2, ms(t, 1100)));
        assert!(tl.violations().is_empty(), "{:?}", tl.violations());
        let (total, longest) = tl.unowned(3, t, ms(t, 1100));
        assert_eq!(total, Duration::from_millis(3000));
        assert_eq!(longest, Duration::from_millis(1000));
    }

    #[test]
    fn a_crashed_member_acquires_nothing() {
        let t = Instant::now();
        let mut tl = Timeline::default();
        tl.crash("a", ms(t, 100));
        tl.push("a", acquired(0, 1, ms(t, 150)));
        let v = tl.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("after it crashed"), "{v:?}");
    }

    #[test]
    fn acquiring_twice_is_odd() {
        let t = Instant::now();
        let mut tl = Timeline::default();
        tl.push("a", acquired(0, 1, ms(t, 0)));
        tl.push("a", acquired(0, 2, ms(t, 10)));
        let v = tl.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("while it still owned it"), "{v:?}");
    }
}
