//! What a group snapshot says: coverage, balance, and the problems `status --check` reports.
//! Pure: no I/O, no clock.

use std::time::Duration;

use redbuckets::share::{target_range, Load};
use redbuckets::GroupSnapshot;

/// Balance and coverage of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// Buckets without an owner.
    pub free: usize,
    /// Fewest buckets held by a live member, and by whom.
    pub min: Option<(u32, String)>,
    /// Most buckets held by a live member, and by whom.
    pub max: Option<(u32, String)>,
    /// True when every live member has weight 1 (or all the same weight).
    pub equal_weights: bool,
    /// Buckets that members hold but have committed to release (a rebalance in progress).
    pub draining: u32,
    /// Why the group is not converged; empty when it is.
    pub problems: Vec<String>,
}

impl Analysis {
    /// Every bucket owned, holdings within their shares, nothing being handed over.
    pub fn converged(&self) -> bool {
        self.problems.is_empty() && self.draining == 0
    }
}

/// Looks at one snapshot.
pub fn analyze(s: &GroupSnapshot) -> Analysis {
    let free = s.free();
    let min = s
        .members
        .iter()
        .min_by_key(|m| m.held)
        .map(|m| (m.held, m.id.clone()));
    let max = s
        .members
        .iter()
        .max_by_key(|m| m.held)
        .map(|m| (m.held, m.id.clone()));
    let equal_weights = s.members.windows(2).all(|w| w[0].weight == w[1].weight);
    let draining = s
        .members
        .iter()
        .map(|m| m.held.saturating_sub(m.committed))
        .sum();

    let mut problems = Vec::new();
    if s.members.is_empty() {
        problems.push("no live member".to_string());
    }
    if free > 0 {
        let mut p = format!("{free} of {} buckets are unowned", s.buckets);
        let parked: u32 = s.parked.iter().map(|p| p.held).sum();
        if parked > 0 {
            let ids: Vec<&str> = s.parked.iter().map(|p| p.id.as_str()).collect();
            p.push_str(&format!(
                " ({parked} parked for restarting members: {})",
                ids.join(", ")
            ));
        }
        if !s.quarantine.is_zero() {
            p.push_str(&format!(
                " (the group is warming up: it grants nothing for another {})",
                crate::render::fmt_duration(s.quarantine)
            ));
        }
        problems.push(p);
    }
    if equal_weights {
        if let (Some((lo, lo_id)), Some((hi, hi_id))) = (&min, &max) {
            if hi - lo > 1 {
                problems.push(format!(
                    "held counts differ by more than one: {hi_id} holds {hi}, {lo_id} holds {lo}"
                ));
            }
        }
    } else {
        let loads: Vec<Load> = s
            .members
            .iter()
            .map(|m| Load {
                weight: m.weight,
                held: m.committed,
            })
            .collect();
        for (i, m) in s.members.iter().enumerate() {
            let (lo, hi) = target_range(s.buckets, &loads, i);
            if m.held < lo || m.held > hi {
                problems.push(format!(
                    "{} (weight {}) holds {}, its share is {lo}..={hi}",
                    m.id, m.weight, m.held
                ));
            }
        }
    }
    Analysis {
        free,
        min,
        max,
        equal_weights,
        draining,
        problems,
    }
}

/// Held counts per member id, for comparisons between snapshots.
pub fn holdings(s: &GroupSnapshot) -> Vec<(String, u32)> {
    s.members.iter().map(|m| (m.id.clone(), m.held)).collect()
}

/// The parts of a snapshot that matter to a viewer: owners, members and their counts, whether
/// the group is warming up. Session ages and expiry times change on every read and are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    version: u64,
    owners: Vec<Option<String>>,
    members: Vec<(String, u32, u32)>,
    parked: Vec<(String, u32)>,
    warming_up: bool,
    stale: bool,
}

/// The [`Digest`] of a snapshot: equal digests draw the same picture.
pub fn digest(s: &GroupSnapshot) -> Digest {
    Digest {
        version: s.version,
        owners: s
            .owners
            .iter()
            .map(|o| o.as_ref().map(|o| o.member.clone()))
            .collect(),
        members: s
            .members
            .iter()
            .map(|m| (m.id.clone(), m.held, m.committed))
            .collect(),
        parked: s.parked.iter().map(|p| (p.id.clone(), p.held)).collect(),
        warming_up: s.quarantine > Duration::ZERO,
        stale: s.stale,
    }
}

#[cfg(test)]
mod tests {
    //! Real states, made by speaking the store protocol to a `MemoryStore` on a paused clock.

    use super::*;
    use redbuckets::store::{RegisterRequest, SessionRef};
    use redbuckets::{GroupKey, MemoryStore, Store};

    const TTL: Duration = Duration::from_secs(10);

    fn session(id: &str) -> SessionRef {
        SessionRef {
            member: id.to_string(),
            session: format!("s-{id}"),
        }
    }

    async fn register(store: &MemoryStore, key: &GroupKey, id: &str, weight: u32) {
        store
            .register(key, &RegisterRequest::new(session(id), weight, 8, TTL))
            .await
            .unwrap();
    }

