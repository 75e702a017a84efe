//! Exhaustive checking: every interleaving, up to a depth, of a few [`MemberCore`]s and one
//! protocol [`Model`], with every fault of issue 19 (item 7), checked for S1, S2, S3, the
//! model's own invariants and convergence once the faults stop. Unit tests only; CI runs
//! bounded depths, `deep` (ignored) runs deeper with two faults per path.
//!
//! # What is explored
//! A state is the world of `world.rs`: the store's clock, the model, and per member its core
//! (the real [`MemberCore`] with its real shared ledger, exactly as the shell drives it: one
//! call in flight, notices before a heartbeat's or rebalance's reply), the call in flight, the
//! notices queued for it, the lease handles its user holds (each dropped 2 ms after its bucket
//! is revoked, inside the drain time), and its clock rate. Each transition is one choice
//! ([`Choice`]):
//! - a call runs in the store with its reply at once; or (faults) runs with its reply held,
//!   delivered later or never (a timeout at the call's deadline); or is lost before it runs;
//! - a queued notice is delivered; or (faults) lost, duplicated, left waiting while time moves
//!   on, or overtaken by the reply it came before;
//! - (faults) a member crashes (its core is dropped, nobody is told), restarts under its id,
//!   is cut off from the store (calls and notices lost) until healed, or pauses (a starved
//!   process: its timers wait, then the notice that came meanwhile goes in first, as the
//!   shell's biased `select!` takes it); the store loses its data;
//! - a member leaves gracefully, or (a join scenario) starts in the running group;
//! - (a scenario with a rejoin grace) a member that left or crashed starts again under its id
//!   (`Rejoin`, not a fault: the restart the grace is for). A session of a member with a
//!   grace that ends parks its buckets; time moves to the grace's end too;
//! - time moves to the next instant at which something happens.
//!
//! Every member's clock runs at 1 − d or 1 + d of the store's (d = `max_clock_drift`, 10% here
//! so that it shows within a 30 ms ttl); every assignment is explored. The search starts warm
//! (the members joined and the buckets spread by a fault-free run, found once and replayed) or
//! cold; its depth counts the choices after that start, faults draw on one budget per path,
//! leaves on another, and time stops at a horizon (60 ms of store time, two ttls).
//!
//! Timers and call deadlines fire as soon as they are due, in member order, without a choice:
//! the shell sleeps until its core's wake-up and cuts each call at its deadline, and a timer
//! of one member commutes with every step of another (it changes nothing but its own core).
//! A member that runs late is the `Pause` fault.
//!
//! Time is discrete: it jumps to the next instant at which something can happen — a member's
//! wake-up or call deadline or lease deadline (mapped to the store's clock through its rate,
//! rounded up to the µs), a session expiry or the end of a grace or of a quarantine in the
//! model, the moment a user drops a revoked bucket's handle. Nothing changes between two such instants unless a
//! choice is made, and every choice can be made at every instant, so the instants explored
//! are the instants that matter. What this leaves out: a call that runs at an instant strictly
//! between two events (it behaves as at the earlier one, with a smaller token and expiry).
//!
//! # What is checked
//! In every state and on every transition:
//! - **S1**: no two members each believe they own a bucket at this instant. A member believes
//!   it owns `b` while its ledger has `b` owned, or draining with a handle its user still
//!   holds (the work a drain waits for), and its lease deadline has not passed at its own now.
//!   And on the user's event stream: every `Acquired` comes before the lease deadline in force
//!   (a grant applied after it, even if lost within the same step, is an ownership nobody
//!   covers).
//! - **S2**: every grant of `b` the model makes has a token above every earlier grant of `b`
//!   (also across a wipe), and no member holds `b` under a token above the model's latest.
//! - **S3**: whenever the model frees a bucket or grants it (anything but the wipe itself),
//!   no member other than the new owner believes it owns it at that instant: its deadline,
//!   mapped to the store's clock, has passed, or it let it go.
//! - [`Model::check`]: the store's own invariants.
//! - **Parking** (with a grace), against what the checker saw of sessions ending, not the
//!   model's own parked records: what a session held when it ended (left, replaced, or
//!   expired: then from its expiry) keeps its owner record — the id, the old token — until
//!   the grace ends: granted to nobody else, not freed; the id's next session claims all of
//!   it at its registration, under one token above each old one; once the grace is over, the
//!   next call that purges frees what is still parked.
//! - **Liveness**, from the states at the depth bound or the horizon (in CI, every second or
//!   third of them): the world runs without faults (calls answered at once, notices delivered,
//!   paused and cut-off members back) and must converge within four ttls of store time: every
//!   bucket owned by exactly one live member, as the model records it, each member holding
//!   ⌊B/n⌋ or ⌈B/n⌉; no member stopped with an error but from a failed leave. The safety checks
//!   go on during that run. With a grace, every other such run first restarts the crashed
//!   members (their restart waits for the old session to expire and park, then claims), and
//!   the others leave them down until their grace runs out.
//!
//! A failed check panics with the transitions from the start, one line each (a liveness
//! failure also with the fault-free run after them), and the state reached.
//! `scripts/explore-mutants.sh` applies known mistakes one at a time and shows each caught.
//!
//! # Why our own search, not `stateright`
//! `stateright` explores states it can clone and hash. Our member is the real core, whose
//! ledger sits in an `Arc<Shared>` with watch and broadcast channels, cancellation tokens and
//! lease handles: cloning it would take a `Clone` seam through the core, the ledger and the
//! shared state, or a copy of the core written for the checker — the code checked would no
//! longer be the code that ships. So states are never cloned: the search keeps, per state, the
//! choice that led to it and its parent, and rebuilds a state by replaying its path from the
//! start (the core is deterministic: time comes in as values, the jitter is seeded per member,
//! and the session nonces come from a counter here, `session::nonces`). A replay costs the
//! depth in steps; in exchange the search needs no seam but the fingerprint and the nonce
//! counter, and has no dependency. The discrete time, the fault budget and the trace printing
//! are ours either way.
//!
//! # Pruning, and why it is sound
//! The search is breadth-first, so every state is first reached at its smallest depth, and a
//! state whose fingerprint was seen is not expanded again. The fingerprint hashes everything
//! a later step or check reads: the store's clock and the model (`Model` is `Hash`), the fault
//! budgets left and the horizon, the S2 history (the highest token granted per bucket), the
//! nonce counter, and per member: its clock rate, whether it is started, cut off, paused,
//! crashed; its core
//! ([`MemberCore::fingerprint`]: every field that decides, with timers as absolute instants,
//! which is exact since the store's clock is in the hash too); its ledger (buckets, tokens,
//! holds, drains), lease deadline and the sticky expiry flag; its call in flight with the reply
//! held; its queued notices; and the handles its user holds. What it leaves out only feeds logs
//! and metrics (the core's error log, its rebalance timer for a metric; the status fields of
//! `Local` that no decision reads). Two states with one fingerprint therefore have the same
//! futures and the same check outcomes, up to a 64-bit hash collision (at a million states,
//! about one chance in 10^7).

