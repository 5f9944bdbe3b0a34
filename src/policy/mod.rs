//! Classification: what to do after an attempt, as a value ([`Decision`]) computed from its
//! [`Outcome`] by a [`Classify`] policy.

pub(crate) mod hints;

use std::error::Error as StdError;
use std::fmt;
use std::io;

use http::{HeaderMap, StatusCode};

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Decision {
    /// Hand this outcome to the caller: it is a success, or a failure that no other target can
    /// fix (the request itself is wrong).
    Return,
    /// Try the next target with the same request: the failure belongs to this target or model
    /// (the model is missing here, its quota is spent, its context window is too small).
    NextTarget,
    /// A transient failure (rate limit, overload, 5xx, timeout, dropped connection): retry this
    /// target when [`Retries`](crate::Retries) allows, otherwise move on as for
    /// [`NextTarget`](Decision::NextTarget). Reports show which of the two the layer did.
    RetrySame,
}

impl Decision {
    /// Whether another attempt (here or elsewhere) could succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Decision::Return)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::Return => "return",
            Decision::NextTarget => "next target",
            Decision::RetrySame => "retry same target",
        })
    }
}

/// What kind of failure an inner service error is, found by walking its `source()` chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A timeout: tower's or tokio's `Elapsed`, hyper's timeout, reqwest's (feature `reqwest`),
    /// or an I/O `TimedOut`.
    Timeout,
    /// The connection could not be made (refused, DNS, TLS handshake, …), as hyper-util's client
    /// (default feature `hyper-util`), reqwest (feature `reqwest`) or an I/O error says.
    Connect,
    /// The connection closed, reset or ended before a complete response.
    Closed,
    /// A load shedder or limiter refused the request (tower's `Overloaded`).
    Overloaded,
    /// The upstream did not speak HTTP (an unparsable response).
    Protocol,
    /// Another I/O error.
    Io,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Recognises `error` by walking its `source()` chain.
    ///
    /// ```
    /// use tower_model_fallback::ErrorKind;
    ///
    /// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    /// assert_eq!(ErrorKind::of(&refused), ErrorKind::Connect);
    /// let elapsed = tower::timeout::error::Elapsed::new();
    /// assert_eq!(ErrorKind::of(&elapsed), ErrorKind::Timeout);
    /// ```
    pub fn of(error: &(dyn StdError + 'static)) -> ErrorKind {
        let mut found = ErrorKind::Other;
        let mut next = Some(error);
        while let Some(e) = next {
            let kind = Self::one(e);
            if kind != ErrorKind::Other && kind != ErrorKind::Io {
                return kind;
            }
            if kind == ErrorKind::Io {
                found = kind;
            }
            next = e.source();
        }
        found
    }

    fn one(e: &(dyn StdError + 'static)) -> ErrorKind {
        if e.is::<tower::timeout::error::Elapsed>() || e.is::<tokio::time::error::Elapsed>() {
            return ErrorKind::Timeout;
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return ErrorKind::Overloaded;
        }
        #[cfg(feature = "reqwest")]
        if let Some(err) = e.downcast_ref::<reqwest::Error>() {
            // Its own timer's error (`.timeout`, `.read_timeout`) is private to reqwest: only
            // its predicates tell it.
            if err.is_timeout() {
                return ErrorKind::Timeout;
            }
            if err.is_connect() {
                return ErrorKind::Connect;
            }
        }
        #[cfg(feature = "hyper-util")]
        if let Some(err) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            if err.is_connect() {
                return ErrorKind::Connect;
            }
        }
        if let Some(err) = e.downcast_ref::<hyper::Error>() {
            if err.is_timeout() {
                return ErrorKind::Timeout;
            }
            if err.is_closed() || err.is_incomplete_message() || err.is_canceled() {
                return ErrorKind::Closed;
            }
            if err.is_parse() || err.is_parse_status() {
                return ErrorKind::Protocol;
            }
        }
        if let Some(err) = e.downcast_ref::<io::Error>() {
            return match err.kind() {
                io::ErrorKind::TimedOut => ErrorKind::Timeout,
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::NotFound
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable => ErrorKind::Connect,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::NotConnected => ErrorKind::Closed,
                _ => ErrorKind::Io,
            };
        }
        ErrorKind::Other
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect error",
            ErrorKind::Closed => "connection closed",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Io => "i/o error",
            ErrorKind::Other => "error",
        })
    }
}

