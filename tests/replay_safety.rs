//! Replay safety: an attempt whose request reached the upstream and whose outcome is unknown is
//! marked in the report (the provider may have billed it), and a request whose body is not
//! rewritten per target (a file upload, a batch) goes to one target only, unless its method is
//! idempotent or the user opts in.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::*;
use tower::ServiceExt;
use tower_model_fallback::{FallbackLayer, StopReason};

fn request(method: Method, content_type: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/files")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A primary answering 503 and a fallback answering 200, through `configure(layer)`.
async fn served_by(
    request: Request<Full<Bytes>>,
    configure: impl Fn(FallbackLayer) -> FallbackLayer,
) -> (u16, Option<StopReason>, usize, usize) {
    let primary = Upstream::fixed(503, r#"{"error":{"message":"busy"}}"#).await;
    let fallback = Upstream::fixed(200, r#"{"id":"file-1"}"#).await;
    let layer = configure(primary_and_fallback(primary.url(), fallback.url()));
    let response = stack(&layer).oneshot(request).await.unwrap();
    let report = report_of(&response);
    (
        response.status().as_u16(),
        report.stop_reason(),
        primary.count(),
        fallback.count(),
    )
}

#[tokio::test]
async fn a_body_not_rewritten_per_target_goes_to_one_target_only() {
    let upload = || request(Method::POST, "application/octet-stream", "file bytes");
    assert_eq!(
        served_by(upload(), |l| l).await,
        (503, Some(StopReason::NotReplayable), 1, 0),
        "the 503 is handed back; the upload is not sent elsewhere"
    );
    let empty_post = request(Method::POST, "application/json", "");
    assert_eq!(
        served_by(empty_post, |l| l).await,
        (503, Some(StopReason::NotReplayable), 1, 0),
        "an empty POST (a cancel, say) has no model to rewrite either"
    );
    assert_eq!(
        served_by(upload(), |l| l.replay_unrewritable_bodies(true)).await,
        (200, None, 1, 1),
        "opted in"
    );
}

#[tokio::test]
async fn idempotent_methods_and_rewritten_bodies_move_on_as_before() {
    for (what, request) in [
        ("GET", request(Method::GET, "application/json", "")),
        ("HEAD", request(Method::HEAD, "application/json", "")),
        (
            "a JSON object without model",
            request(Method::POST, "application/json", r#"{"input":"x"}"#),
        ),
        (
            "a JSON object with model",
            request(Method::POST, "application/json", r#"{"model":"m"}"#),
        ),
    ] {
        assert_eq!(served_by(request, |l| l).await, (200, None, 1, 1), "{what}");
    }
}

#[tokio::test]
async fn attempts_that_reached_the_upstream_with_no_known_outcome_are_marked() {
    // Reads the request, then never answers: the attempt timeout passes after it was sent.
    let silent = RawUpstream::start(b"", Then::Stall).await;
    // Sends a stream's head, then drops: the request was processed up to some point.
    let dropping = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let refused = refused_addr().await;
    let good = Upstream::chat("ok").await;
    let layer = FallbackLayer::new(
        [
            format!("http://{refused}"),
            silent.url(),
            dropping.url(),
            good.url(),
        ]
        .map(|url| tower_model_fallback::Target::new(url).unwrap()),
    )
    .unwrap()
    .attempt_timeout(Duration::from_millis(300));
    let response = stack(&layer)
        .oneshot(chat_request(r#"{"model":"m","stream":true}"#))
        .await
        .unwrap();
    let report = report_of(&response);
    let unknown: Vec<bool> = report
        .attempts()
        .iter()
        .map(|a| a.outcome_unknown())
        .collect();
    assert_eq!(
        unknown,
        [false, true, true, false],
        "refused: never sent; timed out and dropped after sending: unknown; served: known\n{report}"
    );
    assert_eq!(silent.count(), 1);
}
