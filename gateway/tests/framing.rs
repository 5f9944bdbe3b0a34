//! Every upstream framing reaches the client intact: content-length, chunked, close-delimited
//! (HTTP/1.0, and HTTP/1.1 with `connection: close`), gzip-encoded JSON and SSE passed through
//! as sent, HTTP/2 (h2c), for successes and error statuses alike. Upstreams are raw sockets that
//! write exact bytes, and hyper servers configured each way; clients are a raw socket (exact
//! bytes) and hyper's client.

mod support;

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

const JSON: &str = r#"{"id":"x","object":"chat.completion","choices":[]}"#;

/// One target, no cooldowns: what the upstream sends is what the client gets.
fn one_target(url: String) -> serde_json::Value {
    let mut c = config(&[("only", url)]);
    c["cooldown"] = "off".into();
    c
}

/// Checks the client's view through both clients: the status, the body, a head hyper accepts
/// (never `transfer-encoding` beside `content-length`), and the headers that must (not) pass.
async fn through_both(
    url: String,
    status: u16,
    body: &[u8],
    expect_headers: &[(&str, &str)],
) -> String {
    let gw = gateway(one_target(url), &[]).await;
    let raw_response = raw(gw.addr, &chat_post("", CHAT)).await;
    let (head, _) = split(&raw_response);
    assert!(
        head.starts_with(&format!("http/1.1 {status} ")),
        "raw client got: {head}"
    );
    assert!(
        !(head.contains("transfer-encoding:") && head.contains("content-length:")),
        "{head}"
    );
    for hop in ["keep-alive:", "x-hop:", "proxy-connection:", "upgrade:"] {
        assert!(!head.contains(hop), "{hop} passed on: {head}");
    }
    for (name, value) in expect_headers {
        assert!(
            head.contains(&format!("{name}: {value}")),
            "{name}: {value} missing: {head}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&body_of(&raw_response)),
        String::from_utf8_lossy(body),
        "raw client body"
    );
    let (got, headers, got_body) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(got.as_u16(), status, "hyper client");
    assert_eq!(&got_body[..], body, "hyper client body");
    for (name, value) in expect_headers {
        assert_eq!(headers[*name], *value);
    }
    head
}

fn chunked(status: &str, headers: &str, chunks: &[&str]) -> &'static [u8] {
    let mut out = format!("HTTP/1.1 {status}\r\n{headers}transfer-encoding: chunked\r\n\r\n");
    for c in chunks {
        out.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
    }
    out.push_str("0\r\n\r\n");
    Box::leak(out.into_boxed_str()).as_bytes()
}

#[tokio::test]
async fn a_content_length_answer_passes_with_its_length() {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{JSON}",
        JSON.len()
    );
    let up = RawUpstream::start(Box::leak(response.into_boxed_str()).as_bytes(), false).await;
    let head = through_both(
        up.url(),
        200,
        JSON.as_bytes(),
        &[("x-fallback-target", "only")],
    )
    .await;
    assert!(
        head.contains(&format!("content-length: {}", JSON.len())),
        "{head}"
    );
}

#[tokio::test]
async fn a_chunked_answer_with_hop_by_hop_headers_passes_without_them() {
    let up = RawUpstream::start(
        chunked(
            "200 OK",
            "content-type: application/json\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=5\r\nx-hop: 1\r\n",
            &[&JSON[..10], &JSON[10..]],
        ),
        false,
    )
    .await;
    through_both(
        up.url(),
        200,
        JSON.as_bytes(),
        &[("content-type", "application/json")],
    )
    .await;
}

#[tokio::test]
async fn close_delimited_answers_http_1_0_and_connection_close_pass_whole() {
    let http10 = Box::leak(
        format!("HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{JSON}").into_boxed_str(),
    );
    let up = RawUpstream::start(http10.as_bytes(), true).await;
    through_both(up.url(), 200, JSON.as_bytes(), &[]).await;
    let close = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{JSON}"
        )
        .into_boxed_str(),
    );
    let up = RawUpstream::start(close.as_bytes(), true).await;
    through_both(up.url(), 200, JSON.as_bytes(), &[]).await;
}

#[tokio::test]
async fn a_chunked_429_reaches_the_client_as_a_429_with_its_body_and_retry_after() {
    let body = r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#;
    let up = RawUpstream::start(
        chunked(
            "429 Too Many Requests",
            "content-type: application/json\r\nretry-after: 30\r\n",
            &[&body[..20], &body[20..]],
        ),
        false,
    )
    .await;
    through_both(
        up.url(),
        429,
        body.as_bytes(),
        &[("retry-after", "30"), ("x-should-retry", "false")],
    )
    .await;
}

