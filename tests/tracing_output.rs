//! Tracing: a span per request, one event per attempt at the level users expect (a fallback is a
//! warning; a non-retryable return is info), never keys, never bodies. Its own test binary, with a
//! global subscriber, so that no other test's callsites interfere.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tower::ServiceExt;
use tower_model_fallback::{FallbackLayer, Target};

#[tokio::test]
async fn each_attempt_is_one_event_in_the_request_span_at_its_level_without_keys_or_bodies() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let primary = Upstream::fixed(503, r#"{"error":{"message":"primary-body-text"}}"#).await;
    let fallback = Upstream::fixed(400, r#"{"error":{"message":"fallback-body-text"}}"#).await;
    let layer = FallbackLayer::new([
        Target::new(primary.url())
            .unwrap()
            .with_name("primary")
            .with_model("m-a")
            .bearer("sk-primary-secret")
            .unwrap(),
        Target::new(fallback.url())
            .unwrap()
            .with_name("fallback")
            .with_model("m-b")
            .api_key_header("x-api-key", "sk-fallback-secret")
            .unwrap(),
    ])
    .unwrap();
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-caller-secret")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"x","messages":[{"role":"user","content":"caller-body-text"}]}"#,
        )))
        .unwrap();
    let response = stack(&layer).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 400);

    let log = captured.text();
    let lines: Vec<&str> = log.lines().collect();
    let fallback_line = lines
        .iter()
        .find(|l| l.contains("falling back"))
        .expect("a fallback event");
    assert!(fallback_line.contains(" WARN "), "{fallback_line}");
    assert!(
        fallback_line.contains("model_fallback{method=POST path=/chat/completions}"),
        "{fallback_line}"
    );
    assert!(
        fallback_line.contains("target_name=primary") && fallback_line.contains("503"),
        "{fallback_line}"
    );
    let returned = lines
        .iter()
        .find(|l| l.contains("handed back without falling back"))
        .expect("a return event");
    assert!(
        returned.contains(" INFO ") && returned.contains("target_name=fallback"),
        "{returned}"
    );
    // OpenTelemetry's GenAI names beside them; the second attempt is a resend.
    assert!(
        fallback_line.contains("gen_ai.provider.name=primary")
            && !fallback_line.contains("http.request.resend_count"),
        "{fallback_line}"
    );
    assert!(
        returned.contains("gen_ai.provider.name=fallback")
            && returned.contains("gen_ai.request.model=\"m-b\"")
            && returned.contains("http.request.resend_count=1"),
        "{returned}"
    );
    for secret in [
        "sk-primary-secret",
        "sk-fallback-secret",
        "sk-caller-secret",
        "body-text",
    ] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }
}
