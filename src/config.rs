//! [`FallbackConfig`]: a layer described in JSON, with keys taken from environment variables.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::{DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use tower::retry::budget::TpsBudget;

use crate::catalog::{ModelCatalog, PriceGuard};
use crate::error::ConfigError;
use crate::group::TargetGroup;
use crate::layer::{FallbackLayer, DEFAULT_ERROR_BODY_LIMIT, DEFAULT_MAX_BODY_BYTES};
use crate::policy::DefaultClassifier;
use crate::resilience::Cooldowns;
use crate::resilience::{Hedge, Retries};
use crate::response::CommitPoint;
use crate::target::Target;

/// A [`FallbackLayer`] described as data: targets, limits and timeouts. Unknown fields are an
/// error, and every error names the field (`targets[1].base_url: … is a relative URL`).
///
/// Keys are never written in the file: each target names the environment variable that holds
/// its key (`api_key_env`). A key written in the file (`api_key`) is refused unless
/// `allow_inline_keys` is `true`.
///
/// ```
/// use tower_model_fallback::FallbackConfig;
///
/// let config = FallbackConfig::from_json(br#"{
///     "targets": [
///         {"name": "cometapi", "base_url": "https://api.cometapi.com/v1", "model": "gpt-4o-mini", "api_key_env": "COMETAPI_KEY"},
///         {"name": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}
///     ],
///     "attempt_timeout_ms": 30000
/// }"#).unwrap();
/// let env = |name: &str| Some(format!("key-for-{name}"));
/// let layer = config.layer_with_env(env).unwrap();
/// assert_eq!(layer.targets()[1].name(), "openai");
///
/// let err = FallbackConfig::from_json(br#"{"targets": [{"base_url": "https://a.example", "modle": "x"}]}"#)
///     .unwrap_err();
/// assert!(err.to_string().starts_with("targets[0].modle: unknown field"), "{err}");
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FallbackConfig {
    /// The targets, in order (at least one): each a target, or a group of equivalent targets
    /// (`{"group": "openai", "members": [{…}, {…}]}`) balanced within the group.
    pub targets: Vec<EntryConfig>,
    /// Bound on a request body in bytes (default 33554432, 32 MiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Bound on the part of an error body read to classify it (default 8192).
    #[serde(default = "default_error_body_limit")]
    pub error_body_limit: usize,
    /// Time for one attempt's response head, in milliseconds (default: none), enforced by the
    /// layer ([`FallbackLayer::attempt_timeout`]): past it the attempt counts as a timeout.
    #[serde(default)]
    pub attempt_timeout_ms: Option<u64>,
    /// Time a response head may wait for its first body chunk, in milliseconds (default: none).
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    /// Hold a success until its first chunk, so that a failure before it still falls back
    /// (default `true`).
    #[serde(default = "default_true")]
    pub wait_for_first_chunk: bool,
    /// Where a success is committed: `"first_content"` (the default), `"first_event"` or
    /// `"head"`; see [`CommitPoint`]. Overrides `wait_for_first_chunk` when given.
    #[serde(default)]
    pub commit_on: Option<CommitPoint>,
    /// End a committed stream whose upstream fails with the wire format's own terminal error
    /// event before the body error (default `true`). See
    /// [`FallbackLayer::stream_error_events`].
    #[serde(default = "default_true")]
    pub stream_error_events: bool,
    /// Cut a committed body whose upstream sends nothing for this long, in milliseconds
    /// (default: none). See [`FallbackLayer::stream_idle_timeout`].
    #[serde(default)]
    pub stream_idle_timeout_ms: Option<u64>,
    /// Send a request whose body is not rewritten per target (not a JSON object, no multipart
    /// `model` field) and whose method is not GET or HEAD on to other targets (default
    /// `false`). See [`FallbackLayer::replay_unrewritable_bodies`].
    #[serde(default)]
    pub replay_unrewritable_bodies: bool,
    /// Accept keys written in the file (`api_key`) rather than in the environment (default
    /// `false`).
    #[serde(default)]
    pub allow_inline_keys: bool,
    /// Retries on the same target before moving on (default 0). See [`Retries`].
    #[serde(default)]
    pub retries_per_target: u32,
    /// The first backoff delay in milliseconds (default 500); each later one doubles.
    #[serde(default = "default_retry_base_delay_ms")]
    pub retry_base_delay_ms: u64,
    /// The longest backoff delay in milliseconds, before jitter (default 8000).
    #[serde(default = "default_retry_max_delay_ms")]
    pub retry_max_delay_ms: u64,
    /// The longest `retry-after` honoured, in milliseconds (default 10000); a longer one moves on.
    #[serde(default = "default_max_retry_wait_ms")]
    pub max_retry_wait_ms: u64,
    /// Cooldowns (a circuit breaker per target); off when absent. See [`Cooldowns`].
    #[serde(default)]
    pub cooldown: Option<CooldownConfig>,
    /// A retry budget; no limit when absent.
    #[serde(default)]
    pub retry_budget: Option<BudgetConfig>,
    /// Keep cooldowns, failure counts and the retry budget in Redis, shared by every replica
    /// (cargo feature `redis`); in process when absent. Turns cooldowns on (with the `cooldown`
    /// section's settings, or its defaults).
    #[serde(default)]
    pub health_store: Option<HealthStoreConfig>,
    /// The overall deadline of a request in milliseconds (default: none).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Hedged attempts; sequential when absent. Racing is billed twice.
    #[serde(default)]
    pub hedge: Option<HedgeConfig>,
    /// Statuses that move on to the next target whatever the default table says (default `[]`).
    #[serde(default)]
    pub next_target_on: Vec<u16>,
    /// Statuses handed back to the caller whatever the default table says (default `[]`).
    #[serde(default)]
    pub return_on: Vec<u16>,
    /// Fall back on a 400 `context_length_exceeded` (default `false`).
    #[serde(default)]
    pub fall_back_on_context_length: bool,
    /// Fall back on a 400 content-policy refusal (default `false`).
    #[serde(default)]
    pub fall_back_on_content_policy: bool,
    /// A models list file (the shape of CometAPI's `GET /api/models`) to price the targets with
    /// (default: none). See [`ModelCatalog`].
    #[serde(default)]
    pub models_file: Option<String>,
    /// With `models_file`: the largest acceptable ratio of a fallback's price to the primary's
    /// (default 3.0).
    #[serde(default = "default_price_factor")]
    pub max_price_factor: f64,
    /// With `models_file`: refuse to start (`true`) rather than warn (`false`, the default) when a
    /// fallback is priced above `max_price_factor`.
    #[serde(default)]
    pub refuse_pricier_fallbacks: bool,
}

