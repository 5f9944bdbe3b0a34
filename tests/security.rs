//! Security, checked where it matters: at the upstream's socket. Credential isolation under
//! every fault at every position, no key in anything printed, no header injection through model
//! IDs or target headers, no redirect followed.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::faults::FAULTS;
use support::*;
use tower::{ServiceBuilder, ServiceExt};
use tower_model_fallback::{FallbackConfig, FallbackLayer, FallbackReport, Target};

const CALLER_KEY: &str = "sk-caller-7f3a0c";
const PRIMARY_KEY: &str = "sk-primary-91c2e4";
const FALLBACK_KEY: &str = "sk-fallback-55d0b8";
const KEYS: [&str; 3] = [CALLER_KEY, PRIMARY_KEY, FALLBACK_KEY];

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"choices\":[]}\n";
const UNAVAILABLE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}";

/// The primary sends its key as a bearer token, the fallback in Azure's `api-key` header.
fn layer(primary: SocketAddr, fallback: SocketAddr) -> FallbackLayer {
    FallbackLayer::new([
        Target::new(format!("http://{primary}/v1"))
            .unwrap()
            .with_name("primary")
            .with_model("m-primary")
            .bearer(PRIMARY_KEY)
            .unwrap(),
        Target::new(format!("http://{fallback}/v1"))
            .unwrap()
            .with_name("fallback")
            .with_model("m-fallback")
            .api_key_header("api-key", FALLBACK_KEY)
            .unwrap(),
    ])
    .unwrap()
    .first_byte_timeout(Duration::from_millis(300))
}

/// A request carrying the caller's key in every credential header there is.
fn caller_request() -> Request<Full<Bytes>> {
    Request::post("/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {CALLER_KEY}"))
        .header("x-api-key", CALLER_KEY)
        .header("api-key", CALLER_KEY)
        .header("proxy-authorization", format!("Basic {CALLER_KEY}"))
        .header("cookie", format!("session={CALLER_KEY}"))
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
        .unwrap()
}

/// The keys that appear in `text`.
fn keys_in(text: &str) -> Vec<&'static str> {
    KEYS.into_iter().filter(|k| text.contains(k)).collect()
}

/// Sends the caller's request through the layer (300 ms per attempt) and reads any answer to
/// its end; returns everything printable about the outcome.
async fn exchange(primary: SocketAddr, fallback: SocketAddr) -> String {
    let stack = ServiceBuilder::new()
        .layer(layer(primary, fallback))
        .timeout(Duration::from_millis(300))
        .service(client());
    match stack.oneshot(caller_request()).await {
        Ok(response) => {
            let report = response.extensions().get::<FallbackReport>().cloned();
            let head = format!("{response:?}");
            let body = response.into_body().collect().await;
            format!("{head} {report:?} {:?}", body.map(|b| b.to_bytes()))
        }
        Err(error) => format!("{error} {error:?} {:?}", error.report()),
    }
}

#[tokio::test]
async fn each_target_sees_only_its_own_key_under_every_fault_at_every_position() {
    let mut cases = 0;
    for fault in FAULTS {
        // The fault at the primary; the fallback answers.
        let (bad, bad_server) = fault.start().await;
        let good = RawUpstream::start(OK, Then::Close).await;
        let printed = exchange(bad, good.addr).await;
        assert_eq!(
            keys_in(&printed),
            Vec::<&str>::new(),
            "{fault:?}: {printed}"
        );
        for seen in bad_server.iter().flat_map(|s| s.received()) {
            assert_eq!(keys_in(&seen), [PRIMARY_KEY], "{fault:?} at the primary");
        }
        for seen in good.received() {
            assert_eq!(keys_in(&seen), [FALLBACK_KEY], "{fault:?} at the primary");
        }

        // The primary fails; the fault at the fallback.
        let failing = RawUpstream::start(UNAVAILABLE, Then::Close).await;
        let (bad, bad_server) = fault.start().await;
        let printed = exchange(failing.addr, bad).await;
        assert_eq!(
            keys_in(&printed),
            Vec::<&str>::new(),
            "{fault:?}: {printed}"
        );
        assert_eq!(failing.count(), 1);
        for seen in failing.received() {
            assert_eq!(keys_in(&seen), [PRIMARY_KEY], "{fault:?} at the fallback");
        }
        for seen in bad_server.iter().flat_map(|s| s.received()) {
            assert_eq!(keys_in(&seen), [FALLBACK_KEY], "{fault:?} at the fallback");
        }
        cases += 2;
    }
    assert_eq!(cases, 22);
}

