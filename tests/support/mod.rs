//! Test upstreams on 127.0.0.1: hyper servers that record what they receive and answer from a
//! closure, plus a client stack wrapped in the layer.
#![allow(dead_code)]

pub mod faults;
pub mod redis_server;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower_model_fallback::{Fallback, FallbackLayer, FallbackReport, ReplayBody, Target};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ServerBody = BoxBody<Bytes, BoxError>;
type Handler =
    Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Response<ServerBody>> + Send>> + Send + Sync>;

/// One request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the upstream received JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// A hyper HTTP/1 server on 127.0.0.1 that records every request.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    pub opened: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    pub closed_notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// An upstream answering every request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<ServerBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |seen| Box::pin(handler(seen)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let closed_notify = Arc::new(Notify::new());
        let (s, o, c, n) = (
            seen.clone(),
            opened.clone(),
            closed.clone(),
            closed_notify.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                o.fetch_add(1, Ordering::SeqCst);
                let (s, c, n, handler) = (s.clone(), c.clone(), n.clone(), handler.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (s, handler) = (s.clone(), handler.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            s.lock().unwrap().push(seen.clone());
                            Ok::<_, Infallible>(handler(seen).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                    n.notify_waiters();
                });
            }
        });
        Upstream {
            addr,
            seen,
            opened,
            closed,
            closed_notify,
            task,
        }
    }

    /// An upstream answering every request with `status` and `body`.
    pub async fn fixed(status: u16, body: &'static str) -> Upstream {
        Upstream::start(move |_| async move { reply(status, body) }).await
    }

    /// An upstream answering like a chat completion endpoint, echoing the model it was asked for.
    pub async fn chat(answer: &'static str) -> Upstream {
        Upstream::start(move |seen| async move {
            let model = serde_json::from_slice::<serde_json::Value>(&seen.body)
                .ok()
                .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_default();
            let body = serde_json::json!({
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            });
            reply_owned(200, body.to_string())
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url_with(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits (bounded) until at least `n` connections have closed.
    pub async fn wait_closed(&self, n: usize) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.closed.load(Ordering::SeqCst) < n {
            let notified = self.closed_notify.notified();
            if self.closed.load(Ordering::SeqCst) >= n {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
        true
    }
}

pub fn reply(status: u16, body: &'static str) -> Response<ServerBody> {
    reply_owned(status, body.to_owned())
}

pub fn reply_owned(status: u16, body: String) -> Response<ServerBody> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .unwrap()
}

/// An address where nothing listens: connecting is refused.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// A server that accepts, reads the request head, and closes the connection without answering.
pub async fn hang_up_server() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            drop(stream);
        }
    });
    (addr, count, task)
}

pub type HttpClient = Client<HttpConnector, ReplayBody>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The layer around a plain hyper-util client.
pub fn stack(layer: &FallbackLayer) -> Fallback<HttpClient> {
    tower::Layer::layer(layer, client())
}

/// A chat completion request body as the OpenAI SDK sends it.
pub const CHAT: &str = r#"{"model":"caller-model","messages":[{"role":"user","content":"Hi"}]}"#;

pub fn chat_request(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

pub async fn body_string<B>(body: B) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// A response body fed by a channel: each `Bytes` sent is one frame; dropping the sender ends it.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(http_body::Frame::data)))
    }
}

/// A streamed response and the sender that feeds it.
pub fn streamed(
    status: u16,
) -> (
    Response<ServerBody>,
    tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let response = Response::builder()
        .status(status)
        .header("content-type", "text/event-stream")
        .body(ChannelBody(rx).boxed())
        .unwrap();
    (response, tx)
}

/// What a [`RawUpstream`] does after writing its bytes.
#[derive(Clone, Copy, Debug)]
pub enum Then {
    /// Close the connection.
    Close,
    /// Keep the connection open, sending nothing more, until the test ends.
    Stall,
}

/// A fault server on 127.0.0.1 speaking raw bytes: it reads one request (head and
/// content-length body), writes `response` exactly, then closes or stalls.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    /// Every request received, head and body, as text.
    pub received: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub async fn start(response: &'static [u8], then: Then) -> RawUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then as many body bytes as content-length says (bounded).
                let complete = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            break true;
                        }
                    }
                    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => break false,
                    }
                };
                if !complete {
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let _ = stream.write_all(response).await;
                let _ = stream.flush().await;
                match then {
                    Then::Close => drop(stream),
                    Then::Stall => held.push(stream),
                }
            }
        });
        RawUpstream {
            addr,
            requests,
            received,
            task,
        }
    }

    /// Every request received so far, head and body, as text.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A streamed (SSE) response head, chunked, with no body yet.
pub const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// What an in-process scripted target does for one call.
#[derive(Clone, Debug)]
pub struct Act {
    pub delay: Duration,
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: &'static str,
    pub hang: bool,
}

impl Act {
    /// Answer `status` at once.
    pub fn status(status: u16) -> Act {
        Act {
            delay: Duration::ZERO,
            status,
            headers: Vec::new(),
            body: "",
            hang: false,
        }
    }

