//! Streams as the providers send them (byte-exact fixtures in `tests/fixtures/streams/`, written
//! from OpenAI's chat-completions and Responses streaming references and Anthropic's Messages
//! streaming reference): preamble events are held until the first content, a failure or an
//! error event before it moves on, classified like the status it stands for, and the next
//! target's stream reaches the caller clean.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use support::*;
use tower::ServiceExt;
use tower_model_fallback::{
    AttemptOutcome, CommitPoint, Decision, ErrorKind, FallbackLayer, FallbackReport, ReplayBody,
    Retries,
};

const STREAM_REQUEST: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/streams/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The events of a stream, each with its blank line.
fn events(stream: &str) -> Vec<&str> {
    stream.split_inclusive("\n\n").collect()
}

/// A chunked SSE response sending `events` one chunk each, with its terminating chunk when
/// `end` (else the connection just closes: a drop).
fn chunked(events: &[&str], end: bool) -> &'static [u8] {
    let mut out = SSE_HEAD.to_vec();
    for event in events {
        out.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
    }
    if end {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    Box::leak(out.into_boxed_slice())
}

async fn serving(stream: &str) -> RawUpstream {
    RawUpstream::start(chunked(&events(stream), true), Then::Close).await
}

fn layer(primary: String, fallback: String) -> FallbackLayer {
    primary_and_fallback(primary, fallback)
}

/// The report and the body of the answer through `layer`.
async fn run(layer: &FallbackLayer) -> (FallbackReport, Result<String, String>) {
    let response = stack(layer)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    report_and_body(response).await
}

/// Each dialect's success stream, and how many preamble events it opens with.
const DIALECTS: [(&str, usize); 3] = [
    ("openai_chat.sse", 1),
    ("openai_responses.sse", 4),
    ("anthropic_messages.sse", 3),
];

#[tokio::test]
async fn a_drop_after_each_dialects_preamble_falls_back_and_the_caller_sees_one_clean_stream() {
    for (name, preamble) in DIALECTS {
        for end in [false, true] {
            let stream = fixture(name);
            let opening = &events(&stream)[..preamble];
            let primary = RawUpstream::start(chunked(opening, end), Then::Close).await;
            let fallback = serving(&stream).await;
            let (report, body) = run(&layer(primary.url(), fallback.url())).await;
            // Byte for byte the fallback's stream: one `message_start`, one `response.created`.
            assert_eq!(body.unwrap(), stream, "{name}, clean end: {end}");
            match report.attempts()[0].outcome() {
                AttemptOutcome::BodyFailed { kind, message, .. } => {
                    assert_eq!(*kind, ErrorKind::Closed, "{name}: {message}");
                }
                other => panic!("{name}: expected a drop, got {other:?}"),
            }
            assert_eq!(report.served_by().unwrap().target(), "fallback", "{name}");
            assert_eq!((primary.count(), fallback.count()), (1, 1), "{name}");
        }
    }
}

#[tokio::test]
async fn error_events_before_content_move_on_classified_like_the_status_they_stand_for() {
    // (fixture, the code recorded, whether it is retried on the same target like a 429/5xx;
    // an exhausted quota moves on at once, like a 429 insufficient_quota)
    let cases = [
        (
            "openai_chat_server_error_after_role.sse",
            "server_error",
            true,
        ),
        (
            "openai_chat_quota_after_role.sse",
            "insufficient_quota",
            false,
        ),
        (
            "openai_responses_failed_after_created.sse",
            "server_error",
            true,
        ),
        (
            "openai_responses_quota_error_after_created.sse",
            "insufficient_quota",
            false,
        ),
        (
            "openai_responses_rate_limited_first.sse",
            "rate_limit_exceeded",
            true,
        ),
        (
            "anthropic_overloaded_after_start.sse",
            "overloaded_error",
            true,
        ),
        (
            "anthropic_rate_limit_after_start.sse",
            "rate_limit_error",
            true,
        ),
        ("anthropic_api_error_after_start.sse", "api_error", true),
    ];
    for (name, code, retried) in cases {
        let good = fixture(if name.starts_with("anthropic") {
            "anthropic_messages.sse"
        } else if name.contains("responses") {
            "openai_responses.sse"
        } else {
            "openai_chat.sse"
        });
        let primary = serving(&fixture(name)).await;
        let fallback = serving(&good).await;
        let layer = layer(primary.url(), fallback.url())
            .retries(Retries::new(1).base_delay(Duration::from_millis(1)));
        let (report, body) = run(&layer).await;
        assert_eq!(body.unwrap(), good, "{name}");
        let expected = AttemptOutcome::ErrorEvent {
            status: http::StatusCode::OK,
            code: Some(code.to_owned()),
        };
        assert_eq!(report.attempts()[0].outcome(), &expected, "{name}");
        let (decision, tries) = if retried {
            (Decision::RetrySame, 2)
        } else {
            (Decision::NextTarget, 1)
        };
        assert_eq!(report.attempts()[0].decision(), decision, "{name}");
        assert_eq!((primary.count(), fallback.count()), (tries, 1), "{name}");
    }
}