/// What a `health_store` section resolves to: the Redis URL and the TLS files' contents (read
/// only by the features that use them).
#[cfg_attr(not(feature = "redis-tls"), allow(dead_code))]
struct StoreLink {
    url: String,
    /// PEM: the CA certificates to trust.
    ca: Option<Vec<u8>>,
    /// PEM: the client certificate chain and its key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl StoreLink {
    /// The TLS settings the files give, if any.
    #[cfg(feature = "redis-tls")]
    fn tls(&self) -> Option<crate::RedisTls> {
        if self.ca.is_none() && self.identity.is_none() {
            return None;
        }
        let mut tls = crate::RedisTls::new();
        if let Some(ca) = &self.ca {
            tls = tls.root_ca_pem(ca.clone());
        }
        if let Some((chain, key)) = &self.identity {
            tls = tls.client_identity_pem(chain.clone(), key.clone());
        }
        Some(tls)
    }
}

/// The contents of the file that config field `field` names.
fn read_pem(field: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(field, format!("cannot read {path} ({e})")))
}

impl HealthStoreConfig {
    /// The Redis URL, from the file or the environment, and the TLS files, read.
    fn link(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        allow_inline: bool,
    ) -> Result<StoreLink, ConfigError> {
        let url = self.url(env, allow_inline)?;
        let named = self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some();
        if named && cfg!(not(feature = "redis-tls")) {
            return Err(ConfigError::new(
                "tls_ca_file",
                "TLS to Redis needs tower-model-fallback built with its `redis-tls` feature",
            ));
        }
        let ca = self
            .tls_ca_file
            .as_deref()
            .map(|path| read_pem("tls_ca_file", path))
            .transpose()?;
        let identity = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some((
                read_pem("tls_cert_file", cert)?,
                read_pem("tls_key_file", key)?,
            )),
            (None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "tls_cert_file",
                    "and tls_key_file go together: give both or neither",
                ))
            }
        };
        Ok(StoreLink { url, ca, identity })
    }

    /// The Redis URL, from the file or the environment.
    fn url(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        allow_inline: bool,
    ) -> Result<String, ConfigError> {
        let url = match (&self.redis_url, &self.redis_url_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "redis_url",
                    "give redis_url or redis_url_env, not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "redis_url",
                    "is required (or redis_url_env)",
                ))
            }
            (Some(url), None) => {
                let authority = url.split_once("://").map_or("", |(_, rest)| rest);
                let authority = authority.split(['/', '?', '#']).next().unwrap_or("");
                if authority.contains('@') && !allow_inline {
                    return Err(ConfigError::new(
                        "redis_url",
                        "holds a password; name an environment variable with redis_url_env \
                         (or set allow_inline_keys)",
                    ));
                }
                url.clone()
            }
            (None, Some(var)) => env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::new(
                    "redis_url_env",
                    format!("environment variable {var} is not set"),
                )
            })?,
        };
        if self.refresh_ms == 0 {
            return Err(ConfigError::new("refresh_ms", "must be at least 1"));
        }
        if self.probe_lock_ms == 0 {
            return Err(ConfigError::new("probe_lock_ms", "must be at least 1"));
        }
        Ok(url)
    }
}

/// A Redis store's error, in the config's terms: the TLS settings are files there.
#[cfg(feature = "redis-tls")]
fn in_config_terms(e: ConfigError) -> ConfigError {
    let field = match e.field() {
        "root_ca_pem" => "tls_ca_file",
        "client_identity_pem" => "tls_cert_file",
        _ => return e.within("health_store"),
    };
    ConfigError::new(field, e.problem().to_owned()).within("health_store")
}

#[cfg(all(feature = "redis", not(feature = "redis-tls")))]
fn in_config_terms(e: ConfigError) -> ConfigError {
    e.within("health_store")
}

