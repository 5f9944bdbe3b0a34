//! One request through the gateway: routing, client authentication, the checks that keep bad
//! input from going upstream with a key, request decompression, the fallback stack, and a
//! response head fit for the client's hop.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
    openai, strip_hop_by_hop, ConfigError, FallbackError, FallbackReport, ResponseBody, Stats,
};

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
        tracing::info!(
            target: "gateway", client = log.client(), method = %log.method, path = %format_args!("/v1{}", log.path),
            status = head.status.as_u16(), target = served.target(),
            model = served.model().unwrap_or("-"), attempts = report.attempts().len(), "proxied",
        );
    }
    openai::report_headers(&report, &mut head.headers);
    Response::from_parts(head, GatewayBody { kind, guard: None })
}

/// An outcome with no upstream response: an error in OpenAI's shape that names the targets
/// tried and what each did, never a URL, a socket error or a key; the full detail is logged.
fn failed(failure: &FallbackError, log: &Log<'_>) -> Response<GatewayBody> {
    tracing::warn!(
        target: "gateway", client = log.client(), method = %log.method, path = %format_args!("/v1{}", log.path),
        error = %failure, "no upstream response",
    );
    if failure.is_body_unreadable() && body_timed_out(failure) {
        // tower-http's body timeout, in front of the layer: the client was too slow.
        return error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            "the request body did not arrive in time",
        );
    }
    openai::error_response(failure)
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
}