/// The result of one attempt, as a policy sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// The inner service answered with a response head.
    Response {
        /// Its status.
        status: StatusCode,
        /// Its headers.
        headers: &'a HeaderMap,
        /// The start of its body (at most the layer's error-body limit), when the policy asked for
        /// it with [`Classify::wants_body`].
        body: Option<&'a [u8]>,
    },
    /// A successful, streamed (`text/event-stream`) response that sent a provider's error event
    /// before its first content reached the caller: OpenAI's `data: {"error": {...}}`,
    /// Anthropic's `event: error`, a Responses `error`, `response.failed` or
    /// `response.incomplete`.
    ErrorEvent {
        /// The response status (usually 200).
        status: StatusCode,
        /// The response headers.
        headers: &'a HeaderMap,
        /// The event's data (its `data:` lines).
        event: &'a [u8],
        /// The status the error stands for: Anthropic's `overloaded_error` a 529,
        /// `rate_limit_error` and `rate_limit_exceeded` a 429, `api_error` and `server_error` a
        /// 500, `invalid_request_error` a 400, …; an error not recognised a 500.
        stands_for: StatusCode,
        /// The error's code (or type), when it has one.
        code: Option<&'a str>,
    },
    /// The inner service failed without a response, or a response body failed before its first
    /// byte reached the caller (connection dropped, first-byte timeout).
    Error {
        /// What kind of failure it was.
        kind: ErrorKind,
        /// The error itself.
        error: &'a (dyn StdError + 'static),
    },
}

/// Decides, after each attempt, whether to hand the outcome back or try the next target.
///
/// Implement it for full control, start from [`DefaultClassifier`] with status sets, or wrap a
/// closure with [`classify_fn`].
pub trait Classify: Send + Sync + 'static {
    /// Whether the layer should read the start of the response body (bounded by the layer's
    /// error-body limit) before calling [`classify`](Classify::classify). Only asked for
    /// responses whose status is 400 or above; the default asks for 404s, to find
    /// `model_not_found`.
    fn wants_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let _ = headers;
        status == StatusCode::NOT_FOUND
    }

    /// The decision for one attempt's outcome.
    fn classify(&self, outcome: &Outcome<'_>) -> Decision;
}

/// The seed-faithful default: return on success and on the caller's mistakes, move on when
/// another target could do better.
///
/// | outcome | decision |
/// |---|---|
/// | 1xx, 2xx, 3xx | return |
/// | `x-should-retry: false` / `true` on a 4xx or 5xx | return / retry same |
/// | 404 with `model_not_found` in its error body | next target |
/// | 429 with `insufficient_quota` in its error body | next target |
/// | 408, 409, 429, every 5xx | retry same (next target when no retries are left) |
/// | opt-in: 400 `context_length_exceeded`, 400 content-policy refusal | next target |
/// | every other 4xx (400, 401, 403, 404, 405, 413, 415, 422, …) | return |
/// | an inner error: timeout, connect, closed/reset, overloaded, not HTTP, other I/O | retry same |
/// | an inner error of a kind not recognised ([`ErrorKind::Other`]) | return (as an error) |
/// | a success whose body fails, or times out, before its first byte | retry same |
/// | a stream's error event before its first content | as the status it stands for (`overloaded_error`: 529, `invalid_request_error`: 400, …) |
///
/// Status sets override the table (and the `x-should-retry` header):
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use tower_model_fallback::{Classify, Decision, DefaultClassifier, Outcome};
///
/// let policy = DefaultClassifier::new()
///     .next_target_on([StatusCode::FORBIDDEN])
///     .return_on([StatusCode::NOT_IMPLEMENTED]);
/// let headers = HeaderMap::new();
/// let outcome = |status| Outcome::Response { status, headers: &headers, body: None };
/// assert_eq!(policy.classify(&outcome(StatusCode::FORBIDDEN)), Decision::NextTarget);
/// assert_eq!(policy.classify(&outcome(StatusCode::NOT_IMPLEMENTED)), Decision::Return);
/// assert_eq!(policy.classify(&outcome(StatusCode::UNAUTHORIZED)), Decision::Return);
/// assert_eq!(policy.classify(&outcome(StatusCode::TOO_MANY_REQUESTS)), Decision::RetrySame);
/// ```
#[derive(Debug, Clone, Default)]
pub struct DefaultClassifier {
    next_target_on: Vec<StatusCode>,
    return_on: Vec<StatusCode>,
    ignore_should_retry: bool,
    context_length: bool,
    content_policy: bool,
}