#[tokio::test]
async fn a_callers_error_event_is_handed_back_and_never_sent_elsewhere() {
    let cases = [
        (
            "openai_chat_invalid_request_after_role.sse",
            "string_above_max_length",
        ),
        (
            "openai_responses_invalid_prompt_after_created.sse",
            "invalid_prompt",
        ),
        (
            "anthropic_invalid_request_after_start.sse",
            "invalid_request_error",
        ),
    ];
    for (name, code) in cases {
        let stream = fixture(name);
        let primary = serving(&stream).await;
        let fallback = serving(&fixture("openai_chat.sse")).await;
        let (report, body) = run(&layer(primary.url(), fallback.url())).await;
        assert_eq!(body.unwrap(), stream, "{name}: the primary's own stream");
        assert_eq!(report.attempts().len(), 1, "{name}");
        assert_eq!(report.attempts()[0].decision(), Decision::Return, "{name}");
        assert_eq!(
            report.attempts()[0].outcome(),
            &AttemptOutcome::ErrorEvent {
                status: http::StatusCode::OK,
                code: Some(code.to_owned())
            },
            "{name}"
        );
        assert_eq!((primary.count(), fallback.count()), (1, 0), "{name}");
    }
}

/// Serves the first `n` events of `stream`, then drops the connection.
async fn dropping_after(stream: &str, n: usize) -> RawUpstream {
    RawUpstream::start(chunked(&events(stream)[..n], false), Then::Close).await
}

#[tokio::test]
async fn a_first_tool_call_delta_is_content_and_commits() {
    let primary = dropping_after(&fixture("openai_chat_tool_call.sse"), 1).await;
    let fallback = serving(&fixture("openai_chat.sse")).await;
    let (report, body) = run(&layer(primary.url(), fallback.url())).await;
    assert!(body.is_err(), "committed: the drop is the caller's");
    assert_eq!(report.attempts().len(), 1);
    assert_eq!(fallback.count(), 0);
}

#[tokio::test]
async fn commit_on_first_event_commits_on_the_preamble_and_head_on_the_head() {
    for point in [CommitPoint::FirstEvent, CommitPoint::Head] {
        let primary = dropping_after(&fixture("anthropic_messages.sse"), 1).await;
        let fallback = serving(&fixture("anthropic_messages.sse")).await;
        let layer = layer(primary.url(), fallback.url()).commit_on(point);
        let (report, body) = run(&layer).await;
        assert!(body.is_err(), "{point:?}");
        assert_eq!(report.attempts().len(), 1, "{point:?}");
        assert_eq!(fallback.count(), 0, "{point:?}");
    }
}

#[tokio::test]
async fn a_preamble_past_the_64_kib_bound_commits_there() {
    let mut stream = events(&fixture("anthropic_messages.sse"))[..2].concat();
    while stream.len() < 70 * 1024 {
        stream.push_str("event: ping\ndata: {\"type\": \"ping\"}\n\n");
    }
    let stream: &'static str = Box::leak(stream.into_boxed_str());
    let primary = RawUpstream::start(chunked(&events(stream), false), Then::Stall).await;
    let fallback = serving(&fixture("anthropic_messages.sse")).await;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        stack(&layer(primary.url(), fallback.url())).oneshot(chat_request(STREAM_REQUEST)),
    )
    .await
    .expect("committed at the bound, not held for ever")
    .unwrap();
    let first = response.into_body().frame().await.unwrap().unwrap();
    assert!(first
        .into_data()
        .unwrap()
        .starts_with(b"event: message_start\n"));
    assert_eq!(fallback.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_preamble_held_past_the_first_byte_timeout_commits_there() {
    let role = events(&fixture("openai_chat.sse"))[0].to_owned();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = tower::service_fn(move |_: Request<ReplayBody>| {
        counted.fetch_add(1, Ordering::SeqCst);
        let body = Stalled(Some(Bytes::from(role.clone())));
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap();
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let layer = slow_then_fast(Duration::from_secs(7));
    let started = tokio::time::Instant::now();
    let response = tower::Layer::layer(&layer, inner)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    // A model slow to its first token is not cut: the held role delta is handed over.
    assert_eq!(started.elapsed(), Duration::from_secs(7));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let first = response.into_body().frame().await.unwrap().unwrap();
    assert!(first.into_data().unwrap().starts_with(b"data: {\"id\""));
}
