//! The gateway example, in-process: the layer inside an axum proxy handler, the OpenAI error
//! shapes, `x-fallback-*` headers, streaming through it, config errors and graceful shutdown.

#[path = "../examples/gateway/app.rs"]
mod app;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt, Full};
use support::*;
use tower::ServiceExt;

/// Starts the gateway for `config` (keys from `env`) on 127.0.0.1; returns its address and a
/// handle that shuts it down gracefully.
async fn gateway(
    config: &str,
    env: &[(&str, &str)],
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = app::parse_config(config.as_bytes()).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let layer = config
        .fallback
        .layer_with_env(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    let stack = app::stack(&layer, config.fallback.attempt_timeout());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app::serve(listener, app::router(stack, layer.stats()), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (addr, tx, task)
}

fn two_targets(a: &str, b: &str) -> String {
    format!(
        r#"{{"listen": "127.0.0.1:0",
            "targets": [
              {{"name": "primary", "base_url": "{a}/v1", "model": "model-a", "api_key_env": "A_KEY"}},
              {{"name": "fallback", "base_url": "{b}/v1", "model": "model-b", "api_key_env": "B_KEY"}}],
            "attempt_timeout_ms": 5000, "max_body_bytes": 4096}}"#
    )
}

const KEYS: [(&str, &str); 2] = [("A_KEY", "key-a"), ("B_KEY", "key-b")];

async fn post(addr: SocketAddr, body: &str) -> http::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer the-callers-own-key")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    client.request(request).await.unwrap()
}

