//! One request through the gateway: routing, client authentication, the checks that keep bad
//! input from going upstream with a key, request decompression, the fallback stack, and a
//! response head fit for the client's hop.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::{BoxError, ServiceExt};
use tower_http::body::UnsyncBoxBody;
use tower_http::decompression::RequestDecompression;
use tower_http::timeout::RequestBodyTimeout;
use tower_model_fallback::{
    openai, strip_hop_by_hop, ConfigError, FallbackError, FallbackLayer, FallbackReport,
    ResponseBody, Stats,
};
use tracing::Instrument;

use crate::auth::{Caller, Clients};
use crate::config::{GatewayConfig, OtelConfig};
use crate::metrics::{self, Metrics, RequestOutcome};
use crate::serve::{InFlight, Limits};
use crate::upstream::{stack, Stack};

/// The gateway's request handling, shared by every connection (a clone is one reference count).
/// Its config can be swapped while it serves ([`Gateway::reload`]).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    /// The config serving new requests; a request in flight keeps the one it started with.
    current: ArcSwap<Shared>,
    metrics: Metrics,
    /// What the running server took from the config it started with, whatever reloads since.
    started: Started,
}

/// The fields a reload cannot change: the running server's address, client-side limits and
/// trace export.
#[derive(PartialEq)]
struct Started {
    listen: std::net::SocketAddr,
    limits: Limits,
    otel: Option<OtelConfig>,
}

impl Started {
    fn of(config: &GatewayConfig) -> Started {
        Started {
            listen: config.listen,
            limits: config.into(),
            otel: config.otel.clone(),
        }
    }

    /// What `next` changes of these: each waits for a restart.
    fn changed_by(&self, next: &Started) -> Option<String> {
        let mut changed = Vec::new();
        if next.listen != self.listen {
            changed.push(format!("listen ({} -> {})", self.listen, next.listen));
        }
        if next.limits != self.limits {
            changed.push("header_read_timeout_ms / idle_timeout_ms / shutdown_timeout_ms".into());
        }
        // Not the values: the endpoint is the operator's to log or not.
        if next.otel != self.otel {
            changed.push("otel".into());
        }
        (!changed.is_empty()).then(|| {
            format!(
                "changed: {}; the running server keeps what it started with until a restart",
                changed.join(", ")
            )
        })
    }
}

struct Shared {
    /// The fallback stack behind tower-http's request-body timeout: the longest pause between
    /// two chunks of the body the layer reads.
    stack: RequestBodyTimeout<Stack>,
    /// The same behind tower-http's request decompression too, for compressed bodies only: the
    /// layer then reads (bounded by `max_body_bytes`) and rewrites the decompressed JSON. The
    /// timeout is outside, on the bytes as they arrive.
    decompress: RequestBodyTimeout<RequestDecompression<Stack>>,
    layer: FallbackLayer,
    clients: Clients,
    /// Each client's request counter, by name (the anonymous caller's under `anonymous`).
    client_counts: Vec<(Arc<str>, Arc<AtomicU64>)>,
    targets: Vec<String>,
}

impl Shared {
    fn new(
        config: &GatewayConfig,
        env: &impl Fn(&str) -> Option<String>,
        metrics: &Metrics,
        previous: Option<&Shared>,
    ) -> Result<Shared, ConfigError> {
        config.check_listen()?;
        let clients = Clients::from_config(&config.clients, env)?;
        let mut layer = config.fallback.layer_with_env(env)?;
        if let Some(previous) = previous {
            layer = layer.carry_over(&previous.layer);
        }
        let stack = stack(&layer, config.upstream_h2c);
        let names = config.clients.iter().map(|c| c.name.as_str());
        let client_counts = if clients.is_enabled() {
            names.map(|n| (Arc::from(n), metrics.client(n))).collect()
        } else {
            vec![(Arc::from(ANONYMOUS), metrics.client(ANONYMOUS))]
        };
        Ok(Shared {
            decompress: RequestBodyTimeout::new(
                RequestDecompression::new(stack.clone()),
                config.body_read_timeout,
            ),
            stack: RequestBodyTimeout::new(stack, config.body_read_timeout),
            targets: layer
                .targets()
                .iter()
                .map(|t| t.name().to_owned())
                .collect(),
            layer,
            clients,
            client_counts,
        })
    }

