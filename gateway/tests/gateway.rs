//! The gateway on 127.0.0.1: fallback with headers that say so, error answers passed through,
//! OpenAI-shaped errors of its own, streaming through it, config errors and graceful shutdown.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_model_fallback_gateway::GatewayConfig;

const OK_JSON: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"model\":\"seen\"}\n";

const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

fn two(a: &RawUpstream, b: &RawUpstream) -> serde_json::Value {
    let mut c = config(&[("primary", a.url()), ("fallback", b.url())]);
    c["targets"][0]["api_key_env"] = "A_KEY".into();
    c["targets"][1]["api_key_env"] = "B_KEY".into();
    c["max_body_bytes"] = 4096.into();
    c
}

const KEYS: [(&str, &str); 2] = [("A_KEY", "key-a"), ("B_KEY", "key-b")];

#[tokio::test]
async fn a_503_from_the_primary_is_served_by_the_fallback_with_its_model_key_and_headers() {
    let primary = RawUpstream::start(BUSY, false).await;
    let fallback = RawUpstream::start(OK_JSON, false).await;
    let gw = gateway(two(&primary, &fallback), &KEYS).await;
    let (status, headers, body) = post(
        &gw.url("/v1/chat/completions"),
        &[("authorization", "Bearer the-callers-own-key")],
        CHAT,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-fallback-target"], "fallback");
    assert_eq!(headers["x-fallback-model"], "model-fallback");
    assert_eq!(headers["x-fallback-attempts"], "2");
    assert_eq!(&body[..], b"{\"model\":\"seen\"}\n");
    let seen = &fallback.received()[0];
    assert!(
        seen.starts_with("POST /v1/chat/completions HTTP/1.1"),
        "the /v1 prefix is not doubled: {seen}"
    );
    assert!(seen.contains("\"model\":\"model-fallback\""), "{seen}");
    assert!(
        seen.to_lowercase().contains("authorization: bearer key-b"),
        "{seen}"
    );
    assert!(!seen.contains("the-callers-own-key"), "{seen}");
    assert!(primary.received()[0]
        .to_lowercase()
        .contains("authorization: bearer key-a"));
}

#[tokio::test]
async fn an_upstream_400_is_passed_through_unchanged_and_not_retried() {
    let primary = RawUpstream::start(
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{\"error\":{\"message\":\"bad\",\"code\":null}}\n",
        false,
    )
    .await;
    let fallback = RawUpstream::start(OK_JSON, false).await;
    let gw = gateway(two(&primary, &fallback), &KEYS).await;
    let (status, headers, body) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(status, 400);
    assert_eq!(headers["x-fallback-attempts"], "1");
    assert!(headers.get("x-should-retry").is_none());
    assert_eq!(
        &body[..],
        b"{\"error\":{\"message\":\"bad\",\"code\":null}}\n"
    );
    assert_eq!(fallback.count(), 0);
}

#[tokio::test]
async fn oversize_invalid_json_and_unknown_routes_get_openai_shaped_errors_and_send_nothing() {
    let primary = RawUpstream::start(OK_JSON, false).await;
    let fallback = RawUpstream::start(OK_JSON, false).await;
    let gw = gateway(two(&primary, &fallback), &KEYS).await;
    let url = gw.url("/v1/chat/completions");
    let big = format!(r#"{{"model":"x","pad":"{}"}}"#, "p".repeat(5000));
    for (body, path, status, code) in [
        (
            big.as_str(),
            "/v1/chat/completions",
            413,
            "request_too_large",
        ),
        (
            r#"{"model": "x", "messages": [}"#,
            "/v1/chat/completions",
            400,
            "invalid_json",
        ),
        (CHAT, "/admin", 404, "not_found"),
        (CHAT, "/v1x/chat", 404, "not_found"),
    ] {
        let _ = &url;
        let (got, _, answer) = post(&gw.url(path), &[], body.to_owned()).await;
        assert_eq!(got, status, "{path}");
        let json: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(json["error"]["code"], code);
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert!(json["error"]["message"].is_string());
    }
    assert_eq!(primary.count() + fallback.count(), 0);
}

#[tokio::test]
async fn a_streamed_answer_passes_through_the_gateway_chunk_by_chunk() {
    // An upstream that sends its first event, then waits for the test before the last one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let _ = tcp.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let first = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        tcp.write_all(format!("{head}{:x}\r\n{first}\r\n", first.len()).as_bytes())
            .await
            .unwrap();
        let _ = go_rx.await;
        let last = "data: [DONE]\n\n";
        tcp.write_all(format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len()).as_bytes())
            .await
            .unwrap();
    });
    let mut c = config(&[("only", format!("http://{addr}/v1"))]);
    c["cooldown"] = "off".into();
    let gw = gateway(c, &[]).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&chat_post("", r#"{"model":"m","stream":true}"#))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&got, b"\"Hi\"").is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .expect("the first event arrives before the stream ends")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(find(&got, b"[DONE]").is_none());
    go_tx.send(()).unwrap();
    got.extend(read_to_close(&mut tcp).await);
    assert!(String::from_utf8_lossy(&body_of(&got)).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_and_refuses_new_connections() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let _ = tcp.read(&mut buf).await;
        let _ = seen_tx.send(());
        let _ = go_rx.await;
        tcp.write_all(OK_JSON).await.unwrap();
    });
    let mut c = config(&[("slow", format!("http://{addr}/v1"))]);
    c["cooldown"] = "off".into();
    let mut gw = gateway(c, &[]).await;
    let url = gw.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move { post(&url, &[], CHAT).await.0 });
    seen_rx.await.unwrap();
    gw.stop.take().unwrap().send(()).unwrap();
    // Accepting stops at once.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(gw.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener is closed");
    assert!(
        !gw.task.is_finished(),
        "the server waits for the request in flight"
    );
    go_tx.send(()).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(5), gw.task)
        .await
        .expect("the server stopped")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn after_the_shutdown_timeout_a_hung_request_is_cut_and_serve_returns() {
    // The upstream takes the request and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(tcp);
    });
    let mut c = config(&[("hung", format!("http://{addr}/v1"))]);
    c["attempt_timeout_ms"] = 3_600_000.into();
    c["shutdown_timeout_ms"] = 2000.into();
    let mut gw = gateway(c, &[]).await;
    let mut client = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    client.write_all(&chat_post("", CHAT)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    gw.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), &mut gw.task)
        .await
        .expect("serve returns after the shutdown timeout")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // The cut connection is closed: the client reads its end.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[test]