#[cfg(feature = "redis")]
fn shared_health(
    layer: FallbackLayer,
    link: &StoreLink,
    config: &HealthStoreConfig,
    cooldowns: Option<Cooldowns>,
) -> Result<FallbackLayer, ConfigError> {
    let store = crate::RedisHealth::new(&link.url, &config.prefix)
        .and_then(|s| s.refresh(Duration::from_millis(config.refresh_ms)))
        .and_then(|s| s.probe_lock(Duration::from_millis(config.probe_lock_ms)));
    #[cfg(feature = "redis-tls")]
    let store = store.and_then(|s| match link.tls() {
        Some(tls) => s.tls(&tls),
        None => Ok(s),
    });
    let store = store
        .map_err(in_config_terms)?
        .cooldowns(cooldowns.unwrap_or_default());
    Ok(layer.redis_health(store))
}

#[cfg(feature = "redis")]
fn shared_budget(
    layer: FallbackLayer,
    link: &StoreLink,
    config: &HealthStoreConfig,
    budget: &BudgetConfig,
) -> Result<FallbackLayer, ConfigError> {
    let shared = crate::RedisBudget::new(
        &link.url,
        &config.prefix,
        Duration::from_millis(budget.ttl_ms),
        budget.min_per_sec,
        budget.percent,
    )
    .and_then(|b| b.refresh(Duration::from_millis(config.refresh_ms)));
    #[cfg(feature = "redis-tls")]
    let shared = shared.and_then(|b| match link.tls() {
        Some(tls) => b.tls(&tls),
        None => Ok(b),
    });
    Ok(layer.retry_budget(shared.map_err(in_config_terms)?))
}

#[cfg(not(feature = "redis"))]
fn shared_health(
    _: FallbackLayer,
    _: &StoreLink,
    _: &HealthStoreConfig,
    _: Option<Cooldowns>,
) -> Result<FallbackLayer, ConfigError> {
    Err(ConfigError::new(
        "health_store",
        "needs tower-model-fallback built with its `redis` feature",
    ))
}

#[cfg(not(feature = "redis"))]
fn shared_budget(
    _: FallbackLayer,
    _: &StoreLink,
    _: &HealthStoreConfig,
    _: &BudgetConfig,
) -> Result<FallbackLayer, ConfigError> {
    Err(ConfigError::new(
        "health_store",
        "needs tower-model-fallback built with its `redis` feature",
    ))
}

fn default_price_factor() -> f64 {
    3.0
}

/// The `cooldown` section of a [`FallbackConfig`]; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CooldownConfig {
    /// Failures within the window that open the breaker (default 3).
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// The window in milliseconds (default 60000).
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// How long an open breaker skips the target, in milliseconds (default 30000).
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: u64,
    /// The cooldown after a 429 `insufficient_quota`, in milliseconds (default 900000).
    #[serde(default = "default_quota_cooldown_ms")]
    pub quota_cooldown_ms: u64,
}

/// The `retry_budget` section of a [`FallbackConfig`] (tower's `TpsBudget`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// How long a request's deposit counts, in milliseconds, 1000 to 60000 (default 10000).
    #[serde(default = "default_budget_ttl_ms")]
    pub ttl_ms: u64,
    /// Retries allowed per second whatever the traffic (default 10).
    #[serde(default = "default_budget_min_per_sec")]
    pub min_per_sec: u32,
    /// Retries allowed as a share of requests, 0.0 to 1000.0 (default 0.2).
    #[serde(default = "default_budget_percent")]
    pub percent: f32,
}

impl BudgetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1000..=60_000).contains(&self.ttl_ms) {
            return Err(ConfigError::new(
                "retry_budget.ttl_ms",
                "must be between 1000 and 60000",
            ));
        }
        if !(0.0..=1000.0).contains(&self.percent) {
            return Err(ConfigError::new(
                "retry_budget.percent",
                "must be between 0.0 and 1000.0",
            ));
        }
        if self.min_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::new("retry_budget.min_per_sec", "is too large"));
        }
        Ok(())
    }
}

/// The `health_store` section of a [`FallbackConfig`]: where shared state lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthStoreConfig {
    /// The Redis URL, `redis://host:port[/db]`. A URL with a password is refused unless
    /// `allow_inline_keys` is set; name an environment variable with `redis_url_env` instead.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// The environment variable that holds the Redis URL.
    #[serde(default)]
    pub redis_url_env: Option<String>,
    /// With a `rediss://` URL: a PEM file of the CA certificates that signed the server's
    /// certificate, trusted instead of the webpki roots (default: the webpki roots, which managed
    /// Redis services' certificates chain to). Needs the `redis-tls` feature.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// With a `rediss://` URL: a PEM file of the client certificate chain, for a server that asks
    /// for one (`tls-auth-clients yes`); goes with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    /// The PEM file of `tls_cert_file`'s private key.
    #[serde(default)]
    pub tls_key_file: Option<String>,
    /// The prefix of every key (default `"tower-model-fallback"`). Gateways with the same prefix
    /// share their state.
    #[serde(default = "default_store_prefix")]
    pub prefix: String,
    /// How often each replica refreshes its state from Redis, in milliseconds (default 200).
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u64,
    /// How long the replica that probes a target after a shared cooldown holds the fleet's lock,
    /// in milliseconds (default 30000): long enough for one attempt.
    #[serde(default = "default_probe_lock_ms")]
    pub probe_lock_ms: u64,
}

fn default_store_prefix() -> String {
    "tower-model-fallback".to_owned()
}
fn default_probe_lock_ms() -> u64 {
    30_000
}
fn default_refresh_ms() -> u64 {
    200
}

