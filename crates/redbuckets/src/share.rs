//! The share rule: pure arithmetic, no I/O, no clock.
//!
//! A store runs [`step`] atomically for one member at a time (a Lua script in Redis, a mutex in
//! [`crate::MemoryStore`]), against the *committed* holdings of every live member. A member that
//! must give buckets up has its count lowered at the moment of decision, before it drains and
//! releases them, so concurrent decisions of other members never see the same surplus twice.
//!
//! With `n` live members of weights `w_i` (total `W`) and `B` buckets, member `i` has a base share
//! `⌊B·w_i/W⌋`; the remainder `r = B − Σ base` goes one bucket each to at most `r` members.
//! Sticky by design: nothing moves unless a member is above its share or a bucket is free.
//! The Lua version of this rule is `share_rule` in `store/lua/common.lua`, a pure function that
//! `rebalance.lua` calls; `tests/lua_share.rs` runs it through `EVAL` against this module on
//! random inputs.

/// One live member's weight and committed holdings, as the store sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Relative weight (≥ 1).
    pub weight: u32,
    /// Buckets the member holds, minus those it has committed to release.
    pub held: u32,
}

/// What one member should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Take this many free buckets (already capped by the free count).
    Take(u32),
    /// Give up this many buckets.
    Release(u32),
    /// Nothing to do.
    Stay,
}

/// Base share of a member of weight `weight` when the live weights sum to `total_weight`.
#[must_use]
pub fn base_share(buckets: u32, weight: u32, total_weight: u64) -> u32 {
    if total_weight == 0 {
        return 0;
    }
    // B ≤ 2^16 and weights ≤ 10^6 × 1000 members: the product fits u64 comfortably.
    u32::try_from(u64::from(buckets) * u64::from(weight) / total_weight).unwrap_or(u32::MAX)
}

/// The range `[min, max]` a member may converge to: its base share, and one more if it gets one
/// of the remainder buckets.
#[must_use]
pub fn target_range(buckets: u32, loads: &[Load], me: usize) -> (u32, u32) {
    let total: u64 = loads.iter().map(|l| u64::from(l.weight)).sum();
    let Some(mine) = loads.get(me) else {
        return (0, 0);
    };
    let base = base_share(buckets, mine.weight, total);
    let assigned: u64 = loads
        .iter()
        .map(|l| u64::from(base_share(buckets, l.weight, total)))
        .sum();
    if u64::from(buckets) > assigned {
        (base, base + 1)
    } else {
        (base, base)
    }
}

/// The share rule for member `me` (an index into `loads`) when `free` buckets are unowned.
#[must_use]
pub fn step(buckets: u32, loads: &[Load], me: usize, free: u32) -> Step {
    let total: u64 = loads.iter().map(|l| u64::from(l.weight)).sum();
    let Some(mine) = loads.get(me) else {
        return Step::Stay;
    };
    let mut assigned: u64 = 0;
    let mut others_with_extra: u64 = 0;
    for (i, load) in loads.iter().enumerate() {
        let base = base_share(buckets, load.weight, total);
        assigned += u64::from(base);
        if i != me && load.held > base {
            others_with_extra += 1;
        }
    }
    let remainder = u64::from(buckets).saturating_sub(assigned);
    let base = base_share(buckets, mine.weight, total);
    let allowed = if others_with_extra < remainder {
        base + 1
    } else {
        base
    };
    if mine.held > allowed {
        Step::Release(mine.held - allowed)
    } else if mine.held < allowed && free > 0 {
        Step::Take((allowed - mine.held).min(free))
    } else {
        Step::Stay
    }
}

/// Bases and the remainder of a group: each member's base share, and how many members may hold
/// one bucket above it.
fn bases(buckets: u32, loads: &[Load]) -> (Vec<u32>, u64) {
    let total: u64 = loads.iter().map(|l| u64::from(l.weight)).sum();
    let base: Vec<u32> = loads
        .iter()
        .map(|l| base_share(buckets, l.weight, total))
        .collect();
    let assigned: u64 = base.iter().map(|&b| u64::from(b)).sum();
    (base, u64::from(buckets).saturating_sub(assigned))
}

/// The order in which the stores visit members when they pick whom to wake: by weight, then by
/// committed count, then by id (`loads` must be in id order, as the stores keep them). The Lua
/// twin gets it from one `ZRANGEBYSCORE` per weight, weights ascending.
fn visit_order(loads: &[Load], key: impl Fn(usize) -> u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&i| (loads[i].weight, key(i), i));
    order
}

