//! Counters per target, kept with atomics (no lock on the request path), read as a snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::histogram::{HistogramSnapshot, LatencyHistogram};
use crate::policy::ErrorKind;
use crate::report::{AttemptOutcome, FallbackReport};

/// The names of what an attempt came to, as [`TargetStats::outcomes`] counts them: a status
/// class, an error kind, a stream whose first event was an error, or a hedged attempt dropped.
pub const OUTCOMES: [&str; 14] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "timeout",
    "connect",
    "closed",
    "overloaded",
    "protocol",
    "io",
    "error",
    "error_event",
    "superseded",
];

/// A cheap handle on a layer's counters: per target, attempts (by outcome), successes,
/// retryable failures, non-retryable returns, fallbacks triggered, retries, cooldown skips,
/// tokens, cost, and histograms of attempt latency and time to first content; per pair of
/// targets, fallbacks from one to the other; overall, requests and how many fell back. Every
/// clone of the layer and of its services shares them.
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
    totals: Arc<Totals>,
    targets: Box<[Arc<Counters>]>,
    /// `from * n + to`: fallbacks from target `from` to target `to`.
    fallbacks: Box<[AtomicU64]>,
}

#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    fell_back: AtomicU64,
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
    outcomes: [AtomicU64; OUTCOMES.len()],
    latency: LatencyHistogram,
    first_content: LatencyHistogram,
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

/// The place of `outcome` in [`OUTCOMES`].
fn outcome_slot(outcome: &AttemptOutcome) -> usize {
    let kind = |kind: &ErrorKind| match kind {
        ErrorKind::Timeout => 5,
        ErrorKind::Connect => 6,
        ErrorKind::Closed => 7,
        ErrorKind::Overloaded => 8,
        ErrorKind::Protocol => 9,
        ErrorKind::Io => 10,
        ErrorKind::Other => 11,
    };
    match outcome {
        AttemptOutcome::Status(s) => usize::from(s.as_u16() / 100).clamp(1, 5) - 1,
        AttemptOutcome::Error { kind: k, .. } | AttemptOutcome::BodyFailed { kind: k, .. } => {
            kind(k)
        }
        AttemptOutcome::ErrorEvent { .. } => 12,
        AttemptOutcome::Superseded => 13,
    }
}

