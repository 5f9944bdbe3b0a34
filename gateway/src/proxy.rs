//! One request through the gateway: routing, client authentication, the checks that keep bad
//! input from going upstream with a key, request decompression, the fallback stack, and a
//! response head fit for the client's hop.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, CONNECTION, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::{BoxError, ServiceExt};
use tower_http::body::UnsyncBoxBody;
use tower_http::decompression::RequestDecompression;
use tower_http::timeout::RequestBodyTimeout;
use tower_model_fallback::{ConfigError, FallbackError, FallbackReport, ResponseBody, Stats};

use crate::auth::{Caller, Clients};
use crate::config::GatewayConfig;
use crate::serve::InFlight;
use crate::upstream::{stack, Stack};

/// The gateway's request handling, shared by every connection (a clone is one reference count).
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

struct Shared {
    /// The fallback stack behind tower-http's request-body timeout: the longest pause between
    /// two chunks of the body the layer reads.
    stack: RequestBodyTimeout<Stack>,
    /// The same behind tower-http's request decompression too, for compressed bodies only: the
    /// layer then reads (bounded by `max_body_bytes`) and rewrites the decompressed JSON. The
    /// timeout is outside, on the bytes as they arrive.
    decompress: RequestBodyTimeout<RequestDecompression<Stack>>,
    stats: Stats,
    clients: Clients,
    targets: Vec<String>,
}

impl Gateway {
    /// Builds the gateway for `config`, with keys (targets' and clients') from `env`. Errors name
    /// the field: a missing key, a bad target, clients required for a non-loopback `listen`.
    pub fn new(
        config: &GatewayConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Gateway, ConfigError> {
        config.check_listen()?;
        let clients = Clients::from_config(&config.clients, &env)?;
        let layer = config.fallback.layer_with_env(&env)?;
        let stack = stack(&layer, config.upstream_h2c);
        Ok(Gateway {
            shared: Arc::new(Shared {
                decompress: RequestBodyTimeout::new(
                    RequestDecompression::new(stack.clone()),
                    config.body_read_timeout,
                ),
                stack: RequestBodyTimeout::new(stack, config.body_read_timeout),
                stats: layer.stats(),
                clients,
                targets: layer
                    .targets()
                    .iter()
                    .map(|t| t.name().to_owned())
                    .collect(),
            }),
        })
    }

    /// The targets' names, in order.
    pub fn targets(&self) -> &[String] {
        &self.shared.targets
    }

    /// The layer's counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Answers one request: `GET /healthz` (open), `GET /stats`, and `/v1/*` through the
    /// fallback stack; every route but `/healthz` needs a client key when clients are set.
    pub async fn handle<B>(&self, mut request: Request<B>) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let shared = &*self.shared;
        let path = request.uri().path();
        if path == "/healthz" {
            return text(StatusCode::OK, "text/plain", Bytes::from_static(b"ok"));
        }
        let Ok(caller) = shared.clients.authenticate(request.headers_mut()) else {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                "a valid gateway key is required, as `Authorization: Bearer KEY` or `x-api-key`",
            );
        };
        let path = request.uri().path();
        if path == "/stats" && request.method() == Method::GET {
            let snapshot = shared.stats.snapshot();
            let json = serde_json::to_vec(&snapshot).unwrap_or_default();
            return text(StatusCode::OK, "application/json", Bytes::from(json));
        }
        let Some(rest) = path
            .strip_prefix("/v1")
            .filter(|r| r.is_empty() || r.starts_with('/'))
        else {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such route; the API is under /v1",
            );
        };
        if has_dot_segment(rest) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_path",
                "the path has a dot segment (`.` or `..`, literal or percent-encoded)",
            );
        }
        // The layer joins the target's base URL (which ends in its own `/v1`) and this path.
        let rest = if rest.is_empty() { "/" } else { rest };
        let path_and_query = match request.uri().query() {
            None => {
                http::uri::PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(rest.as_bytes()))
            }
            Some(q) => format!("{rest}?{q}").parse(),
        };
        match path_and_query {
            Ok(pq) => *request.uri_mut() = http::Uri::from(pq),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_path",
                    "the path is not a valid URI path",
                )
            }
        }
        let compressed = match request.headers().get(CONTENT_ENCODING) {
            None => false,
            Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => false,
            Some(v) if DECODED.iter().any(|e| v.as_bytes().eq_ignore_ascii_case(e)) => true,
            Some(_) => {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    "unsupported_content_encoding",
                    "the request's content-encoding is not one of gzip, br, deflate, zstd",
                )
            }
        };
        // axum's and hyper's extensions mean nothing upstream, and the layer copies a request's
        // extensions into every attempt: dropped here, they cost no copy.
        request.extensions_mut().clear();
        let method = request.method().clone();
        let uri = request.uri().clone();
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
        let log = Log {
            caller: &caller,
            method: &method,
            path: uri.path(),
        };
        match result {
            Ok(mut response) => {
                // The upstream's version is its hop's (an HTTP/1.0 upstream's answer to an
                // HTTP/1.1 client is an HTTP/1.1 answer).
                *response.version_mut() = version;
                proxied(response, &log)
            }
            Err(e) => failed(&e, &log),
        }
    }
}

/// The encodings tower-http's request decompression is built with here.
const DECODED: [&[u8]; 4] = [b"gzip", b"br", b"deflate", b"zstd"];