/// Error codes of content-policy refusals (OpenAI, Azure OpenAI).
const CONTENT_POLICY_CODES: [&str; 3] = [
    "content_policy_violation",
    "content_filter",
    "content_filtered",
];

/// Whether an error body says the prompt exceeds the model's context window.
fn is_context_length(body: &[u8]) -> bool {
    if error_code(body).as_deref() == Some("context_length_exceeded") {
        return true;
    }
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let message = value.as_ref().and_then(|v| {
        v.get("error")?
            .get("message")?
            .as_str()
            .map(str::to_ascii_lowercase)
    });
    message.is_some_and(|m| m.contains("maximum context length") || m.contains("context window"))
}

impl DefaultClassifier {
    /// The default table.
    pub fn new() -> Self {
        DefaultClassifier::default()
    }

    /// Moves on to the next target on these statuses, whatever the table says.
    pub fn next_target_on(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        for s in statuses {
            self.return_on.retain(|r| *r != s);
            self.next_target_on.push(s);
        }
        self
    }

    /// Hands these statuses back to the caller, whatever the table says.
    pub fn return_on(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        for s in statuses {
            self.next_target_on.retain(|r| *r != s);
            self.return_on.push(s);
        }
        self
    }

    /// Ignores the `x-should-retry` response header (honoured by default, as the OpenAI SDKs do).
    pub fn ignore_should_retry(mut self, ignore: bool) -> Self {
        self.ignore_should_retry = ignore;
        self
    }

    fn classify_status(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Decision {
        let code = body.and_then(error_code);
        self.classify_coded(status, headers, code.as_deref(), body)
    }

    /// The table, for a status (or the status an error event stands for) and its error code.
    fn classify_coded(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        code: Option<&str>,
        body: Option<&[u8]>,
    ) -> Decision {
        if status.as_u16() < 400 {
            return Decision::Return;
        }
        if self.next_target_on.contains(&status) {
            return Decision::NextTarget;
        }
        if self.return_on.contains(&status) {
            return Decision::Return;
        }
        if !self.ignore_should_retry {
            match headers.get("x-should-retry").map(|v| v.as_bytes()) {
                Some(b"true") => return Decision::RetrySame,
                Some(b"false") => return Decision::Return,
                _ => {}
            }
        }
        match status.as_u16() {
            404 if code == Some("model_not_found") => Decision::NextTarget,
            // A spent quota will not come back on a retry; another provider may have one.
            429 if code == Some("insufficient_quota") => Decision::NextTarget,
            400 if self.context_length && body.is_some_and(is_context_length) => {
                Decision::NextTarget
            }
            400 if self.content_policy && CONTENT_POLICY_CODES.contains(&code.unwrap_or("")) => {
                Decision::NextTarget
            }
            408 | 409 | 429 | 500..=599 => Decision::RetrySame,
            _ => Decision::Return,
        }
    }

    /// Opt-in: a 400 saying the prompt is longer than the model's context window
    /// (`context_length_exceeded`) moves on to the next target, whose model may have a larger one.
    pub fn fall_back_on_context_length(mut self, on: bool) -> Self {
        self.context_length = on;
        self
    }

    /// Opt-in: a 400 content-policy refusal (`content_policy_violation`, `content_filter`) moves
    /// on to the next target. Routing around a provider's safety refusal must be a deliberate
    /// choice: it is never the default.
    pub fn fall_back_on_content_policy(mut self, on: bool) -> Self {
        self.content_policy = on;
        self
    }
}

impl Classify for DefaultClassifier {
    fn wants_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let reads = match status.as_u16() {
            404 | 429 => true,
            400 => self.context_length || self.content_policy,
            _ => false,
        };
        reads
            && !self.next_target_on.contains(&status)
            && !self.return_on.contains(&status)
            && (self.ignore_should_retry || !headers.contains_key("x-should-retry"))
    }

