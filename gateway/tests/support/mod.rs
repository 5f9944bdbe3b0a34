//! Real servers on 127.0.0.1 for the gateway's tests: the gateway in-process, upstreams that
//! write exact bytes from a raw socket, and raw-socket clients that read exact bytes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_model_fallback_gateway::{serve, Gateway, GatewayConfig};

pub mod process;

pub const CHAT: &str = r#"{"model":"caller-model","messages":[{"role":"user","content":"Hi"}]}"#;

/// The gateway on 127.0.0.1, in-process; dropping `stop` (or sending on it) shuts it down.
pub struct Running {
    pub addr: SocketAddr,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Starts the gateway for `config` with keys from `env`.
pub async fn gateway(config: serde_json::Value, env: &[(&str, &str)]) -> Running {
    let mut config = config;
    config["listen"] = "127.0.0.1:0".into();
    let config = GatewayConfig::from_json(config.to_string().as_bytes()).expect("a valid config");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let gateway = Gateway::new(&config, |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .expect("a gateway");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let limits = (&config).into();
    let task = tokio::spawn(async move {
        serve::serve(listener, gateway, limits, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

/// A config over `targets` (`(name, base_url)`), each with model `model-<name>`.
pub fn config(targets: &[(&str, String)]) -> serde_json::Value {
    let targets: Vec<serde_json::Value> = targets
        .iter()
        .map(|(name, url)| serde_json::json!({"name": name, "base_url": url, "model": format!("model-{name}")}))
        .collect();
    serde_json::json!({"targets": targets, "attempt_timeout_ms": 5000})
}

/// An upstream on a raw socket: reads each request (head and a `content-length` body) and
/// answers with exactly the bytes the script gives for that request's number, then closes when
/// `close` says so. It records each request's head and body.
pub struct RawUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    count: Arc<AtomicUsize>,
}

impl RawUpstream {
    /// Every request gets `response`; the connection closes after each when `close`.
    pub async fn start(response: &'static [u8], close: bool) -> RawUpstream {
        RawUpstream::scripted(move |_| (response.to_vec(), close)).await
    }

    /// Rate limited (429 with `retry-after: 30`) on its first call, `ok` afterwards.
    pub async fn limited_once(ok: &'static [u8]) -> RawUpstream {
        RawUpstream::scripted(move |n| {
            let bytes = if n == 0 {
                b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 30\r\ncontent-length: 2\r\n\r\n{}".to_vec()
            } else {
                ok.to_vec()
            };
            (bytes, false)
        })
        .await
    }

    /// Request `n` (from 0) gets `script(n)`: the bytes, and whether to close afterwards.
    pub async fn scripted(
        script: impl Fn(usize) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let (s, c) = (seen.clone(), count.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (s, c, script) = (s.clone(), c.clone(), script.clone());
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let Some(request) = read_request(&mut tcp).await else {
                            return;
                        };
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        s.lock().unwrap().push(request);
                        let (bytes, close) = script(n);
                        if tcp.write_all(&bytes).await.is_err() {
                            return;
                        }
                        if close {
                            let _ = tcp.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, seen, count }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Each request as received: head and body, as text.
    pub fn received(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request (head, then a `content-length` body) from `tcp`.
pub async fn read_request(tcp: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends `request` on a new connection and reads until the gateway closes it (or 10 s pass).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    read_to_close(&mut tcp).await
}

/// Everything the peer sends until it closes (a reset ends it too), for at most 10 s.
pub async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 8192];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    out
}

/// A chat POST on the wire with `connection: close`, so the answer ends with the connection.
pub fn chat_post(extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A response split into head (lowercased) and body.
pub fn split(response: &[u8]) -> (String, Vec<u8>) {
    let end = find(response, b"\r\n\r\n").map_or(response.len(), |i| i + 4);
    (
        String::from_utf8_lossy(&response[..end]).to_lowercase(),
        response[end..].to_vec(),
    )
}

/// Decodes a chunked body.
pub fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(body, b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[line_end + 2..line_end + 2 + size]);
        body = &body[line_end + 2 + size + 2..];
    }
    out
}

/// The body of a raw response, whatever its framing (content-length, chunked, close).
pub fn body_of(response: &[u8]) -> Vec<u8> {
    let (head, body) = split(response);
    if head.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    }
}

/// A POST through a hyper client; the status, headers and whole body.
pub async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = http::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (head, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (head.status, head.headers, body)
}

/// A chat POST of `body` to `url` over HTTP/2 with prior knowledge (h2c): the response to come.
pub fn h2c_chat(url: String, body: &'static str) -> hyper_util::client::legacy::ResponseFuture {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    client.request(request)
}

/// A success that reports its usage.
pub const OK_WITH_USAGE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 84\r\n\r\n{\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}";
/// A 503.
pub const DOWN: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
/// The key of client `web` (`WEB_KEY`) in [`with_client`].
pub const KEY: &str = "sk-gateway-client-secret";

/// A client key, and the models catalog (the layer reads `usage` only with one).
pub fn with_client(mut config: serde_json::Value) -> serde_json::Value {
    config["clients"] = serde_json::json!([{"name": "web", "key_env": "WEB_KEY"}]);
    config["models_file"] =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models.json").into();
    config
}

/// A gateway over a primary that answers 503 and a healthy fallback, after one request with
/// the client's key (which falls back).
pub async fn after_a_fallback() -> (Running, [RawUpstream; 2]) {
    let primary = RawUpstream::start(DOWN, false).await;
    let fallback = RawUpstream::start(OK_WITH_USAGE, false).await;
    let gw = gateway(
        with_client(config(&[
            ("primary", primary.url()),
            ("fallback", fallback.url()),
        ])),
        &[("WEB_KEY", KEY)],
    )
    .await;
    let bearer = format!("Bearer {KEY}");
    let (status, headers, _) = post(
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer)],
        CHAT,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-fallback-target"], "fallback");
    (gw, [primary, fallback])
}
