//! Stats, the priced catalog and usage cost, multipart bodies and `{model}` in base URLs against
//! real servers on 127.0.0.1. (Tracing output has a test binary of its own: `tracing_output.rs`.)

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tower::{Layer, ServiceExt};
use tower_model_fallback::{
    Cooldowns, FallbackLayer, FallbackReport, ModelCatalog, PriceGuard, Target,
};

#[tokio::test(start_paused = true)]
async fn stats_count_every_outcome_per_target_and_the_fallback_rate() {
    let client = Scripted::new(&[
        (
            "primary",
            vec![
                Act::status(503),
                Act::status(200),
                Act::status(400),
                Act::status(503),
            ],
        ),
        ("fallback", vec![Act::status(200)]),
    ]);
    let layer = hosts(&["primary", "fallback"]).cooldowns(Cooldowns::new().failures(2));
    let stats = layer.stats();
    for _ in 0..6 {
        let _ = layer
            .layer(client.clone())
            .oneshot(chat_request(CHAT))
            .await
            .unwrap();
    }
    // primary: 503 (falls back), 200 (resets the count), 400 (handed back), 503 (falls back),
    // 503 (falls back; second failure in a row opens the breaker), then skipped.
    let s = stats.snapshot();
    let (p, f) = (&s.targets[0], &s.targets[1]);
    assert_eq!((s.requests, s.fell_back), (6, 4));
    assert!((s.fallback_rate - 4.0 / 6.0).abs() < 1e-9);
    assert_eq!(
        (
            p.attempts,
            p.successes,
            p.retryable_failures,
            p.non_retryable_returns
        ),
        (5, 1, 3, 1)
    );
    assert_eq!((p.fallbacks_triggered, p.cooldown_skips), (3, 1));
    assert_eq!((f.attempts, f.successes), (4, 4));
    assert_eq!(p.latency_histogram.count(), 5);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["targets"][0]["name"], "primary");
    assert!(s.to_string().contains("fallback_rate=0.667"), "{s}");
}

#[tokio::test]
async fn a_non_streamed_answer_reports_its_usage_and_estimated_cost() {
    let up = Upstream::start(|_| async {
        reply(200, r#"{"id":"x","model":"gpt-4o-mini","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1000,"completion_tokens":2000,"total_tokens":3000}}"#)
    })
    .await;
    let catalog = ModelCatalog::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models.json"
    ))
    .unwrap();
    let layer = FallbackLayer::new([Target::new(up.url()).unwrap().with_model("gpt-4o-mini")])
        .unwrap()
        .catalog(catalog, PriceGuard::warn_above(5.0))
        .unwrap();
    let stats = layer.stats();
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap();
    assert!(
        report.usage().is_none(),
        "known only once the body has been read"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.ends_with(b"\"total_tokens\":3000}}"),
        "the body is untouched"
    );
    let usage = report.usage().expect("usage read at the end of the body");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (1000, 2000));
    // 1000 x 0.12 / 1e6 + 2000 x 0.48 / 1e6
    assert!((usage.cost_usd.unwrap() - 0.00108).abs() < 1e-12);
    let s = stats.snapshot();
    assert_eq!(
        (s.targets[0].prompt_tokens, s.targets[0].completion_tokens),
        (1000, 2000)
    );
    assert!((s.targets[0].estimated_cost_usd - 0.00108).abs() < 1e-9);
}

#[test]
fn a_fallback_priced_above_the_factor_is_refused_or_warned_about() {
    let catalog = ModelCatalog::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models.json"
    ))
    .unwrap();
    let targets = || {
        [
            Target::new("https://a.example/v1")
                .unwrap()
                .with_model("gpt-4o-mini"),
            Target::new("https://b.example/v1")
                .unwrap()
                .with_model("deepseek-v4-pro"),
            Target::new("https://c.example/v1")
                .unwrap()
                .with_model("gpt-4o"),
        ]
    };
    let err = FallbackLayer::new(targets())
        .unwrap()
        .catalog(catalog.clone(), PriceGuard::refuse_above(3.0))
        .unwrap_err();
    assert_eq!(err.field(), "targets[2].model");
    assert!(
        err.problem()
            .starts_with("gpt-4o costs 16.7x the primary (gpt-4o-mini)"),
        "{err}"
    );
    assert!(FallbackLayer::new(targets())
        .unwrap()
        .catalog(catalog.clone(), PriceGuard::refuse_above(20.0))
        .is_ok());
    assert!(FallbackLayer::new(targets())
        .unwrap()
        .catalog(catalog, PriceGuard::warn_above(3.0))
        .is_ok());
}

#[test]
fn the_catalog_lists_candidates_for_a_feature_cheapest_first() {
    let catalog = ModelCatalog::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models.json"
    ))
    .unwrap();
    let ids: Vec<&str> = catalog
        .candidates("text-to-text")
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "gpt-4o-mini",
            "deepseek-v4-pro",
            "claude-3-5-haiku",
            "gpt-4o",
            "mystery-preview"
        ]
    );
    assert_eq!(catalog.price("dall-e-3").unwrap().per_request, Some(0.032));
    assert!(ModelCatalog::from_json(b"{\"data\": 7}").is_err());
}

#[tokio::test]
async fn a_multipart_body_gets_its_model_part_substituted_on_the_wire() {
    let primary = Upstream::fixed(503, "{}").await;
    let fallback = Upstream::fixed(200, r#"{"text":"hello"}"#).await;
    let layer = FallbackLayer::new([
        Target::new(primary.url_with("/v1"))
            .unwrap()
            .with_model("whisper-1"),
        Target::new(fallback.url_with("/v1"))
            .unwrap()
            .with_model("gpt-4o-transcribe"),
    ])
    .unwrap();
    let body = "--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....model\r\n--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b0undary--\r\n";
    let request = Request::post("/audio/transcriptions")
        .header("content-type", "multipart/form-data; boundary=b0undary")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = stack(&layer).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = response.extensions().get::<FallbackReport>().unwrap();
    assert_eq!(report.requested_model(), Some("whisper-1"));
    assert!(report.served_by().unwrap().model_substituted());
    let seen = &fallback.requests()[0];
    assert_eq!(seen.uri.path(), "/v1/audio/transcriptions");
    assert_eq!(
        std::str::from_utf8(&seen.body).unwrap(),
        body.replace("\r\n\r\nwhisper-1\r\n", "\r\n\r\ngpt-4o-transcribe\r\n")
    );
    assert_eq!(
        seen.header("content-length").unwrap(),
        seen.body.len().to_string()
    );
}

#[tokio::test]
async fn a_model_in_the_base_url_is_filled_in_per_target() {
    let azure = Upstream::fixed(200, "{}").await;
    let layer = FallbackLayer::new([
        Target::new(format!("{}/openai/deployments/{{model}}", azure.url()))
            .unwrap()
            .with_model("gpt-4o mini"),
        Target::new(format!("{}/openai/deployments/{{model}}", azure.url())).unwrap(),
    ])
    .unwrap();
    let request = Request::post("/chat/completions?api-version=2024-10-21")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"x","messages":[]}"#,
        )))
        .unwrap();
    stack(&layer).oneshot(request).await.unwrap();
    assert_eq!(
        azure.requests()[0].uri,
        "/openai/deployments/gpt-4o%20mini/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(azure.requests()[0].json()["model"], "gpt-4o mini");
}