    /// Lets the group's first ttl pass, keeping `ids` alive.
    async fn end_quarantine(store: &MemoryStore, key: &GroupKey, ids: &[&str]) {
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        for id in ids {
            store
                .heartbeat(key, &session(id), TTL, Duration::MAX)
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
    }

    async fn snapshot(store: &MemoryStore, key: &GroupKey) -> GroupSnapshot {
        store.snapshot(key).await.unwrap().unwrap()
    }

    /// The buckets the snapshot records as `id`'s (its session as `session` names it).
    async fn owned(store: &MemoryStore, key: &GroupKey, id: &str) -> Vec<u32> {
        let s = snapshot(store, key).await;
        let held = s.holdings(&session(id)).expect("a live session");
        held.owned.into_keys().collect()
    }

    #[tokio::test(start_paused = true)]
    async fn warming_up_then_imbalanced_then_balanced() {
        let store = MemoryStore::new();
        let key = GroupKey::new("t", "g");
        register(&store, &key, "a", 1).await;
        let a = analyze(&snapshot(&store, &key).await);
        assert_eq!(a.free, 8);
        assert_eq!(a.problems.len(), 1, "{:?}", a.problems);
        assert!(a.problems[0].starts_with("8 of 8 buckets are unowned"));
        assert!(a.problems[0].contains("warming up"), "{:?}", a.problems);

        // a alone takes everything; then b joins.
        end_quarantine(&store, &key, &["a"]).await;
        store.rebalance(&key, &session("a"), 8).await.unwrap();
        register(&store, &key, "b", 1).await;
        let s = snapshot(&store, &key).await;
        let a = analyze(&s);
        assert_eq!(a.free, 0);
        assert_eq!(a.min, Some((0, "b".to_string())));
        assert_eq!(a.max, Some((8, "a".to_string())));
        assert_eq!(
            a.problems,
            vec!["held counts differ by more than one: a holds 8, b holds 0".to_string()]
        );

        // a commits to release 4 (draining), releases them, b takes them.
        store.rebalance(&key, &session("a"), 8).await.unwrap();
        assert_eq!(analyze(&snapshot(&store, &key).await).draining, 4);
        let give: Vec<u32> = owned(&store, &key, "a").await.into_iter().take(4).collect();
        store
            .release(&key, &session("a"), &give, u64::MAX)
            .await
            .unwrap();
        store.rebalance(&key, &session("b"), 8).await.unwrap();
        let a = analyze(&snapshot(&store, &key).await);
        assert!(a.converged(), "{a:?}");
        assert_eq!(a.min.map(|m| m.0), Some(4));
        assert_eq!(a.max.map(|m| m.0), Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn parked_buckets_are_unowned_and_named() {
        let store = MemoryStore::new();
        let key = GroupKey::new("t", "p");
        let mut req = RegisterRequest::new(session("a"), 1, 8, TTL);
        req.grace = Duration::from_secs(30);
        store.register(&key, &req).await.unwrap();
        register(&store, &key, "b", 1).await;
        end_quarantine(&store, &key, &["a", "b"]).await;
        store.rebalance(&key, &session("a"), 8).await.unwrap();
        store.rebalance(&key, &session("b"), 8).await.unwrap();
        let held = owned(&store, &key, "a").await;
        store.leave(&key, &session("a"), &held).await.unwrap();
        let s = snapshot(&store, &key).await;
        assert_eq!(s.parked.len(), 1);
        assert_eq!((s.parked[0].id.as_str(), s.parked[0].held), ("a", 4));
        let a = analyze(&s);
        assert_eq!(a.free, 4);
        assert_eq!(
            a.problems,
            vec!["4 of 8 buckets are unowned (4 parked for restarting members: a)".to_string()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_members_are_held_to_their_share() {
        let store = MemoryStore::new();
        let key = GroupKey::new("t", "w");
        register(&store, &key, "a", 3).await;
        register(&store, &key, "b", 1).await;
        end_quarantine(&store, &key, &["a", "b"]).await;
        // b takes first: its share is 2 of 8, a's 6.
        store.rebalance(&key, &session("b"), 8).await.unwrap();
        store.rebalance(&key, &session("a"), 3).await.unwrap();
        let a = analyze(&snapshot(&store, &key).await);
        assert!(!a.equal_weights);
        assert!(
            a.problems
                .iter()
                .any(|p| p == "a (weight 3) holds 3, its share is 6..=6"),
            "{:?}",
            a.problems
        );
        store.rebalance(&key, &session("a"), 8).await.unwrap();
        let a = analyze(&snapshot(&store, &key).await);
        assert!(a.converged(), "{a:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_member_is_a_problem() {
        let store = MemoryStore::new();
        let key = GroupKey::new("t", "empty");
        register(&store, &key, "a", 1).await;
        store.deregister(&key, &session("a")).await.unwrap();
        let a = analyze(&snapshot(&store, &key).await);
        assert!(a.problems.iter().any(|p| p == "no live member"), "{a:?}");
    }
}