/// What the per-request log line says.
struct Log<'a> {
    caller: &'a Caller,
    method: &'a Method,
    path: &'a str,
}

impl Log<'_> {
    fn client(&self) -> &str {
        self.caller.as_deref().unwrap_or("-")
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
fn proxied(response: Response<Kind>, log: &Log<'_>) -> Response<GatewayBody> {
    let (mut head, kind) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    // Taken out, not cloned: the response goes on without it.
    let report = head
        .extensions
        .remove::<FallbackReport>()
        .unwrap_or_default();
    if let Some(served) = report.served_by() {
        set(&mut head.headers, "x-fallback-target", served.target());
        if let Some(model) = served.model() {
            set(&mut head.headers, "x-fallback-model", model);
        }
        tracing::info!(
            target: "gateway", client = log.client(), method = %log.method, path = %format_args!("/v1{}", log.path),
            status = head.status.as_u16(), target = served.target(),
            model = served.model().unwrap_or("-"), attempts = report.attempts().len(), "proxied",
        );
    }
    head.headers
        .insert("x-fallback-attempts", count(report.attempts().len()));
    if gave_up(&report) {
        // Every target was tried: an SDK's own retries would only run the chain again.
        head.headers
            .insert("x-should-retry", HeaderValue::from_static("false"));
    }
    Response::from_parts(head, GatewayBody { kind, guard: None })
}

fn gave_up(report: &FallbackReport) -> bool {
    report.is_exhausted() || report.stop_reason().is_some()
}

/// An outcome with no upstream response: an error in OpenAI's shape that names the targets
/// tried and what each did, never a URL, a socket error or a key; the full detail is logged.
fn failed(error: &FallbackError, log: &Log<'_>) -> Response<GatewayBody> {
    tracing::warn!(
        target: "gateway", client = log.client(), method = %log.method, path = %format_args!("/v1{}", log.path),
        error = %error, "no upstream response",
    );
    let mut response = openai_error(error);
    if gave_up(error.report()) || error.is_upstream() || error.is_deadline() {
        response
            .headers_mut()
            .insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// The status, type, code and message a client sees for `error`.
pub fn openai_error(error: &FallbackError) -> Response<GatewayBody> {
    let (status, kind, code, message) = if error.is_body_too_large() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            "the request body is over the gateway's size limit".to_owned(),
        )
    } else if error.is_invalid_json() {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "the request body is not valid JSON".to_owned(),
        )
    } else if error.is_body_unreadable() && body_timed_out(error) {
        (
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body did not arrive in time".to_owned(),
        )
    } else if error.is_body_unreadable() {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body_unreadable",
            "the request body could not be read (or decompressed)".to_owned(),
        )
    } else if error.is_deadline() {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "deadline_exceeded",
            format!("the deadline passed; {}", tried(error.report())),
        )
    } else if error.is_invalid_request() {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            "the request cannot be sent to any target".to_owned(),
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "all_targets_failed",
            format!("no target answered; {}", tried(error.report())),
        )
    };
    error_response(status, kind, code, message)
}

/// `tried primary (model-a): connect error, fallback (model-b): 503 Service Unavailable`:
/// target names, models and what kind of failure, without the failure's own message.
fn tried(report: &FallbackReport) -> String {
    let mut out = String::from("tried ");
    for (i, attempt) in report.attempts().iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(attempt.target());
        if let Some(model) = attempt.model() {
            out.push_str(&format!(" ({model})"));
        }
        out.push_str(": ");
        match attempt.outcome() {
            tower_model_fallback::AttemptOutcome::Status(s) => out.push_str(&s.to_string()),
            tower_model_fallback::AttemptOutcome::Error { kind, .. } => {
                out.push_str(&kind.to_string())
            }
            tower_model_fallback::AttemptOutcome::BodyFailed { status, kind, .. } => {
                out.push_str(&format!("{status}, then {kind}"))
            }
            other => out.push_str(&other.to_string()),
        }
    }
    if report.attempts().is_empty() {
        out.push_str("no target");
    }
    for skip in report.skipped() {
        out.push_str(&format!(", {} cooling down", skip.target()));
    }
    out
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

/// Headers that belong to one hop (RFC 9110 §7.6.1), and those `connection` names. Passed on,
/// they would contradict the framing hyper chooses for the client's hop (a `transfer-encoding:
/// chunked` beside the `content-length` of a body the layer has read).
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// A small count as a header value without an allocation (`HeaderValue::from` makes two).
fn count(n: usize) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    DIGITS
        .get(n)
        .map_or_else(|| HeaderValue::from(n), |d| HeaderValue::from_static(d))
}

/// A header, when the value can be one (a model ID with a newline cannot, and is left out).
fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
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
    error_response(status, kind, code, message.to_owned())
}

/// `{"error": {"message", "type", "code"}}`, OpenAI's shape.
fn error_response(
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
) -> Response<GatewayBody> {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    text(status, "application/json", Bytes::from(body.to_string()))
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
    }
}

impl GatewayBody {
    fn full(data: Bytes) -> GatewayBody {
        GatewayBody {
            kind: Kind::Full { data: Some(data) },
            guard: None,
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
        match self.project().kind.project() {
            KindProj::Proxied { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Boxed { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
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

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "close, x-trace"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("x-trace", "1"),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("retry-after", "30"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "content-type", "retry-after"]);
    }
}