/// After a member joined: the members now above their share, and the count each must come down
/// to, in the order the stores wake them. The store commits these counts at once (as if each had
/// run [`step`] and been told to release), and wakes exactly these members: a join costs work
/// in proportion to the buckets that move, not to the group's size.
///
/// Every member above `base + 1` comes down to `base + 1`; then, if more members hold one above
/// their base than the remainder allows, the first of those in id order come down to `base`.
/// Afterwards [`step`] tells no member to release. Mirrored by `commit_givers` in `common.lua`.
#[must_use]
pub fn givers(buckets: u32, loads: &[Load]) -> Vec<(usize, u32)> {
    let (base, remainder) = bases(buckets, loads);
    let mut counts: Vec<u32> = loads.iter().map(|l| l.held).collect();
    let mut out: Vec<(usize, u32)> = Vec::new();
    for i in visit_order(loads, |i| loads[i].held) {
        if counts[i] > base[i] + 1 {
            counts[i] = base[i] + 1;
            out.push((i, counts[i]));
        }
    }
    let above = (0..loads.len()).filter(|&i| counts[i] > base[i]).count() as u64;
    let mut excess = above.saturating_sub(remainder);
    for i in visit_order(loads, |_| 0) {
        if excess == 0 {
            break;
        }
        if counts[i] == base[i] + 1 {
            counts[i] = base[i];
            excess -= 1;
            match out.iter_mut().find(|(j, _)| *j == i) {
                Some(entry) => entry.1 = counts[i],
                None => out.push((i, counts[i])),
            }
        }
    }
    out
}

