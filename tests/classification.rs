//! Every row of the default classification table, against real upstreams on 127.0.0.1: which
//! targets were called, how often, and what the caller got.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::*;
use tower::{Service, ServiceExt};
use tower_model_fallback::{
    classify_fn, Decision, DefaultClassifier, ErrorKind, FallbackLayer, FallbackReport, Outcome,
    ReplayBody, Target,
};

fn two_targets(primary: &Upstream, fallback: &Upstream) -> FallbackLayer {
    FallbackLayer::new([
        Target::new(primary.url_with("/v1"))
            .unwrap()
            .with_name("primary")
            .with_model("model-a"),
        Target::new(fallback.url_with("/v1"))
            .unwrap()
            .with_name("fallback")
            .with_model("model-b"),
    ])
    .unwrap()
}

/// Sends one chat request through primary → fallback; returns the caller's status and report.
async fn run(primary: &Upstream, fallback: &Upstream) -> (StatusCode, FallbackReport, String) {
    let svc = stack(&two_targets(primary, fallback));
    let response = svc.oneshot(chat_request(CHAT)).await.expect("a response");
    let status = response.status();
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .expect("a report");
    (status, report, body_string(response.into_body()).await)
}

async fn primary_answering(status: u16) -> (StatusCode, usize, usize, FallbackReport) {
    let primary = Upstream::fixed(status, r#"{"error":{"message":"primary says no"}}"#).await;
    let fallback = Upstream::chat("from the fallback").await;
    let (got, report, _) = run(&primary, &fallback).await;
    (got, primary.count(), fallback.count(), report)
}

#[tokio::test]
async fn success_and_redirect_statuses_are_returned_from_the_primary() {
    for status in [200, 201, 204, 301, 302, 304] {
        let (got, p, f, report) = primary_answering(status).await;
        assert_eq!((got.as_u16(), p, f), (status, 1, 0), "{status}");
        assert_eq!(report.served_by().unwrap().target(), "primary");
        assert!(!report.fell_back());
    }
}

#[tokio::test]
async fn caller_errors_are_returned_at_once_and_the_fallback_is_never_called() {
    for status in [400, 401, 403, 404, 405, 410, 413, 415, 422] {
        let (got, p, f, report) = primary_answering(status).await;
        assert_eq!((got.as_u16(), p, f), (status, 1, 0), "{status}");
        assert_eq!(report.attempts().len(), 1);
        assert_eq!(report.attempts()[0].decision(), Decision::Return);
    }
}

#[tokio::test]
async fn a_400_keeps_its_body_and_the_fallback_is_never_called() {
    let primary = Upstream::fixed(
        400,
        r#"{"error":{"message":"messages is required","type":"invalid_request_error"}}"#,
    )
    .await;
    let fallback = Upstream::chat("never").await;
    let (status, report, body) = run(&primary, &fallback).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        r#"{"error":{"message":"messages is required","type":"invalid_request_error"}}"#
    );
    assert_eq!(fallback.count(), 0);
    assert_eq!(report.attempts().len(), 1);
}

#[tokio::test]
async fn retryable_statuses_move_to_the_next_target() {
    for status in [
        408, 409, 429, 500, 501, 502, 503, 504, 520, 521, 522, 523, 524, 529, 599,
    ] {
        let (got, p, f, report) = primary_answering(status).await;
        assert_eq!((got.as_u16(), p, f), (200, 1, 1), "{status}");
        let attempts = report.attempts();
        assert_eq!(attempts[0].status().unwrap().as_u16(), status);
        assert_eq!(attempts[0].decision(), Decision::NextTarget);
        assert_eq!(report.served_by().unwrap().target(), "fallback");
        assert_eq!(report.served_by().unwrap().model(), Some("model-b"));
    }
}