    fn count_client(&self, caller: &Caller) {
        let name = caller.as_deref().unwrap_or(ANONYMOUS);
        if let Some((_, count)) = self.client_counts.iter().find(|(n, _)| &**n == name) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `/readyz`: ready while any target is not cooling down; else the reason.
    fn readiness(&self) -> Result<(), String> {
        let left: Vec<_> = (0..self.targets.len())
            .map(|i| self.layer.cooling_for(i))
            .collect();
        if left.iter().any(|d| d.is_zero()) {
            return Ok(());
        }
        let cooling: Vec<String> = self
            .targets
            .iter()
            .zip(left)
            .map(|(name, left)| format!("{name} for {} s", left.as_secs_f64().ceil()))
            .collect();
        Err(format!(
            "not ready: every target is cooling down ({})",
            cooling.join(", ")
        ))
    }
}

/// The client name of requests when the gateway has no `clients`.
const ANONYMOUS: &str = "anonymous";

impl Gateway {
    /// Builds the gateway for `config`, with keys (targets' and clients') from `env`. Errors name
    /// the field: a missing key, a bad target, clients required for a non-loopback `listen`.
    pub fn new(
        config: &GatewayConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Gateway, ConfigError> {
        let metrics = Metrics::default();
        let shared = Shared::new(config, &env, &metrics, None)?;
        Ok(Gateway {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(shared),
                metrics,
                started: Started::of(config),
            }),
        })
    }

    /// Serves `config` from now on, when it is valid: new requests use it at once, requests in
    /// flight finish on the config they started with, and targets that are the same in both
    /// (name, base URL, model, key) keep their cooldowns and counters. When it is not valid,
    /// nothing changes and the error says why. `listen`, `otel` and the client-side limits of
    /// [`serve`](crate::serve::serve) stay those the server started with: a file that differs
    /// from them there gets a warning that they wait for a restart (compared with the start,
    /// not with the last reload).
    pub fn reload(
        &self,
        config: &GatewayConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        let current = self.inner.current.load_full();
        let next = Shared::new(config, &env, &self.inner.metrics, Some(&current))?;
        let warning = self.inner.started.changed_by(&Started::of(config));
        self.inner.current.store(Arc::new(next));
        Ok(warning)
    }

    /// The targets' names, in order.
    pub fn targets(&self) -> Vec<String> {
        self.inner.current.load().targets.clone()
    }

    /// The layer's counters.
    pub fn stats(&self) -> Stats {
        self.inner.current.load().layer.stats()
    }

    /// The gateway's own counters (requests by outcome, by client).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Answers one request: `GET /healthz` (open), `GET /readyz`, `GET /metrics`,
    /// `GET /stats`, and `/v1/*` through the fallback stack; every route but `/healthz` needs a
    /// client key when clients are set.
    pub async fn handle<B>(&self, mut request: Request<B>) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        if request.uri().path() == "/healthz" {
            return text(StatusCode::OK, "text/plain", Bytes::from_static(b"ok"));
        }
        // The config this request started with; a reload does not change it under the request.
        let shared = self.inner.current.load_full();
        let metrics = &self.inner.metrics;
        let Ok(caller) = shared.clients.authenticate(request.headers_mut()) else {
            metrics.request(RequestOutcome::Rejected);
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                "a valid gateway key is required, as `Authorization: Bearer KEY` or `x-api-key`",
            );
        };
        shared.count_client(&caller);
        if request.method() == Method::GET {
            if let Some(response) = self.endpoint(&shared, request.uri().path()) {
                return response;
            }
        }
        let response = match route(&mut request) {
            Ok(compressed) => {
                let span = server_span(request.method(), request.uri().path(), &caller);
                let line = Line {
                    caller,
                    method: request.method().clone(),
                    uri: request.uri().clone(),
                    started,
                    span: span.clone(),
                };
                // The layer's `model_fallback` span opens in here: a child of the server span.
                forward(&shared, request, compressed, line)
                    .instrument(span)
                    .await
            }
            Err((status, code, message)) => {
                let response = error(status, "invalid_request_error", code, message);
                (response, RequestOutcome::Rejected)
            }
        };
        metrics.request(response.1);
        response.0
    }

    /// The gateway's own GET endpoints, when `path` is one.
    fn endpoint(&self, shared: &Shared, path: &str) -> Option<Response<GatewayBody>> {
        Some(match path {
            "/stats" => {
                let json = serde_json::to_vec(&shared.layer.stats().snapshot()).unwrap_or_default();
                text(StatusCode::OK, "application/json", Bytes::from(json))
            }
            "/metrics" => {
                let body = self.inner.metrics.render(&shared.layer);
                text(StatusCode::OK, metrics::CONTENT_TYPE, Bytes::from(body))
            }
            "/readyz" => match shared.readiness() {
                Ok(()) => text(StatusCode::OK, "text/plain", Bytes::from_static(b"ready")),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from(reason),
                ),
            },
            _ => return None,
        })
    }
}

