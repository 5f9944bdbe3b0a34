//! Nothing is paid for that nobody reads, through the gateway: a client that hangs up (an
//! HTTP/1.1 socket closed, an HTTP/2 stream reset) while a stream's preamble is held closes the
//! upstream connection at once and starts no fallback, whatever the upstream's framing; one that
//! hangs up after content arrived closes the upstream too. The upstreams are raw sockets that
//! send a provider's preamble, then hold the stream open and note when the gateway closes it.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const STREAM_CHAT: &str =
    r#"{"model":"caller-model","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

/// How the held upstream frames its body.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Chunked,
    /// No length, no chunks: the body ends when the connection does.
    CloseDelimited,
}

/// The events of a provider's recorded stream, each with its blank line.
fn events(fixture: &str) -> Vec<String> {
    let path = format!(
        "{}/../tests/fixtures/streams/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let stream = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    stream.split_inclusive("\n\n").map(str::to_owned).collect()
}

/// Each provider's preamble: the events before its first content.
fn preambles() -> Vec<(&'static str, String)> {
    vec![
        (
            "openai chat role-only delta",
            events("openai_chat.sse")[..1].concat(),
        ),
        (
            "responses created, in_progress",
            events("openai_responses.sse")[..2].concat(),
        ),
        (
            "anthropic message_start, content_block_start, ping",
            events("anthropic_messages.sse")[..3].concat(),
        ),
    ]
}

/// An upstream that answers each request with a 200 SSE head and `opening`, then holds the
/// stream open; it counts requests, notifies `sent` once the opening is written, and counts the
/// connections the gateway closed.
struct Holding {
    url: String,
    requests: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    sent: Arc<Notify>,
    gone: Arc<Notify>,
}

impl Holding {
    async fn start(framing: Framing, opening: String) -> Holding {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let up = Holding {
            url,
            requests: Arc::default(),
            closed: Arc::default(),
            sent: Arc::default(),
            gone: Arc::default(),
        };
        let (requests, closed) = (up.requests.clone(), up.closed.clone());
        let (sent, gone) = (up.sent.clone(), up.gone.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (requests, closed) = (requests.clone(), closed.clone());
                let (sent, gone) = (sent.clone(), gone.clone());
                let opening = opening.clone();
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    if read_request(&mut tcp).await.is_none() {
                        return;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n";
                    let bytes = match framing {
                        Framing::Chunked => format!(
                            "{head}transfer-encoding: chunked\r\n\r\n{:x}\r\n{opening}\r\n",
                            opening.len()
                        ),
                        Framing::CloseDelimited => {
                            format!("{head}connection: close\r\n\r\n{opening}")
                        }
                    };
                    if tcp.write_all(bytes.as_bytes()).await.is_err() {
                        return;
                    }
                    sent.notify_one();
                    // Held open: nothing more is written. A read ends when the gateway closes.
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                    gone.notify_one();
                });
            }
        });
        up
    }

    /// Waits (at most 3 s) for the gateway to close this upstream's connection.
    async fn closed_in_time(&self) -> bool {
        let gone = self.gone.notified();
        if self.closed.load(Ordering::SeqCst) > 0 {
            return true;
        }
        tokio::time::timeout(Duration::from_secs(3), gone)
            .await
            .is_ok()
    }
}

/// A gateway over `primary` then `fallback`; `first_byte_timeout_ms` when given.
async fn gateway_over(
    primary: &Holding,
    fallback: &RawUpstream,
    first_byte: Option<u64>,
) -> Running {
    let mut config = config(&[
        ("primary", primary.url.clone()),
        ("fallback", fallback.url()),
    ]);
    // Long enough that only the client's leaving can end the held attempt within the test.
    config["attempt_timeout_ms"] = 30_000.into();
    if let Some(ms) = first_byte {
        config["first_byte_timeout_ms"] = ms.into();
    }
    gateway(config, &[]).await
}