#[tokio::test]
async fn a_404_model_not_found_moves_on_and_its_body_is_read_only_to_decide() {
    let primary = Upstream::fixed(
        404,
        r#"{"error":{"message":"The model `model-a` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
    )
    .await;
    let fallback = Upstream::chat("found it").await;
    let (status, report, body) = run(&primary, &fallback).await;
    assert_eq!(
        (status.as_u16(), primary.count(), fallback.count()),
        (200, 1, 1)
    );
    assert!(body.contains("found it"));
    assert_eq!(report.attempts()[0].status(), Some(StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn a_plain_404_is_returned_with_its_body_intact() {
    let primary = Upstream::fixed(
        404,
        r#"{"error":{"message":"no such route","code":"not_found"}}"#,
    )
    .await;
    let fallback = Upstream::chat("never").await;
    let (status, _, body) = run(&primary, &fallback).await;
    assert_eq!((status.as_u16(), fallback.count()), (404, 0));
    assert_eq!(
        body,
        r#"{"error":{"message":"no such route","code":"not_found"}}"#
    );
}

#[tokio::test]
async fn a_404_body_larger_than_the_read_bound_is_still_returned_whole() {
    let big: &'static str = Box::leak(
        format!(r#"{{"error":{{"message":"{}"}}}}"#, "x".repeat(100_000)).into_boxed_str(),
    );
    let primary = Upstream::fixed(404, big).await;
    let fallback = Upstream::chat("never").await;
    let (status, _, body) = run(&primary, &fallback).await;
    assert_eq!((status.as_u16(), fallback.count()), (404, 0));
    assert_eq!(body, big);
}

#[tokio::test]
async fn x_should_retry_overrides_the_status() {
    let primary = Upstream::start(|_| async {
        let mut r = reply(503, r#"{"error":{"message":"busy"}}"#);
        r.headers_mut()
            .insert("x-should-retry", "false".parse().unwrap());
        r
    })
    .await;
    let fallback = Upstream::chat("never").await;
    let (status, _, _) = run(&primary, &fallback).await;
    assert_eq!((status.as_u16(), fallback.count()), (503, 0));

    let primary = Upstream::start(|_| async {
        let mut r = reply(400, r#"{"error":{"message":"odd"}}"#);
        r.headers_mut()
            .insert("x-should-retry", "true".parse().unwrap());
        r
    })
    .await;
    let fallback = Upstream::chat("yes").await;
    let (status, _, _) = run(&primary, &fallback).await;
    assert_eq!((status.as_u16(), fallback.count()), (200, 1));
}

#[tokio::test]
async fn connection_refused_moves_to_the_next_target() {
    let dead = refused_addr().await;
    let fallback = Upstream::chat("up").await;
    let layer = FallbackLayer::new([
        Target::new(format!("http://{dead}/v1"))
            .unwrap()
            .with_name("dead"),
        Target::new(fallback.url_with("/v1"))
            .unwrap()
            .with_name("fallback"),
    ])
    .unwrap();
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!((response.status().as_u16(), fallback.count()), (200, 1));
    let report = response.extensions().get::<FallbackReport>().unwrap();
    match report.attempts()[0].outcome() {
        tower_model_fallback::AttemptOutcome::Error { kind, .. } => {
            assert_eq!(*kind, ErrorKind::Connect)
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_closed_before_the_response_moves_to_the_next_target() {
    let (addr, hits, _task) = hang_up_server().await;
    let fallback = Upstream::chat("up").await;
    let layer = FallbackLayer::new([
        Target::new(format!("http://{addr}/v1"))
            .unwrap()
            .with_name("flaky"),
        Target::new(fallback.url_with("/v1"))
            .unwrap()
            .with_name("fallback"),
    ])
    .unwrap();
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        (
            hits.load(std::sync::atomic::Ordering::SeqCst),
            fallback.count()
        ),
        (1, 1)
    );
    let report = response.extensions().get::<FallbackReport>().unwrap();
    match report.attempts()[0].outcome() {
        tower_model_fallback::AttemptOutcome::Error { kind, .. } => {
            assert_eq!(*kind, ErrorKind::Closed)
        }
        other => panic!("expected a closed connection, got {other:?}"),
    }
}

/// An in-process inner service: the primary host misbehaves as told, any other answers 200.
fn routed<F>(
    primary_fails: F,
) -> impl Service<
    Request<ReplayBody>,
    Response = Response<Full<Bytes>>,
    Error = tower::BoxError,
    Future = impl Send,
> + Clone
where
    F: Fn() -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Response<Full<Bytes>>, tower::BoxError>>
                    + Send,
            >,
        > + Clone
        + Send
        + 'static,
{
    tower::service_fn(move |req: Request<ReplayBody>| {
        let fail = primary_fails.clone();
        async move {
            if req.uri().host() == Some("primary.test") {
                fail().await
            } else {
                Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        }
    })
}

fn in_process_layer() -> FallbackLayer {
    FallbackLayer::new([
        Target::new("http://primary.test/v1").unwrap(),
        Target::new("http://fallback.test/v1").unwrap(),
    ])
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_per_attempt_timeout_moves_to_the_next_target() {
    let inner = tower::ServiceBuilder::new()
        .timeout(Duration::from_secs(10))
        .service(routed(|| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Response::new(Full::new(Bytes::new())))
            })
        }));
    let svc = tower::Layer::layer(&in_process_layer(), inner);
    let started = tokio::time::Instant::now();
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    let report = response.extensions().get::<FallbackReport>().unwrap();
    assert_eq!(report.attempts().len(), 2);
    assert!(matches!(
        report.attempts()[0].outcome(),
        tower_model_fallback::AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
            ..
        }
    ));
}

#[tokio::test]
async fn an_overloaded_inner_service_moves_to_the_next_target() {
    let inner =
        routed(|| Box::pin(async { Err(tower::load_shed::error::Overloaded::new().into()) }));
    let svc = tower::Layer::layer(&in_process_layer(), inner);
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    let report = response.extensions().get::<FallbackReport>().unwrap();
    assert!(matches!(
        report.attempts()[0].outcome(),
        tower_model_fallback::AttemptOutcome::Error {
            kind: ErrorKind::Overloaded,
            ..
        }
    ));
    assert_eq!(report.served_by().unwrap().target_index(), 1);
}

#[tokio::test]
async fn status_sets_replace_the_table() {
    let primary = Upstream::fixed(403, r#"{"error":{"message":"region blocked"}}"#).await;
    let fallback = Upstream::chat("ok").await;
    let layer = two_targets(&primary, &fallback)
        .classifier(DefaultClassifier::new().next_target_on([StatusCode::FORBIDDEN]));
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!((response.status().as_u16(), fallback.count()), (200, 1));

    let primary = Upstream::fixed(503, "{}").await;
    let fallback = Upstream::chat("never").await;
    let layer = two_targets(&primary, &fallback)
        .classifier(DefaultClassifier::new().return_on([StatusCode::SERVICE_UNAVAILABLE]));
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!((response.status().as_u16(), fallback.count()), (503, 0));
}

#[tokio::test]
async fn a_closure_policy_sees_the_error_body_it_asked_for() {
    let primary = Upstream::fixed(
        400,
        r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#,
    )
    .await;
    let fallback = Upstream::chat("bigger window").await;
    let policy = classify_fn(|outcome: &Outcome<'_>| match outcome {
        Outcome::Response {
            body: Some(body), ..
        } if tower_model_fallback::error_code(body).as_deref()
            == Some("context_length_exceeded") =>
        {
            Some(Decision::NextTarget)
        }
        _ => None,
    })
    .wants_body_for([StatusCode::BAD_REQUEST]);
    let layer = two_targets(&primary, &fallback).classifier(policy);
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!((response.status().as_u16(), fallback.count()), (200, 1));
}

#[derive(Debug)]
struct SigningFailed;
impl std::fmt::Display for SigningFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("could not sign the request")
    }
}
impl std::error::Error for SigningFailed {}

#[tokio::test]
async fn an_unrecognised_inner_error_is_returned_without_trying_the_next_target() {
    let inner = routed(|| Box::pin(async { Err(SigningFailed.into()) }));
    let svc = tower::Layer::layer(&in_process_layer(), inner);
    let err = svc.oneshot(chat_request(CHAT)).await.unwrap_err();
    assert_eq!(err.report().attempts().len(), 1);
    assert!(!err.report().is_exhausted());
    assert!(
        err.to_string().contains("could not sign the request"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_error_body_that_stalls_is_classified_on_what_arrived_within_ten_seconds() {
    let inner = tower::service_fn(|req: Request<ReplayBody>| async move {
        let body = if req.uri().host() == Some("primary.test") {
            http_body_util::Either::Left(Stalled(Some(Bytes::from_static(b"{\"error\":"))))
        } else {
            http_body_util::Either::Right(Full::new(Bytes::from_static(b"ok")))
        };
        let status = if req.uri().host() == Some("primary.test") {
            404
        } else {
            200
        };
        Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(body).unwrap())
    });
    let svc = tower::Layer::layer(&in_process_layer(), inner);
    let started = tokio::time::Instant::now();
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_eq!(
        response.status(),
        404,
        "a partial body is no proof of model_not_found"
    );
    let mut body = response.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"{\"error\":"),
        "what was read is handed on"
    );
}