    /// Never answer.
    pub fn hang() -> Act {
        Act {
            hang: true,
            ..Act::status(200)
        }
    }

    /// Answer after `delay`.
    pub fn after(mut self, delay: Duration) -> Act {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Act {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn body(mut self, body: &'static str) -> Act {
        self.body = body;
        self
    }
}

/// An in-process client: routes by host to a script of acts (the last act repeats) and records
/// every call with its time on tokio's clock.
#[derive(Clone, Default)]
pub struct Scripted {
    scripts: Arc<Mutex<std::collections::HashMap<String, std::collections::VecDeque<Act>>>>,
    pub calls: Arc<Mutex<Vec<(String, tokio::time::Instant)>>>,
}

impl Scripted {
    pub fn new(scripts: &[(&str, Vec<Act>)]) -> Scripted {
        let map = scripts
            .iter()
            .map(|(h, acts)| (h.to_string(), acts.iter().cloned().collect()))
            .collect();
        Scripted {
            scripts: Arc::new(Mutex::new(map)),
            calls: Arc::default(),
        }
    }

    /// Calls to `host`.
    pub fn count(&self, host: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == host)
            .count()
    }

    /// The hosts called, in order.
    pub fn sequence(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// When each call to `host` was made, relative to `start`.
    pub fn times(&self, host: &str, start: tokio::time::Instant) -> Vec<Duration> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == host)
            .map(|(_, t)| *t - start)
            .collect()
    }
}

impl tower::Service<Request<ReplayBody>> for Scripted {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        let host = req.uri().host().unwrap_or_default().to_owned();
        self.calls
            .lock()
            .unwrap()
            .push((host.clone(), tokio::time::Instant::now()));
        let act = {
            let mut scripts = self.scripts.lock().unwrap();
            match scripts.get_mut(&host) {
                Some(queue) if queue.len() > 1 => queue.pop_front(),
                Some(queue) => queue.front().cloned(),
                None => None,
            }
            .unwrap_or_else(|| Act::status(200))
        };
        Box::pin(async move {
            if act.hang {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(act.delay).await;
            let mut response = Response::builder().status(act.status);
            for (name, value) in &act.headers {
                response = response.header(*name, value.as_str());
            }
            Ok(response
                .body(Full::new(Bytes::from_static(act.body.as_bytes())))
                .unwrap())
        })
    }
}

/// A layer over in-process targets named by host (`http://{host}/v1`).
pub fn hosts(names: &[&str]) -> FallbackLayer {
    FallbackLayer::new(names.iter().map(|h| {
        tower_model_fallback::Target::new(format!("http://{h}/v1"))
            .unwrap()
            .with_name(*h)
    }))
    .unwrap()
}

/// One chat request through `layer` over `client`: the status and the report.
pub async fn send(
    layer: &FallbackLayer,
    client: &Scripted,
) -> (StatusCode, tower_model_fallback::FallbackReport) {
    use tower::ServiceExt;
    let response = tower::Layer::layer(layer, client.clone())
        .oneshot(chat_request(CHAT))
        .await
        .unwrap();
    let report = response
        .extensions()
        .get::<tower_model_fallback::FallbackReport>()
        .cloned()
        .unwrap();
    (response.status(), report)
}

/// Two targets, `primary` (model `a`) and `fallback` (model `b`).
pub fn primary_and_fallback(primary: String, fallback: String) -> FallbackLayer {
    FallbackLayer::new([
        Target::new(primary)
            .unwrap()
            .with_name("primary")
            .with_model("a"),
        Target::new(fallback)
            .unwrap()
            .with_name("fallback")
            .with_model("b"),
    ])
    .unwrap()
}

/// A response's report, and its body as text (or the body's error).
pub async fn report_and_body<B>(response: Response<B>) -> (FallbackReport, Result<String, String>)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let report = report_of(&response);
    let body = match response.into_body().collect().await {
        Ok(c) => Ok(String::from_utf8(c.to_bytes().to_vec()).unwrap()),
        Err(e) => Err(e.to_string()),
    };
    (report, body)
}

/// A body that sends its bytes (if any), then nothing, for ever.
pub struct Stalled(pub Option<Bytes>);

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// Two targets with no server behind them (`slow.test`, then `fast.test`), for in-process
/// inner services, with this first-byte timeout.
pub fn slow_then_fast(first_byte_timeout: Duration) -> FallbackLayer {
    FallbackLayer::new([
        Target::new("http://slow.test").unwrap(),
        Target::new("http://fast.test").unwrap(),
    ])
    .unwrap()
    .first_byte_timeout(first_byte_timeout)
}

/// The report a response carries.
pub fn report_of<B>(response: &Response<B>) -> FallbackReport {
    response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .expect("every response carries a report")
}

/// The next frame of `body`, which must be data.
pub async fn next_data<B>(body: &mut B) -> Bytes
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let frame = body.frame().await.expect("a frame, not the end");
    frame
        .expect("data, not an error")
        .into_data()
        .expect("data")
}

/// A tracing writer that keeps everything in memory.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}
