//! Every fault of a misbehaving upstream, at every position (primary, fallback, all targets),
//! against a fault server on 127.0.0.1: the exact outcome and attempt count for each case.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use support::faults::{Fault, FAULTS};
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{AttemptOutcome, ErrorKind, FallbackLayer, FallbackReport, Target};

/// The layer over `primary` and `fallback`, with a 300 ms per-attempt timeout inside and a
/// 300 ms first-byte timeout.
fn stack(
    primary: SocketAddr,
    fallback: SocketAddr,
) -> impl tower::Service<
    http::Request<http_body_util::Full<bytes::Bytes>>,
    Response = http::Response<tower_model_fallback::ResponseBody<hyper::body::Incoming>>,
    Error = tower_model_fallback::FallbackError,
> {
    let layer = FallbackLayer::new([
        Target::new(format!("http://{primary}/v1"))
            .unwrap()
            .with_name("primary"),
        Target::new(format!("http://{fallback}/v1"))
            .unwrap()
            .with_name("fallback"),
    ])
    .unwrap()
    .first_byte_timeout(Duration::from_millis(300));
    ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_millis(300))
        .service(client())
}

fn attempt_matches(report: &FallbackReport, i: usize, fault: Fault) {
    let attempt = &report.attempts()[i];
    match (fault.kind(), fault.status(), attempt.outcome()) {
        (Some(kind), _, AttemptOutcome::Error { kind: k, .. }) => assert_eq!(*k, kind, "{fault:?}"),
        (None, Some(200), AttemptOutcome::BodyFailed { kind, .. }) => {
            assert_eq!(*kind, ErrorKind::Timeout, "{fault:?}")
        }
        (None, Some(s), AttemptOutcome::Status(got)) => assert_eq!(got.as_u16(), s, "{fault:?}"),
        (_, _, other) => panic!("{fault:?}: unexpected outcome {other:?}"),
    }
}

#[tokio::test]
async fn a_fault_at_the_primary_is_served_by_the_fallback_until_the_answer_has_started() {
    for fault in FAULTS {
        let (bad, _server) = fault.start().await;
        let good = Upstream::chat("from the fallback").await;
        let outcome = stack(bad, good.addr).oneshot(chat_request(CHAT)).await;
        let response = outcome.unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        let report = response
            .extensions()
            .get::<FallbackReport>()
            .cloned()
            .unwrap();
        if fault.after_commit() {
            // The answer started: the first bytes reach the caller, then an error, never a
            // clean end; no fallback.
            assert_eq!((report.attempts().len(), good.count()), (1, 0), "{fault:?}");
            let mut body = response.into_body();
            let first = body.frame().await.expect("a first chunk");
            assert!(first.is_ok(), "{fault:?}");
            let mut failed = false;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed, "{fault:?}: the body ended cleanly");
            assert!(report.stream_error().is_some(), "{fault:?}");
        } else {
            assert_eq!(response.status(), 200, "{fault:?}");
            assert_eq!((report.attempts().len(), good.count()), (2, 1), "{fault:?}");
            assert_eq!(report.served_by().unwrap().target(), "fallback");
            attempt_matches(&report, 0, fault);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                String::from_utf8_lossy(&body).contains("from the fallback"),
                "{fault:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_fault_at_the_fallback_is_never_reached_when_the_primary_answers() {
    for fault in FAULTS {
        let good = Upstream::chat("from the primary").await;
        let (bad, server) = fault.start().await;
        let response = stack(good.addr, bad)
            .oneshot(chat_request(CHAT))
            .await
            .unwrap();
        let report = response
            .extensions()
            .get::<FallbackReport>()
            .cloned()
            .unwrap();
        assert_eq!(
            (response.status().as_u16(), report.attempts().len()),
            (200, 1),
            "{fault:?}"
        );
        assert_eq!(server.map_or(0, |s| s.count()), 0, "{fault:?}");
    }
}

#[tokio::test]
async fn when_every_target_has_the_fault_the_last_failure_comes_back_with_both_attempts() {
    for fault in FAULTS {
        let (a, _sa) = fault.start().await;
        let (b, _sb) = fault.start().await;
        let outcome = stack(a, b).oneshot(chat_request(CHAT)).await;
        match (fault.after_commit(), fault.status(), outcome) {
            (true, _, Ok(response)) => {
                // The primary's answer started: committed, no second attempt.
                let report = response
                    .extensions()
                    .get::<FallbackReport>()
                    .cloned()
                    .unwrap();
                assert_eq!(report.attempts().len(), 1, "{fault:?}");
            }
            (false, Some(status), Ok(response)) => {
                let report = response
                    .extensions()
                    .get::<FallbackReport>()
                    .cloned()
                    .unwrap();
                assert_eq!(response.status().as_u16(), status, "{fault:?}");
                assert!(report.is_exhausted(), "{fault:?}");
                assert_eq!(report.attempts().len(), 2, "{fault:?}");
                attempt_matches(&report, 0, fault);
                attempt_matches(&report, 1, fault);
            }
            // No response at all, or a head whose body never started: an error.
            (false, status, Err(error)) if status.is_none() || fault == Fault::HeadThenStall => {
                assert!(
                    error.is_upstream() && error.report().is_exhausted(),
                    "{fault:?}: {error}"
                );
                assert_eq!(error.report().attempts().len(), 2, "{fault:?}");
                attempt_matches(error.report(), 0, fault);
                attempt_matches(error.report(), 1, fault);
                assert_eq!(
                    error.to_string().lines().count(),
                    3,
                    "{fault:?}: one line per attempt"
                );
            }
            (_, _, other) => panic!("{fault:?}: unexpected {:?}", other.map(|r| r.status())),
        }
    }
}
