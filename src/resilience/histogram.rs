//! A latency histogram that resolves a few percent from 1 ms to 131 s, kept with atomics.
//!
//! Buckets are log-linear (as in HdrHistogram): each power of two of milliseconds is cut into
//! 16 equal buckets, so a bucket is 1/16 to 1/32 of its value wide (6 % to 3 %), and finding one
//! is a leading-zeros count and a shift, no search and no float. Below 1 ms the buckets are
//! 1/16 ms wide; past 131.072 s one bucket holds the rest.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::ser::{Serialize, SerializeSeq, Serializer};

/// The histogram's unit: 1/16 ms.
const UNIT_NS: u128 = 62_500;
/// Sub-buckets per power of two (and linear buckets below 1 ms).
const SUB: u64 = 16;
/// Powers of two of milliseconds covered: 1 ms up to 2^17 ms (131.072 s).
const OCTAVES: u64 = 17;
/// Every bucket, the last one unbounded.
const BUCKETS: usize = (SUB + OCTAVES * SUB + 1) as usize;

/// Counts of durations in log-linear buckets, and their sum; every method takes `&self` and
/// recording is two relaxed atomic adds, so it can sit on a request path shared by every thread.
///
/// ```
/// use std::time::Duration;
/// use tower_model_fallback::LatencyHistogram;
///
/// let h = LatencyHistogram::new();
/// h.record(Duration::from_millis(301));
/// let s = h.snapshot();
/// // The median is the upper bound of its bucket: within 1 % of the attempt, not 500 ms.
/// assert_eq!(s.quantile_ms(0.5), Some(304.0));
/// assert_eq!(s.count_under_ms(304.0), 1);
/// ```
pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl LatencyHistogram {
    /// An empty histogram (289 buckets).
    pub fn new() -> Self {
        LatencyHistogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn record(&self, elapsed: Duration) {
        if let Some(c) = self.counts.get(index(elapsed)) {
            c.fetch_add(1, Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// The counts as they are now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum_us: self.sum_us.load(Relaxed),
        }
    }

    /// The buckets' upper bounds in milliseconds, ascending (the last, unbounded bucket has
    /// none): 1/16 ms steps to 2 ms, then 16 steps per power of two. A bound picked from these
    /// makes [`HistogramSnapshot::count_under_ms`] exact.
    pub fn bounds_ms() -> impl Iterator<Item = f64> {
        (0..BUCKETS - 1).filter_map(upper_ms)
    }
}

/// The bucket of `elapsed`.
fn index(elapsed: Duration) -> usize {
    let units = u64::try_from(elapsed.as_nanos() / UNIT_NS).unwrap_or(u64::MAX);
    if units < 2 * SUB {
        return units as usize;
    }
    // `units` is in [16·2^o, 32·2^o): power of two `o`, sub-bucket `units >> o` in [16, 32).
    let octave = u64::from(63 - units.leading_zeros()) - 4;
    if octave >= OCTAVES {
        return BUCKETS - 1;
    }
    (SUB * octave + (units >> octave)) as usize
}

/// The exclusive upper bound of bucket `i`, in milliseconds; `None` for the last.
fn upper_ms(i: usize) -> Option<f64> {
    let i = i as u64;
    if i >= BUCKETS as u64 - 1 {
        return None;
    }
    let units = if i < 2 * SUB {
        i + 1
    } else {
        let octave = i / SUB - 1;
        (i % SUB + SUB + 1) << octave
    };
    Some(units as f64 / SUB as f64)
}

/// What [`LatencyHistogram::snapshot`] returns. Serializes as its non-empty buckets.
#[derive(Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    counts: Box<[u64]>,
    sum_us: u64,
}

impl HistogramSnapshot {
    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their sum.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us)
    }

    /// The mean in milliseconds (0 with no samples).
    pub fn mean_ms(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum_us as f64 / n as f64 / 1000.0,
        }
    }

    /// The upper bound (ms) of the bucket holding the `q` quantile; `None` with no samples or
    /// past the last bound.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper_ms(i);
            }
        }
        None
    }

    /// Durations under `ms` milliseconds: exact when `ms` is one of
    /// [`LatencyHistogram::bounds_ms`], else those of the buckets that end at or below it.
    pub fn count_under_ms(&self, ms: f64) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .take_while(|(i, _)| upper_ms(*i).is_some_and(|b| b <= ms))
            .map(|(_, c)| c)
            .sum()
    }

    /// The non-empty buckets, ascending.
    pub fn buckets(&self) -> impl Iterator<Item = Bucket> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &count)| Bucket {
                le_ms: upper_ms(i),
                count,
            })
    }
}

