//! async-openai's client through `FallbackLayer`, plain and streamed, with no keys and no
//! network (feature `reqwest`).
//!
//! Two upstreams on 127.0.0.1: a primary that answers 503 and a fallback that answers chat
//! completions, as JSON or as a stream. async-openai's `Client` takes a tower service for its
//! HTTP calls (its `middleware` feature); the adapter below hands each of its requests to the
//! layer over a `ReqwestService`, and the layer's report to a channel, since async-openai's
//! parsed answers carry no HTTP extensions.
//!
//! The SDK's base URL is not where requests go: the adapter keeps only the path (`/chat/
//! completions`), and the layer sends it to each target's base URL with that target's model and
//! key. Give the SDK a base without a path and any key.
//!
//! Run: `cargo run --example async_openai --features reqwest`

mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tower::{Service, ServiceExt};
use tower_model_fallback::{Fallback, FallbackLayer, FallbackReport, ReqwestService, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// async-openai's HTTP service: each request through the fallback stack; each report out on
/// `reports`.
#[derive(Clone)]
struct ThroughFallback {
    stack: Fallback<ReqwestService>,
    reports: mpsc::UnboundedSender<FallbackReport>,
}

impl Service<HttpRequestFactory> for ThroughFallback {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        // The stack's readiness is awaited by `oneshot` in the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let (stack, reports) = (self.stack.clone(), self.reports.clone());
        Box::pin(async move {
            let request: http::Request<reqwest::Body> = factory
                .build()
                .await?
                .try_into()
                .map_err(OpenAIError::Reqwest)?;
            let (mut parts, body) = request.into_parts();
            // Only the path and query: the layer joins them to each target's base URL.
            parts.uri = parts
                .uri
                .path_and_query()
                .cloned()
                .map(http::Uri::from)
                .unwrap_or_default();
            let response = stack
                .oneshot(http::Request::from_parts(parts, body))
                .await
                .map_err(|e| OpenAIError::from(Box::new(e) as BoxError))?;
            if let Some(report) = response.extensions().get::<FallbackReport>() {
                let _ = reports.send(report.clone());
            }
            Ok(reqwest::Response::from(response.map(reqwest::Body::wrap)))
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let primary = upstream::serve(Duration::ZERO, |_| {
        let error = r#"{"error":{"message":"The server is overloaded","type":"server_error"}}"#;
        upstream::json(503, error.to_owned())
    })
    .await?;
    let fallback = upstream::serve(Duration::ZERO, upstream::chat_completion_or_stream).await?;

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
    let (reports, mut report) = mpsc::unbounded_channel();
    let stack = tower::Layer::layer(&layer, ReqwestService::new(reqwest::Client::new()));
    let config = OpenAIConfig::new()
        .with_api_base("http://fallback.invalid")
        .with_api_key("unused");
    let client = async_openai::Client::with_config(config)
        .with_http_service(ThroughFallback { stack, reports });

    println!("1) client.chat().create(..)");
    let answer = client.chat().create(request()?).await?;
    let content = answer.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    println!("   {content:?} from model {}", answer.model);
    print_report(report.recv().await);

    println!("2) client.chat().create_stream(..)");
    let mut stream = client.chat().create_stream(request()?).await?;
    print_report(report.recv().await);
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if let Some(delta) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            println!("   chunk {delta:?}");
            text.push_str(&delta);
        }
    }
    println!("   streamed: {text:?}");
    println!(
        "\nupstream calls: primary {}, fallback {}",
        primary.calls(),
        fallback.calls()
    );
    Ok(())
}

fn request() -> Result<CreateChatCompletionRequest, OpenAIError> {
    CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello")
            .build()?
            .into()])
        .build()
}

fn print_report(report: Option<FallbackReport>) {
    for (i, attempt) in report.unwrap_or_default().attempts().iter().enumerate() {
        println!("   attempt {}: {attempt}", i + 1);
    }
}
