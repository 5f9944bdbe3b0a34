//! Contract 6: readiness before every attempt, clone-and-swap, cancellation on drop.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::sync::Notify;
use tokio_test::{assert_pending, assert_ready};
use tower::{Layer, Service, ServiceExt};
use tower_model_fallback::{FallbackLayer, FallbackReport, ReplayBody, Target};

fn two_in_process_targets() -> FallbackLayer {
    FallbackLayer::new([
        Target::new("http://primary.test/v1")
            .unwrap()
            .with_model("a"),
        Target::new("http://fallback.test/v1")
            .unwrap()
            .with_model("b"),
    ])
    .unwrap()
}

#[tokio::test]
async fn every_attempt_after_the_first_waits_for_inner_readiness_again() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<ReplayBody>, Response<Full<Bytes>>>();
    let mut svc = two_in_process_targets().layer(mock);
    handle.allow(1);
    assert!(ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .is_ok());
    let mut fut = tokio_test::task::spawn(svc.call(chat_request(CHAT)));
    assert_pending!(fut.poll());

    let (first, send) = handle.next_request().await.unwrap();
    assert_eq!(first.uri().host(), Some("primary.test"));
    send.send_response(
        Response::builder()
            .status(503)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );

    // The fallback is not called while the inner service is not ready.
    assert_pending!(fut.poll());
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    assert!(fut.is_woken(), "readiness wakes the attempt loop");
    assert_pending!(fut.poll());
    let (second, send) = handle.next_request().await.unwrap();
    assert_eq!(second.uri().host(), Some("fallback.test"));
    let body = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        br#"{"model":"b","messages":[{"role":"user","content":"Hi"}]}"#
    );
    send.send_response(Response::new(Full::new(Bytes::from_static(b"ok"))));
    let response = assert_ready!(fut.poll()).unwrap();
    assert_eq!(response.status(), 200);
}

/// A service that refuses a call on an instance that was not polled ready (clones start unready).
struct Strict {
    ready: bool,
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Strict {
            ready: false,
            polls: self.polls.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl Service<Request<ReplayBody>> for Strict {
    type Response = Response<Full<Bytes>>;
    type Error = tower::BoxError;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        if !std::mem::replace(&mut self.ready, false) {
            return std::future::ready(Err("called without poll_ready".into()));
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let status = if req.uri().host() == Some("primary.test") {
            503
        } else {
            200
        };
        let _ = n;
        std::future::ready(Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap()))
    }
}

#[tokio::test]
async fn the_service_polled_ready_is_the_one_called_and_it_is_polled_again_before_the_fallback() {
    let polls = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = Strict {
        ready: false,
        polls: polls.clone(),
        calls: calls.clone(),
    };
    let svc = two_in_process_targets().layer(inner);
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(polls.load(Ordering::SeqCst), 2, "one readiness per attempt");
    let report = response.extensions().get::<FallbackReport>().unwrap();
    assert_eq!(report.attempts().len(), 2);
}

#[tokio::test]
async fn dropping_the_response_future_closes_the_upstream_connection() {
    let received = Arc::new(Notify::new());
    let r = received.clone();
    let up = Upstream::start(move |_| {
        let r = r.clone();
        async move {
            r.notify_one();
            std::future::pending::<()>().await;
            reply(200, "{}")
        }
    })
    .await;
    let layer = FallbackLayer::new([Target::new(up.url()).unwrap()]).unwrap();
    let task = tokio::spawn(stack(&layer).oneshot(chat_request(CHAT)));
    tokio::time::timeout(Duration::from_secs(5), received.notified())
        .await
        .expect("the upstream got the request");
    assert_eq!(up.closed.load(Ordering::SeqCst), 0);
    task.abort();
    assert!(
        up.wait_closed(1).await,
        "the upstream saw the connection close"
    );
    assert_eq!(up.count(), 1);
}

/// Answers 503 to its first call, then fails to get ready (a dead buffer worker, say).
#[derive(Clone)]
struct DiesAfterOne {
    calls: Arc<AtomicUsize>,
}

impl Service<Request<ReplayBody>> for DiesAfterOne {
    type Response = Response<Full<Bytes>>;
    type Error = tower::BoxError;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.calls.load(Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err("worker gone".into()))
        }
    }

    fn call(&mut self, _: Request<ReplayBody>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(b"primary busy")))
            .unwrap()))
    }
}

#[tokio::test]
async fn when_the_inner_service_dies_before_the_fallback_the_last_response_is_handed_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = two_in_process_targets().layer(DiesAfterOne {
        calls: calls.clone(),
    });
    let response = svc.oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 503);
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap();
    assert_eq!(
        report.attempts().len(),
        1,
        "no attempt is recorded that was never sent"
    );
    assert_eq!(report.served_by().unwrap().target_index(), 0);
    assert_eq!(
        &response.into_body().collect().await.unwrap().to_bytes()[..],
        b"primary busy"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