/// After `free` buckets became free (a release, a leave, a purge): the members to wake so that
/// they take them, in order. First members below their base share, fewest first, until their
/// room covers `free`; then, while the remainder allows more members one bucket above their
/// base, members at their base. It never counts on more room than a member surely has, so every
/// free bucket has a woken taker when the group has room for it (L1), at the price of waking a
/// few members that find nothing left. Mirrored by `wake_takers` in `common.lua`.
#[must_use]
pub fn takers(buckets: u32, loads: &[Load], free: u32) -> Vec<usize> {
    let (base, remainder) = bases(buckets, loads);
    let above = (0..loads.len())
        .filter(|&i| loads[i].held > base[i])
        .count() as u64;
    let mut extras = remainder.saturating_sub(above);
    let mut need = u64::from(free);
    let mut out = Vec::new();
    if need == 0 {
        return out;
    }
    for i in visit_order(loads, |i| loads[i].held) {
        if loads[i].held < base[i] {
            out.push(i);
            need = need.saturating_sub(u64::from(base[i] - loads[i].held));
            if need == 0 {
                return out;
            }
        }
    }
    for i in visit_order(loads, |_| 0) {
        if need == 0 || extras == 0 {
            break;
        }
        if loads[i].held == base[i] {
            out.push(i);
            need -= 1;
            extras -= 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! Property tests: a model group where members step in random order and releases land late
    //! (as drains do), driven through random join/leave/crash histories.
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone)]
    struct ModelMember {
        weight: u32,
        owned: BTreeSet<u32>,
        committed: u32,
        /// Buckets already chosen for release but not yet freed.
        pending: Vec<u32>,
    }

    #[derive(Debug, Default)]
    struct Model {
        buckets: u32,
        members: BTreeMap<u32, ModelMember>,
        free: BTreeSet<u32>,
    }

    impl Model {
        fn new(buckets: u32) -> Self {
            Model {
                buckets,
                members: BTreeMap::new(),
                free: (0..buckets).collect(),
            }
        }

        fn loads(&self) -> (Vec<u32>, Vec<Load>) {
            let ids = self.members.keys().copied().collect();
            let loads = self
                .members
                .values()
                .map(|m| Load {
                    weight: m.weight,
                    held: m.committed,
                })
                .collect();
            (ids, loads)
        }

        /// One atomic store step for member `id`; returns true if anything changed.
        fn step_member(&mut self, id: u32) -> bool {
            let (ids, loads) = self.loads();
            let me = ids.iter().position(|&x| x == id).unwrap();
            let free = self.free.len() as u32;
            match step(self.buckets, &loads, me, free) {
                Step::Stay => false,
                Step::Take(k) => {
                    let m = self.members.get_mut(&id).unwrap();
                    for _ in 0..k {
                        let b = self.free.pop_first().unwrap();
                        m.owned.insert(b);
                    }
                    m.committed += k;
                    true
                }
                Step::Release(k) => {
                    let m = self.members.get_mut(&id).unwrap();
                    m.committed -= k;
                    let candidates: Vec<u32> = m
                        .owned
                        .iter()
                        .rev()
                        .filter(|b| !m.pending.contains(b))
                        .take(k as usize)
                        .copied()
                        .collect();
                    assert_eq!(candidates.len(), k as usize);
                    m.pending.extend(candidates);
                    true
                }
            }
        }

        fn flush_pending(&mut self, id: u32) -> bool {
            let m = self.members.get_mut(&id).unwrap();
            if m.pending.is_empty() {
                return false;
            }
            for b in m.pending.drain(..) {
                m.owned.remove(&b);
                self.free.insert(b);
            }
            true
        }

        /// Random interleaving of steps and late releases until nothing changes.
        fn converge(&mut self, choices: &mut impl Iterator<Item = u32>) {
            let mut quiet_rounds = 0;
            let mut guard = 0;
            while quiet_rounds < 2 {
                guard += 1;
                assert!(guard < 10_000, "no convergence: {self:?}");
                let ids: Vec<u32> = self.members.keys().copied().collect();
                let mut changed = false;
                for _ in 0..ids.len() * 2 {
                    let pick = ids[choices.next().unwrap_or(0) as usize % ids.len()];
                    if choices.next().unwrap_or(0) % 3 == 0 {
                        changed |= self.flush_pending(pick);
                    } else {
                        changed |= self.step_member(pick);
                    }
                }
                for id in &ids {
                    changed |= self.step_member(*id);
                    changed |= self.flush_pending(*id);
                }
                quiet_rounds = if changed { 0 } else { quiet_rounds + 1 };
            }
        }

        fn owners(&self) -> BTreeMap<u32, u32> {
            let mut owners = BTreeMap::new();
            for (id, m) in &self.members {
                for b in &m.owned {
                    assert!(
                        owners.insert(*b, *id).is_none(),
                        "bucket {b} has two owners"
                    );
                }
            }
            owners
        }

        fn check_converged(&self) {
            let owners = self.owners();
            assert_eq!(owners.len() as u32, self.buckets, "every bucket owned");
            assert!(self.free.is_empty());
            let (_, loads) = self.loads();
            for (i, (id, m)) in self.members.iter().enumerate() {
                let (lo, hi) = target_range(self.buckets, &loads, i);
                let held = m.owned.len() as u32;
                assert_eq!(held, m.committed);
                assert!(
                    (lo..=hi).contains(&held),
                    "member {id} holds {held}, share {lo}..={hi}: {loads:?}"
                );
            }
        }
    }

    fn moved(before: &BTreeMap<u32, u32>, after: &BTreeMap<u32, u32>) -> usize {
        after
            .iter()
            .filter(|(b, o)| before.get(b) != Some(o))
            .count()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(u32),
        Leave(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u32..4).prop_map(Op::Join),
            (0usize..64).prop_map(Op::Leave)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn histories_stay_balanced_and_move_little(
            buckets in 1u32..700,
            weighted in any::<bool>(),
            start in 1usize..8,
            ops in prop::collection::vec(op(), 1..12),
            choices in prop::collection::vec(any::<u32>(), 64..512),
        ) {
            let mut choices = choices.into_iter().cycle();
            let mut model = Model::new(buckets);
            let mut next_id = 0;
            let mut join = |model: &mut Model, w: u32| {
                next_id += 1;
                model.members.insert(next_id, ModelMember {
                    weight: if weighted { w } else { 1 },
                    owned: BTreeSet::new(),
                    committed: 0,
                    pending: Vec::new(),
                });
            };
            for _ in 0..start {
                join(&mut model, 1);
            }
            model.converge(&mut choices);
            model.check_converged();
            for op in ops {
                let before = model.owners();
                let n = model.members.len();
                let optimal = match op {
                    Op::Join(w) => {
                        join(&mut model, w);
                        let (ids, loads) = model.loads();
                        let me = ids.len() - 1;
                        target_range(buckets, &loads, me).1 as usize
                    }
                    Op::Leave(i) => {
                        if n <= 1 {
                            continue;
                        }
                        let id = *model.members.keys().nth(i % n).unwrap();
                        let gone = model.members.remove(&id).unwrap();
                        model.free.extend(gone.owned.iter().copied());
                        gone.owned.len()
                    }
                };
                model.converge(&mut choices);
                model.check_converged();
                let after = model.owners();
                let moves = moved(&before, &after);
                let n = model.members.len();
                prop_assert!(moves <= optimal + n, "{op:?}: moved {moves}, optimal {optimal}, n {n}");
                if !weighted {
                    // Equal weights: the rule moves exactly what the newcomer needs or the
                    // departed member had.
                    prop_assert!(moves <= optimal, "{op:?}: moved {moves}, optimal {optimal}");
                }
            }
        }
    }

    #[test]
    fn fifth_member_joining_moves_the_optimal_204() {
        let mut model = Model::new(1024);
        for id in 1..=4 {
            model.members.insert(
                id,
                ModelMember {
                    weight: 1,
                    owned: BTreeSet::new(),
                    committed: 0,
                    pending: Vec::new(),
                },
            );
        }
        let mut choices = (0u32..).map(|x| x.wrapping_mul(2_654_435_761));
        model.converge(&mut choices);
        let before = model.owners();
        model.members.insert(
            5,
            ModelMember {
                weight: 1,
                owned: BTreeSet::new(),
                committed: 0,
                pending: Vec::new(),
            },
        );
        model.converge(&mut choices);
        model.check_converged();
        assert_eq!(moved(&before, &model.owners()), 204);
    }

    #[test]
    fn weights_split_proportionally() {
        let loads = [Load { weight: 1, held: 0 }, Load { weight: 3, held: 0 }];
        assert_eq!(target_range(1000, &loads, 0), (250, 250));
        assert_eq!(target_range(1000, &loads, 1), (750, 750));
        assert_eq!(target_range(7, &loads, 0), (1, 2));
        assert_eq!(step(7, &loads, 1, 7), Step::Take(6));
    }

    #[test]
    fn single_bucket_goes_to_one_member() {
        let mut loads = vec![Load { weight: 1, held: 0 }; 3];
        assert_eq!(step(1, &loads, 0, 1), Step::Take(1));
        loads[0].held = 1;
        assert_eq!(step(1, &loads, 1, 0), Step::Stay);
        assert_eq!(step(1, &loads, 0, 0), Step::Stay);
    }

    fn loads_strategy() -> impl Strategy<Value = (u32, Vec<Load>)> {
        (
            1u32..2000,
            prop::collection::vec((1u32..4, 0u32..600), 1..12),
        )
            .prop_map(|(b, raw)| {
                let loads = raw
                    .into_iter()
                    .map(|(weight, held)| Load {
                        weight,
                        held: held.min(b),
                    })
                    .collect();
                (b, loads)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// After a join the store commits the givers' counts: then no member is told to
        /// release, and only the members named moved.
        #[test]
        fn after_the_givers_commit_nobody_must_release((buckets, loads) in loads_strategy()) {
            let mut after = loads.clone();
            for (i, count) in givers(buckets, &loads) {
                prop_assert!(count < loads[i].held, "member {i} named but not lowered");
                after[i].held = count;
            }
            for me in 0..after.len() {
                prop_assert!(
                    !matches!(step(buckets, &after, me, 0), Step::Release(_)),
                    "member {me} must still release: {after:?}"
                );
            }
        }

        /// The members woken for `free` buckets can take all of them whenever the group has
        /// room for them: stepping only the woken members, in any order, leaves no bucket
        /// free that some member could still take.
        #[test]
        fn the_woken_takers_take_every_free_bucket(
            (buckets, loads) in loads_strategy(),
            free in 1u32..300,
            order in any::<u64>(),
        ) {
            // Scale the holdings down so that they fit, some buckets free.
            let sum: u64 = loads.iter().map(|l| u64::from(l.held)).sum::<u64>() + 1;
            let mut loads: Vec<Load> = loads
                .into_iter()
                .map(|l| Load {
                    weight: l.weight,
                    held: u32::try_from(u64::from(l.held) * u64::from(buckets) / sum)
                        .unwrap_or(0)
                        .saturating_sub(1),
                })
                .collect();
            let held: u32 = loads.iter().map(|l| l.held).sum();
            let mut free = free.min(buckets - held);
            prop_assume!(free > 0);
            let woken = takers(buckets, &loads, free);
            // Each woken member steps until it stays, in a rotating order.
            let mut pending = woken.clone();
            let mut turn = order as usize;
            while !pending.is_empty() {
                turn = turn.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let k = (turn >> 33) % pending.len();
                let me = pending[k];
                match step(buckets, &loads, me, free) {
                    Step::Take(n) => {
                        loads[me].held += n;
                        free -= n;
                    }
                    _ => {
                        pending.swap_remove(k);
                    }
                }
            }
            if free > 0 {
                for me in 0..loads.len() {
                    prop_assert!(
                        !matches!(step(buckets, &loads, me, free), Step::Take(_)),
                        "{free} buckets left free, member {me} could take (woken: {woken:?}, {loads:?})"
                    );
                }
            }
        }
    }
}
