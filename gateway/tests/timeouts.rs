//! Client-side timeouts, on tokio's paused clock with raw-socket clients: an idle connection, a
//! half-sent head and a trickled body are each closed in time; a request in flight is not idle.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"choices\":[]}";

async fn timed_gateway(up: &RawUpstream) -> Running {
    let mut c = config(&[("only", up.url())]);
    c["idle_timeout_ms"] = 2000.into();
    c["header_read_timeout_ms"] = 3000.into();
    c["body_read_timeout_ms"] = 4000.into();
    gateway(c, &[]).await
}

/// Reads until the gateway closes; how long that took.
async fn closed_after(tcp: &mut TcpStream) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let got = read_to_close(tcp).await;
    (start.elapsed(), got)
}

fn around(d: Duration, secs: u64) -> bool {
    d >= Duration::from_secs(secs) && d < Duration::from_millis(secs * 1000 + 500)
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_and_an_idle_keep_alive_one_are_closed_after_the_idle_timeout() {
    let up = RawUpstream::start(OK, false).await;
    let gw = timed_gateway(&up).await;
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let (waited, got) = closed_after(&mut silent).await;
    assert!(around(waited, 2), "{waited:?}");
    assert!(got.is_empty());

    let mut kept = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    kept.write_all(request.as_bytes()).await.unwrap();
    let (waited, got) = closed_after(&mut kept).await;
    assert!(split(&got).0.starts_with("http/1.1 200 "));
    assert!(around(waited, 2), "closed 2 s after the answer: {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_head_trickled_byte_by_byte_is_cut_at_the_header_read_timeout() {
    let up = RawUpstream::start(OK, false).await;
    let gw = timed_gateway(&up).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    // One byte a second keeps the idle timer quiet; only the header timeout can end it.
    let mut closed = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if tcp.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            _ => {}
        }
    }
    let waited = start.elapsed();
    assert!(closed, "the connection was closed");
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stops_arriving_gets_a_408_at_the_body_read_timeout() {
    let up = RawUpstream::start(OK, false).await;
    let gw = timed_gateway(&up).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    // A second chunk 3 s later (under the 4 s pause allowed), then nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tcp.write_all(b"\"m\",").await.unwrap();
    let (waited, got) = closed_after(&mut tcp).await;
    let (head, _) = split(&got);
    assert!(head.starts_with("http/1.1 408 "), "{head}");
    let json: serde_json::Value = serde_json::from_slice(&body_of(&got)).unwrap();
    assert_eq!(json["error"]["code"], "request_timeout");
    assert!(around(waited, 4), "{waited:?}");
    assert_eq!(up.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_on_a_slow_upstream_is_not_idle() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let _ = tcp.read(&mut buf).await;
        // Longer than the idle timeout, inside the raw client's 10 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        tcp.write_all(OK).await.unwrap();
    });
    let mut c = config(&[("slow", format!("http://{addr}/v1"))]);
    c["idle_timeout_ms"] = 2000.into();
    c["attempt_timeout_ms"] = 30_000.into();
    let gw = gateway(c, &[]).await;
    let response = raw(gw.addr, &chat_post("", CHAT)).await;
    let (head, body) = split(&response);
    assert!(
        head.starts_with("http/1.1 200 "),
        "{head}{}",
        String::from_utf8_lossy(&body)
    );
}
