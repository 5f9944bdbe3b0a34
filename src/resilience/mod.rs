//! What keeps an outage from multiplying load: same-target retries and hedging
//! ([`Retries`], [`Hedge`]), cooldowns behind the [`HealthStore`] trait, per-target [`Stats`],
//! and (feature `redis`) a health store and retry budget shared by several processes.

pub(crate) mod balance;
pub(crate) mod health;
pub(crate) mod histogram;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod retries;
pub(crate) mod stats;

use std::time::{Duration, Instant};

#[cfg(feature = "redis-tls")]
pub use self::redis::RedisTls;
#[cfg(feature = "redis")]
pub use self::redis::{RedisBudget, RedisHealth};
pub use health::{Admission, Cooldowns, HealthOutcome, HealthStore, TargetId};
pub use histogram::{Bucket, HistogramSnapshot, LatencyHistogram};
pub use retries::{Hedge, Retries};
pub use stats::{FallbackCount, Stats, StatsSnapshot, TargetStats, OUTCOMES};

/// `now + duration`, saturating far in the future instead of overflowing.
pub(crate) fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}