fn bad_configs_name_the_field_and_the_problem() {
    let ok_target = r#"{"base_url": "http://127.0.0.1:9/v1", "api_key_env": "A_KEY"}"#;
    for (json, expected) in [
        (
            format!(r#"{{"targets": [{ok_target}], "colour": "blue"}}"#),
            "colour: unknown field `colour`",
        ),
        (
            r#"{"targets": [{"base_url": "not a url"}]}"#.to_owned(),
            "targets[0].base_url: \"not a url\" is a relative URL",
        ),
        (
            r#"{"targets": []}"#.to_owned(),
            "targets: at least one target is required",
        ),
        (
            format!(r#"{{"listen": "nowhere", "targets": [{ok_target}]}}"#),
            "listen: \"nowhere\" is not an address",
        ),
        (
            format!(r#"{{"clients": [{{"name": "web"}}], "targets": [{ok_target}]}}"#),
            "clients: missing field `key_env`",
        ),
        (
            format!(r#"{{"listen": "0.0.0.0:8080", "targets": [{ok_target}]}}"#),
            "clients: are required to listen on 0.0.0.0:8080",
        ),
        (
            format!(
                r#"{{"clients": [{{"name": "web", "key_env": "NOT_SET"}}], "targets": [{ok_target}]}}"#
            ),
            "clients[0].key_env: environment variable NOT_SET is not set",
        ),
        ("[]".to_owned(), "config: expected a JSON object"),
    ] {
        let err = GatewayConfig::from_json(json.as_bytes()).and_then(|c| {
            tower_model_fallback_gateway::Gateway::new(&c, |v| {
                (v != "NOT_SET").then(|| "k".to_owned())
            })
            .map(|_| ())
        });
        let err = err.expect_err(&json).to_string();
        assert!(err.starts_with(expected), "{json}\n  gave: {err}");
    }
    let anonymous = format!(
        r#"{{"listen": "0.0.0.0:8080", "allow_anonymous": true, "targets": [{ok_target}]}}"#
    );
    let config = GatewayConfig::from_json(anonymous.as_bytes()).unwrap();
    assert!(tower_model_fallback_gateway::Gateway::new(&config, |_| Some("k".into())).is_ok());
}
