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

/// The report of the answer through `layer`, the bytes its body yielded and the error it ended
/// with (`None`: a clean end).
async fn run(layer: &FallbackLayer) -> (FallbackReport, String, Option<String>) {
    let response = stack(layer)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let report = report_of(&response);
    let (text, error) = read_all(response.into_body()).await;
    (report, text, error)
}

/// Every byte a body yields, and the error it ends with (`None`: a clean end).
async fn read_all<B>(mut body: B) -> (String, Option<String>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut text = Vec::new();
    loop {
        match body.frame().await {
            None => return (String::from_utf8(text).unwrap(), None),
            Some(Ok(frame)) => text.extend_from_slice(&frame.into_data().unwrap_or_default()),
            Some(Err(e)) => return (String::from_utf8(text).unwrap(), Some(e.to_string())),
        }
    }
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
            let (report, body, error) = run(&layer(primary.url(), fallback.url())).await;
            // Byte for byte the fallback's stream: one `message_start`, one `response.created`.
            assert_eq!((body, error), (stream, None), "{name}, clean end: {end}");
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
        let (report, body, error) = run(&layer).await;
        assert_eq!((body, error), (good, None), "{name}");
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
        let (report, body, error) = run(&layer(primary.url(), fallback.url())).await;
        assert_eq!(body, stream, "{name}: the primary's own stream");
        // The error event is the stream's end: the clean end after it is not a success.
        assert!(error.unwrap().contains("after an error event"), "{name}");
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
    let (report, _, error) = run(&layer(primary.url(), fallback.url())).await;
    assert!(error.is_some(), "committed: the drop is the caller's");
    assert_eq!(report.attempts().len(), 1);
    assert_eq!(fallback.count(), 0);
}

#[tokio::test]
async fn commit_on_first_event_commits_on_the_preamble_and_head_on_the_head() {
    for point in [CommitPoint::FirstEvent, CommitPoint::Head] {
        let primary = dropping_after(&fixture("anthropic_messages.sse"), 1).await;
        let fallback = serving(&fixture("anthropic_messages.sse")).await;
        let layer = layer(primary.url(), fallback.url()).commit_on(point);
        let (report, _, error) = run(&layer).await;
        assert!(error.is_some(), "{point:?}");
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

/// An inner service whose streams send `opening`, then nothing; it counts its calls.
fn stalling_stream(
    opening: String,
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<ReplayBody>,
    Response = Response<Stalled>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_: Request<ReplayBody>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let body = Stalled(Some(Bytes::from(opening.clone())));
        let response = Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap();
        async move { Ok::<_, std::convert::Infallible>(response) }
    })
}

