//! [`FallbackLayer`]: the targets, the policy and the limits, shared by every service it builds.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use std::time::Duration;

use tower::retry::budget::Budget;

use crate::catalog::{ModelCatalog, PriceGuard};
use crate::error::ConfigError;
use crate::group::{flatten, TargetGroup};
use crate::per_target::PerTarget;
use crate::policy::{Classify, DefaultClassifier};
use crate::resilience::balance::{Loads, Rng};
use crate::resilience::health::{Bound, Cooldowns, HealthStore, TargetId};
use crate::resilience::Stats;
use crate::resilience::{Hedge, Retries};
use crate::response::CommitPoint;
use crate::service::Fallback;
use crate::settings::{target_key, Shared};
use crate::target::Target;

/// The default bound on a buffered request body: 32 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// The default bound on the part of an error body read to classify it: 8 KiB.
pub const DEFAULT_ERROR_BODY_LIMIT: usize = 8 * 1024;

/// A [`Layer`] that wraps an HTTP client service in [`Fallback`]: each request goes to the
/// first target, and to the next one when the policy says another target could do better.
///
/// Cloning is cheap: the configuration is immutable and shared.
///
/// ```
/// use tower_model_fallback::{FallbackLayer, Target};
///
/// # fn main() -> Result<(), tower_model_fallback::ConfigError> {
/// let layer = FallbackLayer::new([
///     Target::new("https://api.cometapi.com/v1")?.with_model("gpt-4o-mini").bearer("key-1")?,
///     Target::new("https://api.openai.com/v1")?.with_model("gpt-4o-mini").bearer("key-2")?,
/// ])?
/// .max_body_bytes(4 * 1024 * 1024);
/// assert_eq!(layer.targets().len(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct FallbackLayer {
    shared: Arc<Shared>,
}

impl FallbackLayer {
    /// A layer over `targets`, tried in order: [`Target`]s, or [`TargetGroup`]s of equivalent
    /// targets balanced within the group (a target on its own is a group of one). At least one
    /// target is required.
    pub fn new(
        targets: impl IntoIterator<Item = impl Into<TargetGroup>>,
    ) -> Result<Self, ConfigError> {
        let flat = flatten(targets.into_iter().map(Into::into))?;
        let targets: Arc<[Target]> = flat.targets.into();
        if targets.is_empty() {
            return Err(ConfigError::new(
                "targets",
                "at least one target is required",
            ));
        }
        let target_keys = targets.iter().map(target_key).collect();
        let stats = Stats::new(targets.iter().map(|t| t.name.clone())).with_groups(
            flat.group_of
                .iter()
                .map(|&g| flat.groups.get(g).and_then(|g| g.name.clone())),
        );
        Ok(FallbackLayer {
            shared: Arc::new(Shared {
                credential_names: crate::request::credential_names(&targets).into(),
                loads: Arc::new(Loads::new(targets.len())),
                targets,
                groups: flat.groups.into(),
                group_of: flat.group_of.into(),
                weights: flat.weights.into(),
                rng: Arc::new(Rng::random()),
                classifier: Arc::new(DefaultClassifier::new()),
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                error_body_limit: DEFAULT_ERROR_BODY_LIMIT,
                commit_on: CommitPoint::FirstContent,
                stream_error_events: true,
                stream_idle_timeout: None,
                replay_unrewritable: false,
                first_byte_timeout: None,
                attempt_timeout: None,
                retries: Retries::default(),
                health: None,
                target_keys,
                quota_cooldown: Cooldowns::new().settings().quota_cooldown,
                budget: None,
                deadline: None,
                hedge: None,
                stats,
                record_stats: true,
                catalog: None,
            }),
        })
    }

