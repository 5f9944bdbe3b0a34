//! Model fallback for LLM API clients, as a [tower](https://docs.rs/tower) middleware.
//!
//! Apps that call OpenAI-compatible APIs (CometAPI, OpenAI, any gateway that speaks
//! `/v1/chat/completions`) keep a short ordered list of models and providers. When a call fails
//! in a way another target could fix (rate limit, overload, 5xx, timeout, connection failure,
//! "this model does not exist here"), [`FallbackLayer`] re-issues the same request to the next
//! [`Target`], with that target's model written into the JSON body, its base URL and its own
//! credential. When the failure is the caller's fault (400, 401, 403, 422, …) it stops at once and
//! hands the response back: a bad request is fixed, never re-sent to another model.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_model_fallback::{FallbackLayer, FallbackReport, ReplayBody, Target};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let layer = FallbackLayer::new([
//!     Target::new("https://api.cometapi.com/v1")?.with_name("cometapi").with_model("gpt-4o-mini").bearer("key-1")?,
//!     Target::new("https://api.openai.com/v1")?.with_name("openai").with_model("gpt-4o-mini").bearer("key-2")?,
//! ])?;
//!
//! // Any HTTP client service works; here a stand-in whose first provider is overloaded.
//! let client = tower::service_fn(|req: Request<ReplayBody>| async move {
//!     let status = if req.uri().host() == Some("api.cometapi.com") { 503 } else { 200 };
//!     Ok::<_, std::convert::Infallible>(
//!         Response::builder().status(status).body(Full::new(Bytes::from_static(b"{}"))).unwrap(),
//!     )
//! });
//! let service = ServiceBuilder::new().layer(layer).service(client);
//!
//! let request = Request::post("/chat/completions") // relative to each target's base URL
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"any","messages":[]}"#)))?;
//! let response = service.oneshot(request).await?;
//!
//! let report = response.extensions().get::<FallbackReport>().unwrap();
//! assert_eq!(response.status(), 200);
//! assert_eq!(report.served_by().unwrap().target(), "openai");
//! assert_eq!(report.attempts().len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! With a real client, the inner service is `hyper_util::client::legacy::Client` (with an HTTPS
//! connector such as hyper-rustls); `examples/quickstart.rs` runs one against two local upstreams.
//!
//! # What happens to a request
//!
//! 1. The body is read once, bounded by [`FallbackLayer::max_body_bytes`] (32 MiB by default).
//!    Over the bound, an unreadable body, or invalid JSON under a JSON content type: a
//!    [`FallbackError`] and nothing is sent.
//! 2. Each attempt goes to the target's base URL followed by the caller's path and query (the
//!    OpenAI SDK's rule: base `https://api.cometapi.com/v1` + `/chat/completions`). The caller's
//!    credential headers (`authorization`, `proxy-authorization`, `x-api-key`, `api-key`,
//!    `x-goog-api-key`, `cookie`), `host`, `content-length` and hop-by-hop headers are removed; the target's
//!    own credential (marked sensitive) and extra headers are added; everything else, and the
//!    request extensions, are kept.
//! 3. The target's model replaces every top-level `"model"` value of a JSON object body (one is
//!    inserted when there is none). Every other byte is sent as the caller wrote it; nested
//!    `"model"` keys are never touched; nothing unchanged is copied. Bodies that are not a JSON
//!    object (empty, other content types) are sent unchanged and the report says so. A
//!    compressed body cannot carry a target's model: targets that name one are skipped
//!    ([`SkipReason::BodyNotRewritable`]), and with none left nothing is sent
//!    ([`FallbackError::is_body_not_rewritable`]).
//! 4. The policy ([`Classify`], default [`DefaultClassifier`]) decides after each attempt:
//!    [`Decision::Return`] or [`Decision::NextTarget`].
//! 5. The response is handed back with its body streaming through, and a [`FallbackReport`] in
//!    its extensions. When every target failed, the last response is handed back untouched; when
//!    the last failure was an error (including a 2xx whose body failed or timed out before its
//!    first byte: there is no answer to hand back), the [`FallbackError`] lists every attempt.
//!
//! # Default classification
//!
//! | outcome | decision |
//! |---|---|
//! | 1xx, 2xx, 3xx | return |
//! | 400, 401, 403, 405, 413, 415, 422 and every 4xx not named below | return at once |
//! | 404 whose error body says `model_not_found`, 429 `insufficient_quota` | next target |
//! | 408, 409, 429, 500, 502, 503, 504, 520–524, 529, every other 5xx | retry same, else next |
//! | `x-should-retry: false` / `true` on an error status | return / retry same, else next |
//! | inner error: timeout, connect, closed/reset, `Overloaded`, not HTTP, other I/O | retry same, else next |
//! | inner error of a kind it does not recognise ([`ErrorKind::Other`]) | an error, at once |
//! | a success whose body fails, or times out, before its first byte | retry same, else next |
//! | a stream whose first event is an error object (`data: {"error": …}`) | retry same, else next |
//! | opt-in: 400 `context_length_exceeded`, 400 content-policy refusal | next target |
//!
//! "Retry same, else next" is [`Decision::RetrySame`]: the same target is retried when
//! [`Retries`] allows (none by default), otherwise the next target is tried at once.
//!
//! # Resilience
//!
//! [`Retries`] (same-target retries honouring `Retry-After`), [`Cooldowns`] (a circuit breaker per
//! target, shared by every clone, behind the [`HealthStore`] trait), a retry budget (tower's
//! `TpsBudget`), an overall [deadline](FallbackLayer::deadline) and [`Hedge`] (racing, billed
//! twice) are all opt-in:
//!
//! ```
//! use std::time::Duration;
//! use tower::retry::budget::TpsBudget;
//! use tower_model_fallback::{Cooldowns, FallbackLayer, Retries, Target};
//!
//! # fn main() -> Result<(), tower_model_fallback::ConfigError> {
//! let layer = FallbackLayer::new([
//!     Target::new("https://api.cometapi.com/v1")?.with_model("gpt-4o-mini"),
//!     Target::new("https://api.openai.com/v1")?.with_model("gpt-4o-mini"),
//! ])?
//! .retries(Retries::new(2))
//! .cooldowns(Cooldowns::new())
//! .retry_budget(TpsBudget::new(Duration::from_secs(10), 10, 0.2))
//! .deadline(Duration::from_secs(60));
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! Error bodies are read only for the statuses the policy asks for (404 and 429 by default), and only up
//! to [`FallbackLayer::error_body_limit`] (8 KiB); the caller still gets the whole body.
//!
//! # Stacking
//!
//! The layer is a plain tower citizen: `poll_ready` is the inner service's, every attempt after
//! the first waits for readiness again, dropping the response future cancels the attempt in
//! flight, and the layer spawns no task per request (hedged attempts are polled by the response
//! future itself). With the `redis` feature, a `RedisHealth` and a `RedisBudget` each spawn
//! one background task, once, on the tokio runtime of the first request that uses them: it
//! batches their writes to Redis and refreshes the shared state; it ends when the store is
//! dropped. Put a per-attempt timeout on the layer ([`FallbackLayer::attempt_timeout`]) or a
//! per-attempt `TimeoutLayer` inside it (its `Elapsed`
//! moves to the next target) and a whole-request timeout outside. A tower `RetryLayer` inside it
//! multiplies attempts: each target is then tried up to the retry policy's count before the
//! fallback moves on.
//!
//! The inner service receives a [`ReplayBody`] (cheap to clone, exact size hint), so inner layers
//! that need `Request: Clone` work. Its response body must be `Unpin`; hyper's `Incoming`,
//! axum's `Body` and boxed bodies are.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod attempt;
mod catalog;
mod config;
mod engine;
mod error;
mod future;
mod group;
mod hop;
mod layer;
mod media;
pub mod openai;
mod per_target;
mod policy;
mod report;
mod request;
#[cfg(feature = "reqwest")]
mod reqwest_service;
mod resilience;
mod response;
mod service;
mod settings;
mod target;