impl fmt::Debug for HistogramSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.buckets()).finish()
    }
}

impl Serialize for HistogramSnapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for bucket in self.buckets() {
            seq.serialize_element(&bucket)?;
        }
        seq.end()
    }
}

/// One histogram bucket.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Bucket {
    /// Upper bound in milliseconds (durations under it); `None` for the last, unbounded bucket.
    pub le_ms: Option<f64>,
    /// Durations in this bucket.
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_from_1ms_to_120s_lands_in_a_bucket_a_few_percent_wide() {
        let mut ms = 1.0f64;
        while ms <= 120_000.0 {
            let d = Duration::from_secs_f64(ms / 1000.0);
            let i = index(d);
            let upper = upper_ms(i).unwrap();
            let lower = if i == 0 {
                0.0
            } else {
                upper_ms(i - 1).unwrap()
            };
            assert!(lower <= ms && ms < upper, "{ms} in [{lower}, {upper})");
            assert!(
                (upper - lower) / lower <= 1.0 / 16.0 + 1e-12,
                "{ms}: too wide"
            );
            ms *= 1.013;
        }
        assert_eq!(index(Duration::from_secs(200)), BUCKETS - 1);
        assert_eq!(index(Duration::MAX), BUCKETS - 1);
        assert_eq!(index(Duration::ZERO), 0);
    }

    #[test]
    fn bounds_ascend_and_match_the_buckets() {
        let bounds: Vec<f64> = LatencyHistogram::bounds_ms().collect();
        assert_eq!(bounds.len(), BUCKETS - 1);
        assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((bounds[0], bounds[15], bounds[31]), (0.0625, 1.0, 2.0));
        assert_eq!(*bounds.last().unwrap(), 131_072.0);
        for (i, b) in bounds.iter().enumerate() {
            // Just under a bound is in its bucket; at the bound, in the next.
            let at = Duration::from_nanos((b * 1e6) as u64);
            assert_eq!(index(at), i + 1, "{b}");
            assert_eq!(index(at - Duration::from_nanos(1)), i, "{b}");
        }
    }

    #[test]
    fn quantiles_counts_and_the_serialized_form() {
        let h = LatencyHistogram::new();
        for ms in [3, 40, 301, 301, 700] {
            h.record(Duration::from_millis(ms));
        }
        h.record(Duration::from_secs(500));
        let s = h.snapshot();
        assert_eq!(s.count(), 6);
        assert_eq!(s.quantile_ms(0.5), Some(304.0));
        assert_eq!(s.quantile_ms(0.8), Some(704.0));
        assert_eq!(s.quantile_ms(1.0), None, "past the last bound");
        assert_eq!(s.count_under_ms(304.0), 4);
        assert_eq!(s.count_under_ms(303.9), 2);
        assert_eq!(s.sum(), Duration::from_millis(501_345));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json[0], serde_json::json!({"le_ms": 3.125, "count": 1}));
        assert_eq!(json[2], serde_json::json!({"le_ms": 304.0, "count": 2}));
        assert_eq!(json[4], serde_json::json!({"le_ms": null, "count": 1}));
    }
}
