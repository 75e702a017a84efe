//! The members of one group under test, whatever their store: their events in one log
//! (checked for S1 and S2 at every collect), their counts, balance and exclusive ownership.
//! `ctx` is what a test file needs to add members (a store, a URL); it adds `join` itself (an
//! inherent impl on its `Members<Ctx>` alias, which is why this stays in the library's tests
//! and not in the testkit).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use redbuckets::{Event, Events, Member, Store};
use tokio::time::Instant;

use redbuckets_testkit::EventLog;

/// Started members of one group, their event receivers and the log of their events.
#[derive(Debug)]
pub struct Members<C> {
    /// What the test file needs to add members (a store, a URL).
    pub ctx: C,
    /// The members, in the order added.
    pub members: Vec<Member>,
    /// One receiver per member added, with its id.
    pub receivers: Vec<(String, Events)>,
    /// Every event collected so far.
    pub timeline: EventLog,
    /// The group's bucket count.
    pub buckets: u32,
}

impl<C> Members<C> {
    /// No members yet.
    pub fn with(ctx: C, buckets: u32) -> Self {
        Members {
            ctx,
            members: Vec::new(),
            receivers: Vec::new(),
            timeline: EventLog::default(),
            buckets,
        }
    }

    /// Adds a started member; its events are collected from now on.
    pub fn add(&mut self, member: Member) {
        self.receivers
            .push((member.id().to_string(), member.events()));
        self.members.push(member);
    }

    /// Starts member `id` of group `name` on `store` (a 200 ms drain) and adds it.
    pub async fn start_on<S: Store>(
        &mut self,
        store: S,
        name: &str,
        id: &str,
        heartbeat: Duration,
        ttl: Duration,
    ) {
        let member = Member::builder(store, name)
            .id(id)
            .buckets(self.buckets)
            .heartbeat(heartbeat)
            .ttl(ttl)
            .drain_timeout(Duration::from_millis(200))
            .start()
            .await
            .expect("start");
        self.add(member);
    }

    /// Every member leaves gracefully, and each leave succeeds.
    pub async fn shutdown(self) {
        for m in self.members {
            m.shutdown().await.expect("graceful leave");
        }
    }

    /// Drains the members' events and checks S1 and S2 over everything seen so far.
    pub fn collect(&mut self) {
        self.timeline.collect(&mut self.receivers);
        self.timeline.check_safety();
    }

    /// Counts per member, as the members themselves see it.
    pub fn counts(&self) -> Vec<usize> {
        self.members.iter().map(|m| m.buckets().len()).collect()
    }

    /// Every bucket owned, and each member holds ⌊B/n⌋ or ⌈B/n⌉.
    pub fn balanced(&self) -> bool {
        let counts = self.counts();
        let Some(lo) = (self.buckets as usize).checked_div(counts.len()) else {
            return false;
        };
        counts.iter().sum::<usize>() == self.buckets as usize
            && counts.iter().all(|&c| c == lo || c == lo + 1)
    }

    /// Waits (on tokio's clock, paused or not) until balanced; returns how long it took.
    pub async fn until_balanced(&mut self, limit: Duration) -> Duration {
        let began = Instant::now();
        while !self.balanced() {
            assert!(
                began.elapsed() < limit,
                "not balanced after {limit:?}: {:?}",
                self.counts()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.collect();
        }
        self.collect();
        began.elapsed()
    }

    /// Every bucket has at most one owner in the members' own views.
    pub fn assert_exclusive(&self) {
        let mut owner = vec![None; self.buckets as usize];
        for m in &self.members {
            for b in m.buckets() {
                assert!(
                    owner[b as usize].replace(m.id().to_string()).is_none(),
                    "bucket {b} owned twice"
                );
            }
        }
    }

    /// S2 across a loss: every grant since event `mark` carries a larger token than `before`
    /// (the largest token seen before the loss), and there was at least one.
    pub fn assert_grants_above(&self, mark: usize, before: u64) {
        let after = self.timeline.grant_tokens_since(mark).into_iter().min();
        let after = after.expect("re-acquired");
        assert!(after > before, "token went from {before} to {after}");
    }

    /// The largest token seen in any event.
    pub fn max_token(&self) -> u64 {
        self.timeline
            .events
            .iter()
            .filter_map(|(_, e)| e.token())
            .max()
            .unwrap_or(0)
    }
}

/// Waits until `member` holds `want`, at most `limit`; returns how long it took.
pub async fn until_holds(member: &Member, want: &BTreeSet<u32>, limit: Duration) -> Duration {
    let began = Instant::now();
    while member.buckets().into_iter().collect::<BTreeSet<_>>() != *want {
        assert!(
            began.elapsed() < limit,
            "{} holds {} of its {} buckets after {limit:?}",
            member.id(),
            member.buckets().len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    began.elapsed()
}

/// A restart under a fixed id with a rejoin grace, on any store: members `m0`, `m1`, `m2` of
/// group `name` (with the grace) balanced; `m0` shuts down and starts again, then `m1` is
/// aborted (a crash) and starts again at once: each gets back exactly what it held, under
/// larger tokens, and no other member acquires anything. S1/S2 over every event, with each
/// restarted process its own owner in the checker (`<id>'`).
pub async fn rejoin_round<S: Store + Clone>(
    store: S,
    name: &str,
    buckets: u32,
    heartbeat: Duration,
    ttl: Duration,
) {
    let grace = ttl * 5;
    let build = |id: &str| {
        Member::builder(store.clone(), name)
            .id(id)
            .buckets(buckets)
            .heartbeat(heartbeat)
            .ttl(ttl)
            .drain_timeout(Duration::from_millis(100))
            .rejoin_grace(grace)
    };
    let mut g = Members::with((), buckets);
    for id in ["m0", "m1", "m2"] {
        g.add(build(id).start().await.expect("start"));
    }
    g.until_balanced(ttl * 5).await;
    for (i, crash) in [(0, false), (0, true)] {
        let old = g.members.remove(i);
        let id = old.id().to_string();
        let held: BTreeSet<u32> = old.buckets().into_iter().collect();
        let top = g.max_token();
        g.collect();
        let mark = g.timeline.events.len();
        if crash {
            let at = Instant::now();
            old.abort();
            g.timeline.crashed(&id, at);
        } else {
            old.shutdown().await.expect("graceful leave");
        }
        g.collect();
        g.receivers.retain(|(r, _)| *r != id);
        let again = build(&id).start().await.expect("restart");
        until_holds(&again, &held, ttl * 3).await;
        let renamed = format!("{id}'");
        g.receivers.push((renamed.clone(), again.events()));
        g.members.push(again);
        g.collect();
        let since = &g.timeline.events[mark..];
        let others: Vec<_> = since
            .iter()
            .filter(|(m, e)| *m != renamed && matches!(e, Event::Acquired { .. }))
            .collect();
        assert!(others.is_empty(), "others acquired {others:?}");
        let mine: Vec<u64> = since
            .iter()
            .filter(|(m, e)| *m == renamed && matches!(e, Event::Acquired { .. }))
            .filter_map(|(_, e)| e.token())
            .collect();
        assert_eq!(mine.len(), held.len());
        assert!(mine.iter().all(|t| *t > top), "{mine:?} after {top}");
        g.assert_exclusive();
    }
    g.shutdown().await;
}
