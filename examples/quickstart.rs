//! Model fallback in one file, with no keys and no network.
//!
//! Two upstreams start on 127.0.0.1: a primary that answers 503 (overloaded) to every chat
//! request, and a fallback that answers like a chat completion endpoint. A hyper-util client
//! wrapped in `FallbackLayer` sends a chat request: the primary fails, the same request goes to
//! the fallback with the fallback's model and key, and the report says who answered. A second,
//! malformed request gets a 400 from the primary and is not re-sent anywhere.
//!
//! Run: `cargo run --example quickstart`

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{FallbackLayer, FallbackReport, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let primary_calls = Arc::new(AtomicUsize::new(0));
    let fallback_calls = Arc::new(AtomicUsize::new(0));
    let primary = serve(primary_calls.clone(), |body| {
        if body.get("messages").is_none() {
            json(400, r#"{"error":{"message":"'messages' is a required property","type":"invalid_request_error","code":null}}"#.to_owned())
        } else {
            json(503, r#"{"error":{"message":"The server is overloaded, please retry later","type":"server_error"}}"#.to_owned())
        }
    })
    .await?;
    let fallback = serve(fallback_calls.clone(), |body| {
        let model = body["model"].as_str().unwrap_or("?").to_owned();
        let answer = serde_json::json!({
            "id": "chatcmpl-quickstart",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": format!("Hello from {model} on the fallback.")}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
        });
        json(200, answer.to_string())
    })
    .await?;
    println!("primary   http://{primary}/v1   answers 503 to chat requests, 400 to malformed ones");
    println!("fallback  http://{fallback}/v1   answers chat completions\n");

    let layer = FallbackLayer::new([
        Target::new(format!("http://{primary}/v1"))?
            .name("primary")
            .model("gpt-4o-mini")
            .bearer("demo-key-primary")?,
        Target::new(format!("http://{fallback}/v1"))?
            .name("fallback")
            .model("claude-3-5-haiku")
            .bearer("demo-key-fallback")?,
    ])?;
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build_http());

    println!("1) a chat request");
    let request =
        chat(br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#)?;
    let (status, report, body) = send(client.clone(), request).await?;
    let body: serde_json::Value = serde_json::from_slice(&body)?;
    let served = report
        .served_by()
        .map(|a| a.target().to_owned())
        .unwrap_or_default();
    println!(
        "   {status}, served by {served} with model {}: {}\n",
        body["model"], body["choices"][0]["message"]["content"]
    );

    println!("2) a malformed request (no \"messages\")");
    let (status, _, body) = send(client, chat(br#"{"model":"gpt-4o-mini"}"#)?).await?;
    println!(
        "   {status}, handed back as the primary sent it, not re-sent: {}",
        String::from_utf8_lossy(&body)
    );
    println!(
        "\nupstream calls: primary {}, fallback {} (the 400 never reached the fallback)",
        primary_calls.load(Ordering::SeqCst),
        fallback_calls.load(Ordering::SeqCst)
    );
    Ok(())
}

/// A chat request, with a path relative to each target's base URL as in the OpenAI SDKs.
fn chat(body: &'static [u8]) -> Result<Request<Full<Bytes>>, http::Error> {
    Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)))
}

/// Sends one request, prints its attempts, and returns the status, the report and the body.
async fn send<S>(
    client: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, FallbackReport, Bytes), BoxError>
where
    S: tower::Service<
        Request<Full<Bytes>>,
        Response = Response<tower_model_fallback::ResponseBody<Incoming>>,
    >,
    S::Error: Into<BoxError>,
{
    let response = client.oneshot(request).await.map_err(Into::into)?;
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap_or_default();
    for (i, attempt) in report.attempts().iter().enumerate() {
        println!("   attempt {}: {attempt}", i + 1);
    }
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, report, body))
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A tiny upstream on 127.0.0.1 answering every request with `answer(parsed JSON body)`.
async fn serve(
    calls: Arc<AtomicUsize>,
    answer: fn(&serde_json::Value) -> Response<Full<Bytes>>,
) -> Result<std::net::SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let calls = calls.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let bytes = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                    Ok::<_, Infallible>(answer(&body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}