pub use catalog::{ModelCatalog, ModelEntry, PriceGuard, Pricing};
pub use config::{
    BudgetConfig, CooldownConfig, EntryConfig, FallbackConfig, GroupConfig, HealthStoreConfig,
    HedgeConfig, TargetConfig,
};
pub use error::{BoxError, ConfigError, FallbackError};
pub use future::ResponseFuture;
pub use group::{TargetGroup, MAX_GROUP_MEMBERS};
pub use hop::strip_hop_by_hop;
pub use layer::{FallbackLayer, DEFAULT_ERROR_BODY_LIMIT, DEFAULT_MAX_BODY_BYTES};
pub use per_target::{PerTarget, PerTargetError, PerTargetFuture};
pub use policy::{
    classify_fn, error_code, Classify, ClassifyFn, Decision, DefaultClassifier, ErrorKind, Outcome,
};
pub use report::{Attempt, AttemptOutcome, FallbackReport, Skip, SkipReason, StopReason, Usage};
pub use request::ReplayBody;
#[cfg(feature = "reqwest")]
pub use reqwest_service::{ReqwestFuture, ReqwestService};
#[cfg(feature = "redis-tls")]
pub use resilience::RedisTls;
pub use resilience::{
    Admission, Bucket, Cooldowns, FallbackCount, HealthOutcome, HealthStore, Hedge,
    HistogramSnapshot, LatencyHistogram, Retries, Stats, StatsSnapshot, TargetId, TargetStats,
    OUTCOMES,
};
#[cfg(feature = "redis")]
pub use resilience::{RedisBudget, RedisHealth};
pub use response::{CommitPoint, ResponseBody};
pub use service::Fallback;
pub use target::{AttemptTarget, Target};

// Every Rust snippet of the README compiles (and those that need no network run) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

#[doc(hidden)]
pub mod __private {
    //! Internals exposed for benchmarks, property tests and fuzzing only; not a stable API.

    use bytes::Bytes;

    /// Substitutes the top-level model of a JSON object body, as the layer does for a target
    /// whose model is `model`: the slices the layer would send.
    pub fn substitute(body: &Bytes, model: &str) -> Result<Vec<Bytes>, String> {
        let slots = crate::request::json::locate(body).map_err(|e| e.to_string())?;
        Ok(slots.splice(body, &crate::target::ModelLiteral::new(model)))
    }

    /// Substitutes (or inserts) the `model` field of a `multipart/form-data` body with the given
    /// boundary, as the layer does: `None` when the body is not well-formed multipart for it, or
    /// the model cannot be a form value.
    pub fn substitute_multipart(body: &Bytes, boundary: &str, model: &str) -> Option<Vec<Bytes>> {
        crate::request::multipart::locate(body, boundary)?.splice(body, model)
    }

    /// The model a JSON body asks for (its first top-level `"model"`, when a string), as the
    /// layer reads it for the report; `None` for invalid JSON.
    pub fn requested_model(body: &[u8]) -> Option<String> {
        let slots = crate::request::json::locate(body).ok()?;
        crate::request::json::requested_model(body, &slots).map(|m| m.to_string())
    }

    /// The first `model` field of a `multipart/form-data` body, as the layer reads it.
    pub fn multipart_model(body: &[u8], boundary: &str) -> Option<String> {
        crate::request::multipart::locate(body, boundary)?
            .requested_model(body)
            .map(|m| m.to_string())
    }
}
