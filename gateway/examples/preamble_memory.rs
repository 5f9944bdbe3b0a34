//! What a held preamble costs in memory. Through the gateway over loopback, `n` streams (default
//! 200) are opened at once to an upstream that sends a provider's preamble and then holds the
//! stream open, with no content. With `commit_on: first_content` (the default) the layer holds
//! each preamble until content comes; with `first_event` (the baseline) the preamble is handed to
//! the client at once. The heap still in use is counted by a counting global allocator, with
//! the clients connected and every preamble sent, against the same process before the streams;
//! the difference between the two commit points is what holding costs, per stream. A request
//! still waiting for its upstream's head is measured the same way, for scale.
//!
//! Measured through a real HTTP/1.1 connection, not an in-process body: what the upstream's
//! frames are slices of (hyper's read buffer) is part of the cost. The layer holds a copy of a
//! preamble in one buffer, so it does not pin hyper's; BENCHMARKS.md has the figures before.
//!
//! Run: `cargo run --release -p tower-model-fallback-gateway --example preamble_memory -- [n]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_model_fallback_gateway::{serve, Gateway, GatewayConfig};

struct Counting;

/// Bytes allocated and not yet freed.
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Error = Box<dyn std::error::Error + Send + Sync>;

const BODY: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

/// The preambles: OpenAI chat's role-only delta, Anthropic's three opening events, and a
/// Responses `response.created` that echoes 60 KiB of instructions (it echoes the request's
/// instructions and tools, which can be that long).
fn preambles() -> Vec<(&'static str, String)> {
    let role = r#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}"#;
    let anthropic = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-20250514\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
    );
    let instructions = "Answer briefly. ".repeat(60 * 1024 / 16);
    let created = format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"instructions\":\"{instructions}\",\"model\":\"gpt-4.1\",\"output\":[]}}}}\n\n"
    );
    vec![
        ("openai chat role-only delta", format!("{role}\n\n")),
        ("anthropic message_start..ping", anthropic.to_owned()),
        ("responses created, 60 KiB", created),
    ]
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    println!("heap in use per held stream through the gateway, {n} streams at once, after every preamble was sent");
    // A request still waiting for its upstream's head: what any request in flight costs.
    let waiting = per_stream(n, "first_content", "").await?;
    println!(
        "a request waiting for its upstream's head: {:.1} K a stream",
        waiting / 1024.0
    );
    println!(
        "{:<32} {:>9} {:>13} {:>15} {:>12} {:>16}",
        "preamble", "bytes", "first_event", "first_content", "holding", "over waiting"
    );
    for (name, preamble) in preambles() {
        let baseline = per_stream(n, "first_event", &preamble).await?;
        let held = per_stream(n, "first_content", &preamble).await?;
        println!(
            "{name:<32} {:>9} {:>11.1} K {:>13.1} K {:>10.1} K {:>14.1} K",
            preamble.len(),
            baseline / 1024.0,
            held / 1024.0,
            (held - baseline) / 1024.0,
            (held - waiting) / 1024.0
        );
    }
    Ok(())
}

/// Heap bytes in use per stream with `n` streams held open (the preamble sent, no content),
/// through a gateway with `commit_on`, above the same process before the streams were opened.
async fn per_stream(n: usize, commit_on: &str, preamble: &str) -> Result<f64, Error> {
    let upstream = Holding::start(preamble.to_owned()).await?;
    let config = GatewayConfig::from_json(
        format!(
            r#"{{"targets": [{{"name": "upstream", "base_url": "http://{}/v1", "model": "gpt-4o-mini"}}],
                "attempt_timeout_ms": 60000, "stream_idle_timeout_ms": null, "commit_on": "{commit_on}"}}"#,
            upstream.addr
        )
        .as_bytes(),
    )?;
    let service = Gateway::new(&config, |_| None)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let gateway = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(listener, service, (&config).into(), async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = LIVE.load(Ordering::Relaxed);

    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut tcp = TcpStream::connect(gateway).await?;
        tcp.write_all(request.as_bytes()).await?;
        clients.push(tcp);
    }
    // Every preamble sent (bounded), then a moment for the gateway to read them.
    for _ in 0..600 {
        if upstream.sent.load(Ordering::SeqCst) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if upstream.sent.load(Ordering::SeqCst) < n {
        return Err(format!(
            "only {} of {n} preambles sent",
            upstream.sent.load(Ordering::SeqCst)
        )
        .into());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = LIVE.load(Ordering::Relaxed);

    drop(clients);
    for _ in 0..600 {
        if upstream.closed.load(Ordering::SeqCst) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let _ = server.await;
    Ok((during - before) as f64 / n as f64)
}

/// An upstream on a raw socket: a chunked 200 SSE head and the preamble, then nothing until the
/// gateway closes the connection. An empty preamble: not even the head (`sent` counts the
/// requests read).
struct Holding {
    addr: std::net::SocketAddr,
    sent: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Holding {
    async fn start(preamble: String) -> std::io::Result<Holding> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (sent, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, c) = (sent.clone(), closed.clone());
        let answer = Arc::new(if preamble.is_empty() {
            String::new()
        } else {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{preamble}\r\n",
                preamble.len()
            )
        });
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (s, c, answer) = (s.clone(), c.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    // The request: its head and body are small; wait for the body's end.
                    while !got.ends_with(BODY.as_bytes()) {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if tcp.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    s.fetch_add(1, Ordering::SeqCst);
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Holding { addr, sent, closed })
    }
}