mod world;

use std::collections::HashSet;
use std::time::Instant as WallInstant;

use world::{Choice, Scenario, World};

/// One explored state: the choice that reached it from its parent.
struct Node {
    parent: u32,
    choice: Choice,
}

/// What a search found.
#[derive(Debug)]
struct Report {
    states: usize,
    transitions: usize,
    depth: usize,
    liveness_checked: usize,
    secs: f64,
}

/// The path from the start to node `id`.
fn path(nodes: &[Node], mut id: u32) -> Vec<Choice> {
    let mut path = Vec::new();
    while id != 0 {
        let node = &nodes[id as usize];
        path.push(node.choice);
        id = node.parent;
    }
    path.reverse();
    path
}

/// Fails with the trace of `path` (then of the fault-free run from there, if `settled`, with
/// the crashed members restarted if it says so), replayed with its log on.
fn fail(sc: &Scenario, path: &[Choice], settled: Option<bool>, why: &str) -> ! {
    let mut w = World::new(sc, true);
    for &c in path {
        w.apply(c);
        if w.violation.is_some() {
            break;
        }
    }
    if let (Some(restart), None) = (settled, &w.violation) {
        w.log_line("--- the faults stop here ---".into());
        let _ = w.settle(None, restart);
    }
    let (trace, state) = (w.trace(), w.describe());
    panic!(
        "{}: {why}\n--- trace ({} transitions) ---\n{trace}--- state ---\n{state}",
        sc.name,
        path.len()
    );
}