impl Stats {
    pub(crate) fn new(names: impl IntoIterator<Item = Arc<str>>) -> Self {
        let names: Box<[Arc<str>]> = names.into_iter().collect();
        let targets = names.iter().map(|_| Arc::default()).collect();
        let groups = names.iter().map(|_| None).collect();
        Stats::with_parts(names, groups, Arc::default(), targets)
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

    fn with_parts(
        names: Box<[Arc<str>]>,
        groups: Box<[Option<Arc<str>>]>,
        totals: Arc<Totals>,
        targets: Box<[Arc<Counters>]>,
    ) -> Self {
        let n = names.len();
        Stats {
            inner: Arc::new(Inner {
                names,
                groups,
                totals,
                targets,
                fallbacks: (0..n * n).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    /// These counters, sharing `previous`'s totals and, for each target `j` with
    /// `same[j] == Some(i)`, target `i`'s counters: what a config reload keeps. The
    /// fallbacks by pair start again from zero.
    pub(crate) fn carried_from(&self, previous: &Stats, same: &[Option<usize>]) -> Stats {
        let targets = self
            .inner
            .targets
            .iter()
            .zip(same.iter().chain(std::iter::repeat(&None)))
            .map(|(mine, same)| {
                same.and_then(|i| previous.inner.targets.get(i))
                    .unwrap_or(mine)
                    .clone()
            })
            .collect();
        Stats::with_parts(
            self.inner.names.clone(),
            self.inner.groups.clone(),
            previous.inner.totals.clone(),
            targets,
        )
    }

    pub(crate) fn request(&self) {
        self.inner.totals.requests.fetch_add(1, Relaxed);
    }

    /// A request that fell back: once, and once for each change of target between two of its
    /// attempts.
    pub(crate) fn fell_back(&self, report: &FallbackReport) {
        self.inner.totals.fell_back.fetch_add(1, Relaxed);
        let n = self.inner.names.len();
        for pair in report.attempts().windows(2) {
            let (from, to) = (pair[0].target_index(), pair[1].target_index());
            if from != to && from < n && to < n {
                if let Some(c) = self.inner.fallbacks.get(from * n + to) {
                    c.fetch_add(1, Relaxed);
                }
            }
        }
    }

    pub(crate) fn skip(&self, target: usize) {
        if let Some(c) = self.inner.targets.get(target) {
            c.cooldown_skips.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn attempt(
        &self,
        target: usize,
        tally: Tally,
        outcome: &AttemptOutcome,
        elapsed: Duration,
    ) {
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
        if matches!(outcome, AttemptOutcome::Error { .. }) {
            c.errors.fetch_add(1, Relaxed);
        }
        if let Some(o) = c.outcomes.get(outcome_slot(outcome)) {
            o.fetch_add(1, Relaxed);
        }
        c.latency.record(elapsed);
    }

    /// Counts the time from a request's arrival to its first content chunk reaching the caller,
    /// for target `target` (its place in the layer's list). The layer does not see when a
    /// chunk leaves: a proxy that does (the gateway) reports it here.
    pub fn record_first_content(&self, target: usize, elapsed: Duration) {
        if let Some(c) = self.inner.targets.get(target) {
            c.first_content.record(elapsed);
        }
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
        let requests = i.totals.requests.load(Relaxed);
        let fell_back = i.totals.fell_back.load(Relaxed);
        let targets = i
            .names
            .iter()
            .zip(i.targets.iter())
            .zip(i.groups.iter())
            .map(|((name, c), group)| target_stats(name, group.as_deref(), c))
            .collect();
        let n = i.names.len();
        let fallbacks = i
            .fallbacks
            .iter()
            .enumerate()
            .map(|(k, c)| (k / n.max(1), k % n.max(1), c.load(Relaxed)))
            .filter(|(_, _, count)| *count > 0)
            .map(|(from, to, count)| FallbackCount {
                from: i.names[from].to_string(),
                to: i.names[to].to_string(),
                count,
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
            fallbacks,
        }
    }
}

fn target_stats(name: &str, group: Option<&str>, c: &Counters) -> TargetStats {
    let latency = c.latency.snapshot();
    TargetStats {
        name: name.to_owned(),
        group: group.map(str::to_owned),
        attempts: c.attempts.load(Relaxed),
        successes: c.successes.load(Relaxed),
        retryable_failures: c.retryable_failures.load(Relaxed),
        non_retryable_returns: c.non_retryable.load(Relaxed),
        errors: c.errors.load(Relaxed),
        fallbacks_triggered: c.fallbacks_triggered.load(Relaxed),
        retries: c.retries.load(Relaxed),
        cooldown_skips: c.cooldown_skips.load(Relaxed),
        superseded: c.superseded.load(Relaxed),
        outcomes: OUTCOMES
            .iter()
            .zip(c.outcomes.iter())
            .map(|(name, count)| (*name, count.load(Relaxed)))
            .filter(|(_, count)| *count > 0)
            .collect(),
        latency_ms_p50: latency.quantile_ms(0.5),
        latency_ms_p99: latency.quantile_ms(0.99),
        latency_ms_mean: latency.mean_ms(),
        latency_histogram: latency,
        first_content: c.first_content.snapshot(),
        prompt_tokens: c.prompt_tokens.load(Relaxed),
        completion_tokens: c.completion_tokens.load(Relaxed),
        estimated_cost_usd: c.cost_nano_usd.load(Relaxed) as f64 / 1e9,
    }
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
    /// Fallbacks from one target to another (each change of target between two attempts of a
    /// request), the pairs that happened.
    pub fallbacks: Vec<FallbackCount>,
}

/// Fallbacks from one target to another.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct FallbackCount {
    /// The target that failed.
    pub from: String,
    /// The target tried next.
    pub to: String,
    /// How many times.
    pub count: u64,
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
    /// Attempts by what they came to, by the names of [`OUTCOMES`] (those that happened).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Median attempt latency: the upper bound of its histogram bucket (a few percent above
    /// the attempts'), in ms.
    pub latency_ms_p50: Option<f64>,
    /// 99th-percentile attempt latency, likewise.
    pub latency_ms_p99: Option<f64>,
    /// Mean attempt latency in ms.
    pub latency_ms_mean: f64,
    /// The attempt latency histogram (serialized as its non-empty buckets).
    pub latency_histogram: HistogramSnapshot,
    /// Time from a request's arrival to its first content chunk, for the requests this target
    /// served, as a proxy reported it ([`Stats::record_first_content`]).
    pub first_content: HistogramSnapshot,
    /// Prompt tokens reported by non-streamed answers' `usage`.
    pub prompt_tokens: u64,
    /// Completion tokens reported likewise.
    pub completion_tokens: u64,
    /// Cost estimated from `usage` and the models catalog, in USD.
    pub estimated_cost_usd: f64,
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
    use crate::policy::Decision;
    use crate::report::Attempt;
    use http::StatusCode;

    fn attempt(target_index: usize, status: u16) -> Attempt {
        Attempt {
            target: Arc::from("t"),
            target_index,
            group: None,
            model: None,
            substituted: false,
            outcome: AttemptOutcome::Status(StatusCode::from_u16(status).unwrap()),
            elapsed: Duration::ZERO,
            decision: Decision::NextTarget,
            outcome_unknown: false,
        }
    }

    #[test]
    fn counts_outcomes_pairs_and_percentiles() {
        let stats = Stats::new([Arc::from("a"), Arc::from("b")]);
        stats.request();
        stats.request();
        let mut report = FallbackReport::default();
        report.push(attempt(0, 503));
        report.push(attempt(1, 200));
        stats.fell_back(&report);
        let status = |s| AttemptOutcome::Status(StatusCode::from_u16(s).unwrap());
        let refused = AttemptOutcome::Error {
            kind: ErrorKind::Connect,
            message: String::new(),
        };
        stats.attempt(0, Tally::NextTarget, &status(503), Duration::from_millis(3));
        stats.attempt(0, Tally::NextTarget, &refused, Duration::from_millis(1));
        stats.attempt(1, Tally::Success, &status(200), Duration::from_millis(40));
        stats.attempt(1, Tally::Success, &status(200), Duration::from_millis(301));
        stats.attempt(1, Tally::Success, &status(201), Duration::from_millis(700));
        stats.skip(0);
        stats.record_first_content(1, Duration::from_millis(90));
        let s = stats.snapshot();
        assert_eq!((s.requests, s.fell_back, s.fallback_rate), (2, 1, 0.5));
        assert_eq!(s.targets[0].fallbacks_triggered, 2);
        assert_eq!(s.targets[0].errors, 1);
        assert_eq!(s.targets[0].cooldown_skips, 1);
        assert_eq!(
            s.targets[0].outcomes,
            BTreeMap::from([("5xx", 1), ("connect", 1)])
        );
        assert_eq!(s.targets[1].outcomes, BTreeMap::from([("2xx", 3)]));
        assert_eq!(s.targets[1].successes, 3);
        assert_eq!(s.targets[1].latency_ms_p50, Some(304.0));
        assert_eq!(s.targets[1].latency_ms_p99, Some(704.0));
        assert_eq!(s.targets[1].first_content.count(), 1);
        assert_eq!(
            (
                s.fallbacks.len(),
                &*s.fallbacks[0].from,
                &*s.fallbacks[0].to
            ),
            (1, "a", "b")
        );
        assert!(s
            .to_string()
            .starts_with("requests=2 fell_back=1 fallback_rate=0.500 | a: attempts=2"));
    }

    #[test]
    fn a_carried_over_target_keeps_its_counters_and_the_totals_carry() {
        let old = Stats::new([Arc::from("a"), Arc::from("b")]);
        old.request();
        old.attempt(
            1,
            Tally::Success,
            &AttemptOutcome::Superseded,
            Duration::ZERO,
        );
        let new = Stats::new([Arc::from("b"), Arc::from("c")]).carried_from(&old, &[Some(1), None]);
        new.attempt(
            0,
            Tally::Success,
            &AttemptOutcome::Superseded,
            Duration::ZERO,
        );
        let s = new.snapshot();
        assert_eq!(s.requests, 1);
        assert_eq!((s.targets[0].attempts, s.targets[1].attempts), (2, 0));
        assert_eq!(old.snapshot().targets[1].attempts, 2, "one set of counters");
    }
}