    fn classify(&self, outcome: &Outcome<'_>) -> Decision {
        match *outcome {
            Outcome::Response {
                status,
                headers,
                body,
            } => self.classify_status(status, headers, body),
            Outcome::ErrorEvent {
                headers,
                event,
                stands_for,
                code,
                ..
            } => self.classify_coded(stands_for, headers, code, Some(event)),
            // An error the layer does not recognise as a transport failure (a local middleware's,
            // a client's own bug) would fail the same way everywhere.
            Outcome::Error {
                kind: ErrorKind::Other,
                ..
            } => Decision::Return,
            Outcome::Error { .. } => Decision::RetrySame,
        }
    }
}

/// The `code` of an OpenAI-shaped error body (`{"error": {"code": …}}`), or its `type` when it has
/// no code; also accepts a top-level `code`. `None` for anything else.
///
/// ```
/// use tower_model_fallback::error_code;
///
/// let body = br#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#;
/// assert_eq!(error_code(body).as_deref(), Some("model_not_found"));
/// assert_eq!(error_code(b"not json"), None);
/// ```
pub fn error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let field =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|c| c.as_str()).map(str::to_owned);
    match value.get("error") {
        Some(err) => field(err, "code").or_else(|| field(err, "type")),
        None => field(&value, "code"),
    }
}

/// A policy from a closure that decides what it knows and leaves the rest to
/// [`DefaultClassifier`] by returning `None`.
///
/// **`None` means "use the default", not "done".** In reqwest-retry's `RetryableStrategy`, a
/// `None` from `handle` ends retrying (the result goes back as it is); here the outcome goes on to
/// the default table, so a 503 the closure answers `None` for still moves to the next target. To
/// hand an outcome back, return `Some(Decision::Return)`; to fall back, `Some(Decision::NextTarget)`
/// (or `Some(Decision::RetrySame)` to let [`Retries`](crate::Retries) retry it first).
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use tower_model_fallback::{classify_fn, Classify, Decision, Outcome};
///
/// let policy = classify_fn(|_: &Outcome<'_>| None); // decides nothing itself
/// let headers = HeaderMap::new();
/// let unavailable = Outcome::Response { status: StatusCode::SERVICE_UNAVAILABLE, headers: &headers, body: None };
/// assert_eq!(policy.classify(&unavailable), Decision::RetrySame); // the default's answer, not Return
/// ```
///
/// ```
/// use http::StatusCode;
/// use tower_model_fallback::{classify_fn, Decision, Outcome};
///
/// // Also fall back when a provider refuses on content policy (a deliberate choice).
/// let policy = classify_fn(|outcome: &Outcome<'_>| match outcome {
///     Outcome::Response { status, body: Some(body), .. }
///         if *status == StatusCode::BAD_REQUEST
///             && tower_model_fallback::error_code(body).as_deref() == Some("content_policy_violation") =>
///     {
///         Some(Decision::NextTarget)
///     }
///     _ => None,
/// })
/// .wants_body_for([StatusCode::BAD_REQUEST]);
/// # let _ = policy;
/// ```
pub fn classify_fn<F>(f: F) -> ClassifyFn<F>
where
    F: Fn(&Outcome<'_>) -> Option<Decision> + Send + Sync + 'static,
{
    ClassifyFn {
        f,
        body_for: Vec::new(),
        default: DefaultClassifier::new(),
    }
}

/// A policy made by [`classify_fn`].
#[derive(Clone)]
pub struct ClassifyFn<F> {
    f: F,
    body_for: Vec<StatusCode>,
    default: DefaultClassifier,
}

impl<F> ClassifyFn<F> {
    /// Also reads the start of the body for these statuses, so the closure sees it.
    pub fn wants_body_for(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.body_for.extend(statuses);
        self
    }

    /// The policy consulted when the closure returns `None` (default: [`DefaultClassifier::new`]).
    pub fn or_else(mut self, default: DefaultClassifier) -> Self {
        self.default = default;
        self
    }
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn")
            .field("body_for", &self.body_for)
            .field("default", &self.default)
            .finish()
    }
}