/// Breadth-first search of `sc` to its depth, then the liveness check from every state at
/// the depth bound.
fn explore(sc: &Scenario) -> Report {
    let started = WallInstant::now();
    let mut nodes = vec![Node {
        parent: 0,
        choice: Choice::Advance,
    }];
    let mut seen = HashSet::new();
    // The starts: one per clock assignment, each up to `Choice::Horizon` (warm: through the
    // fault-free run to convergence, found once and then replayed as choices).
    let mut frontier: Vec<u32> = Vec::new();
    for begin in World::new(sc, false).enabled() {
        let mut w = World::new(sc, false);
        w.apply(begin);
        let mut start = vec![begin];
        if sc.warm {
            match w.settle(None, false) {
                Ok(taken) => start.extend(taken),
                Err(why) => fail(
                    sc,
                    &start,
                    Some(false),
                    &format!("the warm start does not converge: {why}"),
                ),
            }
        }
        start.push(Choice::Horizon);
        let mut id = 0;
        for choice in start {
            nodes.push(Node { parent: id, choice });
            id = u32::try_from(nodes.len() - 1).expect("under 2^32 states");
        }
        frontier.push(id);
    }
    let mut transitions = 0;
    let mut depth = 0;
    let mut leaves: Vec<u32> = Vec::new();
    while depth < sc.depth && !frontier.is_empty() {
        let mut next = Vec::new();
        for &id in &frontier {
            let at = path(&nodes, id);
            let mut first = Some(World::replay(sc, &at));
            let choices = first.as_ref().map(World::enabled).unwrap_or_default();
            if choices.is_empty() {
                leaves.push(id);
            }
            for (i, &c) in choices.iter().enumerate() {
                transitions += 1;
                // The replay made to list the choices serves the last one.
                let mut w = match first.take() {
                    Some(w) if i + 1 == choices.len() => w,
                    kept => {
                        first = kept;
                        World::replay(sc, &at)
                    }
                };
                w.apply(c);
                if let Some(why) = w.violation.take() {
                    let mut full = at.clone();
                    full.push(c);
                    fail(sc, &full, None, &why);
                }
                if seen.insert(w.fingerprint()) {
                    nodes.push(Node {
                        parent: id,
                        choice: c,
                    });
                    next.push(u32::try_from(nodes.len() - 1).expect("under 2^32 states"));
                }
            }
        }
        depth += 1;
        frontier = next;
    }
    leaves.extend(frontier);
    let mut liveness_checked = 0;
    let mut converges = HashSet::new();
    for (i, &id) in leaves.iter().enumerate() {
        if i % sc.liveness_every != 0 {
            continue;
        }
        liveness_checked += 1;
        let at = path(&nodes, id);
        let mut w = World::replay(sc, &at);
        // With a grace, every other run restarts the crashed members at once (a supervisor:
        // the restart waits for the old session's expiry, which parks, and then claims), and
        // the others leave them down (their grace runs out).
        let restart = sc.grace_us > 0 && (i / sc.liveness_every) % 2 == 1;
        if let Err(why) = w.settle(Some(&mut converges), restart) {
            fail(
                sc,
                &at,
                Some(restart),
                &format!("no convergence once faults stop: {why}"),
            );
        }
        if let Some(why) = w.violation.take() {
            fail(
                sc,
                &at,
                Some(restart),
                &format!("after the faults stopped (the fault-free run from here): {why}"),
            );
        }
    }
    Report {
        states: seen.len(),
        transitions,
        depth,
        liveness_checked,
        secs: started.elapsed().as_secs_f64(),
    }
}

