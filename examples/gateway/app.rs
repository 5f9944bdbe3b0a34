//! The gateway's parts: its config, the client stack, the axum router and the demo upstreams.
//! `main.rs` runs them; `tests/gateway.rs` includes this file to test them in-process.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower::{BoxError, ServiceExt};
use tower_model_fallback::{
    ConfigError, Fallback, FallbackConfig, FallbackError, FallbackLayer, FallbackReport,
    ReplayBody, Stats,
};

/// The gateway's config: where to listen, and a [`FallbackConfig`].
#[derive(Debug)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub fallback: FallbackConfig,
}

/// Parses `{"listen": "127.0.0.1:8080", ...FallbackConfig fields}`. Unknown fields are errors.
pub fn parse_config(json: &[u8]) -> Result<GatewayConfig, ConfigError> {
    let mut value: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| config_error("config", format!("not valid JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(config_error("config", "expected a JSON object".into()));
    };
    let listen = match object.remove("listen") {
        None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        Some(serde_json::Value::String(s)) => s.parse().map_err(|e| {
            config_error(
                "listen",
                format!("{s:?} is not an address like 127.0.0.1:8080: {e}"),
            )
        })?,
        Some(other) => {
            return Err(config_error(
                "listen",
                format!("expected a string, got {other}"),
            ))
        }
    };
    // Deserialized from the parsed value: errors name the field, not a position in a
    // re-encoded document.
    Ok(GatewayConfig {
        listen,
        fallback: FallbackConfig::from_value(value)?,
    })
}

fn config_error(field: &'static str, problem: String) -> ConfigError {
    ConfigError::new(field, problem)
}

/// The client the gateway forwards with: HTTPS (HTTP/1.1 and HTTP/2 by ALPN) or plain HTTP.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, ReplayBody>;

pub fn https_client() -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true); // a proxy forwards small writes at once
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One attempt: the shared client, bounded by the per-attempt timeout when there is one. Cloned
/// for every request (axum's state, then the layer's clone-and-swap), so a clone is one
/// reference count: the client itself is behind an `Arc`.
#[derive(Clone)]
pub struct Attempt {
    client: Arc<HttpsClient>,
    timeout: Option<Duration>,
}

impl tower::Service<http::Request<ReplayBody>> for Attempt {
    type Response = http::Response<Incoming>;
    type Error = AttemptError;
    type Future = AttemptFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), AttemptError>> {
        // hyper-util's client is always ready; its pool waits inside the response future.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<ReplayBody>) -> AttemptFuture {
        AttemptFuture {
            response: self.client.request(request),
            timer: self.timeout.map(tokio::time::sleep),
        }
    }
}

pin_project_lite::pin_project! {
    /// An attempt in flight: the client's response future and its timeout.
    pub struct AttemptFuture {
        #[pin]
        response: hyper_util::client::legacy::ResponseFuture,
        #[pin]
        timer: Option<tokio::time::Sleep>,
    }
}

impl Future for AttemptFuture {
    type Output = Result<http::Response<Incoming>, AttemptError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(result) = this.response.poll(cx) {
            return std::task::Poll::Ready(result.map_err(|e| AttemptError(e.into())));
        }
        match this.timer.as_pin_mut().map(|t| t.poll(cx)) {
            // tower's `Elapsed`, which the layer recognises as a timeout.
            Some(std::task::Poll::Ready(())) => std::task::Poll::Ready(Err(AttemptError(
                Box::new(tower::timeout::error::Elapsed::new()),
            ))),
            _ => std::task::Poll::Pending,
        }
    }
}

/// An attempt's error. A concrete type rather than `BoxError`: with `BoxError` as the inner
/// error, rustc cannot prove the handler's future `Send` ("implementation of `From` is not
/// general enough", a known compiler limitation that tower's `Buffer` shares).
#[derive(Debug)]
pub struct AttemptError(BoxError);

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for AttemptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The service the gateway calls: the fallback layer over the attempt service.
pub type Stack = Fallback<Attempt>;

pub fn stack(layer: &FallbackLayer, attempt_timeout: Option<Duration>) -> Stack {
    let inner = Attempt {
        client: Arc::new(https_client()),
        timeout: attempt_timeout,
    };
    tower::Layer::layer(layer, inner)
}