/// The `hedge` section of a [`FallbackConfig`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HedgeConfig {
    /// Start the next target after this many milliseconds without a response head.
    pub delay_ms: u64,
    /// Attempts in flight at once (default 2).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_retry_base_delay_ms() -> u64 {
    500
}
fn default_retry_max_delay_ms() -> u64 {
    8000
}
fn default_max_retry_wait_ms() -> u64 {
    10_000
}
fn default_failures() -> u32 {
    3
}
fn default_window_ms() -> u64 {
    60_000
}
fn default_cooldown_ms() -> u64 {
    30_000
}
fn default_quota_cooldown_ms() -> u64 {
    900_000
}
fn default_budget_ttl_ms() -> u64 {
    10_000
}
fn default_budget_min_per_sec() -> u32 {
    10
}
fn default_budget_percent() -> f32 {
    0.2
}
fn default_max_in_flight() -> usize {
    2
}

/// One entry of a [`FallbackConfig`]'s `targets`: a target, or a group of equivalent targets.
/// An object whose first field is `group` or `members` is a group.
#[derive(Debug, Clone)]
pub enum EntryConfig {
    /// A target on its own.
    Target(TargetConfig),
    /// A group of targets, balanced within the group (see [`TargetGroup`]).
    Group(GroupConfig),
}

/// A group of a [`FallbackConfig`]: `{"group": "openai", "members": [{…}, {…}]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupConfig {
    /// The group's name, in reports and stats.
    pub group: String,
    /// Its members (1 to 64), each a target with an optional `weight` (default 1).
    pub members: Vec<TargetConfig>,
}

impl From<TargetConfig> for EntryConfig {
    fn from(target: TargetConfig) -> Self {
        EntryConfig::Target(target)
    }
}

impl From<GroupConfig> for EntryConfig {
    fn from(group: GroupConfig) -> Self {
        EntryConfig::Group(group)
    }
}

impl GroupConfig {
    /// A group named `group` of `members` (the struct is `#[non_exhaustive]`).
    pub fn new(group: impl Into<String>, members: Vec<TargetConfig>) -> Self {
        GroupConfig {
            group: group.into(),
            members,
        }
    }
}

impl<'de> Deserialize<'de> for EntryConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EntryVisitor)
    }
}

/// Tells a group from a target by the first field, then hands the whole object, first field
/// included, to the derived deserializer: errors keep their paths (`members[0].modle`).
struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = EntryConfig;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(r#"a target, or a group {"group": NAME, "members": [targets]}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EntryConfig, A::Error> {
        let first: Option<String> = map.next_key()?;
        let group = matches!(first.as_deref(), Some("group" | "members"));
        let whole = serde::de::value::MapAccessDeserializer::new(Replay { first, map });
        if group {
            GroupConfig::deserialize(whole).map(EntryConfig::Group)
        } else {
            TargetConfig::deserialize(whole).map(EntryConfig::Target)
        }
    }
}

/// A map whose first key was already read: it is given again, then the rest.
struct Replay<A> {
    first: Option<String>,
    map: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(key) => seed
                .deserialize(IntoDeserializer::<A::Error>::into_deserializer(key))
                .map(Some),
            None => self.map.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

impl EntryConfig {
    /// The entry as a group (a target on its own is a group of one). Errors name the field
    /// within the entry (`members[0].api_key_env`).
    fn group(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        allow_inline_keys: bool,
    ) -> Result<TargetGroup, ConfigError> {
        let config = match self {
            EntryConfig::Target(target) => {
                if target.weight.is_some() {
                    return Err(ConfigError::new(
                        "weight",
                        "only a group's members have a weight",
                    ));
                }
                return target.target(env, allow_inline_keys).map(TargetGroup::from);
            }
            EntryConfig::Group(config) => config,
        };
        if config.group.trim().is_empty() {
            return Err(ConfigError::new("group", "must not be empty"));
        }
        let mut group = TargetGroup::new(&config.group);
        for (i, member) in config.members.iter().enumerate() {
            let target = member
                .target(env, allow_inline_keys)
                .map_err(|e| e.within(format!("members[{i}]")))?;
            group = group.weighted(target, member.weight.unwrap_or(1));
        }
        Ok(group)
    }
}

/// One target of a [`FallbackConfig`].
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TargetConfig {
    /// The display name (default: the base URL's host).
    #[serde(default)]
    pub name: Option<String>,
    /// The base URL, e.g. `https://api.cometapi.com/v1`.
    pub base_url: String,
    /// The model ID written into the body (default: the caller's model, unchanged).
    #[serde(default)]
    pub model: Option<String>,
    /// The environment variable that holds this target's key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The key itself; refused unless `allow_inline_keys` is `true`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// The header the key is sent in (default `authorization`, as `Bearer <key>`); e.g.
    /// `x-api-key` or `api-key` to send the bare key there.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// Extra headers sent to this target only.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Let the caller's own key through to this target (default `false`).
    #[serde(default)]
    pub forward_caller_credentials: bool,
    /// A group member's weight, its relative capacity (default 1; only in a group's `members`).
    #[serde(default)]
    pub weight: Option<u32>,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("api_key_header", &self.api_key_header)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field(
                "forward_caller_credentials",
                &self.forward_caller_credentials,
            )
            .field("weight", &self.weight)
            .finish()
    }
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_error_body_limit() -> usize {
    DEFAULT_ERROR_BODY_LIMIT
}

fn default_true() -> bool {
    true
}

/// A section built from its serde defaults, so that each default is written once (in the
/// field's `#[serde(default = …)]`). Only called with values that deserialize (unit-tested).
fn from_defaults<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a config section's defaults deserialize")
}