/// A response and how the request ended, for the counters.
type Answer = (Response<GatewayBody>, RequestOutcome);

/// Why the gateway refuses a request itself: status, OpenAI error code, message.
type Refusal = (StatusCode, &'static str, &'static str);

/// Checks a `/v1/*` request and rewrites its URI for the layer: whether its body is
/// compressed, or why it is refused.
fn route<B>(request: &mut Request<B>) -> Result<bool, Refusal> {
    let path = request.uri().path();
    let Some(rest) = path
        .strip_prefix("/v1")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return Err((
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; the API is under /v1",
        ));
    };
    if rest == "/v1" || rest.starts_with("/v1/") {
        // The layer would say "send /chat/completions", which is right for a target's base URL
        // but not for the gateway's own routes: say it in the gateway's terms.
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "the path repeats /v1; the API is under a single /v1, e.g. /v1/chat/completions \
             (an SDK's base URL ends in /v1 and its paths do not)",
        ));
    }
    if has_dot_segment(rest) {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "the path has a dot segment (`.` or `..`, literal or percent-encoded)",
        ));
    }
    // The layer joins the target's base URL (which ends in its own `/v1`) and this path.
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match request.uri().query() {
        None => http::uri::PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(rest.as_bytes())),
        Some(q) => format!("{rest}?{q}").parse(),
    };
    match path_and_query {
        Ok(pq) => *request.uri_mut() = http::Uri::from(pq),
        Err(_) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "invalid_path",
                "the path is not a valid URI path",
            ))
        }
    }
    let compressed = match request.headers().get(CONTENT_ENCODING) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => false,
        Some(v) if DECODED.iter().any(|e| v.as_bytes().eq_ignore_ascii_case(e)) => true,
        Some(_) => {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_encoding",
                "the request's content-encoding is not one of gzip, br, deflate, zstd",
            ))
        }
    };
    // axum's and hyper's extensions mean nothing upstream, and the layer copies a request's
    // extensions into every attempt: dropped here, they cost no copy.
    request.extensions_mut().clear();
    Ok(compressed)
}

/// Sends a checked request through the fallback stack.
async fn forward<B>(shared: &Shared, request: Request<B>, compressed: bool, line: Line) -> Answer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let version = request.version();
    let result = if compressed {
        shared
            .decompress
            .clone()
            .oneshot(request)
            .await
            .map(|r| r.map(|body| Kind::Boxed { body }))
    } else {
        shared
            .stack
            .clone()
            .oneshot(request)
            .await
            .map(|r| r.map(|body| Kind::Proxied { body }))
    };
    match result {
        Ok(mut response) => {
            // The upstream's version is its hop's (an HTTP/1.0 upstream's answer to an
            // HTTP/1.1 client is an HTTP/1.1 answer).
            *response.version_mut() = version;
            proxied(response, line, shared.layer.stats())
        }
        Err(e) => failed(&e, line),
    }
}

/// The encodings tower-http's request decompression is built with here.
const DECODED: [&[u8]; 4] = [b"gzip", b"br", b"deflate", b"zstd"];

/// The target of the server span of each proxied request. Only an OpenTelemetry pipeline
/// (the `otel` feature) listens to it; the log lines leave it out, so they stay one line a
/// request with no span around it.
pub const SERVER_SPAN_TARGET: &str = "fallback_gateway::server";

/// The routes a server span is named after (`http.route`), under `/v1`: the providers' fixed
/// endpoints. Any other path (one with an ID in it, `/files/file-abc`) names the span by its
/// method alone, as OpenTelemetry's HTTP conventions ask: a span name is low-cardinality.
const ROUTES: [&str; 13] = [
    "/chat/completions",
    "/completions",
    "/responses",
    "/messages",
    "/embeddings",
    "/moderations",
    "/models",
    "/images/generations",
    "/images/edits",
    "/audio/speech",
    "/audio/transcriptions",
    "/audio/translations",
    "/rerank",
];

