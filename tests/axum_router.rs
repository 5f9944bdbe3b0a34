//! The layer on an axum `Router`, behind `HandleErrorLayer` (axum needs infallible services).

mod support;

use axum::error_handling::HandleErrorLayer;
use axum::response::IntoResponse;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{FallbackError, FallbackLayer, Target};

async fn handle(error: FallbackError) -> axum::response::Response {
    let status = if error.is_body_too_large() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else if error.is_invalid_json() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::BAD_GATEWAY
    };
    (status, error.to_string()).into_response()
}

fn router(layer: FallbackLayer) -> Router {
    let proxy = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(handle))
        .layer(layer)
        .service(client());
    Router::new().nest_service("/v1", proxy)
}

#[tokio::test]
async fn a_router_service_falls_back_and_turns_errors_into_responses() {
    let primary = Upstream::fixed(502, "{}").await;
    let fallback = Upstream::chat("via axum").await;
    let layer = FallbackLayer::new([
        Target::new(primary.url_with("/v1")).unwrap(),
        Target::new(fallback.url_with("/v1"))
            .unwrap()
            .with_model("b"),
    ])
    .unwrap()
    .max_body_bytes(64);
    let app = router(layer);

    let request = |body: &'static str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap()
    };
    let response = app
        .clone()
        .oneshot(request(r#"{"model":"a","messages":[]}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("via axum"));
    assert_eq!(fallback.requests()[0].uri.path(), "/v1/chat/completions");

    let response = app.clone().oneshot(request("{ not json")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let long =
        r#"{"model":"a","messages":[{"role":"user","content":"far more than sixty-four bytes"}]}"#;
    let response = app.oneshot(request(long)).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        (primary.count(), fallback.count()),
        (1, 1),
        "nothing sent for the bad requests"
    );
}