async fn json_of(response: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn a_503_from_the_primary_is_served_by_the_fallback_with_headers_that_say_so() {
    let primary = Upstream::fixed(503, r#"{"error":{"message":"busy"}}"#).await;
    let fallback = Upstream::chat("hello").await;
    let (addr, _stop, _task) = gateway(&two_targets(&primary.url(), &fallback.url()), &KEYS).await;
    let response = post(addr, CHAT).await;
    assert_eq!(response.status(), 200);
    let h = response.headers().clone();
    assert_eq!(
        (
            &h["x-fallback-target"],
            &h["x-fallback-model"],
            &h["x-fallback-attempts"]
        ),
        (
            &"fallback".parse().unwrap(),
            &"model-b".parse().unwrap(),
            &"2".parse().unwrap()
        )
    );
    assert_eq!(json_of(response).await["model"], "model-b");
    let seen = &fallback.requests()[0];
    assert_eq!(
        seen.uri.path(),
        "/v1/chat/completions",
        "the gateway's /v1 prefix is not doubled"
    );
    assert_eq!(seen.header("authorization"), Some("Bearer key-b"));
    assert_eq!(
        primary.requests()[0].header("authorization"),
        Some("Bearer key-a")
    );
}

#[tokio::test]
async fn an_upstream_error_response_is_passed_through_unchanged() {
    let primary = Upstream::fixed(
        400,
        r#"{"error":{"message":"bad messages","type":"invalid_request_error","code":null}}"#,
    )
    .await;
    let fallback = Upstream::chat("never").await;
    let (addr, _stop, _task) = gateway(&two_targets(&primary.url(), &fallback.url()), &KEYS).await;
    let response = post(addr, CHAT).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-fallback-attempts"], "1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        br#"{"error":{"message":"bad messages","type":"invalid_request_error","code":null}}"#
    );
    assert_eq!(fallback.count(), 0);
}

#[tokio::test]
async fn transport_failures_oversize_and_invalid_json_get_openai_shaped_errors() {
    let a = refused_addr().await;
    let b = refused_addr().await;
    let (addr, _stop, _task) = gateway(
        &two_targets(&format!("http://{a}"), &format!("http://{b}")),
        &KEYS,
    )
    .await;

    let response = post(addr, CHAT).await;
    assert_eq!(response.status(), 502);
    let error = json_of(response).await;
    assert_eq!(
        (
            error["error"]["type"].as_str(),
            error["error"]["code"].as_str()
        ),
        (Some("upstream_error"), Some("all_targets_failed"))
    );
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1. primary (model-a): connect error"),
        "{message}"
    );
    assert!(
        message.contains("2. fallback (model-b): connect error"),
        "{message}"
    );

    let response = post(
        addr,
        &format!(r#"{{"model":"x","pad":"{}"}}"#, "p".repeat(5000)),
    )
    .await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        json_of(response).await["error"]["code"],
        "request_too_large"
    );

    let response = post(addr, r#"{"model": "x", "messages": [}"#).await;
    assert_eq!(response.status(), 400);
    let error = json_of(response).await;
    assert_eq!(error["error"]["code"], "invalid_json");
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn a_streamed_answer_passes_through_the_gateway_chunk_by_chunk() {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let go_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let upstream = Upstream::start(move |_| {
        let go_rx = go_rx.clone();
        async move {
            let (response, tx) = streamed(200);
            tokio::spawn(async move {
                tx.send(Ok(Bytes::from_static(b"data: {\"n\":1}\n\n")))
                    .await
                    .unwrap();
                if let Some(go) = go_rx.lock().await.take() {
                    let _ = go.await;
                }
                tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await
                    .unwrap();
            });
            response
        }
    })
    .await;
    let primary = Upstream::fixed(429, "{}").await;
    let (addr, _stop, _task) = gateway(&two_targets(&primary.url(), &upstream.url()), &KEYS).await;
    let response = post(addr, r#"{"model":"m","stream":true,"messages":[]}"#).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-fallback-target"], "fallback");
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: {\"n\":1}\n\n")
    );
    assert!(!body.is_end_stream());
    go_tx.send(()).unwrap();
    assert_eq!(
        &body.collect().await.unwrap().to_bytes()[..],
        b"data: [DONE]\n\n"
    );
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight() {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let go_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let slow = Upstream::start(move |_| {
        let go_rx = go_rx.clone();
        async move {
            if let Some(go) = go_rx.lock().await.take() {
                let _ = go.await;
            }
            reply(200, r#"{"model":"slow"}"#)
        }
    })
    .await;
    let other = Upstream::chat("unused").await;
    let (addr, stop, task) = gateway(&two_targets(&slow.url(), &other.url()), &KEYS).await;
    let in_flight = tokio::spawn(async move { post(addr, CHAT).await.status() });
    while slow.count() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !task.is_finished(),
        "the server waits for the request in flight"
    );
    go_tx.send(()).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), in_flight)
            .await
            .unwrap()
            .unwrap(),
        200
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server stopped")
        .unwrap();
}

#[test]
fn bad_configs_name_the_field_and_the_problem() {
    let ok_target = r#"{"base_url": "http://127.0.0.1:9/v1", "api_key_env": "A_KEY"}"#;
    for (json, expected) in [
        (
            format!(r#"{{"targets": [{ok_target}], "colour": "blue"}}"#),
            "colour: unknown field `colour`",
        ),
        (
            r#"{"targets": [{"base_url": "not a url"}]}"#.to_owned(),
            "targets[0].base_url: \"not a url\" is a relative URL",
        ),
        (
            r#"{"targets": []}"#.to_owned(),
            "targets: at least one target is required",
        ),
        (
            format!(r#"{{"listen": "nowhere", "targets": [{ok_target}]}}"#),
            "listen: \"nowhere\" is not an address",
        ),
        ("[]".to_owned(), "config: expected a JSON object"),
    ] {
        let err = app::parse_config(json.as_bytes())
            .and_then(|c| c.fallback.layer_with_env(|_| Some("k".into())).map(|_| c));
        let err = err.expect_err(&json).to_string();
        assert!(err.starts_with(expected), "{json}\n  gave: {err}");
    }
    let missing = app::parse_config(format!(r#"{{"targets": [{ok_target}]}}"#).as_bytes()).unwrap();
    let err = missing
        .fallback
        .layer_with_env(|_| None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "targets[0].api_key_env: environment variable A_KEY is not set"
    );
}

#[tokio::test]
async fn the_gateway_serves_as_an_axum_router_service() {
    let up = Upstream::chat("direct").await;
    let config = app::parse_config(
        format!(r#"{{"targets": [{{"base_url": "{}/v1"}}]}}"#, up.url()).as_bytes(),
    )
    .unwrap();
    let router = {
        let layer = config.fallback.layer().unwrap();
        app::router(app::stack(&layer, None), layer.stats())
    };
    let response = router
        .oneshot(
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(CHAT))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let health = {
        let layer = config.fallback.layer().unwrap();
        app::router(app::stack(&layer, None), layer.stats())
    }
    .oneshot(
        Request::get("/healthz")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(health.status(), 200);
}
