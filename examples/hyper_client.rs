//! A plain hyper-util client stack: the fallback layer over a per-attempt timeout, a buffer and
//! a rate limit. The primary hangs for 30 s; each attempt gets 500 ms, so requests are answered
//! by the fallback. The rate limit (2 requests a second, both targets together) paces the
//! attempts, and since the timeout sits above it, time spent waiting for a rate-limit slot counts
//! against an attempt: the third request shows it. The buffer makes the rate limit shareable.
//!
//! Run: `cargo run --example hyper_client`

mod upstream;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{FallbackLayer, FallbackReport, Target};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let hanging = upstream::serve(Duration::from_secs(30), upstream::chat_completion).await?;
    let fallback = upstream::serve(Duration::ZERO, upstream::chat_completion).await?;

    let client = ServiceBuilder::new()
        .layer(FallbackLayer::new([
            Target::new(format!("http://{}/v1", hanging.addr))?
                .with_name("hanging")
                .with_model("big-model"),
            Target::new(format!("http://{}/v1", fallback.addr))?
                .with_name("fallback")
                .with_model("small-model"),
        ])?)
        .timeout(Duration::from_millis(500)) // one attempt; its Elapsed moves to the next target
        .buffer(64) // RateLimit is not Clone; the buffer makes the stack shareable
        .rate_limit(2, Duration::from_secs(1))
        .service(Client::builder(TokioExecutor::new()).build_http());

    let started = Instant::now();
    for i in 1..=3 {
        let request = Request::post("/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"any","messages":[]}"#,
            )))?;
        let response = client.clone().oneshot(request).await?;
        let report = response
            .extensions()
            .get::<FallbackReport>()
            .cloned()
            .unwrap_or_default();
        let at = started.elapsed().as_millis();
        println!("request {i} done at {at:>5} ms: {}", response.status());
        for attempt in report.attempts() {
            println!("    {attempt}");
        }
    }
    println!(
        "calls: hanging {}, fallback {}",
        hanging.calls(),
        fallback.calls()
    );
    Ok(())
}
