//! An external checker of the safety guarantees over what members reported: S1 (no bucket has
//! two owners at once) and S2 (each grant of a bucket carries a larger token than the grant
//! before it), plus what the streams say each member holds and how long buckets went unowned.
//!
//! It is the one checker of the project: the CLI's `demo` runs it over its members' [`Event`]s,
//! and the tests run it over events, over simulated runs and over the JSON lines of member
//! processes. It is pure: changes go in with their instants (any [`Moment`]: tokio's `Instant`,
//! or the time since the Unix epoch for lines written by other processes); nothing here reads a
//! clock.
//!
//! ```
//! use std::time::Duration;
//! use redbuckets::check::{Change, Timeline};
//!
//! let ms = Duration::from_millis;
//! let mut timeline = Timeline::new();
//! timeline.record("a", Change::Acquired, 7, 1, ms(0));
//! timeline.record("a", Change::Revoked, 7, 1, ms(100));
//! timeline.record("b", Change::Acquired, 7, 2, ms(100));
//! assert!(timeline.violations().is_empty());
//!
//! // c is granted bucket 7 while b still owns it, and with a token that did not grow.
//! timeline.record("c", Change::Acquired, 7, 2, ms(150));
//! assert_eq!(timeline.violations().len(), 2);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::Event;

/// A point in time the checker can order and measure.
pub trait Moment: Copy + Ord + fmt::Debug {
    /// How long after `earlier` this is (zero if it is not after).
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

impl Moment for std::time::Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// Time since a fixed origin, e.g. the Unix epoch of lines that several processes on one host
/// wrote.
impl Moment for Duration {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_sub(earlier)
    }
}

/// One change of ownership a member reported, as the checker reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Ownership began (a grant).
    Acquired,
    /// Ownership ended by giving the bucket up.
    Revoked,
    /// Ownership ended without a release (`at`: when the lease stopped being valid).
    Lost,
    /// The store freed the bucket; ownership had already ended at the revoke.
    Released,
}

/// How an ownership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The member revoked it.
    Revoked,
    /// The member lost it.
    Lost,
    /// The member crashed while it owned it (see [`Timeline::crash`]).
    Crashed,
    /// Not yet: still owned at the end of the timeline.
    Open,
}

/// One ownership: `member` held a bucket with `token` from `start` until `end` (`None`: still).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval<T> {
    /// Who owned the bucket.
    pub member: String,
    /// The grant's fencing token.
    pub token: u64,
    /// When ownership began.
    pub start: T,
    /// When it ended, if it did.
    pub end: Option<T>,
    /// How it ended.
    pub ending: Ending,
    /// When the store confirmed the release, for an ownership that ended with one.
    pub released: Option<T>,
}

#[derive(Debug, Clone)]
struct Record<T> {
    member: String,
    change: Change,
    bucket: u32,
    token: u64,
    at: T,
}

/// Every change of every member. Each member's changes must be recorded in the order it reported
/// them; how different members' changes interleave does not matter (their instants do).
#[derive(Debug, Clone)]
pub struct Timeline<T = Instant> {
    records: Vec<Record<T>>,
    /// Members that stopped without telling anyone (a crash, an abort), and when.
    crashes: BTreeMap<String, T>,
    complete: bool,
}

impl<T: Moment> Default for Timeline<T> {
    fn default() -> Self {
        Timeline::new()
    }
}

impl<T: Moment> Timeline<T> {
    /// An empty timeline that takes each member's stream as possibly joined late: an end or a
    /// release of a bucket it was not seen to acquire is skipped.
    #[must_use]
    pub fn new() -> Self {
        Timeline {
            records: Vec::new(),
            crashes: BTreeMap::new(),
            complete: false,
        }
    }

    /// Every member's stream is recorded from its start: an end or a release of a bucket the
    /// member was not seen to own, or of another token than the one it owned, is a violation.
    #[must_use]
    pub fn complete_streams(mut self) -> Self {
        self.complete = true;
        self
    }

    /// Records one change of `member`.
    pub fn record(&mut self, member: &str, change: Change, bucket: u32, token: u64, at: T) {
        self.records.push(Record {
            member: member.to_string(),
            change,
            bucket,
            token,
            at,
        });
    }

    /// Records that `member` crashed at `at`: whatever it owned, it stopped owning then, even if
    /// its last changes are recorded later; a grant after `at` is a violation.
    pub fn crash(&mut self, member: &str, at: T) {
        self.crashes.insert(member.to_string(), at);
    }

