//! Counters per target, kept with atomics (no lock on the request path), read as a snapshot.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the latency histogram's buckets, in milliseconds (the last is unbounded).
pub const LATENCY_BUCKETS_MS: [u64; 12] =
    [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000];

/// A cheap handle on a layer's counters: per target, attempts, successes, retryable failures,
/// non-retryable returns, fallbacks triggered, cooldown skips and a latency histogram; overall,
/// requests and how many fell back. Every clone of the layer and of its services shares them.
///
/// ```
/// use tower_model_fallback::{FallbackLayer, Target};
///
/// let layer = FallbackLayer::new([Target::new("http://a.example").unwrap()]).unwrap();
/// let stats = layer.stats();
/// let snapshot = stats.snapshot();
/// assert_eq!(snapshot.requests, 0);
/// println!("{snapshot}"); // one line: requests, fallback rate, per-target counts
/// ```
#[derive(Clone)]
pub struct Stats {
    inner: Arc<Inner>,
}

struct Inner {
    names: Box<[Arc<str>]>,
    /// Each target's group, when it is a member of one.
    groups: Box<[Option<Arc<str>>]>,
    requests: AtomicU64,
    fell_back: AtomicU64,
    targets: Box<[Counters]>,
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    successes: AtomicU64,
    retryable_failures: AtomicU64,
    non_retryable: AtomicU64,
    errors: AtomicU64,
    fallbacks_triggered: AtomicU64,
    retries: AtomicU64,
    cooldown_skips: AtomicU64,
    superseded: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_total_us: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cost_nano_usd: AtomicU64,
}

/// How an attempt ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tally {
    Success,
    NonRetryable,
    RetrySame,
    NextTarget,
    Superseded,
}

impl Stats {
    pub(crate) fn new(names: impl IntoIterator<Item = Arc<str>>) -> Self {
        let names: Box<[Arc<str>]> = names.into_iter().collect();
        let targets = names.iter().map(|_| Counters::default()).collect();
        Stats {
            inner: Arc::new(Inner {
                groups: names.iter().map(|_| None).collect(),
                names,
                requests: AtomicU64::new(0),
                fell_back: AtomicU64::new(0),
                targets,
            }),
        }
    }

    /// Names each target's group (before the stats are shared).
    pub(crate) fn with_groups(
        mut self,
        groups: impl IntoIterator<Item = Option<Arc<str>>>,
    ) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            for (slot, group) in inner.groups.iter_mut().zip(groups) {
                *slot = group;
            }
        }
        self
    }

    pub(crate) fn request(&self) {
        self.inner.requests.fetch_add(1, Relaxed);
    }

    pub(crate) fn fell_back(&self) {
        self.inner.fell_back.fetch_add(1, Relaxed);
    }

    pub(crate) fn skip(&self, target: usize) {
        if let Some(c) = self.inner.targets.get(target) {
            c.cooldown_skips.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn attempt(&self, target: usize, tally: Tally, error: bool, elapsed: Duration) {
        let Some(c) = self.inner.targets.get(target) else {
            return;
        };
        c.attempts.fetch_add(1, Relaxed);
        let counter = match tally {
            Tally::Success => &c.successes,
            Tally::NonRetryable => &c.non_retryable,
            Tally::RetrySame => {
                c.retries.fetch_add(1, Relaxed);
                &c.retryable_failures
            }
            Tally::NextTarget => {
                c.fallbacks_triggered.fetch_add(1, Relaxed);
                &c.retryable_failures
            }
            Tally::Superseded => &c.superseded,
        };
        counter.fetch_add(1, Relaxed);
        if error {
            c.errors.fetch_add(1, Relaxed);
        }
        let ms = elapsed.as_millis();
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= u128::from(*b))
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        c.latency[bucket].fetch_add(1, Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        c.latency_total_us.fetch_add(us, Relaxed);
    }

    pub(crate) fn usage(&self, target: usize, prompt: u64, completion: u64, cost_usd: Option<f64>) {
        let Some(c) = self.inner.targets.get(target) else {
            return;
        };
        c.prompt_tokens.fetch_add(prompt, Relaxed);
        c.completion_tokens.fetch_add(completion, Relaxed);
        if let Some(cost) = cost_usd.filter(|c| c.is_finite() && *c >= 0.0) {
            c.cost_nano_usd.fetch_add((cost * 1e9) as u64, Relaxed);
        }
    }

    /// The counters as they are now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let i = &self.inner;
        let requests = i.requests.load(Relaxed);
        let fell_back = i.fell_back.load(Relaxed);
        let targets = i
            .names
            .iter()
            .zip(i.targets.iter())
            .zip(i.groups.iter())
            .map(|((name, c), group)| {
                let latency: Vec<u64> = c.latency.iter().map(|b| b.load(Relaxed)).collect();
                let attempts = c.attempts.load(Relaxed);
                TargetStats {
                    name: name.to_string(),
                    group: group.as_deref().map(str::to_owned),
                    attempts,
                    successes: c.successes.load(Relaxed),
                    retryable_failures: c.retryable_failures.load(Relaxed),
                    non_retryable_returns: c.non_retryable.load(Relaxed),
                    errors: c.errors.load(Relaxed),
                    fallbacks_triggered: c.fallbacks_triggered.load(Relaxed),
                    retries: c.retries.load(Relaxed),
                    cooldown_skips: c.cooldown_skips.load(Relaxed),
                    superseded: c.superseded.load(Relaxed),
                    latency_ms_p50: percentile(&latency, 0.5),
                    latency_ms_p99: percentile(&latency, 0.99),
                    latency_ms_mean: if attempts == 0 {
                        0.0
                    } else {
                        c.latency_total_us.load(Relaxed) as f64 / attempts as f64 / 1000.0
                    },
                    latency_histogram: LATENCY_BUCKETS_MS
                        .iter()
                        .map(|b| Some(*b))
                        .chain([None])
                        .zip(latency)
                        .map(|(le_ms, count)| Bucket { le_ms, count })
                        .collect(),
                    prompt_tokens: c.prompt_tokens.load(Relaxed),
                    completion_tokens: c.completion_tokens.load(Relaxed),
                    estimated_cost_usd: c.cost_nano_usd.load(Relaxed) as f64 / 1e9,
                }
            })
            .collect();
        StatsSnapshot {
            requests,
            fell_back,
            fallback_rate: if requests == 0 {
                0.0
            } else {
                fell_back as f64 / requests as f64
            },
            targets,
        }
    }
}