/// The fallback: a whole stream, which must never be asked for.
async fn fallback() -> RawUpstream {
    let body = events("openai_chat.sse").concat();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    RawUpstream::start(Box::leak(answer.into_bytes().into_boxed_slice()), false).await
}

/// Nothing reaches `tcp` for a moment: the preamble is held, not even the head is sent.
async fn nothing_arrives(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf))
        .await
        .is_err()
}

#[tokio::test]
async fn a_client_that_hangs_up_while_a_preamble_is_held_closes_the_upstream_and_starts_no_fallback(
) {
    for framing in [Framing::Chunked, Framing::CloseDelimited] {
        for (preamble, opening) in preambles() {
            // Without and with a first-byte timeout: the timeout (10 s) cannot be what ends it.
            for first_byte in [None, Some(10_000)] {
                let case = format!("{framing:?}, {preamble}, first_byte_timeout {first_byte:?}");
                let primary = Holding::start(framing, opening.clone()).await;
                let fallback = fallback().await;
                let gw = gateway_over(&primary, &fallback, first_byte).await;
                let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
                tcp.write_all(&chat_post("", STREAM_CHAT)).await.unwrap();
                tokio::time::timeout(Duration::from_secs(5), primary.sent.notified())
                    .await
                    .unwrap_or_else(|_| panic!("{case}: the primary sent its preamble"));
                assert!(
                    nothing_arrives(&mut tcp).await,
                    "{case}: the preamble is held"
                );
                assert_eq!(primary.closed.load(Ordering::SeqCst), 0, "{case}");
                drop(tcp);
                assert!(
                    primary.closed_in_time().await,
                    "{case}: the primary's connection closed when the client left"
                );
                // The request's future is gone with the connection: nothing can start after.
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(
                    fallback.count(),
                    0,
                    "{case}: no fallback after the client left"
                );
                assert_eq!(primary.requests.load(Ordering::SeqCst), 1, "{case}");
            }
        }
    }
}

#[tokio::test]
async fn an_h2_client_that_resets_its_stream_while_a_preamble_is_held_closes_the_upstream() {
    let (preamble, opening) = preambles().remove(2);
    let primary = Holding::start(Framing::Chunked, opening).await;
    let fallback = fallback().await;
    let gw = gateway_over(&primary, &fallback, None).await;
    let waiting = tokio::spawn(h2c_chat(gw.url("/v1/chat/completions"), STREAM_CHAT));
    tokio::time::timeout(Duration::from_secs(5), primary.sent.notified())
        .await
        .expect("the primary sent its preamble");
    assert!(!waiting.is_finished(), "{preamble}: the preamble is held");
    // Dropping the request future resets the HTTP/2 stream; the connection stays up.
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    assert!(
        primary.closed_in_time().await,
        "the primary's connection closed on the stream reset"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fallback.count(), 0, "no fallback after the client left");
}

#[tokio::test]
async fn a_client_that_hangs_up_after_content_arrived_closes_the_upstream() {
    let chat = events("openai_chat.sse");
    // The role-only delta and the first content delta: committed.
    let opening = chat[..2].concat();
    for framing in [Framing::Chunked, Framing::CloseDelimited] {
        let primary = Holding::start(framing, opening.clone()).await;
        let fallback = fallback().await;
        let gw = gateway_over(&primary, &fallback, None).await;
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&chat_post("", STREAM_CHAT)).await.unwrap();
        // Read until the content delta has arrived (bounded).
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        let content = "\"content\":\"Hello\"";
        let arrived = tokio::time::timeout(Duration::from_secs(5), async {
            while find(&got, content.as_bytes()).is_none() {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            true
        })
        .await;
        assert_eq!(
            arrived,
            Ok(true),
            "{framing:?}: {}",
            String::from_utf8_lossy(&got)
        );
        let (head, _) = split(&got);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(primary.closed.load(Ordering::SeqCst), 0);
        drop(tcp);
        assert!(
            primary.closed_in_time().await,
            "{framing:?}: the primary's connection closed when the client left"
        );
        assert_eq!(fallback.count(), 0);
    }
}
