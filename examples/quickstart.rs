//! Model fallback in one file, with no keys and no network.
//!
//! Two upstreams start on 127.0.0.1: a primary that answers 503 (overloaded) to every chat
//! request, and a fallback that answers like a chat completion endpoint. A hyper-util client
//! wrapped in `FallbackLayer` sends a chat request: the primary fails, the same request goes to
//! the fallback with the fallback's model and key, and the report says who answered. A second,
//! malformed request gets a 400 from the primary and is not re-sent anywhere.
//!
//! Run: `cargo run --example quickstart`

mod upstream;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{FallbackLayer, FallbackReport, ResponseBody, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let primary = upstream::serve(Duration::ZERO, |body| {
        if body.get("messages").is_none() {
            let error = r#"{"error":{"message":"'messages' is a required property","type":"invalid_request_error","code":null}}"#;
            upstream::json(400, error.to_owned())
        } else {
            let error = r#"{"error":{"message":"The server is overloaded, please retry later","type":"server_error"}}"#;
            upstream::json(503, error.to_owned())
        }
    })
    .await?;
    let fallback = upstream::serve(Duration::ZERO, upstream::chat_completion).await?;
    println!(
        "primary   http://{}/v1   answers 503 to chat requests, 400 to malformed ones",
        primary.addr
    );
    println!(
        "fallback  http://{}/v1   answers chat completions\n",
        fallback.addr
    );

    let layer = FallbackLayer::new([
        Target::new(format!("http://{}/v1", primary.addr))?
            .with_name("primary")
            .with_model("gpt-4o-mini")
            .bearer("demo-key-primary")?,
        Target::new(format!("http://{}/v1", fallback.addr))?
            .with_name("fallback")
            .with_model("claude-3-5-haiku")
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
        primary.calls(),
        fallback.calls()
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
    S: tower::Service<Request<Full<Bytes>>, Response = Response<ResponseBody<Incoming>>>,
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
