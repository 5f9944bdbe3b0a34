//! `GET /metrics`: the Prometheus text exposition format, written by prometheus-client from a
//! snapshot taken at scrape time.
//!
//! Nothing here sits on the request path: the library's [`Stats`](tower_model_fallback::Stats) and the gateway's own
//! counters are atomics, and a scrape reads them. Label values are target names, model IDs,
//! client names and fixed words: never a key, a URL or anything a client sent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tower_model_fallback::{FallbackLayer, HistogramSnapshot, StatsSnapshot};

/// The `Content-Type` of a `/metrics` answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How a request through the gateway ended, as `fallback_gateway_requests_total{outcome}`
/// counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// An upstream answered 1xx–3xx.
    Success,
    /// An upstream's 4xx, handed back (the caller's request was at fault).
    ClientError,
    /// An upstream's 5xx or 429, handed back once every target had failed.
    UpstreamError,
    /// No upstream answered at all (transport errors, the deadline).
    NoUpstreamResponse,
    /// The gateway refused it itself: no key, a bad path, a body too large or not JSON.
    Rejected,
}

const OUTCOMES: [&str; 5] = [
    "success",
    "client_error",
    "upstream_error",
    "no_upstream_response",
    "rejected",
];

/// The gateway's own counters, kept across config reloads.
#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; OUTCOMES.len()],
    /// By client name; taken at config (re)load, read at scrape time, never locked per request.
    clients: Mutex<BTreeMap<Arc<str>, Arc<AtomicU64>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Counts one request.
    pub fn request(&self, outcome: RequestOutcome) {
        if let Some(c) = self.requests.get(outcome as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The counter of client `name` (the same one for the same name across reloads).
    pub fn client(&self, name: &str) -> Arc<AtomicU64> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.entry(Arc::from(name)).or_default().clone()
    }

    /// The exposition: the gateway's counters, then the layer's, read now.
    pub fn render(&self, layer: &FallbackLayer) -> String {
        let clients = self
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, c)| (name.to_string(), c.load(Relaxed)))
            .collect();
        let scrape = Scrape {
            requests: self.requests.iter().map(|c| c.load(Relaxed)).collect(),
            clients,
            stats: layer.stats().snapshot(),
            models: layer
                .targets()
                .iter()
                .map(|t| t.model().unwrap_or("").to_owned())
                .collect(),
            cooling: (0..layer.targets().len())
                .map(|i| layer.cooling_for(i).as_secs_f64())
                .collect(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug here, not input.
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
            tracing::error!(target: "gateway", "metrics: encoding failed");
        }
        out
    }
}

/// The Prometheus bucket bounds of both histograms, in milliseconds: 4 per power of two from
/// 5 ms to 65.5 s, each a bound of the library's histogram, so every count is exact.
fn bounds_ms() -> &'static [f64] {
    static BOUNDS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut bounds = Vec::new();
        for ms in tower_model_fallback::LatencyHistogram::bounds_ms() {
            if ms < 5.0 {
                continue;
            }
            // A quarter of each power of two: 5, 6, 7, 8, 10, 12, 14, 16, 20 … ms.
            let octave = ms.log2().floor().exp2();
            if (ms / octave * 4.0).fract() == 0.0 {
                bounds.push(ms);
                if ms >= 60_000.0 {
                    break;
                }
            }
        }
        bounds
    })
}

/// Everything a scrape shows, read at once.
#[derive(Debug)]
struct Scrape {
    requests: Vec<u64>,
    clients: Vec<(String, u64)>,
    stats: StatsSnapshot,
    models: Vec<String>,
    cooling: Vec<f64>,
}

/// A histogram read from the library's, with the buckets of [`bounds_ms`], in seconds.
#[derive(Debug)]
struct Histogram<'a>(&'a HistogramSnapshot);