#[tokio::test(start_paused = true)]
async fn a_preamble_held_past_the_first_byte_timeout_commits_there() {
    let role = events(&fixture("openai_chat.sse"))[0].to_owned();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = stalling_stream(role, calls.clone());
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

#[tokio::test(start_paused = true)]
async fn comments_alone_past_the_first_byte_timeout_are_no_sign_of_life_and_move_on() {
    // A queue's keep-alive comments (and a `data:` heartbeat) while no model works: the
    // timeout moves on, as it does for a stream that sent nothing.
    for opening in [
        ": PROCESSING\n\n",
        ": PROCESSING\n\ndata:\n\n",
        "data: {\"cho",
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = stalling_stream(opening.to_owned(), calls.clone());
        let layer = slow_then_fast(Duration::from_secs(7));
        let started = tokio::time::Instant::now();
        let result = tower::Layer::layer(&layer, inner)
            .oneshot(chat_request(STREAM_REQUEST))
            .await;
        // Both targets were tried, each cut at its first-byte timeout.
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{opening:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(14), "{opening:?}");
        let report = match &result {
            Ok(response) => report_of(response),
            Err(error) => error.report().clone(),
        };
        assert!(report.is_exhausted(), "{opening:?}: {report}");
    }
}

#[tokio::test]
async fn a_preamble_split_into_one_byte_chunks_is_held_and_dropped_like_a_whole_one() {
    let stream = fixture("openai_responses.sse");
    let opening: String = events(&stream)[..4].concat();
    let bytes: Vec<&str> = (0..opening.len()).map(|i| &opening[i..i + 1]).collect();
    let primary = RawUpstream::start(chunked(&bytes, false), Then::Close).await;
    let fallback = serving(&stream).await;
    let (report, body, error) = run(&layer(primary.url(), fallback.url())).await;
    assert_eq!((body, error), (stream, None));
    assert_eq!(report.served_by().unwrap().target(), "fallback");
}

// After the commit point: a failure ends the stream with its format's own terminal error event,
// then the body error.

#[tokio::test]
async fn a_drop_after_content_ends_with_each_formats_terminal_error_event_then_an_error() {
    let cases = [
        ("openai_chat.sse", 2, "data: {\"error\":{"),
        (
            "openai_responses.sse",
            5,
            "event: response.failed\ndata: {\"response\":{",
        ),
        (
            "anthropic_messages.sse",
            4,
            "event: error\ndata: {\"error\":{",
        ),
    ];
    for (name, sent, terminal) in cases {
        let stream = fixture(name);
        let all = events(&stream);
        // The last event sent is cut in two, and the connection drops in its middle.
        let mut chunks: Vec<&str> = all[..sent].to_vec();
        let half = &all[sent][..all[sent].len() / 2];
        chunks.push(half);
        let primary = RawUpstream::start(chunked(&chunks, false), Then::Close).await;
        let fallback = serving(&stream).await;
        let (report, body, error) = run(&layer(primary.url(), fallback.url())).await;
        let whole = all[..sent].concat();
        assert!(body.starts_with(&whole), "{name}: {body}");
        let rest = &body[whole.len()..];
        assert!(rest.starts_with(terminal), "{name}: {rest}");
        assert!(
            rest.ends_with("}\n\n"),
            "{name}: the half event is not sent: {rest}"
        );
        assert!(!body.contains("[DONE]"), "{name}");
        let event: serde_json::Value =
            serde_json::from_str(rest.lines().find_map(|l| l.strip_prefix("data: ")).unwrap())
                .unwrap();
        assert!(event.to_string().contains("stream_interrupted") || name != "openai_chat.sse");
        assert!(error.is_some(), "{name}: then the body error");
        assert!(
            report.attempts().len() == 1 && fallback.count() == 0,
            "{name}"
        );
    }
}

#[tokio::test]
async fn with_stream_error_events_off_a_drop_after_content_is_the_body_error_alone() {
    let stream = fixture("openai_chat.sse");
    let all = events(&stream);
    let primary = dropping_after(&stream, 2).await;
    let fallback = serving(&stream).await;
    let layer = layer(primary.url(), fallback.url()).stream_error_events(false);
    let (_, body, error) = run(&layer).await;
    assert_eq!(body, all[..2].concat());
    assert!(error.is_some());
}

#[tokio::test]
async fn an_upstream_error_event_after_content_is_passed_on_and_the_end_is_an_error() {
    let messages = fixture("anthropic_messages.sse");
    let overloaded = fixture("anthropic_overloaded_after_start.sse");
    let stream = format!(
        "{}{}",
        events(&messages)[..4].concat(),
        events(&overloaded)[3]
    );
    let primary = serving(&stream).await;
    let fallback = serving(&messages).await;
    let (report, body, error) = run(&layer(primary.url(), fallback.url())).await;
    assert_eq!(body, stream, "one error event: the upstream's own");
    assert!(error.unwrap().contains("after an error event"));
    assert!(report.stream_error().is_some());
    assert_eq!(fallback.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_committed_stream_that_stalls_is_cut_after_the_stream_idle_timeout() {
    let content = events(&fixture("openai_chat.sse"))[..2].concat();
    let inner = stalling_stream(content, Arc::default());
    let layer = slow_then_fast(Duration::from_secs(7)).stream_idle_timeout(Duration::from_secs(30));
    let response = tower::Layer::layer(&layer, inner)
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let report = report_of(&response);
    let mut body = response.into_body();
    let first = next_data(&mut body).await;
    assert!(first.starts_with(b"data: {\"id\""));
    // The caller's own pause does not count: the timer runs while the body waits.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let waited = tokio::time::Instant::now();
    let terminal = next_data(&mut body).await;
    assert_eq!(waited.elapsed(), Duration::from_secs(30));
    let terminal = std::str::from_utf8(&terminal).unwrap();
    assert!(terminal.starts_with("data: {\"error\":"), "{terminal}");
    assert!(terminal.contains("stream_idle_timeout"), "{terminal}");
    let error = body.frame().await.unwrap().unwrap_err();
    let io = error.downcast_ref::<std::io::Error>().unwrap();
    assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
    assert!(report
        .stream_error()
        .unwrap()
        .contains("stream idle timeout"));
}

// The caller going away: nothing is paid for that nobody reads.

/// An upstream that streams `opening` and then holds the stream open; `sent` is notified once
/// the opening is written.
async fn holding(opening: String, sent: Arc<tokio::sync::Notify>) -> Upstream {
    Upstream::start(move |_| {
        let (opening, sent) = (opening.clone(), sent.clone());
        async move {
            let (response, tx) = streamed(200);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from(opening))).await;
                sent.notify_one();
                // Held open until the reader goes away.
                tx.closed().await;
            });
            response
        }
    })
    .await
}