    /// The bound on a request body (default [`DEFAULT_MAX_BODY_BYTES`]). A larger body is an
    /// error ([`FallbackError::is_body_too_large`](crate::FallbackError::is_body_too_large)) and
    /// nothing is sent.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.shared).max_body_bytes = limit;
        self
    }

    /// The bound on the part of an error response body read to classify it (default
    /// [`DEFAULT_ERROR_BODY_LIMIT`]). Only read for statuses the policy asks for; `0` never reads.
    pub fn error_body_limit(mut self, limit: usize) -> Self {
        Arc::make_mut(&mut self.shared).error_body_limit = limit;
        self
    }

    /// Where the layer commits to a successful response (default
    /// [`CommitPoint::FirstContent`]).
    ///
    /// Until then a 2xx head and what followed it are held, bounded (64 KiB, and the
    /// [first-byte timeout](FallbackLayer::first_byte_timeout)); if the body fails before — the
    /// connection drops, the first-byte timeout passes with nothing read, the stream ends or
    /// sends an error event such as `data: {"error": …}` or Anthropic's `overloaded_error` —
    /// what was held is dropped and the next target is tried. With [`CommitPoint::Head`], the
    /// layer commits as soon as the head arrives. Either way, once a byte has reached the
    /// caller, an upstream failure is an error on the response body.
    pub fn commit_on(mut self, point: CommitPoint) -> Self {
        Arc::make_mut(&mut self.shared).commit_on = point;
        self
    }

    /// Whether a committed `text/event-stream` whose upstream fails — a drop, a reset, a stall
    /// past the [stream idle timeout](FallbackLayer::stream_idle_timeout) — first gets its wire
    /// format's own terminal error event (default `true`): chat completions
    /// `data: {"error": {"message", "type", "code"}}`, Responses `event: response.failed`,
    /// Anthropic `event: error`, so that an SDK reading the stream raises an error it can name.
    /// The body error follows either way; an upstream's own error event after the commit point
    /// is passed on, and a clean end after it is a body error too. Never a fake `[DONE]`.
    pub fn stream_error_events(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.shared).stream_error_events = on;
        self
    }

    /// Cuts a committed response body whose upstream sends nothing for `timeout` (default: no
    /// limit): the body ends with the terminal error event (see
    /// [`stream_error_events`](FallbackLayer::stream_error_events)) and an error of kind
    /// `TimedOut`. Only the upstream's silence counts, not the caller's pauses between reads.
    /// Needs a tokio runtime with its time driver.
    pub fn stream_idle_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.shared).stream_idle_timeout = Some(timeout);
        self
    }

    /// Sends a request whose body the layer does not rewrite for a target — not a JSON object,
    /// no multipart `model` field: a file upload, a batch, an assistants run — on to the next
    /// target after a failure (default `false`). Such a request is the same everywhere and may
    /// have side effects; a timeout or a reset after it was sent says nothing of whether it took
    /// effect (see [`Attempt::outcome_unknown`](crate::Attempt::outcome_unknown)). So by default
    /// it goes to one target only (same-target [`Retries`] still apply), unless its method is
    /// idempotent (GET, HEAD); the report says why
    /// ([`StopReason::NotReplayable`](crate::StopReason::NotReplayable)). A JSON object
    /// without `model` gets the target's model inserted and moves on like any other.
    pub fn replay_unrewritable_bodies(mut self, replay: bool) -> Self {
        Arc::make_mut(&mut self.shared).replay_unrewritable = replay;
        self
    }

    /// `true`: [`CommitPoint::FirstContent`] (the default); `false`: [`CommitPoint::Head`].
    /// Kept for configs written before [`commit_on`](FallbackLayer::commit_on).
    pub fn wait_for_first_chunk(self, wait: bool) -> Self {
        self.commit_on(if wait {
            CommitPoint::FirstContent
        } else {
            CommitPoint::Head
        })
    }

    /// How long one attempt may wait for its response head before it counts as timed out and
    /// the policy decides as for any timeout (by default: retry or move to the next target).
    /// Default: no limit. The layer's own timer gives the same outcome as a tower
    /// `TimeoutLayer` inside the layer (a `tower::timeout::error::Elapsed`), without one more
    /// service in the stack. The body's first byte is bounded by
    /// [`first_byte_timeout`](FallbackLayer::first_byte_timeout), the whole request by
    /// [`deadline`](FallbackLayer::deadline). Needs a tokio runtime with its time driver.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_model_fallback::{FallbackLayer, Target};
    ///
    /// # fn main() -> Result<(), tower_model_fallback::ConfigError> {
    /// let layer = FallbackLayer::new([Target::new("https://api.openai.com/v1")?])?
    ///     .attempt_timeout(Duration::from_secs(30));
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.shared).attempt_timeout = Some(timeout);
        self
    }

    /// How long a response head may wait for its first body chunk (and an error body for the
    /// bytes read to classify it) before the attempt counts as timed out (default: no limit).
    /// Needs a tokio runtime with its time driver.
    pub fn first_byte_timeout(mut self, timeout: std::time::Duration) -> Self {
        Arc::make_mut(&mut self.shared).first_byte_timeout = Some(timeout);
        self
    }

    /// Retries on the same target before moving on (default: none). See [`Retries`].
    pub fn retries(mut self, retries: Retries) -> Self {
        Arc::make_mut(&mut self.shared).retries = retries;
        self
    }

    /// Skips targets that keep failing, for a while, in every clone of the service (default:
    /// off). See [`Cooldowns`].
    pub fn cooldowns(mut self, cooldowns: Cooldowns) -> Self {
        let n = self.shared.targets.len();
        let shared = Arc::make_mut(&mut self.shared);
        shared.quota_cooldown = cooldowns.settings().quota_cooldown;
        shared.health = Some(Arc::new(Bound::in_memory(
            cooldowns.for_targets(n),
            shared.target_keys.clone(),
        )));
        self
    }

    /// Keeps cooldowns in a store of your own (shared between processes, say) instead of
    /// [`Cooldowns`]. `quota_cooldown` is the cooldown asked for after a 429
    /// `insufficient_quota`.
    pub fn health_store(mut self, mut store: impl HealthStore, quota_cooldown: Duration) -> Self {
        let ids: Vec<TargetId<'_>> = self
            .shared
            .target_keys
            .iter()
            .enumerate()
            .map(|(index, key)| TargetId { index, key })
            .collect();
        store.bind(&ids);
        drop(ids);
        let shared = Arc::make_mut(&mut self.shared);
        shared.quota_cooldown = quota_cooldown;
        shared.health = Some(Arc::new(Bound::new(
            Box::new(store),
            shared.target_keys.clone(),
        )));
        self
    }

    /// Shares cooldowns and failure counts with other processes through Redis (cargo feature
    /// `redis`). See [`RedisHealth`](crate::RedisHealth).
    #[cfg(feature = "redis")]
    pub fn redis_health(self, store: crate::RedisHealth) -> Self {
        let quota = store.quota_cooldown();
        self.health_store(store, quota)
    }

    /// Limits retries and fallbacks to a share of recent requests (default: no limit), with
    /// tower's [`TpsBudget`](tower::retry::budget::TpsBudget) or any
    /// [`Budget`](tower::retry::budget::Budget). Each request deposits once; each attempt after
    /// the first withdraws. When the budget is spent, the failure in hand goes back to the caller
    /// and the report says why ([`StopReason::RetryBudget`](crate::StopReason::RetryBudget)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::retry::budget::TpsBudget;
    /// # use tower_model_fallback::{FallbackLayer, Target};
    /// # let layer = FallbackLayer::new([Target::new("http://a.example").unwrap()]).unwrap();
    /// // Retries and fallbacks up to 20 % of the requests of the last 10 s, plus 1 a second.
    /// let layer = layer.retry_budget(TpsBudget::new(Duration::from_secs(10), 1, 0.2));
    /// ```
    pub fn retry_budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        Arc::make_mut(&mut self.shared).budget = Some(Arc::new(budget));
        self
    }

    /// An overall deadline for each request, from its first attempt (default: none): no attempt
    /// starts after it, and the attempt in flight is cancelled when it passes. Then the last
    /// response is handed back, or an error ([`FallbackError::is_deadline`](crate::FallbackError::is_deadline)).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        Arc::make_mut(&mut self.shared).deadline = Some(deadline);
        self
    }

    /// The layer's counters, shared by every service it builds (see [`Stats`]).
    pub fn stats(&self) -> Stats {
        self.shared.stats.clone()
    }

    /// How long target `index` (its place in [`targets`](Self::targets)) still cools down: zero
    /// when it is available, or when the layer has no cooldowns. No side effects: what a
    /// readiness check or a gauge asks.
    pub fn cooling_for(&self, index: usize) -> Duration {
        self.shared
            .health
            .as_ref()
            .map_or(Duration::ZERO, |health| health.cooling_for(index))
    }

    /// Carries `previous`'s state over to this layer, for every target that is the same in
    /// both (same name, base URL, model and credential): its [`Stats`] counters and, when both
    /// layers keep cooldowns in memory, its cooldown, shared from now on with `previous` (so
    /// requests still in flight on the old layer report to the same place). The request
    /// totals carry over too; the fallbacks by pair of targets start again. What a config
    /// reload calls last, once the new layer is built.
    ///
    /// ```
    /// use tower_model_fallback::{Cooldowns, FallbackLayer, Target};
    ///
    /// let old = FallbackLayer::new([Target::new("http://a.example").unwrap()])?
    ///     .cooldowns(Cooldowns::new());
    /// let new = FallbackLayer::new([
    ///     Target::new("http://a.example").unwrap(),
    ///     Target::new("http://b.example").unwrap(),
    /// ])?
    /// .cooldowns(Cooldowns::new())
    /// .carry_over(&old);
    /// assert_eq!(new.stats().snapshot().targets.len(), 2);
    /// # Ok::<(), tower_model_fallback::ConfigError>(())
    /// ```
    pub fn carry_over(mut self, previous: &FallbackLayer) -> Self {
        let old_keys = &previous.shared.target_keys;
        let same: Vec<Option<usize>> = self
            .shared
            .target_keys
            .iter()
            .map(|key| old_keys.iter().position(|old| old == key))
            .collect();
        let shared = Arc::make_mut(&mut self.shared);
        shared.stats = shared.stats.carried_from(&previous.shared.stats, &same);
        if let (Some(mine), Some(theirs)) = (&shared.health, &previous.shared.health) {
            if let Some(carried) = mine.carried_from(theirs, &same) {
                shared.health = Some(Arc::new(carried));
            }
        }
        self
    }

    /// Whether to keep [`Stats`] (default `true`; the counters are atomics, no lock).
    pub fn record_stats(mut self, record: bool) -> Self {
        Arc::make_mut(&mut self.shared).record_stats = record;
        self
    }

    /// Prices the targets with a [`ModelCatalog`]: a fallback priced above `guard.max_factor`
    /// times the primary is warned about (logged) or, with [`PriceGuard::refuse_above`], refused
    /// with an error naming it. Non-streamed JSON answers then carry their estimated cost in the
    /// report ([`FallbackReport::usage`](crate::FallbackReport::usage)) and the stats.
    ///
    /// ```
    /// use tower_model_fallback::{FallbackLayer, ModelCatalog, PriceGuard, Target};
    ///
    /// let catalog = ModelCatalog::from_json(br#"{"data": [
    ///   {"id": "small", "pricing": {"input": 0.15, "output": 0.6}},
    ///   {"id": "large", "pricing": {"input": 5.0, "output": 15.0}}]}"#).unwrap();
    /// let targets = || [
    ///     Target::new("https://a.example/v1").unwrap().with_model("small"),
    ///     Target::new("https://b.example/v1").unwrap().with_model("large"),
    /// ];
    /// let refused = FallbackLayer::new(targets()).unwrap().catalog(catalog.clone(), PriceGuard::refuse_above(3.0));
    /// assert!(refused.unwrap_err().to_string().starts_with("targets[1].model: large costs 26.7x"));
    /// let warned = FallbackLayer::new(targets()).unwrap().catalog(catalog, PriceGuard::warn_above(3.0));
    /// assert!(warned.is_ok());
    /// ```
    pub fn catalog(
        mut self,
        catalog: ModelCatalog,
        guard: PriceGuard,
    ) -> Result<Self, ConfigError> {
        let targets = &self.shared.targets;
        let price = |t: &Target| {
            t.model()
                .and_then(|m| catalog.price(m))
                .and_then(|p| p.comparable())
        };
        if let Some(primary) = targets.first() {
            let base = price(primary);
            for (i, target) in targets.iter().enumerate().skip(1) {
                let (Some(base), Some(this)) = (base, price(target)) else {
                    tracing::warn!(
                        target: "tower_model_fallback",
                        target_name = target.name(),
                        "no price in the catalog to compare this fallback with the primary",
                    );
                    continue;
                };
                let factor = if base > 0.0 {
                    this / base
                } else {
                    f64::INFINITY
                };
                if factor <= guard.max_factor {
                    continue;
                }
                let problem = format!(
                    "{} costs {factor:.1}x the primary ({}), above the limit of {}x",
                    target.model().unwrap_or("?"),
                    primary.model().unwrap_or("?"),
                    guard.max_factor
                );
                if guard.refuse {
                    return Err(ConfigError::new("model", problem).within(format!("targets[{i}]")));
                }
                tracing::warn!(target: "tower_model_fallback", target_name = target.name(), "{problem}");
            }
        }
        Arc::make_mut(&mut self.shared).catalog = Some(Arc::new(catalog));
        Ok(self)
    }

    /// Races targets: see [`Hedge`] (default: sequential). Racing is billed twice.
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        Arc::make_mut(&mut self.shared).hedge = Some(hedge);
        self
    }

    /// Seeds the random draws of the choice within a group (default: a random seed per layer),
    /// for reproducible tests and benchmarks.
    pub fn balance_seed(mut self, seed: u64) -> Self {
        Arc::make_mut(&mut self.shared).rng = Arc::new(Rng::seeded(seed));
        self
    }

    /// Replaces the classification policy (default [`DefaultClassifier`]).
    pub fn classifier(mut self, classifier: impl Classify) -> Self {
        Arc::make_mut(&mut self.shared).classifier = Arc::new(classifier);
        self
    }

    /// The settings every service of this layer shares.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Wraps one inner service per target, in target order, in [`Fallback`]: each attempt goes
    /// to its target's own stack (see [`PerTarget`]). An error unless there is exactly one
    /// service per target.
    pub fn per_target<S>(
        &self,
        services: impl IntoIterator<Item = S>,
    ) -> Result<Fallback<PerTarget<S>>, ConfigError> {
        let inner = PerTarget::new(services);
        let (given, wanted) = (inner.services().len(), self.shared.targets.len());
        if given != wanted {
            return Err(ConfigError::new(
                "per_target",
                format!("{given} services for {wanted} targets; give one per target, in order"),
            ));
        }
        Ok(self.layer(inner))
    }

    /// The targets, in order.
    pub fn targets(&self) -> &[Target] {
        &self.shared.targets
    }
}

impl fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("targets", &self.shared.targets)
            .field("max_body_bytes", &self.shared.max_body_bytes)
            .field("error_body_limit", &self.shared.error_body_limit)
            .finish()
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback::new(inner, self.shared.clone())
    }
}
