//! The share rule in Lua (`share_rule` in `store/lua/common.lua`, which `rebalance.lua` calls)
//! against `share::step` and `share::target_range`, on random inputs, through `EVAL` on a real
//! `redis-server` (own server, free port).
//!
//! Inputs: B from 1 to 65,536, 1 to 1,000 members with weights from 1 to 1,000,000 (a few
//! distinct weights, or each its own), committed counts near the member's base share (where the
//! remainder decides) or anywhere in 0..=B, any free count. `SHARE_CASES=100000` runs more.

use proptest::prelude::*;
use proptest::sample::Index;
use redbuckets::share::{self, Load, Step};
use redbuckets_testkit::RedisServer;

const COMMON: &str = include_str!("../src/store/lua/common.lua");

/// Calls `share_rule` with ARGV = [tag, B, my_w, mine, free, (weight, count, above)...].
const DRIVER: &str = r"
local groups = {}
for i = 6, #ARGV, 3 do
  groups[#groups + 1] = { tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]) }
end
local kind, count, lo, hi = share_rule(tonumber(ARGV[2]), groups, tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5]))
return { kind, count, lo, hi }
";

#[derive(Debug, Clone)]
struct Case {
    buckets: u32,
    loads: Vec<Load>,
    me: usize,
    free: u32,
}

/// A member: which of the distinct weights (or its own), and where its count lies.
type Spec = (Index, u32, i64, bool, u32);

fn case() -> impl Strategy<Value = Case> {
    let buckets = prop_oneof![
        3 => 1u32..=64,
        2 => 1u32..=65_536,
        1 => Just(65_536u32),
    ];
    let members = prop_oneof![
        3 => prop::collection::vec(any::<Spec>(), 1..=12),
        1 => prop::collection::vec(any::<Spec>(), 1..=1_000),
    ];
    let weights = prop_oneof![
        Just(vec![1u32]),
        prop::collection::vec(1u32..=1_000_000, 1..=4),
    ];
    (
        buckets,
        weights,
        any::<bool>(),
        members,
        any::<Index>(),
        any::<u32>(),
    )
        .prop_map(|(buckets, weights, own, members, me, free)| {
            let weight_of = |(pick, raw, ..): &Spec| {
                if own {
                    1 + raw % 1_000_000
                } else {
                    weights[pick.index(weights.len())]
                }
            };
            let total: u64 = members.iter().map(|m| u64::from(weight_of(m))).sum();
            let loads = members
                .iter()
                .map(|m| {
                    let weight = weight_of(m);
                    let (_, _, delta, near, anywhere) = *m;
                    let held = if near {
                        let base = i64::from(share::base_share(buckets, weight, total));
                        u32::try_from((base + delta % 3).max(0)).unwrap_or(0)
                    } else {
                        anywhere % (buckets + 1)
                    };
                    Load { weight, held }
                })
                .collect::<Vec<_>>();
            let me = me.index(loads.len());
            Case {
                buckets,
                loads,
                me,
                free: free % (buckets + 1),
            }
        })
}

/// The ARGV of `DRIVER`: the loads grouped by weight, as rebalance.lua reads them.
fn argv(case: &Case) -> Vec<String> {
    let total: u64 = case.loads.iter().map(|l| u64::from(l.weight)).sum();
    // weight -> (members, members above their base share)
    let mut groups = std::collections::BTreeMap::<u32, (u64, u64)>::new();
    for l in &case.loads {
        let g = groups.entry(l.weight).or_default();
        g.0 += 1;
        if l.held > share::base_share(case.buckets, l.weight, total) {
            g.1 += 1;
        }
    }
    let mine = case.loads[case.me];
    let mut args = vec![
        "{t}".to_string(),
        case.buckets.to_string(),
        mine.weight.to_string(),
        mine.held.to_string(),
        case.free.to_string(),
    ];
    for (w, (count, above)) in groups {
        args.extend([w.to_string(), count.to_string(), above.to_string()]);
    }
    args
}

fn cases() -> u32 {
    std::env::var("SHARE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

#[test]
fn lua_share_rule_matches_share_rs() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    // The proptest! closure is `Fn`.
    let con = std::cell::RefCell::new(client.get_connection().unwrap());
    let script = format!("{COMMON}\n{DRIVER}");
    let config = ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    };
    proptest!(config, |(case in case())| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&script).arg(0);
        for a in argv(&case) {
            cmd.arg(a);
        }
        let (kind, count, lo, hi): (String, u32, u32, u32) = cmd.query(&mut *con.borrow_mut()).unwrap();
        let lua = match kind.as_str() {
            "take" => Step::Take(count),
            "release" => Step::Release(count),
            "stay" => Step::Stay,
            other => panic!("unknown kind {other:?}"),
        };
        let rust = share::step(case.buckets, &case.loads, case.me, case.free);
        prop_assert_eq!(lua, rust, "step");
        let range = share::target_range(case.buckets, &case.loads, case.me);
        prop_assert_eq!((lo, hi), range, "share range");
    });
}

/// Hand-picked edges: one bucket, remainders taken by others, a heavy weight, huge B.
#[test]
fn lua_share_rule_edges() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let script = format!("{COMMON}\n{DRIVER}");
    let l = |weight, held| Load { weight, held };
    let edges = [
        (1, vec![l(1, 0), l(1, 0), l(1, 0)], 0, 1),
        (1, vec![l(1, 1), l(1, 0), l(1, 0)], 1, 0),
        (7, vec![l(1, 0), l(3, 0)], 1, 7),
        (10, vec![l(1, 4), l(1, 4), l(1, 2)], 2, 0),
        (10, vec![l(1, 4), l(1, 3), l(1, 3)], 0, 0),
        (65_536, vec![l(1_000_000, 0), l(1, 0)], 1, 65_536),
        (65_536, vec![l(999_999, 70_000), l(1, 0)], 0, 0),
    ];
    for (buckets, loads, me, free) in edges {
        let case = Case {
            buckets,
            loads,
            me,
            free,
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&script).arg(0);
        for a in argv(&case) {
            cmd.arg(a);
        }
        let (kind, count, lo, hi): (String, u32, u32, u32) = cmd.query(&mut con).unwrap();
        let rust = share::step(case.buckets, &case.loads, case.me, case.free);
        let lua = match kind.as_str() {
            "take" => Step::Take(count),
            "release" => Step::Release(count),
            _ => Step::Stay,
        };
        assert_eq!(lua, rust, "{case:?}");
        assert_eq!(
            (lo, hi),
            share::target_range(case.buckets, &case.loads, case.me),
            "{case:?}"
        );
    }
}
