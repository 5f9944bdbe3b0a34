//! A tiny upstream on 127.0.0.1 for the examples: every request is answered by a function of
//! its parsed JSON body, after an optional delay. Shared by the examples as `mod upstream;`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A running upstream: its address and how many requests it has had.
pub struct Upstream {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Serves `answer(body)` after `delay` for every request.
pub async fn serve(
    delay: Duration,
    answer: fn(&serde_json::Value) -> Response<Full<Bytes>>,
) -> std::io::Result<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    let bytes = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(answer(&body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(Upstream { addr, calls })
}

/// A JSON response.
pub fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A chat completion answering as the model the request asked for.
pub fn chat_completion(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let model = body["model"].as_str().unwrap_or("?").to_owned();
    let answer = serde_json::json!({
        "id": "chatcmpl-example",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": format!("Hello from {model}.")}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    });
    json(200, answer.to_string())
}

/// A chat completion, or with `"stream": true` its server-sent events (three content chunks,
/// then `[DONE]`), answering as the model the request asked for.
pub fn chat_completion_or_stream(body: &serde_json::Value) -> Response<Full<Bytes>> {
    if body["stream"] != serde_json::Value::Bool(true) {
        return chat_completion(body);
    }
    let model = body["model"].as_str().unwrap_or("?");
    let mut events = String::new();
    for piece in ["Hello", " from ", model] {
        let chunk = serde_json::json!({
            "id": "chatcmpl-example", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
        });
        events.push_str(&format!("data: {chunk}\n\n"));
    }
    events.push_str("data: [DONE]\n\n");
    let mut response = Response::new(Full::new(Bytes::from(events)));
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}