impl EncodeMetric for Histogram<'_> {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = bounds_ms()
            .iter()
            .map(|&ms| {
                let under = self.0.count_under_ms(ms);
                let bucket = (ms / 1000.0, under - below);
                below = under;
                bucket
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum().as_secs_f64(),
            self.0.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One metric family: a descriptor, then a value per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.into_iter().peekable();
    let Some(kind) = rows.peek().map(|(_, m)| m.metric_type()) else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let counter = |v: u64| ConstCounter::new(v);
        family(
            &mut e,
            "fallback_gateway_requests",
            "Requests through the gateway, by how they ended",
            OUTCOMES
                .iter()
                .zip(&self.requests)
                .map(|(o, v)| (vec![("outcome", *o)], counter(*v))),
        )?;
        family(
            &mut e,
            "fallback_gateway_client_requests",
            "Authenticated requests, by client name",
            self.clients
                .iter()
                .map(|(name, v)| (vec![("client", name.as_str())], counter(*v))),
        )?;
        family(
            &mut e,
            "fallback_requests",
            "Requests that reached a first attempt",
            [(Labels::new(), counter(s.requests))],
        )?;
        family(
            &mut e,
            "fallback_requests_fell_back",
            "Requests that tried more than one target",
            [(Labels::new(), counter(s.fell_back))],
        )?;
        self.encode_targets(&mut e)?;
        family(
            &mut e,
            "fallback_fallbacks",
            "Changes of target between two attempts of a request, from one target to the next",
            s.fallbacks.iter().map(|f| {
                (
                    vec![("from", f.from.as_str()), ("to", f.to.as_str())],
                    counter(f.count),
                )
            }),
        )?;
        family(
            &mut e,
            "fallback_targets_cooling",
            "Targets cooling down now",
            [(
                Labels::new(),
                ConstGauge::new(self.cooling.iter().filter(|c| **c > 0.0).count() as i64),
            )],
        )
    }
}

impl Scrape {
    /// The per-target families.
    fn encode_targets(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let targets = &self.stats.targets;
        let counter = |v: u64| ConstCounter::new(v);
        let by_target = |pick: fn(&tower_model_fallback::TargetStats) -> u64| {
            targets
                .iter()
                .map(move |t| (vec![("target", t.name.as_str())], counter(pick(t))))
        };
        family(
            e,
            "fallback_attempts",
            "Attempts, by target and outcome (status class or error kind)",
            targets.iter().flat_map(|t| {
                t.outcomes.iter().map(|(outcome, v)| {
                    (
                        vec![("target", t.name.as_str()), ("outcome", *outcome)],
                        counter(*v),
                    )
                })
            }),
        )?;
        family(
            e,
            "fallback_retries",
            "Failures after which the same target was tried again",
            by_target(|t| t.retries),
        )?;
        family(
            e,
            "fallback_cooldown_skips",
            "Requests that skipped a target because it was cooling down",
            by_target(|t| t.cooldown_skips),
        )?;
        family(
            e,
            "fallback_target_cooldown_seconds",
            "How long each target still cools down (0: available)",
            targets
                .iter()
                .zip(&self.cooling)
                .map(|(t, c)| (vec![("target", t.name.as_str())], ConstGauge::new(*c))),
        )?;
        family(
            e,
            "fallback_attempt_duration_seconds",
            "Attempt latency, from the call to the assessed outcome",
            targets.iter().map(|t| {
                (
                    vec![("target", t.name.as_str())],
                    Histogram(&t.latency_histogram),
                )
            }),
        )?;
        family(
            e,
            "fallback_first_content_seconds",
            "Time from a request's arrival to its first content chunk sent to the client",
            targets.iter().map(|t| {
                (
                    vec![("target", t.name.as_str())],
                    Histogram(&t.first_content),
                )
            }),
        )?;
        let model = |i: usize| self.models.get(i).map_or("", String::as_str);
        family(
            e,
            "fallback_tokens",
            "Tokens reported by the answers' usage, by target, model and kind",
            targets.iter().enumerate().flat_map(|(i, t)| {
                let labels = |kind| {
                    vec![
                        ("target", t.name.as_str()),
                        ("model", model(i)),
                        ("kind", kind),
                    ]
                };
                [
                    (labels("input"), counter(t.prompt_tokens)),
                    (labels("output"), counter(t.completion_tokens)),
                ]
            }),
        )?;
        family(
            e,
            "fallback_estimated_cost_usd",
            "Cost estimated from usage and the models catalog, in USD",
            targets.iter().enumerate().map(|(i, t)| {
                (
                    vec![("target", t.name.as_str()), ("model", model(i))],
                    ConstCounter::new(t.estimated_cost_usd),
                )
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buckets_run_from_5ms_past_60s_four_to_a_power_of_two() {
        let b = bounds_ms();
        assert_eq!(&b[..6], &[5.0, 6.0, 7.0, 8.0, 10.0, 12.0]);
        assert_eq!(*b.last().unwrap(), 65_536.0);
        assert_eq!(b.len(), 56);
        let library: Vec<f64> = tower_model_fallback::LatencyHistogram::bounds_ms().collect();
        assert!(b.iter().all(|ms| library.contains(ms)));
    }
}