    /// Number of changes recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Nothing recorded yet?
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Ownership intervals per bucket, each list sorted by start, and anything that makes no
    /// sense as a stream (a member acquiring a bucket it already owns, acquiring after its
    /// crash; with [`Timeline::complete_streams`], ending what it did not own).
    #[must_use]
    pub fn intervals(&self) -> (BTreeMap<u32, Vec<Interval<T>>>, Vec<String>) {
        let mut open: BTreeMap<(&str, u32), (u64, T)> = BTreeMap::new();
        let mut out: BTreeMap<u32, Vec<Interval<T>>> = BTreeMap::new();
        // Per (member, bucket): the index in `out[bucket]` of its last ended ownership, which a
        // release completes.
        let mut last_ended: BTreeMap<(&str, u32), usize> = BTreeMap::new();
        let mut odd = Vec::new();
        for r in &self.records {
            let member = r.member.as_str();
            let key = (member, r.bucket);
            let (bucket, token) = (r.bucket, r.token);
            let crashed = self.crashes.get(member).copied();
            match r.change {
                Change::Acquired => {
                    if crashed.is_some_and(|c| r.at > c) {
                        odd.push(format!(
                            "{member} acquired bucket {bucket} (token {token}) after it crashed"
                        ));
                    }
                    if let Some((held, start)) = open.insert(key, (token, r.at)) {
                        odd.push(format!(
                            "{member} acquired bucket {bucket} (token {token}) while it still \
                             owned it (token {held})"
                        ));
                        let list = out.entry(bucket).or_default();
                        list.push(ended(member, held, start, r.at, Ending::Revoked));
                    }
                }
                Change::Revoked | Change::Lost => {
                    let Some((held, start)) = open.remove(&key) else {
                        // A revoked bucket whose release the store did not confirm ends with
                        // `Lost` (the store frees it with the session): like `Released`, it
                        // follows the revoke of the same grant.
                        let after_revoke = r.change == Change::Lost
                            && last_ended
                                .get(&key)
                                .and_then(|&i| out.get(&bucket).and_then(|l| l.get(i)))
                                .is_some_and(|i| {
                                    i.token == token
                                        && i.ending == Ending::Revoked
                                        && i.released.is_none()
                                });
                        if self.complete && !after_revoke {
                            odd.push(format!(
                                "{member} ended bucket {bucket} (token {token}) it did not own"
                            ));
                        }
                        continue;
                    };
                    if held != token {
                        odd.push(format!(
                            "{member} owned bucket {bucket} with token {held} but ended token \
                             {token}"
                        ));
                    }
                    let (end, ending) = match crashed {
                        Some(c) if c < r.at => (c, Ending::Crashed),
                        _ if r.change == Change::Lost => (r.at, Ending::Lost),
                        _ => (r.at, Ending::Revoked),
                    };
                    let list = out.entry(bucket).or_default();
                    last_ended.insert(key, list.len());
                    list.push(ended(member, held, start, end, ending));
                }
                Change::Released => {
                    let interval = last_ended
                        .get(&key)
                        .and_then(|&i| out.get_mut(&bucket).and_then(|l| l.get_mut(i)))
                        .filter(|i| i.token == token && i.released.is_none());
                    match interval {
                        Some(interval) => interval.released = Some(r.at),
                        None if self.complete => odd.push(format!(
                            "{member} released bucket {bucket} (token {token}) without having \
                             given it up"
                        )),
                        None => {}
                    }
                }
            }
        }
        for ((member, bucket), (token, start)) in open {
            let crashed = self.crashes.get(member).map(|c| (*c).max(start));
            out.entry(bucket).or_default().push(Interval {
                member: member.to_string(),
                token,
                start,
                end: crashed,
                ending: if crashed.is_some() {
                    Ending::Crashed
                } else {
                    Ending::Open
                },
                released: None,
            });
        }
        for list in out.values_mut() {
            list.sort_by_key(|i| (i.start, i.token));
        }
        (out, odd)
    }

