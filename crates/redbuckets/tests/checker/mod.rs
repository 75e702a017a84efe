//! An external checker over members' event streams: S1 (no two owners at once) and S2 (tokens
//! of a bucket strictly increase), shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use redbuckets::Event;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// One ownership: member, token, start, and end (`None` while still owned).
pub type Interval = (String, u64, Instant, Option<Instant>);

/// Every event of every member, in arrival order.
#[derive(Debug, Default)]
pub struct Timeline {
    pub events: Vec<(String, Event)>,
}

impl Timeline {
    /// Drains whatever the receivers have buffered.
    pub fn collect(&mut self, receivers: &mut [(String, broadcast::Receiver<Event>)]) {
        for (member, rx) in receivers.iter_mut() {
            loop {
                match rx.try_recv() {
                    Ok(event) => self.events.push((member.clone(), event)),
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(broadcast::error::TryRecvError::Closed) => break,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        panic!("checker lagged {n} events of {member}")
                    }
                }
            }
        }
    }

    /// Ends every ownership of `member` at `at` (a crash: the process stops owning when it dies).
    pub fn crashed(&mut self, member: &str, at: Instant) {
        let open: Vec<(u32, u64)> = self
            .intervals()
            .into_iter()
            .flat_map(|(b, list)| list.into_iter().map(move |i| (b, i)))
            .filter(|(_, (m, _, _, end))| m == member && end.is_none())
            .map(|(b, (_, token, _, _))| (b, token))
            .collect();
        for (bucket, token) in open {
            self.events.push((
                member.to_string(),
                Event::Lost {
                    bucket,
                    token,
                    reason: redbuckets::LostReason::SessionExpired,
                    at,
                },
            ));
        }
    }

    /// Ownership intervals per bucket: (member, token, start, end or None if still owned).
    pub fn intervals(&self) -> BTreeMap<u32, Vec<Interval>> {
        let mut open: BTreeMap<(String, u32), (u64, Instant)> = BTreeMap::new();
        let mut out: BTreeMap<u32, Vec<_>> = BTreeMap::new();
        for (member, event) in &self.events {
            match event {
                Event::Acquired { bucket, token, at } => {
                    let prev = open.insert((member.clone(), *bucket), (*token, *at));
                    assert!(prev.is_none(), "{member} acquired {bucket} twice");
                }
                Event::Revoked { bucket, at, .. } | Event::Lost { bucket, at, .. } => {
                    if let Some((token, start)) = open.remove(&(member.clone(), *bucket)) {
                        out.entry(*bucket).or_default().push((
                            member.clone(),
                            token,
                            start,
                            Some(*at),
                        ));
                    }
                }
                _ => {}
            }
        }
        for ((member, bucket), (token, start)) in open {
            out.entry(bucket)
                .or_default()
                .push((member, token, start, None));
        }
        out
    }

    /// S1 and S2 over everything seen so far.
    pub fn check_safety(&self) {
        for (bucket, mut list) in self.intervals() {
            list.sort_by_key(|(_, token, _, _)| *token);
            for pair in list.windows(2) {
                let (m1, t1, _, end1) = &pair[0];
                let (m2, t2, start2, _) = &pair[1];
                assert!(t2 > t1, "bucket {bucket}: token went from {t1} to {t2}");
                let end1 = end1.unwrap_or_else(|| {
                    panic!("bucket {bucket}: {m1} still owns it while {m2} acquired it")
                });
                assert!(
                    end1 <= *start2,
                    "bucket {bucket}: {m1} owned it until {end1:?}, {m2} from {start2:?}"
                );
            }
        }
    }

    /// Number of Acquired events after index `from`.
    pub fn acquisitions_since(&self, from: usize) -> usize {
        self.grant_tokens_since(from).len()
    }

    /// The tokens of the grants since event `from`, in arrival order.
    pub fn grant_tokens_since(&self, from: usize) -> Vec<u64> {
        self.events[from..]
            .iter()
            .filter(|(_, e)| matches!(e, Event::Acquired { .. }))
            .map(|(_, e)| e.token())
            .collect()
    }
}
