//! The demo: two upstreams of its own on 127.0.0.1, no keys. The first is flaky (every other
//! request gets a 503); the second answers chat completions, streamed when asked.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::GatewayConfig;

/// The demo's config: the gateway on 127.0.0.1:8080 over the two demo upstreams.
pub async fn config() -> std::io::Result<GatewayConfig> {
    let flaky = upstream(true).await?;
    let steady = upstream(false).await?;
    let json = serde_json::json!({
        "listen": "127.0.0.1:8080",
        "attempt_timeout_ms": 10000,
        "targets": [
            {"name": "flaky", "base_url": format!("http://{flaky}/v1"), "model": "demo-primary"},
            {"name": "steady", "base_url": format!("http://{steady}/v1"), "model": "demo-fallback"},
        ],
    });
    GatewayConfig::from_json(json.to_string().as_bytes()).map_err(std::io::Error::other)
}

async fn upstream(flaky: bool) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let calls = calls.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    if flaky && n % 2 == 0 {
                        let error = r#"{"error":{"message":"demo primary is overloaded","type":"server_error"}}"#;
                        return Ok::<_, Infallible>(respond(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "application/json",
                            Events::one(Bytes::from_static(error.as_bytes())),
                        ));
                    }
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    Ok(chat_answer(&body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    Ok(addr)
}

fn respond(status: StatusCode, content_type: &'static str, body: Events) -> Response<Events> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// A chat completion for the model in `body`, as one JSON object or as SSE events.
fn chat_answer(body: &[u8]) -> Response<Events> {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
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
        return respond(StatusCode::OK, "text/event-stream", events);
    }
    let answer = serde_json::json!({"id": "chatcmpl-demo", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}});
    respond(
        StatusCode::OK,
        "application/json",
        Events::one(Bytes::from(answer.to_string())),
    )
}

/// A body that sends each queued event as its own frame.
#[derive(Default)]
struct Events(std::collections::VecDeque<Bytes>);

impl Events {
    fn one(data: Bytes) -> Events {
        Events([data].into())
    }
}

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|e| Ok(Frame::data(e))))
    }
}
