//! The layer stacked with tower's timeout, buffer, rate-limit, concurrency-limit, load-shed and
//! retry layers, tower-http's trace layer, boxed and buffered services: each combination proven.
//! In-process inner services on tokio's paused clock, where time is what is being tested.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::*;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_model_fallback::{
    AttemptOutcome, ErrorKind, FallbackLayer, FallbackReport, ReplayBody, Target,
};

fn report<B>(response: &Response<B>) -> FallbackReport {
    response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_timeout_inside_skips_a_slow_target_after_the_timeout() {
    let client = Scripted::new(&[
        ("slow", vec![Act::hang()]),
        (
            "fast",
            vec![Act::status(200).after(Duration::from_millis(300))],
        ),
    ]);
    let svc = ServiceBuilder::new()
        .layer(hosts(&["slow", "fast"]))
        .timeout(Duration::from_secs(5))
        .service(client.clone());
    let started = Instant::now();
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(5300),
        "the timeout plus the fast answer"
    );
    let report = report(&response);
    assert!(matches!(
        report.attempts()[0].outcome(),
        AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
            ..
        }
    ));
    assert_eq!((client.count("slow"), client.count("fast")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_cancels_everything_and_no_further_attempt_starts() {
    let slow_503 = Act::status(503).after(Duration::from_secs(4));
    let client = Scripted::new(&[
        ("a", vec![slow_503.clone()]),
        ("b", vec![slow_503.clone()]),
        ("c", vec![slow_503.clone()]),
        ("d", vec![slow_503.clone()]),
        ("e", vec![slow_503.clone()]),
    ]);
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(10))
        .layer(hosts(&["a", "b", "c", "d", "e"]))
        .service(client.clone());
    let started = Instant::now();
    let err = svc.oneshot(chat_request(CHAT)).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_eq!(
        client.calls.lock().unwrap().len(),
        3,
        "attempts at 0 s, 4 s and 8 s"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        client.calls.lock().unwrap().len(),
        3,
        "nothing starts after the cancellation"
    );
}

/// Wraps a future and counts how often it is polled.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

#[tokio::test(start_paused = true)]
async fn buffer_and_rate_limit_inside_apply_back_pressure_without_a_busy_loop() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    let svc = ServiceBuilder::new()
        .layer(hosts(&["primary", "fallback"]))
        .buffer(16)
        .rate_limit(1, Duration::from_secs(10))
        .service(client.clone());
    let started = Instant::now();
    let polls = Arc::new(AtomicUsize::new(0));
    let response = Counted {
        inner: Box::pin(svc.oneshot(chat_request(CHAT))),
        polls: polls.clone(),
    }
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let calls = client.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1].1 - calls[0].1,
        Duration::from_secs(10),
        "the fallback waited for the rate limit"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    let polls = polls.load(Ordering::SeqCst);
    assert!(
        polls <= 12,
        "woken, not spinning: {polls} polls for 10 s of back-pressure"
    );
}

#[tokio::test]
async fn load_shed_over_a_concurrency_limit_moves_to_the_next_target() {
    type Boxed = BoxCloneService<Request<ReplayBody>, Response<Full<Bytes>>, BoxError>;
    let busy = Scripted::new(&[("primary", vec![Act::hang()])]);
    let primary: Boxed = BoxCloneService::new(
        ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(1)
            .service(busy.clone()),
    );
    let fallback: Boxed = BoxCloneService::new(Scripted::new(&[]));
    let client = tower::steer::Steer::new(
        vec![primary.clone(), fallback],
        |req: &Request<ReplayBody>, _: &[_]| usize::from(req.uri().host() != Some("primary")),
    );
    // Someone else holds the primary's only slot.
    let mut other = primary;
    other.ready().await.unwrap();
    let _in_flight = other.call(Request::new(ReplayBody::empty()));

    let response = hosts(&["primary", "fallback"])
        .layer(client)
        .oneshot(chat_request(CHAT))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report = report(&response);
    assert!(matches!(
        report.attempts()[0].outcome(),
        AttemptOutcome::Error {
            kind: ErrorKind::Overloaded,
            ..
        }
    ));
    assert_eq!(
        busy.count("primary"),
        0,
        "the shed request never reached the primary"
    );
}

/// Retries a 503 up to `left` more times on the same target.
#[derive(Clone)]
struct RetryUnavailable {
    left: usize,
}

impl<B: Clone, Res, E> tower::retry::Policy<Request<B>, Response<Res>, E> for RetryUnavailable {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<B>,
        result: &mut Result<Response<Res>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE && self.left > 0 => {
                self.left -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

#[tokio::test]
async fn retry_inside_retries_each_target_then_falls_back() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(200)]),
    ]);
    let svc = ServiceBuilder::new()
        .layer(hosts(&["primary", "fallback"]))
        .retry(RetryUnavailable { left: 2 })
        .service(client.clone());
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        (client.count("primary"), client.count("fallback")),
        (3, 1),
        "1 + 2 retries, then the fallback"
    );
    assert_eq!(
        report(&response).attempts().len(),
        2,
        "the layer sees one attempt per target"
    );
}

#[tokio::test]
async fn retry_outside_repeats_the_whole_chain() {
    let client = Scripted::new(&[
        ("primary", vec![Act::status(503)]),
        ("fallback", vec![Act::status(503)]),
    ]);
    let svc = ServiceBuilder::new()
        .retry(RetryUnavailable { left: 2 })
        .layer(hosts(&["primary", "fallback"]))
        .service(client.clone());
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        (client.count("primary"), client.count("fallback")),
        (3, 3),
        "3 chains of 2 attempts"
    );
}

#[tokio::test]
async fn trace_layer_boxing_and_a_shared_buffer_around_it() {
    let fallback = Upstream::chat("traced").await;
    let primary = Upstream::fixed(503, "{}").await;
    let layer = FallbackLayer::new([
        Target::new(primary.url()).unwrap(),
        Target::new(fallback.url()).unwrap(),
    ])
    .unwrap();
    let traced = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(layer)
        .service(client());
    let boxed = BoxCloneService::new(ServiceExt::<Request<Full<Bytes>>>::map_err(
        traced,
        |e: tower_model_fallback::FallbackError| BoxError::from(e),
    ));
    let shared = tower::buffer::Buffer::new(boxed, 64);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(shared.clone().oneshot(chat_request(CHAT))));
    }
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(report(&response).served_by().unwrap().target_index(), 1);
    }
    assert_eq!((primary.count(), fallback.count()), (20, 20));
}