impl Default for CooldownConfig {
    /// Every field at its default.
    fn default() -> Self {
        from_defaults(serde_json::json!({}))
    }
}

impl Default for BudgetConfig {
    /// Every field at its default.
    fn default() -> Self {
        from_defaults(serde_json::json!({}))
    }
}

impl Default for HealthStoreConfig {
    /// Every field at its default: no Redis URL yet (set `redis_url_env` or `redis_url`).
    fn default() -> Self {
        from_defaults(serde_json::json!({}))
    }
}

impl HedgeConfig {
    /// Start the next target after `delay_ms` without a response head; the rest at defaults.
    pub fn new(delay_ms: u64) -> Self {
        from_defaults(serde_json::json!({ "delay_ms": delay_ms }))
    }
}

impl TargetConfig {
    /// A target at `base_url` with every other field at its default; set the public fields
    /// to change them (the struct is `#[non_exhaustive]`: new options are not breaking).
    ///
    /// ```
    /// use tower_model_fallback::{FallbackConfig, TargetConfig};
    ///
    /// let mut target = TargetConfig::new("https://api.openai.com/v1");
    /// target.model = Some("gpt-4o-mini".into());
    /// target.api_key_env = Some("OPENAI_API_KEY".into());
    /// let mut config = FallbackConfig::new(vec![target]);
    /// config.attempt_timeout_ms = Some(30_000);
    /// let layer = config.layer_with_env(|_| Some("key".into())).unwrap();
    /// assert_eq!(layer.targets()[0].model(), Some("gpt-4o-mini"));
    /// ```
    pub fn new(base_url: impl Into<String>) -> Self {
        from_defaults(serde_json::json!({ "base_url": base_url.into() }))
    }
}

impl FallbackConfig {
    /// A config over `targets` (targets or groups) with every other field at its default (what
    /// a JSON file with only `targets` gives); set the public fields to change them.
    pub fn new(targets: impl IntoIterator<Item = impl Into<EntryConfig>>) -> Self {
        let mut config: FallbackConfig = from_defaults(serde_json::json!({ "targets": [] }));
        config.targets = targets.into_iter().map(Into::into).collect();
        config
    }