impl<F> Classify for ClassifyFn<F>
where
    F: Fn(&Outcome<'_>) -> Option<Decision> + Send + Sync + 'static,
{
    fn wants_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.body_for.contains(&status) || self.default.wants_body(status, headers)
    }

    fn classify(&self, outcome: &Outcome<'_>) -> Decision {
        (self.f)(outcome).unwrap_or_else(|| self.default.classify(outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(status: u16, headers: &[(&str, &str)], body: Option<&[u8]>) -> Decision {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let status = StatusCode::from_u16(status).unwrap();
        let policy = DefaultClassifier::new();
        let body = if policy.wants_body(status, &map) {
            body
        } else {
            None
        };
        policy.classify(&Outcome::Response {
            status,
            headers: &map,
            body,
        })
    }

    #[test]
    fn the_default_table() {
        use Decision::*;
        for s in [200, 201, 204, 301, 304] {
            assert_eq!(decide(s, &[], None), Return, "{s}");
        }
        for s in [400, 401, 403, 404, 405, 410, 413, 415, 422, 451] {
            assert_eq!(decide(s, &[], None), Return, "{s}");
        }
        for s in [
            408, 409, 429, 500, 501, 502, 503, 504, 520, 521, 522, 523, 524, 529, 599,
        ] {
            assert_eq!(decide(s, &[], None), RetrySame, "{s}");
        }
        let quota =
            br#"{"error":{"code":"insufficient_quota","message":"You exceeded your quota"}}"#;
        assert_eq!(decide(429, &[], Some(quota)), NextTarget);
        let not_found = br#"{"error":{"code":"model_not_found","message":"no"}}"#;
        assert_eq!(decide(404, &[], Some(not_found)), NextTarget);
        assert_eq!(
            decide(404, &[], Some(br#"{"error":{"code":"other"}}"#)),
            Return
        );
        assert_eq!(decide(503, &[("x-should-retry", "false")], None), Return);
        assert_eq!(decide(400, &[("x-should-retry", "true")], None), RetrySame);
        assert_eq!(decide(200, &[("x-should-retry", "true")], None), Return);
        assert_eq!(
            decide(404, &[("x-should-retry", "false")], Some(not_found)),
            Return
        );
    }

    #[test]
    fn context_length_and_content_policy_fall_back_only_when_asked() {
        let long = br#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        let refusal = br#"{"error":{"message":"blocked","type":"invalid_request_error","code":"content_policy_violation"}}"#;
        let outcome = |body: &'static [u8]| {
            static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
            Outcome::Response {
                status: StatusCode::BAD_REQUEST,
                headers: EMPTY.get_or_init(HeaderMap::new),
                body: Some(body),
            }
        };
        let default = DefaultClassifier::new();
        assert!(!default.wants_body(StatusCode::BAD_REQUEST, &HeaderMap::new()));
        assert_eq!(default.classify(&outcome(long)), Decision::Return);
        assert_eq!(default.classify(&outcome(refusal)), Decision::Return);
        let opted = DefaultClassifier::new()
            .fall_back_on_context_length(true)
            .fall_back_on_content_policy(true);
        assert!(opted.wants_body(StatusCode::BAD_REQUEST, &HeaderMap::new()));
        assert_eq!(opted.classify(&outcome(long)), Decision::NextTarget);
        assert_eq!(opted.classify(&outcome(refusal)), Decision::NextTarget);
        let only_length = DefaultClassifier::new().fall_back_on_context_length(true);
        assert_eq!(only_length.classify(&outcome(refusal)), Decision::Return);
        let by_message =
            br#"{"error":{"message":"prompt exceeds the context window of this model"}}"#;
        assert_eq!(
            only_length.classify(&outcome(by_message)),
            Decision::NextTarget
        );
    }

    #[test]
    fn recognises_inner_errors_through_their_sources() {
        #[derive(Debug)]
        struct Wrapper(Box<dyn StdError + Send + Sync>);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&*self.0)
            }
        }
        let wrap = |e: Box<dyn StdError + Send + Sync>| Wrapper(e);
        assert_eq!(
            ErrorKind::of(&wrap(Box::new(tower::timeout::error::Elapsed::new()))),
            ErrorKind::Timeout
        );
        assert_eq!(
            ErrorKind::of(&wrap(Box::new(tower::load_shed::error::Overloaded::new()))),
            ErrorKind::Overloaded
        );
        assert_eq!(
            ErrorKind::of(&wrap(Box::new(io::Error::from(
                io::ErrorKind::ConnectionReset
            )))),
            ErrorKind::Closed
        );
        assert_eq!(
            ErrorKind::of(&wrap(Box::new(io::Error::other("x")))),
            ErrorKind::Io
        );
        assert_eq!(ErrorKind::of(&fmt::Error), ErrorKind::Other);
    }
}