#[tokio::test]
async fn a_caller_who_leaves_while_a_preamble_is_held_closes_the_upstream_and_starts_no_fallback() {
    let sent = Arc::new(tokio::sync::Notify::new());
    let opening = events(&fixture("anthropic_messages.sse"))[..3].concat();
    let primary = holding(opening, sent.clone()).await;
    let fallback = serving(&fixture("anthropic_messages.sse")).await;
    let layer = layer(primary.url(), fallback.url());
    let task = tokio::spawn(stack(&layer).oneshot(chat_request(STREAM_REQUEST)));
    tokio::time::timeout(Duration::from_secs(5), sent.notified())
        .await
        .expect("the primary sent its preamble");
    assert!(!task.is_finished(), "the preamble is held, not handed over");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(
        primary.wait_closed(1).await,
        "the primary's connection closed"
    );
    assert_eq!(fallback.count(), 0, "no fallback after the caller left");
}

#[tokio::test]
async fn a_caller_who_drops_a_committed_stream_closes_the_upstream_at_once() {
    let sent = Arc::new(tokio::sync::Notify::new());
    let opening = events(&fixture("openai_chat.sse"))[..2].concat();
    let primary = holding(opening.clone(), sent).await;
    let fallback = serving(&fixture("openai_chat.sse")).await;
    let response = stack(&layer(primary.url(), fallback.url()))
        .oneshot(chat_request(STREAM_REQUEST))
        .await
        .unwrap();
    let mut body = response.into_body();
    assert_eq!(next_data(&mut body).await, opening.as_bytes());
    assert_eq!(primary.closed.load(Ordering::SeqCst), 0);
    drop(body);
    assert!(
        primary.wait_closed(1).await,
        "the primary's connection closed"
    );
    assert_eq!(fallback.count(), 0);
}

/// A read buffer that says when it is freed.
struct ReadBuffer(Vec<u8>, Arc<AtomicUsize>);

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_held_preamble_is_kept_as_a_copy_and_frees_the_read_buffer_it_arrived_in() {
    // As hyper hands frames over: each a slice of a larger read buffer. Holding such a slice
    // for a preamble of a few hundred bytes would keep the whole buffer alive while the model
    // thinks; the layer keeps a copy and lets the buffer go.
    let opening = events(&fixture("anthropic_messages.sse"))[..3].concat();
    let freed = Arc::new(AtomicUsize::new(0));
    let (response_tx, response_rx) = tokio::sync::mpsc::channel(16);
    let sent = Arc::new(tokio::sync::Notify::new());
    let (body, sent_too) = (
        Arc::new(std::sync::Mutex::new(Some(response_rx))),
        sent.clone(),
    );
    let mut buffer = vec![0u8; 16 * 1024];
    buffer[..opening.len()].copy_from_slice(opening.as_bytes());
    let slice = Bytes::from_owner(ReadBuffer(buffer, freed.clone())).slice(..opening.len());
    response_tx.send(Ok(slice)).await.unwrap();
    let inner = tower::service_fn(move |_: Request<ReplayBody>| {
        let (body, sent) = (body.clone(), sent_too.clone());
        async move {
            let rx = body.lock().unwrap().take().expect("one call");
            sent.notify_one();
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(ChannelBody(rx))
                    .unwrap(),
            )
        }
    });
    let layer =
        FallbackLayer::new([tower_model_fallback::Target::new("http://only.test/v1").unwrap()])
            .unwrap();
    let call =
        tokio::spawn(tower::Layer::layer(&layer, inner).oneshot(chat_request(STREAM_REQUEST)));
    tokio::time::timeout(Duration::from_secs(5), sent.notified())
        .await
        .expect("the upstream was called");
    // The frame is read and held (no content yet): its buffer is freed, bounded wait.
    for _ in 0..500 {
        if freed.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!call.is_finished(), "the preamble is held");
    assert_eq!(
        freed.load(Ordering::SeqCst),
        1,
        "the read buffer was let go"
    );
    // Content commits; the caller gets the preamble, whole, then the content.
    let stream = fixture("anthropic_messages.sse");
    let content = events(&stream)[3];
    response_tx
        .send(Ok(Bytes::from(content.to_string())))
        .await
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("committed")
        .unwrap()
        .unwrap();
    // The upstream's stream ends here: a missing byte ends the read instead of waiting.
    drop(response_tx);
    let (body, error) =
        tokio::time::timeout(Duration::from_secs(5), read_all(response.into_body()))
            .await
            .expect("the stream ends");
    assert_eq!(body, [opening.as_str(), content].concat());
    assert_eq!(error, None);
}