    /// Every violation of S1 (two owners at once) and S2 (a grant's token not larger than the
    /// grant before), and every stream that makes no sense, as text. Empty means safe.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        let (intervals, mut found) = self.intervals();
        for (bucket, list) in intervals {
            for pair in list.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if b.token <= a.token {
                    found.push(format!(
                        "S2 bucket {bucket}: {} got token {} after {} had token {}",
                        b.member, b.token, a.member, a.token
                    ));
                }
                match a.end {
                    None => found.push(format!(
                        "S1 bucket {bucket}: {} acquired it (token {}) while {} still owned it \
                         (token {})",
                        b.member, b.token, a.member, a.token
                    )),
                    Some(end) if end > b.start => found.push(format!(
                        "S1 bucket {bucket}: {} owned it until {:?} after {} acquired it",
                        a.member,
                        end.since(b.start),
                        b.member
                    )),
                    Some(_) => {}
                }
            }
        }
        found
    }

    /// What each member holds after everything recorded; crashed members hold nothing.
    #[must_use]
    pub fn holdings(&self) -> BTreeMap<String, BTreeSet<u32>> {
        let mut held: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for r in &self.records {
            let set = held.entry(r.member.clone()).or_default();
            match r.change {
                Change::Acquired => {
                    set.insert(r.bucket);
                }
                Change::Revoked | Change::Lost => {
                    set.remove(&r.bucket);
                }
                Change::Released => {}
            }
        }
        held.retain(|member, _| !self.crashes.contains_key(member));
        held
    }

    /// Grants recorded in `[from, to]`.
    #[must_use]
    pub fn acquisitions(&self, from: T, to: T) -> usize {
        self.records
            .iter()
            .filter(|r| r.change == Change::Acquired && r.at >= from && r.at <= to)
            .count()
    }

    /// Total time buckets `0..buckets` spent without an owner during `[from, to]` (bucket-time:
    /// two buckets unowned for one second count two seconds), and the longest single gap.
    #[must_use]
    pub fn unowned(&self, buckets: u32, from: T, to: T) -> (Duration, Duration) {
        if to <= from {
            return (Duration::ZERO, Duration::ZERO);
        }
        let (intervals, _) = self.intervals();
        let mut total = Duration::ZERO;
        let mut longest = Duration::ZERO;
        let mut gap = |start: T, end: T| {
            let d = end.since(start);
            total += d;
            longest = longest.max(d);
        };
        for bucket in 0..buckets {
            let mut owned: Vec<(T, T)> = intervals
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
                    gap(cursor, start);
                }
                cursor = cursor.max(end);
            }
            if to > cursor {
                gap(cursor, to);
            }
        }
        (total, longest)
    }
}

impl Timeline<Instant> {
    /// Records one event of `member`.
    pub fn push(&mut self, member: &str, event: &Event) {
        let change = match event {
            Event::Acquired { .. } => Change::Acquired,
            Event::Revoked { .. } => Change::Revoked,
            Event::Released { .. } => Change::Released,
            Event::Lost { .. } => Change::Lost,
            // Not a change of ownership: events were dropped, so the stream is incomplete;
            // reporting that is the caller's (the test support panics, the demo counts it).
            Event::Lagged { .. } => return,
        };
        let (Some(bucket), Some(token)) = (event.bucket(), event.token()) else {
            return;
        };
        self.record(member, change, bucket, token, event.at());
    }
}