    /// Parses a JSON config. Errors name the field: `targets[0].modle: unknown field …`.
    pub fn from_json(json: &[u8]) -> Result<FallbackConfig, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let config: FallbackConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "config".to_owned()
            } else {
                path
            };
            ConfigError::new(field, e.inner().to_string())
        })?;
        de.end()
            .map_err(|e| ConfigError::new("config", e.to_string()))?;
        Ok(config)
    }

    /// Builds a config from an already parsed JSON value (for configs embedded in a larger
    /// document: remove your own fields first). Errors name the field.
    pub fn from_value(value: serde_json::Value) -> Result<FallbackConfig, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "config".to_owned()
            } else {
                path
            };
            ConfigError::new(field, e.inner().to_string())
        })
    }

    /// Reads and parses a JSON config file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<FallbackConfig, ConfigError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        FallbackConfig::from_json(&bytes)
    }

    /// Builds the layer, reading keys from the process environment.
    pub fn layer(&self) -> Result<FallbackLayer, ConfigError> {
        self.layer_with_env(|name| std::env::var(name).ok())
    }

    /// Builds the layer, reading keys with `env` (a stand-in for the environment in tests).
    pub fn layer_with_env(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<FallbackLayer, ConfigError> {
        let targets = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.group(&env, self.allow_inline_keys)
                    .map_err(|e| e.within(format!("targets[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut layer = FallbackLayer::new(targets)?
            .max_body_bytes(self.max_body_bytes)
            .error_body_limit(self.error_body_limit)
            .wait_for_first_chunk(self.wait_for_first_chunk);
        if let Some(point) = self.commit_on {
            layer = layer.commit_on(point);
        }
        layer = layer
            .stream_error_events(self.stream_error_events)
            .replay_unrewritable_bodies(self.replay_unrewritable_bodies);
        if let Some(ms) = self.stream_idle_timeout_ms {
            layer = layer.stream_idle_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = self.first_byte_timeout_ms {
            layer = layer.first_byte_timeout(Duration::from_millis(ms));
        }
        if let Some(timeout) = self.attempt_timeout() {
            layer = layer.attempt_timeout(timeout);
        }
        if let Some(d) = self.deadline_ms {
            layer = layer.deadline(Duration::from_millis(d));
        }
        let layer = self.with_resilience(layer, &env)?;
        let layer = self.with_catalog(layer)?;
        self.with_classifier(layer)
    }

    /// Retries, cooldowns (in memory or shared), the retry budget and hedging.
    fn with_resilience(
        &self,
        mut layer: FallbackLayer,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<FallbackLayer, ConfigError> {
        let ms = Duration::from_millis;
        layer = layer.retries(
            Retries::new(self.retries_per_target)
                .base_delay(ms(self.retry_base_delay_ms))
                .max_delay(ms(self.retry_max_delay_ms))
                .max_wait(ms(self.max_retry_wait_ms)),
        );
        let cooldowns = self.cooldown.as_ref().map(|c| {
            Cooldowns::new()
                .failures(c.failures)
                .window(ms(c.window_ms))
                .cooldown(ms(c.cooldown_ms))
                .quota_cooldown(ms(c.quota_cooldown_ms))
        });
        let store = match &self.health_store {
            Some(store) => Some((
                store
                    .link(env, self.allow_inline_keys)
                    .map_err(|e| e.within("health_store"))?,
                store,
            )),
            None => None,
        };
        match (&store, cooldowns) {
            (Some((link, config)), cooldowns) => {
                layer = shared_health(layer, link, config, cooldowns)?;
            }
            (None, Some(cooldowns)) => layer = layer.cooldowns(cooldowns),
            (None, None) => {}
        }
        if let Some(b) = &self.retry_budget {
            b.validate()?;
            layer = match &store {
                Some((link, config)) => shared_budget(layer, link, config, b)?,
                None => layer.retry_budget(TpsBudget::new(ms(b.ttl_ms), b.min_per_sec, b.percent)),
            };
        }
        if let Some(h) = &self.hedge {
            if h.max_in_flight < 2 {
                return Err(ConfigError::new(
                    "hedge.max_in_flight",
                    "must be at least 2 to race",
                ));
            }
            layer = layer.hedge(Hedge::new(ms(h.delay_ms), h.max_in_flight));
        }
        Ok(layer)
    }

    /// The priced models catalog and its guard on pricier fallbacks.
    fn with_catalog(&self, layer: FallbackLayer) -> Result<FallbackLayer, ConfigError> {
        let Some(path) = &self.models_file else {
            return Ok(layer);
        };
        let catalog = ModelCatalog::from_file(path)
            .map_err(|e| ConfigError::new("models_file", e.problem().to_owned()))?;
        let guard = PriceGuard {
            max_factor: self.max_price_factor,
            refuse: self.refuse_pricier_fallbacks,
        };
        layer.catalog(catalog, guard)
    }

    /// The default classifier, with the status sets and opt-ins of the config.
    fn with_classifier(&self, layer: FallbackLayer) -> Result<FallbackLayer, ConfigError> {
        let statuses = |field: &'static str, codes: &[u16]| {
            codes
                .iter()
                .map(|c| {
                    http::StatusCode::from_u16(*c)
                        .ok()
                        .filter(|s| s.as_u16() >= 400)
                        .ok_or_else(|| {
                            ConfigError::new(field, format!("{c} is not an error status (400-599)"))
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let next_target_on = statuses("next_target_on", &self.next_target_on)?;
        let return_on = statuses("return_on", &self.return_on)?;
        let custom = self.fall_back_on_context_length
            || self.fall_back_on_content_policy
            || !next_target_on.is_empty()
            || !return_on.is_empty();
        if !custom {
            return Ok(layer);
        }
        Ok(layer.classifier(
            DefaultClassifier::new()
                .next_target_on(next_target_on)
                .return_on(return_on)
                .fall_back_on_context_length(self.fall_back_on_context_length)
                .fall_back_on_content_policy(self.fall_back_on_content_policy),
        ))
    }

    /// The per-attempt timeout, if one is set.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout_ms.map(Duration::from_millis)
    }
}

impl TargetConfig {
    fn target(
        &self,
        env: &impl Fn(&str) -> Option<String>,
        allow_inline_keys: bool,
    ) -> Result<Target, ConfigError> {
        let mut target = Target::new(&self.base_url)?;
        if let Some(name) = &self.name {
            target = target.with_name(name);
        }
        if let Some(model) = &self.model {
            target = target.with_model(model);
        }
        let key = match (&self.api_key_env, &self.api_key) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "api_key",
                    "give either api_key_env or api_key, not both",
                ))
            }
            (Some(var), None) => Some(env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::new(
                    "api_key_env",
                    format!("environment variable {var} is not set"),
                )
            })?),
            (None, Some(_)) if !allow_inline_keys => {
                return Err(ConfigError::new(
                    "api_key",
                    "a key written in the config file is refused; name an environment variable with api_key_env (or set allow_inline_keys)",
                ))
            }
            (None, key) => key.clone(),
        };
        if let Some(key) = key {
            target = match &self.api_key_header {
                None => target.bearer(key)?,
                Some(h) if h.eq_ignore_ascii_case("authorization") => target.bearer(key)?,
                Some(header) => target.api_key_header(header, key)?,
            };
        }
        for (name, value) in &self.headers {
            target = target
                .header(name, value)
                .map_err(|e| e.within(format!("headers.{name}")))?;
        }
        Ok(target.forward_caller_credentials(self.forward_caller_credentials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(json: &str, env: &[(&str, &str)]) -> Result<FallbackLayer, ConfigError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        FallbackConfig::from_json(json.as_bytes())?.layer_with_env(|k| env.get(k).cloned())
    }

    #[test]
    fn constructors_take_the_serde_defaults() {
        let built = FallbackConfig::new(vec![TargetConfig::new("https://a.example/v1")]);
        let parsed =
            FallbackConfig::from_json(br#"{"targets": [{"base_url": "https://a.example/v1"}]}"#)
                .unwrap();
        assert_eq!(format!("{built:?}"), format!("{parsed:?}"));
        assert_eq!(CooldownConfig::default().failures, 3);
        assert_eq!(BudgetConfig::default().ttl_ms, 10_000);
        assert_eq!(HealthStoreConfig::default().refresh_ms, 200);
        assert_eq!(HedgeConfig::new(250).max_in_flight, 2);
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let cases = [
            (
                r#"{"targets": []}"#,
                "targets: at least one target is required",
            ),
            (
                r#"{"targets": [{"base_url": "http://a.example"}, {"base_url": "api.openai.com/v1"}]}"#,
                "targets[1].base_url: \"api.openai.com/v1\" is a relative URL",
            ),
            (
                r#"{"targets": [{"base_url": "http://a.example", "api_key_env": "NOPE"}]}"#,
                "targets[0].api_key_env: environment variable NOPE is not set",
            ),
            (
                r#"{"targets": [{"base_url": "http://a.example", "api_key": "sk-inline"}]}"#,
                "targets[0].api_key: a key written in the config file is refused",
            ),
            (
                r#"{"targets": [{"base_url": 7}]}"#,
                "targets[0].base_url: invalid type",
            ),
            (r#"{"targetz": []}"#, "targetz: unknown field `targetz`"),
            (
                r#"{"max_body_bytes": 1}"#,
                "config: missing field `targets`",
            ),
            (
                r#"{"targets": [{"base_url": "http://a.example", "headers": {"x-a": "bad\nvalue"}}]}"#,
                "targets[0].headers.x-a.header:",
            ),
            (
                r#"{"targets": [{"base_url": "http://a.example"}]} trailing"#,
                "config: trailing characters",
            ),
        ];
        for (json, expected) in cases {
            let err = build(json, &[]).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{json}\n  gave: {err}\n  want: {expected}"
            );
            assert!(!err.contains("sk-inline"));
        }
    }

    #[test]
    fn a_group_is_accepted_wherever_a_target_is_and_its_errors_name_the_member() {
        let a = r#"{"base_url": "http://a.example"}"#;
        let cases = [
            (
                format!(
                    r#"[{a}, {{"group": "openai", "members": [{a}, {{"base_url": "http://b.example", "api_key_env": "NOPE"}}]}}]"#
                ),
                "targets[1].members[1].api_key_env: environment variable NOPE is not set",
            ),
            (
                r#"[{"group": "g", "members": [{"base_url": "http://b.example", "modle": "x"}]}]"#
                    .to_owned(),
                "targets[0].members[0].modle: unknown field",
            ),
            (
                format!(r#"[{{"members": [{a}], "group": "g", "weight": 2}}]"#),
                "targets[0].weight: unknown field",
            ),
            (
                r#"[{"group": "g", "members": []}]"#.to_owned(),
                "targets[0].members: a group needs at least one member",
            ),
            (
                format!(
                    r#"[{{"group": "g", "members": [{a}, {{"base_url": "http://b.example", "weight": 0}}]}}]"#
                ),
                "targets[0].members[1].weight: must be at least 1",
            ),
            (
                r#"[{"base_url": "http://a.example", "weight": 2}]"#.to_owned(),
                "targets[0].weight: only a group's members have a weight",
            ),
            (
                format!(r#"[{{"group": " ", "members": [{a}]}}]"#),
                "targets[0].group: must not be empty",
            ),
            (
                format!(r#"[{{"members": [{a}]}}]"#),
                "targets[0]: missing field `group`",
            ),
            (r#"[7]"#.to_owned(), "targets[0]: invalid type: integer `7`"),
        ];
        for (targets, expected) in cases {
            let err = build(&format!(r#"{{"targets": {targets}}}"#), &[])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(expected),
                "{targets}\n  gave: {err}\n  want: {expected}"
            );
        }
        let layer = build(
            r#"{"targets": [
                {"members": [
                    {"name": "k1", "base_url": "http://a.example/v1", "api_key_env": "K1"},
                    {"name": "k2", "base_url": "http://a.example/v1", "api_key_env": "K2", "weight": 3}
                 ], "group": "openai"},
                {"name": "other", "base_url": "http://b.example"}
            ]}"#,
            &[("K1", "one"), ("K2", "two")],
        )
        .unwrap();
        let names: Vec<&str> = layer.targets().iter().map(|t| t.name()).collect();
        assert_eq!(names, ["k1", "k2", "other"]);
        let shared = layer.shared();
        assert_eq!(&*shared.weights, &[1, 3, 1]);
        assert_eq!(shared.group_name(1).map(|g| &**g), Some("openai"));
        assert_eq!(shared.group_name(2), None);
        let stats = layer.stats().snapshot();
        assert_eq!(stats.targets[0].group.as_deref(), Some("openai"));
        assert_eq!(stats.targets[2].group, None);
    }

    #[test]
    fn the_health_store_section_is_validated() {
        let base = r#""targets": [{"base_url": "http://a.example"}]"#;
        let mut cases = vec![
            (
                r#""health_store": {"prefix": "p"}"#,
                "health_store.redis_url: is required",
            ),
            (
                r#""health_store": {"redis_url": "redis://:pw@127.0.0.1/", "redis_url_env": "R"}"#,
                "health_store.redis_url: give redis_url or redis_url_env, not both",
            ),
            (
                r#""health_store": {"redis_url": "redis://:hunter2@127.0.0.1/"}"#,
                "health_store.redis_url: holds a password",
            ),
            (
                r#""health_store": {"redis_url_env": "NO_REDIS"}"#,
                "health_store.redis_url_env: environment variable NO_REDIS is not set",
            ),
            (
                r#""health_store": {"redis_url": "redis://127.0.0.1/", "refresh_ms": 0}"#,
                "health_store.refresh_ms: must be at least 1",
            ),
            (
                r#""health_store": {"redis_url": "redis://127.0.0.1/", "probe_lock_ms": 0}"#,
                "health_store.probe_lock_ms: must be at least 1",
            ),
            (
                r#""health_store": {"redis_url": "redis://127.0.0.1/", "refresh": 5}"#,
                "health_store.refresh: unknown field",
            ),
        ];
        if cfg!(feature = "redis") {
            cases.push((
                r#""health_store": {"redis_url": "http://127.0.0.1/"}"#,
                "health_store.redis_url: is not a Redis URL",
            ));
            cases.push((
                r#""health_store": {"redis_url": "redis://127.0.0.1/", "prefix": ""}"#,
                "health_store.prefix: must be non-empty",
            ));
        } else {
            cases.push((
                r#""health_store": {"redis_url": "redis://127.0.0.1/"}"#,
                "health_store: needs tower-model-fallback built with its `redis` feature",
            ));
        }
        if cfg!(not(feature = "redis-tls")) {
            cases.push((
                r#""health_store": {"redis_url": "rediss://127.0.0.1/", "tls_ca_file": "ca.crt"}"#,
                "health_store.tls_ca_file: TLS to Redis needs tower-model-fallback built with its \
                 `redis-tls` feature",
            ));
        }
        for (extra, expected) in cases {
            let err = build(&format!("{{{base}, {extra}}}"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{extra}: {err}");
            assert!(!err.contains("hunter2"));
        }
    }

    #[test]
    fn resilience_sections_are_validated() {
        let base = r#""targets": [{"base_url": "http://a.example"}]"#;
        for (extra, expected) in [
            (
                r#""retry_budget": {"ttl_ms": 100}"#,
                "retry_budget.ttl_ms: must be between 1000 and 60000",
            ),
            (
                r#""retry_budget": {"percent": -1}"#,
                "retry_budget.percent: must be between",
            ),
            (
                r#""hedge": {"delay_ms": 100, "max_in_flight": 1}"#,
                "hedge.max_in_flight: must be at least 2",
            ),
            (
                r#""hedge": {"max_in_flight": 3}"#,
                "hedge: missing field `delay_ms`",
            ),
            (
                r#""cooldown": {"cooldwn_ms": 5}"#,
                "cooldown.cooldwn_ms: unknown field",
            ),
        ] {
            let err = build(&format!("{{{base}, {extra}}}"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{extra}: {err}");
        }
        let layer = build(
            &format!(
                r#"{{{base}, "retries_per_target": 2, "cooldown": {{}}, "retry_budget": {{}},
                "deadline_ms": 60000, "hedge": {{"delay_ms": 3000}}, "fall_back_on_context_length": true}}"#
            ),
            &[],
        );
        assert!(layer.is_ok());
    }

    #[test]
    fn a_models_file_prices_the_targets() {
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models.json");
        let json = |refuse: bool| {
            format!(
                r#"{{"targets": [{{"base_url": "http://a.example", "model": "gpt-4o-mini"}},
                               {{"base_url": "http://b.example", "model": "gpt-4o"}}],
                   "models_file": "{fixture}", "refuse_pricier_fallbacks": {refuse}}}"#
            )
        };
        assert!(build(&json(false), &[]).is_ok());
        let err = build(&json(true), &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("targets[1].model: gpt-4o costs 16.7x"),
            "{err}"
        );
        let missing = build(
            r#"{"targets": [{"base_url": "http://a.example"}], "models_file": "/nonexistent/models.json"}"#,
            &[],
        )
        .unwrap_err();
        assert_eq!(missing.field(), "models_file");
    }

    #[test]
    fn builds_targets_with_keys_from_the_environment() {
        let layer = build(
            r#"{"targets": [
                {"name": "a", "base_url": "http://a.example/v1", "model": "m1", "api_key_env": "A_KEY"},
                {"base_url": "http://b.example", "api_key_env": "B_KEY", "api_key_header": "x-api-key",
                 "headers": {"anthropic-version": "2023-06-01"}}
            ], "first_byte_timeout_ms": 5000, "max_body_bytes": 1024}"#,
            &[("A_KEY", "ka"), ("B_KEY", "kb")],
        )
        .unwrap();
        let targets = layer.targets();
        assert_eq!((targets[0].name(), targets[0].model()), ("a", Some("m1")));
        assert_eq!(targets[0].credentials[0].1, "Bearer ka");
        assert_eq!(targets[1].name(), "b.example");
        assert_eq!(targets[1].credentials[0].0, "x-api-key");
        assert_eq!(targets[1].headers[0].0, "anthropic-version");
    }

    #[test]
    fn commit_on_names_a_commit_point() {
        let json = |point: &str| {
            format!(r#"{{"targets": [{{"base_url": "http://a.example"}}], "commit_on": {point}}}"#)
        };
        for (point, expected) in [
            ("\"first_content\"", CommitPoint::FirstContent),
            ("\"first_event\"", CommitPoint::FirstEvent),
            ("\"head\"", CommitPoint::Head),
        ] {
            let layer = build(&json(point), &[]).unwrap();
            assert_eq!(layer.shared().commit_on, expected, "{point}");
        }
        let err = build(&json("\"first_byte\""), &[]).unwrap_err();
        assert_eq!(err.field(), "commit_on");
        let off = build(
            r#"{"targets": [{"base_url": "http://a.example"}], "wait_for_first_chunk": false}"#,
            &[],
        )
        .unwrap();
        assert_eq!(off.shared().commit_on, CommitPoint::Head);
    }
}
