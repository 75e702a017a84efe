//! Retry pacing: exponential backoff with jitter, and the small seeded generator that draws
//! the jitter.
//!
//! Pure: no clock, no async. The driver keeps one [`Backoff`] per kind of store call (a failing
//! heartbeat does not slow a release down) and resets it when that call succeeds.
//!
//! Why jitter: members that failed together (Redis paused, a failover) would otherwise retry
//! together, in waves that hit a recovering Redis at once. Which jitter: the n-th delay is drawn
//! in the upper half of an exponential ceiling, `[c/2, c]` with `c = min(cap, base × 2ⁿ⁺¹)`,
//! and never below the base. Full jitter (`[0, c]`) retries sooner than the base half of the
//! time, so a failing fleet would call *more* often than with the fixed delay this replaces;
//! decorrelated jitter (`[base, 3 × previous]`) keeps falling back to the base (measured here:
//! with a 10× cap its delays average under half the cap). Drawing in the upper half keeps both
//! the growth and a spread of a factor of two.

use std::time::Duration;

/// The delays of successive retries of one kind of call: the first in `[base, 2 × base]`, the
/// n-th in `[c/2, c]` with `c = base × 2ⁿ`, never above `cap` (then in `[cap/2, cap]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    /// `cap` is raised to `base` if below it.
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The delay before the next retry.
    pub(crate) fn next(&mut self, rng: &mut Jitter) -> Duration {
        // 2^31 × base overflows nothing (saturating) and is past any cap that matters.
        let ceiling = self
            .base
            .saturating_mul(1 << (self.failures + 1).min(31))
            .min(self.cap);
        let low = (ceiling / 2).max(self.base).min(ceiling);
        self.failures = self.failures.saturating_add(1);
        low + (ceiling - low).mul_f64(rng.fraction())
    }

    /// The call succeeded: the next failure starts from the base again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// The shortest delay [`Backoff::next`] returns.
    pub(crate) fn base(&self) -> Duration {
        self.base
    }
}

/// A small seeded generator (SplitMix64) for the jitter. Seeded, not from the OS, so that a
/// simulation driven by one seed replays exactly: the driver seeds it from the member's id and
/// group, which differ between members (and are random UUIDs unless the user names them).
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter(seed)
    }

    /// A seed from text (FNV-1a): stable across runs and Rust versions, unlike `DefaultHasher`.
    pub(crate) fn seed_from(parts: &[&str]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in parts {
            for b in part.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn fraction(&mut self) -> f64 {
        // The top 53 bits: every value exactly representable.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_stay_between_the_base_and_the_cap() {
        let mut rng = Jitter::new(1);
        let mut b = Backoff::new(ms(250), ms(1000));
        let windows = [(250, 500), (500, 1000), (500, 1000), (500, 1000)];
        for (low, high) in windows {
            let d = b.next(&mut rng);
            assert!(
                d >= ms(low) && d <= ms(high),
                "{d:?} not in [{low}, {high}] ms"
            );
        }
        for _ in 0..10_000 {
            let d = b.next(&mut rng);
            assert!(d >= ms(500) && d <= ms(1000), "{d:?}");
        }
    }

    #[test]
    fn delays_grow_until_the_cap() {
        // Averaged over many sequences: the n-th delay grows with n, then stays near the cap.
        let mean_of = |n: usize| {
            let mut total = Duration::ZERO;
            for seed in 0..2_000 {
                let mut rng = Jitter::new(seed);
                let mut b = Backoff::new(ms(100), ms(10_000));
                total += (0..n).map(|_| b.next(&mut rng)).last().unwrap_or_default();
            }
            total / 2_000
        };
        let means: Vec<Duration> = [1, 2, 3, 4, 8].into_iter().map(mean_of).collect();
        // Each the mean of its window [c/2, c]: 150, 300, 600, 1200, then 19,200 capped at 10 s.
        let expected = [150, 300, 600, 1200, 7500];
        for (mean, want) in means.iter().zip(expected) {
            let want = ms(want);
            assert!(
                *mean > want.mul_f64(0.95) && *mean < want.mul_f64(1.05),
                "{means:?}"
            );
        }
    }

    #[test]
    fn a_reset_starts_from_the_base_again() {
        let mut rng = Jitter::new(3);
        let mut b = Backoff::new(ms(100), ms(10_000));
        for _ in 0..20 {
            b.next(&mut rng);
        }
        assert!(b.next(&mut rng) >= ms(5000));
        b.reset();
        let d = b.next(&mut rng);
        assert!(d >= ms(100) && d <= ms(200), "{d:?}");
    }

    #[test]
    fn a_cap_below_the_base_gives_the_base() {
        let mut rng = Jitter::new(3);
        let mut b = Backoff::new(ms(100), ms(10));
        assert_eq!(b.next(&mut rng), ms(100));
        assert_eq!(b.base(), ms(100));
    }

    #[test]
    fn jitter_spreads_members_that_failed_together() {
        // 100 members, seeded by their ids, fail at the same instant: their first retries spread
        // over the whole window instead of coming at once.
        let delays: Vec<Duration> = (0..100)
            .map(|i| {
                let mut rng = Jitter::new(Jitter::seed_from(&["g", &format!("m{i}")]));
                Backoff::new(ms(250), ms(1000)).next(&mut rng)
            })
            .collect();
        let mut tenths = [0usize; 10];
        for d in &delays {
            // [250, 500] ms in ten slots of 25 ms.
            let slot = ((d.as_millis() - 250) / 25).min(9) as usize;
            tenths[slot] += 1;
        }
        assert!(tenths.iter().all(|&n| (2..=25).contains(&n)), "{tenths:?}");
    }

    #[test]
    fn one_seed_gives_one_sequence() {
        let run = |seed| {
            let mut rng = Jitter::new(seed);
            let mut b = Backoff::new(ms(10), ms(1000));
            (0..20).map(|_| b.next(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        assert_ne!(
            Jitter::seed_from(&["g", "a"]),
            Jitter::seed_from(&["ga", ""])
        );
    }
}