fn ended<T>(member: &str, token: u64, start: T, end: T, ending: Ending) -> Interval<T> {
    Interval {
        member: member.to_string(),
        token,
        start,
        end: Some(end),
        ending,
        released: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timeline(changes: &[(&str, Change, u32, u64, u64)]) -> Timeline<Duration> {
        let mut tl = Timeline::new();
        for &(member, change, bucket, token, at) in changes {
            tl.record(member, change, bucket, token, ms(at));
        }
        tl
    }

    use Change::{Acquired, Lost, Released, Revoked};

    #[test]
    fn a_clean_handover_is_safe_and_counts_its_gap() {
        let tl = timeline(&[
            ("a", Acquired, 0, 10, 0),
            ("a", Revoked, 0, 10, 100),
            ("a", Released, 0, 10, 105),
            ("b", Acquired, 0, 11, 110),
        ]);
        assert!(tl.violations().is_empty(), "{:?}", tl.violations());
        assert_eq!(tl.acquisitions(ms(50), ms(200)), 1);
        // Bucket 0 is unowned 100..110; bucket 1 is never owned in 0..200.
        assert_eq!(tl.unowned(2, ms(0), ms(200)), (ms(210), ms(200)));
        let (intervals, _) = tl.intervals();
        assert_eq!(intervals[&0][0].ending, Ending::Revoked);
        assert_eq!(intervals[&0][0].released, Some(ms(105)));
        assert_eq!(intervals[&0][1].ending, Ending::Open);
    }

    #[test]
    fn overlap_and_stale_tokens_are_reported() {
        let v = timeline(&[("a", Acquired, 3, 10, 0), ("b", Acquired, 3, 9, 50)]).violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("S2") && v[0].contains("token 9 after a had token 10"));
        assert!(v[1].starts_with("S1") && v[1].contains("while a still owned it"));

        let v = timeline(&[
            ("a", Acquired, 3, 10, 0),
            ("b", Acquired, 3, 11, 50),
            ("a", Revoked, 3, 10, 60),
        ])
        .violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("a owned it until 10ms after b acquired it"),
            "{v:?}"
        );

        // Equal tokens are an S2 violation too, even in order in time.
        let v = timeline(&[
            ("a", Acquired, 3, 10, 0),
            ("a", Lost, 3, 10, 50),
            ("b", Acquired, 3, 10, 60),
        ])
        .violations();
        assert_eq!(v.len(), 1, "{v:?}");
    }

    #[test]
    fn a_crash_ends_ownership_and_lost_too() {
        let mut tl = timeline(&[("a", Acquired, 0, 1, 0), ("a", Acquired, 1, 1, 0)]);
        tl.crash("a", ms(100));
        // Recorded after the crash, reported before it.
        tl.record("c", Acquired, 2, 1, ms(0));
        tl.record("c", Lost, 2, 1, ms(100));
        for bucket in 0..3 {
            tl.record("b", Acquired, bucket, 2, ms(1100));
        }
        assert!(tl.violations().is_empty(), "{:?}", tl.violations());
        assert_eq!(tl.unowned(3, ms(0), ms(1100)), (ms(3000), ms(1000)));
        let held = tl.holdings();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(held["b"].len(), 3);
        assert_eq!(tl.intervals().0[&0][0].ending, Ending::Crashed);
    }

    #[test]
    fn a_crashed_member_acquires_nothing() {
        let mut tl = Timeline::new();
        tl.crash("a", ms(100));
        tl.record("a", Acquired, 0, 1, ms(150));
        let v = tl.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("after it crashed"), "{v:?}");
    }

    #[test]
    fn a_revoke_may_end_in_lost_when_the_release_is_not_confirmed() {
        let mut complete = Timeline::new().complete_streams();
        for (member, change, bucket, token, at) in [
            ("a", Acquired, 1, 1, 0),
            ("a", Revoked, 1, 1, 10),
            ("a", Lost, 1, 1, 20),
            ("b", Acquired, 1, 2, 30),
        ] {
            complete.record(member, change, bucket, token, ms(at));
        }
        assert!(
            complete.violations().is_empty(),
            "{:?}",
            complete.violations()
        );
        // Not for another grant's token.
        complete.record("b", Revoked, 1, 2, ms(40));
        complete.record("b", Lost, 1, 1, ms(50));
        assert_eq!(
            complete.violations().len(),
            1,
            "{:?}",
            complete.violations()
        );
    }

    #[test]
    fn nonsense_streams_are_reported() {
        let twice = timeline(&[("a", Acquired, 0, 1, 0), ("a", Acquired, 0, 2, 10)]);
        let v = twice.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("while it still owned it"), "{v:?}");

        // A stream joined late may end what it was not seen to acquire; a complete one may not.
        let changes = [
            ("a", Lost, 1, 1, 1),
            ("a", Released, 1, 1, 2),
            ("b", Acquired, 2, 5, 3),
            ("b", Revoked, 2, 6, 4),
        ];
        let late = timeline(&changes);
        assert_eq!(late.violations().len(), 1, "{:?}", late.violations());
        let mut complete = Timeline::new().complete_streams();
        for (member, change, bucket, token, at) in changes {
            complete.record(member, change, bucket, token, ms(at));
        }
        let v = complete.violations();
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(
            v[0].contains("a ended bucket 1 (token 1) it did not own"),
            "{v:?}"
        );
        assert!(v[1].contains("without having given it up"), "{v:?}");
        assert!(v[2].contains("with token 5 but ended token 6"), "{v:?}");
    }

    #[test]
    fn events_go_in_as_changes() {
        let t = Instant::now();
        let (bucket, token) = (4, 7);
        let reason = crate::LostReason::SessionExpired;
        let mut tl = Timeline::new();
        tl.record("a", Change::Acquired, bucket, token, t);
        // `at` of a loss is the lease deadline, which ends the ownership.
        let lost = Event::Lost {
            bucket,
            token,
            reason,
            at: t + ms(5),
        };
        tl.push("a", &lost);
        let (intervals, odd) = tl.intervals();
        assert!(odd.is_empty());
        assert_eq!(intervals[&4][0].end, Some(t + ms(5)));
        assert_eq!(intervals[&4][0].ending, Ending::Lost);
    }
}