/// Runs every scenario and prints what each explored. `EXPLORE_DEPTH`, `EXPLORE_FAULTS` and
/// `EXPLORE_HORIZON_MS` override each scenario's bounds (to hunt with a mutant in place).
fn run_all(scenarios: &[Scenario]) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    for sc in scenarios {
        let mut sc = sc.clone();
        if let Some(depth) = var("EXPLORE_DEPTH") {
            sc.depth = usize::try_from(depth).unwrap_or(usize::MAX);
        }
        if let Some(faults) = var("EXPLORE_FAULTS") {
            sc.faults = u8::try_from(faults).unwrap_or(u8::MAX);
        }
        if let Some(ms) = var("EXPLORE_HORIZON_MS") {
            sc.horizon_us = ms * 1000;
        }
        let r = explore(&sc);
        println!(
            "{}: {} states, {} transitions, depth {}, {} faults, horizon {} ms, {} liveness runs, \
             {:.1} s",
            sc.name,
            r.states,
            r.transitions,
            r.depth,
            sc.faults,
            sc.horizon_us / 1000,
            r.liveness_checked,
            r.secs
        );
    }
}

/// CI: two members, three buckets, one fault per path, every clock assignment.
#[test]
fn two_members_three_buckets() {
    run_all(&[Scenario {
        liveness_every: 2,
        ..Scenario::new("2x3", 2, 3, 10, 1)
    }]);
}

/// CI: three members, two buckets, one fault per path.
#[test]
fn three_members_two_buckets() {
    run_all(&[Scenario {
        liveness_every: 3,
        ..Scenario::new("3x2", 3, 2, 5, 1)
    }]);
}

/// CI: two members and three buckets, the second joining the running group when the search
/// chooses (the first revokes, drains and releases), one fault per path.
#[test]
fn a_member_joins() {
    run_all(&[Scenario {
        late: 1,
        liveness_every: 3,
        ..Scenario::new("2x3 join", 2, 3, 8, 1)
    }]);
}

/// CI: two members and three buckets with a rejoin grace (half a ttl): a member leaves
/// gracefully or crashes, which parks its buckets, and starts again under its id when the
/// search chooses, within the grace (it claims them: at once after a leave, after its old
/// session's expiry after a crash) or after it (they were freed and spread); one fault per
/// path.
#[test]
fn a_member_parks_and_rejoins() {
    run_all(&[Scenario {
        grace_us: 15_000,
        rejoins: 1,
        liveness_every: 3,
        ..Scenario::new("2x3 park", 2, 3, 10, 1)
    }]);
}

/// Deeper, with two faults per path, and from a cold start (the joins and the quarantine
/// explored too): `cargo test -p redbuckets --lib explore -- --ignored --nocapture`.
#[test]
#[ignore = "minutes: run by hand"]
fn deep() {
    let cold = Scenario {
        warm: false,
        ..Scenario::new("2x3 cold", 2, 3, 16, 1)
    };
    let park = |name, members, buckets, depth, faults| Scenario {
        grace_us: 15_000,
        rejoins: 1,
        ..Scenario::new(name, members, buckets, depth, faults)
    };
    run_all(&[
        park("2x3 park deep", 2, 3, 12, 2),
        park("3x2 park deep", 3, 2, 8, 1),
        Scenario::new("2x3 deep", 2, 3, 12, 2),
        Scenario::new("3x2 deep", 3, 2, 8, 2),
        Scenario {
            late: 1,
            ..Scenario::new("2x3 join deep", 2, 3, 11, 2)
        },
        cold,
    ]);
}