/// A proxied request's server span, named `METHOD /v1/route` for the known [`ROUTES`] (else
/// `METHOD`), with OpenTelemetry's HTTP attribute names; the status and the served request's
/// token counts are recorded when it ends ([`Line::log`]). Disabled (and nearly free) unless a
/// subscriber wants the target.
fn server_span(method: &Method, path: &str, caller: &Caller) -> tracing::Span {
    // Without a subscriber for it (no `otel`), nothing below is worked out.
    if !tracing::enabled!(target: SERVER_SPAN_TARGET, tracing::Level::INFO) {
        return tracing::Span::none();
    }
    let empty = tracing::field::Empty;
    let route = ROUTES.contains(&path).then_some(path);
    // A method outside HTTP's own is `_OTHER` (its name in `method_original`): a client may
    // send any token there, and names and attribute values stay few.
    let known = KNOWN_METHODS.contains(method);
    let name = if known { method.as_str() } else { "HTTP" };
    tracing::info_span!(
        target: SERVER_SPAN_TARGET,
        "request",
        otel.name = %SpanName(name, route),
        otel.kind = "server",
        otel.status_code = empty,
        error.r#type = empty,
        http.request.method = if known { method.as_str() } else { "_OTHER" },
        http.request.method_original = (!known).then(|| method.as_str()),
        http.route = route.map(|r| tracing::field::display(V1(r))),
        url.scheme = "http",
        url.path = %V1(path),
        http.response.status_code = empty,
        fallback_gateway.client = caller.as_deref().unwrap_or("-"),
        gen_ai.usage.input_tokens = empty,
        gen_ai.usage.output_tokens = empty,
    )
}

/// HTTP's methods (RFC 9110 and PATCH), as OpenTelemetry's conventions know them.
const KNOWN_METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// `METHOD /v1/route`, or `METHOD` alone.
struct SpanName<'a>(&'a str, Option<&'a str>);

impl std::fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.1 {
            Some(route) => write!(f, "{} {}", self.0, V1(route)),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A routed path as the client sent it: under `/v1`.
struct V1<'a>(&'a str);

impl std::fmt::Display for V1<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/v1{}", self.0)
    }
}

/// What the per-request log line says, besides the report.
struct Line {
    caller: Caller,
    method: Method,
    uri: http::Uri,
    started: Instant,
    /// The request's server span; it ends when the line is written.
    span: tracing::Span,
}

impl Line {
    /// The one log line of a request: who, what, which targets, what came of it, how long,
    /// how many tokens. Never a key, a URL or a body.
    fn log(&self, status: StatusCode, report: &FallbackReport) {
        let tried = report
            .attempts()
            .iter()
            .map(|a| a.target())
            .collect::<Vec<_>>()
            .join(",");
        let served = report.served_by();
        let usage = report.usage();
        tracing::info!(
            target: "gateway",
            client = self.caller.as_deref().unwrap_or("-"),
            method = %self.method,
            path = %format_args!("/v1{}", self.uri.path()),
            status = status.as_u16(),
            targets_tried = %tried,
            served_target = served.map_or("-", |s| s.target()),
            served_model = served.and_then(|s| s.model()).unwrap_or("-"),
            attempts = report.attempts().len(),
            latency_ms = self.started.elapsed().as_millis() as u64,
            input_tokens = usage.map(|u| u.prompt_tokens),
            output_tokens = usage.map(|u| u.completion_tokens),
            "request",
        );
        if self.span.is_disabled() {
            return;
        }
        self.span
            .record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            self.span.record("otel.status_code", "error");
            self.span.record("error.type", status.as_str());
        }
        if let Some(usage) = usage {
            self.span
                .record("gen_ai.usage.input_tokens", usage.prompt_tokens);
            self.span
                .record("gen_ai.usage.output_tokens", usage.completion_tokens);
        }
    }
}

/// Whether any segment of `path` is `.` or `..` once percent-decoded (`%2e`, `%2E.`…), also when
/// a decoded `/` or `\` splits it further: an upstream that normalises would climb out of the
/// API path with the operator's key.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        if !segment.contains('.') && !segment.contains('%') && !segment.contains('\\') {
            return false;
        }
        let decoded = percent_decode(segment);
        decoded
            .split(|&b| b == b'/' || b == b'\\')
            .any(|s| s == b"." || s == b"..")
    })
}

