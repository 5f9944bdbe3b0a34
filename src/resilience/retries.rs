//! Same-target retries: how many, how long to wait (exponential backoff with jitter, or what the
//! upstream asked for in `retry-after-ms` / `retry-after`), and when to move on instead.

use std::time::Duration;

use backon::BackoffBuilder;

/// Retries on the same target before moving on (default: none).
///
/// A failure the policy calls [`RetrySame`](crate::Decision::RetrySame) (a 429, a 5xx, a
/// timeout, a dropped connection) is retried on the same target up to `retries_per_target` times,
/// after the wait the upstream asked for (`retry-after-ms`, or `retry-after` in seconds or as an
/// HTTP date) or else an exponential backoff with jitter (0.5 s, 1 s, 2 s, … up to 8 s, each
/// plus up to 100 % at random, as `backon` computes it). A wait above `max_wait` (default 10 s)
/// is not waited for: the layer moves on to the next target instead. Moving to a different
/// target waits for nothing.
///
/// ```
/// use std::time::Duration;
/// use tower_model_fallback::Retries;
///
/// let retries = Retries::new(2)
///     .base_delay(Duration::from_millis(250))
///     .max_delay(Duration::from_secs(4))
///     .max_wait(Duration::from_secs(5));
/// # let _ = retries;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    pub(crate) per_target: u32,
    pub(crate) base_delay: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) jitter: bool,
}

impl Default for Retries {
    fn default() -> Self {
        Retries::new(0)
    }
}

impl Retries {
    /// Up to `per_target` retries on each target.
    pub fn new(per_target: u32) -> Self {
        Retries {
            per_target,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_wait: Duration::from_secs(10),
            jitter: true,
        }
    }

    /// The first backoff delay (default 0.5 s); each later one doubles.
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// The longest backoff delay before jitter (default 8 s).
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The longest wait honoured (default 10 s): a `retry-after` above it moves on to the next
    /// target rather than waiting.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Random jitter on backoff delays (default on; off makes delays exact, for tests).
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The backoff delays for one target's retries.
    pub(crate) fn backoff(&self) -> backon::ExponentialBackoff {
        let builder = backon::ExponentialBuilder::new()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .without_max_times();
        if self.jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_within_one_delay() {
        let exact: Vec<Duration> = Retries::new(5).jitter(false).backoff().take(6).collect();
        let ms: Vec<u128> = exact.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 8000, 8000]);
        for (i, d) in Retries::new(5).backoff().take(6).enumerate() {
            let base = exact[i];
            assert!(d >= base && d < base * 2, "{i}: {d:?}");
        }
    }
}

/// Hedged attempts: when an attempt has no response head after `delay`, the next target starts
/// in parallel, up to `max_in_flight` attempts at once. The first acceptable response (a success,
/// or a failure no other target can fix) wins and the others are dropped and recorded
/// ([`AttemptOutcome::Superseded`](crate::AttemptOutcome::Superseded)); a failure that another
/// target could fix starts the next target at once.
///
/// Off by default. **Racing is billed twice**: every attempt that reached a provider costs
/// tokens, including the ones dropped. Hedged attempts move on rather than retrying the same
/// target, and each attempt after the first draws on the retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hedge {
    pub(crate) delay: Duration,
    pub(crate) max_in_flight: usize,
}

impl Hedge {
    /// Start the next target after `delay` without a response head, up to `max_in_flight`
    /// attempts at once (at least 1).
    pub fn new(delay: Duration, max_in_flight: usize) -> Self {
        Hedge {
            delay,
            max_in_flight: max_in_flight.max(1),
        }
    }
}