/// The upper bound (ms) of the bucket holding the `q` quantile; `None` past the last bound or
/// with no samples.
fn percentile(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return LATENCY_BUCKETS_MS.get(i).copied();
        }
    }
    None
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stats").field(&self.snapshot()).finish()
    }
}

/// What [`Stats::snapshot`] returns; `Serialize` for a `/stats` endpoint, `Display` for a log line.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Requests that reached a first attempt.
    pub requests: u64,
    /// Requests that tried more than one target.
    pub fell_back: u64,
    /// `fell_back / requests`: "we keep switching away from the primary" in one number.
    pub fallback_rate: f64,
    /// Per target, in the layer's order.
    pub targets: Vec<TargetStats>,
}

/// One target's counters.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct TargetStats {
    /// The target's name.
    pub name: String,
    /// The group it is a member of (`None` for a target given on its own).
    pub group: Option<String>,
    /// Attempts made.
    pub attempts: u64,
    /// Attempts that answered with a success (1xx–3xx) and were handed back.
    pub successes: u64,
    /// Attempts that failed in a way another attempt could fix.
    pub retryable_failures: u64,
    /// Attempts handed back as failures no other target could fix (400, 401, …).
    pub non_retryable_returns: u64,
    /// Attempts that ended in an error rather than a response.
    pub errors: u64,
    /// Failures after which the layer moved on to the next target.
    pub fallbacks_triggered: u64,
    /// Failures after which the layer retried this target.
    pub retries: u64,
    /// Requests that skipped this target because it was cooling down.
    pub cooldown_skips: u64,
    /// Hedged attempts dropped because another answered first.
    pub superseded: u64,
    /// Median attempt latency: the upper bound of its histogram bucket, in ms.
    pub latency_ms_p50: Option<u64>,
    /// 99th-percentile attempt latency, likewise.
    pub latency_ms_p99: Option<u64>,
    /// Mean attempt latency in ms.
    pub latency_ms_mean: f64,
    /// The latency histogram: counts of attempts at or under each bound (`null`: above all).
    pub latency_histogram: Vec<Bucket>,
    /// Prompt tokens reported by non-streamed answers' `usage`.
    pub prompt_tokens: u64,
    /// Completion tokens reported likewise.
    pub completion_tokens: u64,
    /// Cost estimated from `usage` and the models catalog, in USD.
    pub estimated_cost_usd: f64,
}

/// One histogram bucket.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Bucket {
    /// Upper bound in milliseconds; `None` for the last, unbounded bucket.
    pub le_ms: Option<u64>,
    /// Attempts in this bucket.
    pub count: u64,
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requests={} fell_back={} fallback_rate={:.3}",
            self.requests, self.fell_back, self.fallback_rate
        )?;
        for t in &self.targets {
            write!(
                f,
                " | {}: attempts={} ok={} retryable={} returned={} skipped={} p50<={}",
                t.name,
                t.attempts,
                t.successes,
                t.retryable_failures,
                t.non_retryable_returns,
                t.cooldown_skips,
                t.latency_ms_p50
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms}ms"))
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let stats = Stats::new([Arc::from("a"), Arc::from("b")]);
        stats.request();
        stats.request();
        stats.fell_back();
        stats.attempt(0, Tally::NextTarget, false, Duration::from_millis(3));
        stats.attempt(1, Tally::Success, false, Duration::from_millis(40));
        stats.attempt(1, Tally::Success, false, Duration::from_millis(700));
        stats.skip(0);
        let s = stats.snapshot();
        assert_eq!((s.requests, s.fell_back, s.fallback_rate), (2, 1, 0.5));
        assert_eq!(s.targets[0].fallbacks_triggered, 1);
        assert_eq!(s.targets[0].cooldown_skips, 1);
        assert_eq!(s.targets[1].successes, 2);
        assert_eq!(s.targets[1].latency_ms_p50, Some(50));
        assert_eq!(s.targets[1].latency_ms_p99, Some(1000));
        assert!(s
            .to_string()
            .starts_with("requests=2 fell_back=1 fallback_rate=0.500 | a: attempts=1"));
    }
}