fn percent_decode(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(v as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The upstream's response, its head made fit for the client's hop, with `x-fallback-*`.
fn proxied(response: Response<Kind>, line: Line, stats: Stats) -> Answer {
    let (mut head, kind) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    // Taken out, not cloned: the response goes on without it, and the log line reads it when
    // the body is done.
    let report = head
        .extensions
        .remove::<FallbackReport>()
        .unwrap_or_default();
    openai::report_headers(&report, &mut head.headers);
    let outcome = match head.status.as_u16() {
        ..=399 => RequestOutcome::Success,
        429 | 500.. => RequestOutcome::UpstreamError,
        _ => RequestOutcome::ClientError,
    };
    let span = line.span.clone();
    let finish = Finish {
        served: report.served_by().map(|s| s.target_index()),
        status: head.status,
        report,
        line,
        stats,
        first_sent: false,
    };
    let body = GatewayBody {
        kind,
        guard: None,
        finish: Some(finish),
        span,
    };
    (Response::from_parts(head, body), outcome)
}

/// An outcome with no upstream response: an error in OpenAI's shape that names the targets
/// tried and what each did, never a URL, a socket error or a key; the full detail is logged.
fn failed(failure: &FallbackError, line: Line) -> Answer {
    tracing::warn!(
        target: "gateway", client = line.caller.as_deref().unwrap_or("-"), method = %line.method,
        path = %format_args!("/v1{}", line.uri.path()), error = %failure, "no upstream response",
    );
    let response = if failure.is_body_unreadable() && body_timed_out(failure) {
        // tower-http's body timeout, in front of the layer: the client was too slow.
        error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body did not arrive in time",
        )
    } else {
        openai::error_response(failure)
    };
    line.log(response.status(), failure.report());
    let upstream = failure.is_upstream() || failure.is_deadline();
    let outcome = if upstream || !failure.report().attempts().is_empty() {
        RequestOutcome::NoUpstreamResponse
    } else {
        RequestOutcome::Rejected
    };
    (response, outcome)
}

fn body_timed_out(error: &FallbackError) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: &'static str,
) -> Response<GatewayBody> {
    openai::error_body(status, kind, code, message)
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind {
        Proxied { #[pin] body: ResponseBody<Incoming> },
        Boxed { #[pin] body: UnsyncBoxBody<Bytes, BoxError> },
        Full { data: Option<Bytes> },
    }
}

pin_project_lite::pin_project! {
    /// The body of a gateway response: the upstream's, streamed through, or the gateway's own.
    pub struct GatewayBody {
        #[pin]
        kind: Kind,
        // Held until the body is dropped: the connection counts this request as in flight.
        guard: Option<InFlight>,
        // A proxied answer's first content chunk is timed, and its log line written when the
        // body is done (sent, or dropped by a client that left).
        finish: Option<Finish>,
        // The request's server span (none for the gateway's own answers).
        span: tracing::Span,
    }

    impl PinnedDrop for GatewayBody {
        fn drop(this: Pin<&mut Self>) {
            if let Some(finish) = this.project().finish.take() {
                finish.line.log(finish.status, &finish.report);
            }
        }
    }
}

/// What a proxied answer's body reports when its first chunk goes out and when it is done.
struct Finish {
    served: Option<usize>,
    status: StatusCode,
    report: FallbackReport,
    line: Line,
    stats: Stats,
    first_sent: bool,
}

impl Finish {
    fn sent(&mut self, frame: &Frame<Bytes>) {
        if self.first_sent || frame.data_ref().is_none_or(|d| d.is_empty()) {
            return;
        }
        self.first_sent = true;
        if let Some(served) = self.served {
            let elapsed = self.line.started.elapsed();
            self.stats.record_first_content(served, elapsed);
        }
    }
}

impl From<Bytes> for GatewayBody {
    fn from(data: Bytes) -> GatewayBody {
        GatewayBody::full(data)
    }
}

impl GatewayBody {
    fn full(data: Bytes) -> GatewayBody {
        GatewayBody {
            kind: Kind::Full { data: Some(data) },
            guard: None,
            finish: None,
            span: tracing::Span::none(),
        }
    }

    /// The connection counts its request in flight until this body is dropped.
    pub(crate) fn hold(&mut self, guard: InFlight) {
        self.guard = Some(guard);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        // The layer's events while the body streams (the usage it reads) belong to the
        // request's server span.
        let _entered = this.span.enter();
        let polled = match this.kind.project() {
            KindProj::Proxied { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Boxed { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(finish)) = (&polled, this.finish.as_mut()) {
            finish.sent(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Proxied { body } => body.is_end_stream(),
            Kind::Boxed { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Proxied { body } => body.size_hint(),
            Kind::Boxed { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_literal_and_percent_encoded() {
        for path in [
            "/../admin",
            "/chat/..",
            "/./x",
            "/%2e%2e/admin",
            "/%2E%2E/admin",
            "/%2E./x",
            "/.%2e/x",
            "/%2e/x",
            "/a/..%2fadmin",
            "/a/..%5Cadmin",
            "/a\\..\\b",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/chat/completions",
            "/models/gpt-4.1",
            "/files/a..b",
            "/x/...",
            "/%2e%2e%2e",
            "/a%20b",
            "/",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
