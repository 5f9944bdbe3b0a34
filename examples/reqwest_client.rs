//! A reqwest client under `FallbackLayer`, with no keys and no network (feature `reqwest`).
//!
//! Three upstreams on 127.0.0.1: one that never answers, one that refuses connections (nothing
//! listens there), and one that answers chat completions. The reqwest client's own `.timeout`
//! and its connect errors move the request on, and the report says who answered.
//!
//! Run: `cargo run --example reqwest_client --features reqwest`

mod upstream;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{FallbackLayer, FallbackReport, ReqwestService, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let slow = upstream::serve(Duration::from_secs(3600), upstream::chat_completion).await?;
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()? // dropped at the end of the block: nothing listens there
    };
    let fallback = upstream::serve(Duration::ZERO, upstream::chat_completion).await?;

    let layer = FallbackLayer::new([
        Target::new(format!("http://{}/v1", slow.addr))?
            .with_name("slow")
            .with_model("model-a"),
        Target::new(format!("http://{refused}/v1"))?
            .with_name("down")
            .with_model("model-b"),
        Target::new(format!("http://{}/v1", fallback.addr))?
            .with_name("fallback")
            .with_model("model-c"),
    ])?;
    // reqwest's own settings apply to every attempt; its timeout bounds the whole attempt.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()?;
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(ReqwestService::new(client));

    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"any","messages":[{"role":"user","content":"Say hello"}]}"#,
        )))?;
    let response = service.oneshot(request).await?;
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap_or_default();
    for (i, attempt) in report.attempts().iter().enumerate() {
        println!("attempt {}: {attempt}", i + 1);
    }
    let status = response.status();
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    println!(
        "{status}, served by {} with model {}: {}",
        report.served_by().map_or("-", |a| a.target()),
        body["model"],
        body["choices"][0]["message"]["content"]
    );
    Ok(())
}