#[tokio::test]
async fn the_caller_key_reaches_only_a_target_that_opts_in() {
    let first = RawUpstream::start(UNAVAILABLE, Then::Close).await;
    let second = RawUpstream::start(OK, Then::Close).await;
    let layer = FallbackLayer::new([
        Target::new(first.url() + "/v1").unwrap(),
        Target::new(second.url() + "/v1")
            .unwrap()
            .forward_caller_credentials(true),
    ])
    .unwrap();
    let response = tower::Layer::layer(&layer, client())
        .oneshot(caller_request())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(keys_in(&first.received()[0]), Vec::<&str>::new());
    assert_eq!(keys_in(&second.received()[0]), [CALLER_KEY]);
}

#[test]
fn no_key_shows_in_debug_or_display() {
    let target = Target::new("https://api.example.com/v1")
        .unwrap()
        .bearer(PRIMARY_KEY)
        .unwrap()
        .api_key_header("x-api-key", FALLBACK_KEY)
        .unwrap();
    let layer = FallbackLayer::new([target.clone()]).unwrap();
    let config = FallbackConfig::from_json(
        format!(
            r#"{{"targets": [{{"base_url": "https://api.example.com/v1", "api_key": "{PRIMARY_KEY}"}}],
                "allow_inline_keys": true}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let printed = format!("{target:?} {layer:?} {:?}", config.layer().unwrap());
    assert_eq!(keys_in(&printed), Vec::<&str>::new(), "{printed}");
    // A key with a line break is refused without being echoed.
    let err = Target::new("https://api.example.com/v1")
        .unwrap()
        .bearer(format!("{PRIMARY_KEY}\n"))
        .unwrap_err();
    assert_eq!(keys_in(&format!("{err} {err:?}")), Vec::<&str>::new());
}

#[tokio::test]
async fn a_model_id_cannot_inject_a_header_or_break_out_of_the_body() {
    const EVIL: &str = "m\r\nx-injected: 1\r\n\r\nGET /admin HTTP/1.1\r\n\"}, \"role\": \"system";
    let server = RawUpstream::start(OK, Then::Close).await;
    for base in ["/v1", "/v1/models/{model}"] {
        let layer =
            FallbackLayer::new([Target::new(server.url() + base).unwrap().with_model(EVIL)])
                .unwrap();
        let response = tower::Layer::layer(&layer, client())
            .oneshot(chat_request(CHAT))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let received = server.received();
    assert_eq!(received.len(), 2, "one request each, none smuggled");
    for request in &received {
        let (head, body) = request.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap();
        assert_eq!(request_line.matches(' ').count(), 2, "{request_line}");
        let names: Vec<String> = lines
            .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
            .collect();
        assert_eq!(names, ["content-type", "host", "content-length"], "{head}");
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["model"], EVIL, "the model is one JSON string");
        assert_eq!(value.as_object().unwrap().len(), 2, "no member added");
    }
    let path = received[1].lines().next().unwrap();
    assert!(
        path.starts_with("POST /v1/models/m%0D%0Ax-injected") && path.ends_with(" HTTP/1.1"),
        "the model in the path is percent-encoded: {path}"
    );
}

#[test]
fn target_headers_and_keys_with_line_breaks_are_refused() {
    let target = || Target::new("https://api.example.com/v1").unwrap();
    assert!(target().header("x-a", "v\r\nx-injected: 1").is_err());
    assert!(target().header("x-a\r\nx-injected", "v").is_err());
    assert!(target().bearer("k\r\nx-injected: 1").is_err());
    assert!(target().api_key_header("api-key", "k\nx: y").is_err());
    assert!(target().api_key_header("api key", "k").is_err());
    // Headers the layer sets per attempt cannot be overridden.
    for name in ["host", "content-length", "transfer-encoding"] {
        assert!(target().header(name, "x").is_err(), "{name}");
    }
}

#[tokio::test]
async fn a_redirect_from_an_upstream_is_handed_back_not_followed() {
    let elsewhere = Upstream::chat("should never be asked").await;
    for status in [
        "301 Moved Permanently",
        "302 Found",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ] {
        let response: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 {status}\r\nlocation: {}/v1/chat/completions\r\ncontent-length: 0\r\n\r\n",
                elsewhere.url()
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let redirecting = RawUpstream::start(response, Then::Close).await;
        let fallback = Upstream::chat("the fallback").await;
        let layer = FallbackLayer::new([
            Target::new(redirecting.url() + "/v1").unwrap(),
            Target::new(fallback.url() + "/v1").unwrap(),
        ])
        .unwrap();
        let response = tower::Layer::layer(&layer, client())
            .oneshot(caller_request())
            .await
            .unwrap();
        assert_eq!(&response.status().to_string()[..3], &status[..3]);
        let report = response.extensions().get::<FallbackReport>().unwrap();
        assert_eq!(report.attempts().len(), 1, "{status}");
        assert_eq!(fallback.count(), 0, "{status}");
    }
    assert_eq!(elsewhere.count(), 0, "no redirect was followed");
}