/// `/v1/*` proxied through the fallback stack; `GET /stats` the layer's counters as JSON;
/// `GET /healthz` answers `ok`.
pub fn router(stack: Stack, stats: Stats) -> Router {
    Router::new()
        .route("/healthz", any(|| async { "ok" }))
        .route(
            "/stats",
            axum::routing::get(move || {
                let snapshot = stats.snapshot();
                async move { axum::Json(snapshot) }
            }),
        )
        .nest_service("/v1", any(proxy).with_state(stack))
}

/// Logs a one-line summary of the counters every `period`, forever.
pub async fn log_stats(stats: Stats, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        tracing::info!(target: "gateway", "stats: {}", stats.snapshot());
    }
}

/// Forwards one request; the answer streams back with `x-fallback-*` headers.
async fn proxy(State(stack): State<Stack>, mut request: Request) -> Response {
    // axum's routing extensions (matched path, nested path, original URI) mean nothing to the
    // upstream client, and the layer gives every attempt its own copy of a request's extensions:
    // dropped here, they cost no copy at all.
    request.extensions_mut().clear();
    let method = request.method().clone();
    // For the log line: a reference count, not a copy.
    let uri = request.uri().clone();
    let path = uri.path();
    match stack.oneshot(request).await {
        Ok(response) => {
            let (mut head, body) = response.into_parts();
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
                    %method, path = %format_args!("/v1{path}"), status = head.status.as_u16(),
                    target = served.target(), model = served.model().unwrap_or("-"),
                    attempts = report.attempts().len(), "proxied",
                );
            }
            head.headers
                .insert("x-fallback-attempts", count(report.attempts().len()));
            Response::from_parts(head, Body::new(body))
        }
        Err(error) => {
            tracing::warn!(%method, path = %format!("/v1{path}"), error = %error, "no upstream response");
            openai_error(&error)
        }
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
fn set(headers: &mut axum::http::HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// An error in OpenAI's shape, for outcomes with no upstream response to pass through.
pub fn openai_error(error: &FallbackError) -> Response {
    let (status, kind, code) = if error.is_body_too_large() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
        )
    } else if error.is_invalid_json() {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
        )
    } else if error.is_body_unreadable() {
        (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body_unreadable",
        )
    } else if error.is_deadline() {
        (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "deadline_exceeded",
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "all_targets_failed",
        )
    };
    let body =
        serde_json::json!({"error": {"message": error.to_string(), "type": kind, "code": code}});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Small writes (a response head, the first event of a stream) go out at once.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The demo: two upstreams on 127.0.0.1. The first is flaky (every other request gets a 503);
/// the second answers chat completions, streamed when the request says `"stream": true`.
pub async fn demo_upstreams() -> std::io::Result<(SocketAddr, SocketAddr)> {
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = Router::new().fallback(move |request: Request| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n % 2 == 0 {
                let error =
                    r#"{"error":{"message":"demo primary is overloaded","type":"server_error"}}"#;
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("content-type", "application/json")],
                    error,
                )
                    .into_response();
            }
            let body = request
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            chat_answer(body).await
        }
    });
    let steady = Router::new().fallback(|request: Request| async move {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        chat_answer(body).await
    });
    let a = spawn_server(flaky).await?;
    let b = spawn_server(steady).await?;
    Ok((a, b))
}

async fn spawn_server(router: Router) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

/// A chat completion for the model in `body`, as one JSON object or as SSE events.
async fn chat_answer(body: Bytes) -> Response {
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or("demo").to_owned();
    let text = format!("Hello from {model}.");
    if request["stream"] == true {
        let mut events = Events::default();
        for word in text.split_inclusive(' ') {
            let chunk = serde_json::json!({"object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]});
            events
                .0
                .push_back(Bytes::from(format!("data: {chunk}\n\n")));
        }
        events.0.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        return ([("content-type", "text/event-stream")], Body::new(events)).into_response();
    }
    let answer = serde_json::json!({"id": "chatcmpl-demo", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}});
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

/// A body that sends each queued event as its own frame.
#[derive(Default)]
struct Events(std::collections::VecDeque<Bytes>);

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|e| Ok(http_body::Frame::data(e))))
    }
}