#[tokio::test]
async fn a_chunked_404_and_an_empty_chunked_200_pass_as_sent() {
    let body = r#"{"error":{"message":"no such file","type":"invalid_request_error"}}"#;
    let up = RawUpstream::start(
        chunked(
            "404 Not Found",
            "content-type: application/json\r\n",
            &[body],
        ),
        false,
    )
    .await;
    through_both(up.url(), 404, body.as_bytes(), &[]).await;
    let up = RawUpstream::start(
        chunked("200 OK", "content-type: application/json\r\n", &[]),
        false,
    )
    .await;
    through_both(up.url(), 200, b"", &[]).await;
}

#[tokio::test]
async fn a_gzip_encoded_json_answer_passes_compressed_as_sent() {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(JSON.as_bytes()).unwrap();
    let gz = encoder.finish().unwrap();
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
        gz.len()
    )
    .into_bytes();
    response.extend_from_slice(&gz);
    let up = RawUpstream::start(Box::leak(response.into_boxed_slice()), false).await;
    through_both(up.url(), 200, &gz, &[("content-encoding", "gzip")]).await;
}

#[tokio::test]
async fn an_sse_stream_passes_event_by_event() {
    let events = [
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: [DONE]\n\n",
    ];
    let up = RawUpstream::start(
        chunked(
            "200 OK",
            "content-type: text/event-stream\r\ncache-control: no-cache\r\n",
            &events,
        ),
        false,
    )
    .await;
    through_both(
        up.url(),
        200,
        events.concat().as_bytes(),
        &[("content-type", "text/event-stream")],
    )
    .await;
}

/// A hyper upstream: `http2` serves h2c (prior knowledge), else HTTP/1.1; `streamed` sends the
/// body as two frames of unknown length (chunked on HTTP/1.1), else one `Full` (content-length).
async fn hyper_upstream(status: u16, http2: bool, streamed: bool) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                move |_: http::Request<hyper::body::Incoming>| async move {
                    let body = if streamed {
                        http_body_util::Either::Left(Chunks(
                            [&JSON[..7], &JSON[7..]].map(Bytes::from_static_str).into(),
                        ))
                    } else {
                        http_body_util::Either::Right(Full::new(Bytes::from_static(
                            JSON.as_bytes(),
                        )))
                    };
                    let mut r = http::Response::new(body);
                    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, Infallible>(r)
                },
            );
            let io = TokioIo::new(tcp);
            if http2 {
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service),
                );
            } else {
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service),
                );
            }
        }
    });
    addr
}

trait FromStaticStr {
    fn from_static_str(s: &'static str) -> Bytes;
}
impl FromStaticStr for Bytes {
    fn from_static_str(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }
}

/// A body of several frames and no known length.
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn hyper_upstreams_each_way_pass_through_http1_full_and_streamed_and_h2c() {
    for status in [200, 503] {
        for (http2, streamed) in [(false, false), (false, true), (true, false), (true, true)] {
            let addr = hyper_upstream(status, http2, streamed).await;
            let mut c = one_target(format!("http://{addr}/v1"));
            c["upstream_h2c"] = http2.into();
            let gw = gateway(c, &[]).await;
            let raw_response = raw(gw.addr, &chat_post("", CHAT)).await;
            let (head, _) = split(&raw_response);
            let case = format!("status {status}, http2 {http2}, streamed {streamed}");
            assert!(
                head.starts_with(&format!("http/1.1 {status} ")),
                "{case}: {head}"
            );
            assert_eq!(body_of(&raw_response), JSON.as_bytes(), "{case}");
            let (got, _, body) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
            assert_eq!(
                (got.as_u16(), &body[..]),
                (status, JSON.as_bytes()),
                "{case}"
            );
        }
    }
}

#[tokio::test]
async fn an_h2c_client_gets_a_chunked_upstream_answer_with_its_hop_by_hop_headers_removed() {
    // Connection-specific headers are illegal in HTTP/2: passed on, the stream would fail.
    let body = r#"{"error":{"message":"slow down"}}"#;
    let up = RawUpstream::start(
        chunked(
            "429 Too Many Requests",
            "content-type: application/json\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nretry-after: 3\r\n",
            &[body],
        ),
        false,
    )
    .await;
    let gw = gateway(one_target(up.url()), &[]).await;
    let response = h2c_chat(gw.url("/v1/chat/completions"), CHAT)
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    let got = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&got[..], body.as_bytes());
}
