//! Streams through the gateway as the official SDKs read them: OpenAI's Python SDK (chat
//! completions and Responses) and, when installed, Anthropic's. A provider failure after the
//! preamble falls back and the SDK reads one clean stream; a failure after content ends the
//! stream with the format's own terminal error event, which the SDK names. The upstreams replay
//! the byte-exact provider fixtures of the library's `tests/fixtures/streams/`.

mod support;

use std::process::Command;

use support::*;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../tests/fixtures/streams/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The first `n` events of `stream` (all of them when `None`), as a chunked SSE response, one
/// chunk an event; without its terminating chunk unless the stream is whole: a drop.
fn chunked(stream: &str, n: Option<usize>) -> Vec<u8> {
    let events: Vec<&str> = stream.split_inclusive("\n\n").collect();
    let sent = n.unwrap_or(events.len());
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for event in &events[..sent] {
        out.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
    }
    if n.is_none() {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    out
}

async fn upstream(bytes: Vec<u8>) -> RawUpstream {
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    RawUpstream::start(bytes, true).await
}

/// A gateway whose primary fails with `failing` and whose fallback streams `good`, and one
/// whose only target sends the first `cut` events of `good` and drops.
async fn pair(failing: &str, good: &str, cut: usize) -> (Running, Running, Vec<RawUpstream>) {
    let primary = upstream(chunked(&fixture(failing), None)).await;
    let fallback = upstream(chunked(&fixture(good), None)).await;
    let cutting = upstream(chunked(&fixture(good), Some(cut))).await;
    let falls_back = gateway(
        config(&[("primary", primary.url()), ("fallback", fallback.url())]),
        &[],
    )
    .await;
    let cuts = gateway(config(&[("only", cutting.url())]), &[]).await;
    (falls_back, cuts, vec![primary, fallback, cutting])
}

const OPENAI: &str = r#"
import sys, openai
fallback, cut = sys.argv[1], sys.argv[2]

def chat(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    text = []
    try:
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], stream=True)
        for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
        return "ok " + "".join(text)
    except openai.APIError as e:
        return f"{type(e).__name__} {''.join(text)} | {e.message}"

def responses(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    text, types = [], []
    try:
        for event in client.responses.create(model="m", input="Hi", stream=True):
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            if event.type == "response.failed":
                types.append(event.response.error.code)
        return f"ok {''.join(text)} | {' '.join(types[-2:])}"
    except Exception as e:
        return f"{type(e).__name__} {''.join(text)} | {' '.join(types[-2:])}"

print("chat-fallback", chat(fallback))
print("chat-cut", chat(cut))
print("responses-fallback", responses(sys.argv[3]))
print("responses-cut", responses(sys.argv[4]))
"#;

const ANTHROPIC: &str = r#"
import sys, anthropic

def messages(url):
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    text = []
    try:
        with client.messages.stream(model="m", max_tokens=16,
                                    messages=[{"role": "user", "content": "Hi"}]) as stream:
            for chunk in stream.text_stream:
                text.append(chunk)
        return "ok " + "".join(text)
    except anthropic.APIStatusError as e:
        return f"{type(e).__name__} {''.join(text)} | {e.body['error']['type']}"

print("messages-fallback", messages(sys.argv[1]))
print("messages-cut", messages(sys.argv[2]))
"#;

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn python(script: &'static str, args: Vec<String>) -> Vec<String> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_reads_a_clean_fallback_and_names_a_cut_stream_chat_and_responses() {
    if !python_has("httpx, openai") {
        eprintln!(
            "skipped: python3 with httpx and openai is needed (.ci/run installs them with pip)"
        );
        return;
    }
    let (chat_fb, chat_cut, _chat_up) = pair(
        "openai_chat_server_error_after_role.sse",
        "openai_chat.sse",
        3,
    )
    .await;
    let (resp_fb, resp_cut, _resp_up) = pair(
        "openai_responses_failed_after_created.sse",
        "openai_responses.sse",
        5,
    )
    .await;
    let url = |g: &Running| format!("http://{}", g.addr);
    let lines = python(
        OPENAI,
        vec![url(&chat_fb), url(&chat_cut), url(&resp_fb), url(&resp_cut)],
    )
    .await;
    assert_eq!(
        lines,
        [
            "chat-fallback ok Hello! How can I help?",
            "chat-cut APIError Hello! | the upstream stream was interrupted",
            "responses-fallback ok Hi there! | response.output_item.done response.completed",
            "responses-cut APIConnectionError Hi | response.failed server_error",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_reads_a_clean_fallback_and_names_a_cut_stream() {
    if !python_has("anthropic") {
        eprintln!("skipped: python3 with anthropic is needed (.ci/run installs it with pip)");
        return;
    }
    let (fb, cut, _up) = pair(
        "anthropic_overloaded_after_start.sse",
        "anthropic_messages.sse",
        4,
    )
    .await;
    let url = |g: &Running| format!("http://{}", g.addr);
    let lines = python(ANTHROPIC, vec![url(&fb), url(&cut)]).await;
    assert_eq!(
        lines,
        [
            "messages-fallback ok Hello!",
            "messages-cut APIStatusError Hello | api_error",
        ]
    );
}
