//! What the choice within a group reads: each member's load (a peak-EWMA of its attempt
//! latency, as tower's `load::PeakEwma` keeps it, times its attempts in flight) and a seeded
//! random source. Both are atomics: the request path takes no lock.
//!
//! tower's `PeakEwma` wraps a service and `balance::p2c` balances over services found by a
//! `Discover`; here the members share one inner service and differ only in how each request is
//! rewritten, so the estimate is kept per member instead, by the same rule.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How fast an estimate forgets: after this long, an observation weighs 1/e of what it did.
const DECAY: Duration = Duration::from_secs(10);

/// A failure another member could fix counts as an attempt at least this slow, so that a member
/// that answers 429 at once does not look like the fastest.
pub(crate) const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// The load of every target of a layer (only members of groups of two or more are measured).
pub(crate) struct Loads {
    members: Box<[Load]>,
    /// The time updates are counted from: the first update's.
    epoch: OnceLock<Instant>,
}

#[derive(Default)]
struct Load {
    /// The estimate in nanoseconds, as `f64` bits.
    estimate: AtomicU64,
    /// When the estimate was last updated, in nanoseconds since the epoch.
    updated: AtomicU64,
    pending: AtomicU32,
}

impl Loads {
    pub(crate) fn new(targets: usize) -> Self {
        Loads {
            members: (0..targets).map(|_| Load::default()).collect(),
            epoch: OnceLock::new(),
        }
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The estimate of `load` at `now`: decayed towards zero since its last update, as tower's
    /// does when it is read, so that an idle member is tried again.
    fn estimate(&self, load: &Load, now: Instant) -> f64 {
        let estimate = f64::from_bits(load.estimate.load(Relaxed));
        let elapsed = self
            .since_epoch(now)
            .saturating_sub(load.updated.load(Relaxed));
        estimate * decay(elapsed)
    }

    /// The cost of sending the next attempt to target `index`: its latency estimate (plus one
    /// nanosecond, so that unmeasured members compare by what they have in flight) times its
    /// attempts in flight plus this one.
    pub(crate) fn cost(&self, index: usize, now: Instant) -> f64 {
        let Some(load) = self.members.get(index) else {
            return f64::MAX;
        };
        let pending = f64::from(load.pending.load(Relaxed)) + 1.0;
        (self.estimate(load, now) + 1.0) * pending
    }

    /// An attempt on target `index` starts; it is counted in flight until the guard drops.
    pub(crate) fn start(self: &Arc<Self>, index: usize) -> InFlight {
        if let Some(load) = self.members.get(index) {
            load.pending.fetch_add(1, Relaxed);
        }
        InFlight {
            loads: self.clone(),
            index,
        }
    }

    /// Peak-EWMA: a slower attempt than the estimate replaces it at once; a faster one moves it
    /// by how long ago the last update was. Concurrent updates may lose one another's sample:
    /// the estimate is a hint, not an account.
    fn observe(&self, index: usize, rtt: Duration, now: Instant) {
        let Some(load) = self.members.get(index) else {
            return;
        };
        let rtt = rtt.as_nanos() as f64;
        let at = self.since_epoch(now);
        let previous = f64::from_bits(load.estimate.load(Relaxed));
        let next = if rtt > previous {
            rtt
        } else {
            let d = decay(at.saturating_sub(load.updated.load(Relaxed)));
            previous * d + rtt * (1.0 - d)
        };
        load.estimate.store(next.to_bits(), Relaxed);
        load.updated.store(at, Relaxed);
    }
}

fn decay(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / DECAY.as_nanos() as f64).exp()
}

/// An attempt counted in a member's load: [`InFlight::finish`] adds its latency to the
/// estimate; dropped (finished or not) it leaves the count in flight.
pub(crate) struct InFlight {
    loads: Arc<Loads>,
    index: usize,
}

impl InFlight {
    /// The attempt took `rtt`.
    pub(crate) fn finish(self, rtt: Duration, now: Instant) {
        self.loads.observe(self.index, rtt, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(load) = self.loads.members.get(self.index) {
            load.pending.fetch_sub(1, Relaxed);
        }
    }
}

/// A random source for the choice: SplitMix64 over an atomic counter, so every clone of a layer
/// shares one sequence without a lock, and a seed makes it reproducible.
pub(crate) struct Rng {
    state: AtomicU64,
}

impl Rng {
    /// Seeded from the process's hash keys: different in every process.
    pub(crate) fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Rng::seeded(seed)
    }

    pub(crate) fn seeded(seed: u64) -> Self {
        Rng {
            state: AtomicU64::new(seed),
        }
    }

    /// A number below `bound` (which must not be 0).
    pub(crate) fn below(&self, bound: u64) -> u64 {
        const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = self.state.fetch_add(GOLDEN, Relaxed).wrapping_add(GOLDEN);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % bound.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_attempt_raises_the_estimate_at_once_and_idleness_lowers_it() {
        let loads = Arc::new(Loads::new(2));
        let t0 = Instant::now();
        loads.start(0).finish(Duration::from_millis(10), t0);
        loads.start(1).finish(Duration::from_millis(500), t0);
        assert!(loads.cost(0, t0) < loads.cost(1, t0));
        let cost = loads.cost(1, t0);
        assert!((cost - 500e6).abs() < 10.0, "peak taken at once: {cost}");
        // A fast attempt right after moves a peak little; time does the forgetting.
        loads.start(1).finish(Duration::from_millis(10), t0);
        assert!(loads.cost(1, t0) > 400e6);
        assert!(loads.cost(1, t0 + Duration::from_secs(60)) < 2e6);
    }

    #[test]
    fn attempts_in_flight_multiply_the_cost_until_they_drop() {
        let loads = Arc::new(Loads::new(1));
        let t0 = Instant::now();
        let one = loads.cost(0, t0);
        let flight = loads.start(0);
        assert_eq!(loads.cost(0, t0), 2.0 * one);
        drop(flight);
        assert_eq!(loads.cost(0, t0), one);
    }

    #[test]
    fn a_seeded_source_repeats_itself() {
        let (a, b) = (Rng::seeded(7), Rng::seeded(7));
        let draws = |r: &Rng| (0..8).map(|_| r.below(10)).collect::<Vec<_>>();
        let first = draws(&a);
        assert_eq!(first, draws(&b));
        assert!(first.iter().all(|d| *d < 10));
        assert!(first.iter().any(|d| *d != first[0]));
    }
}
