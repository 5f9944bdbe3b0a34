//! Contract 5 against real streaming upstreams on 127.0.0.1: answers stream chunk by chunk; until
//! the first chunk the next target can still be tried; after it, a failure is a body error.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use support::*;
use tower::ServiceExt;
use tower_model_fallback::{
    AttemptOutcome, Decision, ErrorKind, FallbackLayer, ReplayBody, Target,
};

const STREAM_REQUEST: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

fn layer(primary: String, fallback: String) -> FallbackLayer {
    primary_and_fallback(primary, fallback)
}

/// A fallback that streams two SSE events and `[DONE]`.
async fn streaming_fallback() -> Upstream {
    Upstream::start(|_| async {
        let (response, tx) = streamed(200);
        tokio::spawn(async move {
            for event in [
                "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
                "data: [DONE]\n\n",
            ] {
                if tx
                    .send(Ok(Bytes::from_static(event.as_bytes())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        response
    })
    .await
}

#[tokio::test]
async fn an_sse_answer_reaches_the_caller_before_the_upstream_sends_the_next_event() {
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let up = Upstream::start(move |seen| {
        let go_rx = go_rx.clone();
        async move {
            assert_eq!(seen.json()["stream"], true);
            let (response, tx) = streamed(200);
            tokio::spawn(async move {
                tx.send(Ok(Bytes::from_static(b"data: {\"n\":1}\n\n")))
                    .await
                    .unwrap();
                if let Some(go) = go_rx.lock().await.take() {
                    let _ = go.await;
                }
                tx.send(Ok(Bytes::from_static(b"data: {\"n\":2}\n\n")))
                    .await
                    .unwrap();
                tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await
                    .unwrap();
            });
            response
        }
    })
    .await;
    let layer = FallbackLayer::new([Target::new(up.url()).unwrap()]).unwrap();
    let response = stack(&layer)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The upstream is holding its second event until we say so: what we hold now is the first.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event in time");
    assert_eq!(
        first.unwrap().unwrap().into_data().unwrap(),
        Bytes::from_static(b"data: {\"n\":1}\n\n")
    );
    assert!(!body.is_end_stream());
    go_tx.send(()).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"data: {\"n\":2}\n\ndata: [DONE]\n\n");
}

#[tokio::test]
async fn a_connection_dropped_after_the_head_but_before_the_first_chunk_moves_to_the_next_target() {
    let primary = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let fallback = streaming_fallback().await;
    let response = stack(&layer(primary.url(), fallback.url()))
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let (report, body) = report_and_body(response).await;
    assert_eq!(body.unwrap(), "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n");
    assert_eq!((primary.count(), fallback.count()), (1, 1));
    match report.attempts()[0].outcome() {
        AttemptOutcome::BodyFailed { status, kind, .. } => {
            assert_eq!((status.as_u16(), *kind), (200, ErrorKind::Closed));
        }
        other => panic!("expected a body failure, got {other:?}"),
    }
    assert_eq!(report.served_by().unwrap().target(), "fallback");
    assert_eq!(fallback.requests()[0].json()["model"], "b");
}

#[tokio::test]
async fn a_first_byte_timeout_moves_to_the_next_target() {
    let primary = RawUpstream::start(SSE_HEAD, Then::Stall).await;
    let fallback = streaming_fallback().await;
    let layer = layer(primary.url(), fallback.url()).first_byte_timeout(Duration::from_millis(200));
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        stack(&layer).oneshot(chat_request(STREAM_REQUEST)),
    )
    .await
    .expect("the layer gave up on the stalled primary")
    .unwrap();
    let (report, body) = report_and_body(response).await;
    assert!(body.unwrap().ends_with("data: [DONE]\n\n"));
    match report.attempts()[0].outcome() {
        AttemptOutcome::BodyFailed { kind, message, .. } => {
            assert_eq!(*kind, ErrorKind::Timeout);
            assert!(message.contains("first-byte timeout"), "{message}");
        }
        other => panic!("expected a first-byte timeout, got {other:?}"),
    }
    assert_eq!(fallback.count(), 1);
}

#[tokio::test]
async fn a_stream_that_opens_with_an_error_event_moves_to_the_next_target() {
    let primary = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 78\r\n\r\ndata: {\"error\":{\"message\":\"upstream overloaded\",\"code\":\"server_overloaded\"}}\n\n",
        Then::Close,
    )
    .await;
    let fallback = streaming_fallback().await;
    let response = stack(&layer(primary.url(), fallback.url()))
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let (report, body) = report_and_body(response).await;
    assert!(body.unwrap().contains("Hel"));
    assert_eq!(
        report.attempts()[0].outcome(),
        &AttemptOutcome::ErrorEvent {
            status: http::StatusCode::OK,
            code: Some("server_overloaded".into())
        }
    );
    assert_eq!(report.attempts()[0].decision(), Decision::NextTarget);
    assert_eq!(fallback.count(), 1);
}

#[tokio::test]
async fn a_failure_after_the_first_chunk_is_a_body_error_and_is_recorded() {
    let primary = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n13\r\ndata: {\"n\":\"one\"}\n\n\r\n",
        Then::Close,
    )
    .await;
    let fallback = streaming_fallback().await;
    let response = stack(&layer(primary.url(), fallback.url()))
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let report = report_of(&response);
    let mut body = response.into_body();
    let first = next_data(&mut body).await;
    assert_eq!(&first[..], b"data: {\"n\":\"one\"}\n\n");
    // The format's own terminal error event, then the error: never a clean end.
    let terminal = next_data(&mut body).await;
    assert!(terminal.starts_with(b"data: {\"error\":{"), "{terminal:?}");
    let next = body.frame().await.expect("an error, not a clean end");
    assert!(next.is_err());
    assert!(
        report.stream_error().is_some(),
        "the report records the mid-stream failure"
    );
    assert_eq!(
        fallback.count(),
        0,
        "no fallback once the answer has started"
    );
}

#[tokio::test]
async fn committing_on_the_head_hands_back_a_body_that_fails() {
    let primary = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let fallback = streaming_fallback().await;
    let layer = layer(primary.url(), fallback.url()).wait_for_first_chunk(false);
    let response = stack(&layer)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let (report, body) = report_and_body(response).await;
    assert!(body.is_err(), "a clean empty end would hide the failure");
    assert_eq!(report.attempts().len(), 1);
    assert_eq!(fallback.count(), 0);
}

#[tokio::test]
async fn when_every_target_drops_before_the_first_chunk_the_error_lists_both_attempts() {
    // No answer started, so there is none to hand back: a 200 head whose body then fails would
    // reach a gateway's client as a truncated stream instead of an error it can retry.
    let a = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let b = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let error = stack(&layer(a.url(), b.url()))
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap_err();
    assert!(error.is_upstream(), "{error}");
    assert!(error.report().is_exhausted());
    assert_eq!(error.report().attempts().len(), 2);
    assert!(error
        .report()
        .attempts()
        .iter()
        .all(|a| matches!(a.outcome(), AttemptOutcome::BodyFailed { .. })));
}

#[tokio::test]
async fn with_hedging_on_every_target_dropping_before_the_first_chunk_is_an_error_too() {
    let a = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let b = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let layer = layer(a.url(), b.url()).hedge(tower_model_fallback::Hedge::new(
        std::time::Duration::from_secs(5),
        2,
    ));
    let error = stack(&layer)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap_err();
    assert!(error.is_upstream(), "{error}");
    assert_eq!(error.report().attempts().len(), 2);
    assert!(error
        .report()
        .attempts()
        .iter()
        .all(|a| matches!(a.outcome(), AttemptOutcome::BodyFailed { .. })));
}

#[tokio::test(start_paused = true)]
async fn the_first_byte_timeout_is_exact_on_a_paused_clock() {
    let inner = tower::service_fn(|req: Request<ReplayBody>| async move {
        let body = if req.uri().host() == Some("slow.test") {
            http_body_util::Either::Left(Stalled(None))
        } else {
            http_body_util::Either::Right(http_body_util::Full::new(Bytes::from_static(b"ok")))
        };
        Ok::<_, std::convert::Infallible>(Response::new(body))
    });
    let layer = slow_then_fast(Duration::from_secs(7));
    let started = tokio::time::Instant::now();
    let response = tower::Layer::layer(&layer, inner)
        .oneshot(chat_request(CHAT))
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(7));
    let (report, body) = report_and_body(response).await;
    assert_eq!(body.unwrap(), "ok");
    assert_eq!(report.attempts()[0].elapsed(), Duration::from_secs(7));
}

// Regressions found while redesigning the engine: a success that ends, or dies, before its
// commit point is a drop, whatever the error-body limit and however its type is spelled.

#[tokio::test]
async fn with_no_error_body_read_a_success_that_drops_before_its_first_byte_still_falls_back() {
    let primary = RawUpstream::start(SSE_HEAD, Then::Close).await;
    let fallback = streaming_fallback().await;
    let layer = layer(primary.url(), fallback.url()).error_body_limit(0);
    let response = stack(&layer)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let (report, body) = report_and_body(response).await;
    assert!(body.unwrap().ends_with("data: [DONE]\n\n"));
    assert_eq!((primary.count(), fallback.count()), (1, 1));
    assert_eq!(report.served_by().unwrap().target(), "fallback");
}

/// A chunked SSE answer whose body ends cleanly (the terminating chunk) after `events`.
async fn cleanly_ending_stream(events: &'static [u8]) -> RawUpstream {
    RawUpstream::start(events, Then::Close).await
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_before_its_first_event_moves_on_like_a_drop() {
    for (what, bytes) in [
        (
            "no event at all",
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        ),
        (
            "half an event",
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nb\r\ndata: {\"cho\r\n0\r\n\r\n"[..],
        ),
        (
            "a close-delimited stream with half an event",
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: {\"cho"[..],
        ),
    ] {
        let primary = cleanly_ending_stream(bytes).await;
        let fallback = streaming_fallback().await;
        let response = stack(&layer(primary.url(), fallback.url()))
            .oneshot(chat_request(STREAM_REQUEST))
            .await
            .unwrap();
        let (report, body) = report_and_body(response).await;
        assert!(body.unwrap().ends_with("data: [DONE]\n\n"), "{what}");
        match report.attempts()[0].outcome() {
            AttemptOutcome::BodyFailed { status, kind, .. } => {
                assert_eq!((status.as_u16(), *kind), (200, ErrorKind::Closed), "{what}");
            }
            other => panic!("{what}: expected a drop before the first event, got {other:?}"),
        }
        assert_eq!(report.served_by().unwrap().target(), "fallback", "{what}");
    }
}

#[tokio::test]
async fn an_announced_answer_that_ends_before_its_first_byte_moves_on() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let client = tower::service_fn(move |req: Request<ReplayBody>| {
        let first = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        async move {
            let _ = req;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            if first {
                drop(tx); // the body ends at once, though 40 bytes were announced
            } else {
                tx.send(Ok(Bytes::from_static(b"{\"ok\":true}")))
                    .await
                    .unwrap();
            }
            Ok::<_, BoxError>(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .header("content-length", if first { "40" } else { "11" })
                    .body(ChannelBody(rx))
                    .unwrap(),
            )
        }
    });
    let layer = layer("http://a.test".into(), "http://b.test".into());
    let response = tower::Layer::layer(&layer, client)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let (report, body) = report_and_body(response).await;
    assert_eq!(body.unwrap(), "{\"ok\":true}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(matches!(
        report.attempts()[0].outcome(),
        AttemptOutcome::BodyFailed { .. }
    ));
}

#[tokio::test]
async fn media_types_are_compared_without_regard_to_case() {
    let primary = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; Charset=UTF-8\r\ntransfer-encoding: chunked\r\n\r\n3a\r\ndata: {\"error\":{\"message\":\"busy\",\"type\":\"server_error\"}}\n\n\r\n",
        Then::Stall,
    )
    .await;
    let fallback = streaming_fallback().await;
    let response = stack(&layer(primary.url(), fallback.url()))
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    // The primary stalls after its error event: read as a success, the body would never end.
    let (report, body) = tokio::time::timeout(Duration::from_secs(10), report_and_body(response))
        .await
        .expect("the stalled primary was handed back");
    assert!(body.unwrap().ends_with("data: [DONE]\n\n"));
    assert!(
        matches!(
            report.attempts()[0].outcome(),
            AttemptOutcome::ErrorEvent { .. }
        ),
        "{report}"
    );
}
