//! Operating the gateway: `/metrics` in Prometheus's text format after a fallback, `/readyz`
//! while targets cool down, and a config reload under load that drops no request.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;
use tower_model_fallback_gateway::{serve, Gateway, GatewayConfig};

/// A GET with the client key (or none); the status and the body as text.
async fn get(url: &str, key: Option<&str>) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = http::Request::get(url);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn metrics_after_a_fallback_show_attempts_fallbacks_and_latency_without_keys_or_urls() {
    let (gw, _upstreams) = after_a_fallback().await;

    assert_eq!(
        get(&gw.url("/metrics"), None).await.0,
        401,
        "behind the keys"
    );
    let (status, metrics) = get(&gw.url("/metrics"), Some(KEY)).await;
    assert_eq!(status, 200);
    println!("{metrics}");
    for line in [
        r#"fallback_gateway_requests_total{outcome="success"} 1"#,
        r#"fallback_gateway_requests_total{outcome="rejected"} 1"#,
        r#"fallback_gateway_client_requests_total{client="web"} 2"#,
        r#"fallback_attempts_total{target="primary",outcome="5xx"} 1"#,
        r#"fallback_attempts_total{target="fallback",outcome="2xx"} 1"#,
        r#"fallback_fallbacks_total{from="primary",to="fallback"} 1"#,
        r#"fallback_requests_fell_back_total 1"#,
        r#"fallback_attempt_duration_seconds_count{target="primary"} 1"#,
        r#"fallback_attempt_duration_seconds_bucket{target="fallback",le="+Inf"} 1"#,
        r#"fallback_attempt_duration_seconds_bucket{target="primary",le="0.005"}"#,
        r#"fallback_attempt_duration_seconds_bucket{target="primary",le="65.536"} 1"#,
        r#"fallback_first_content_seconds_count{target="fallback"} 1"#,
        r#"fallback_tokens_total{target="fallback",model="model-fallback",kind="input"} 12"#,
        r#"fallback_tokens_total{target="fallback",model="model-fallback",kind="output"} 34"#,
        r#"fallback_targets_cooling 0"#,
        "# TYPE fallback_attempt_duration_seconds histogram",
    ] {
        assert!(metrics.contains(line), "missing {line}");
    }
    assert!(!metrics.contains(KEY) && !metrics.contains("127.0.0.1"));
    // `/stats` stays.
    let (status, stats) = get(&gw.url("/stats"), Some(KEY)).await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["fallbacks"][0]["from"], "primary");
}

#[tokio::test(start_paused = true)]
async fn readyz_is_503_with_the_reason_while_every_target_cools_down() {
    let limited = RawUpstream::limited_once(OK_WITH_USAGE).await;
    let gw = gateway(
        with_client(config(&[("only", limited.url())])),
        &[("WEB_KEY", KEY)],
    )
    .await;
    assert_eq!(
        get(&gw.url("/readyz"), Some(KEY)).await,
        (200, "ready".into())
    );
    assert_eq!(get(&gw.url("/readyz"), None).await.0, 401);
    let bearer = format!("Bearer {KEY}");
    let (status, _, _) = post(
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer)],
        CHAT,
    )
    .await;
    assert_eq!(status, 429);
    let (status, reason) = get(&gw.url("/readyz"), Some(KEY)).await;
    assert_eq!(status, 503);
    assert_eq!(
        reason,
        "not ready: every target is cooling down (only for 30 s)"
    );
    let (_, metrics) = get(&gw.url("/metrics"), Some(KEY)).await;
    assert!(metrics.contains("fallback_targets_cooling 1"), "{metrics}");
    // `/healthz` is liveness: open, and ok while not ready.
    assert_eq!(get(&gw.url("/healthz"), None).await, (200, "ok".into()));
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(get(&gw.url("/readyz"), Some(KEY)).await.0, 200);
}

/// The gateway in-process with its handle kept, to reload it.
async fn serve_gateway(config: &GatewayConfig) -> (Gateway, Running) {
    let gateway = Gateway::new(config, |_| None).expect("a gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (g, limits) = (gateway.clone(), config.into());
    let task = tokio::spawn(async move {
        serve::serve(listener, g, limits, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let running = Running {
        addr,
        stop: Some(tx),
        task,
    };
    (gateway, running)
}

fn parse(config: serde_json::Value) -> GatewayConfig {
    let mut config = config;
    config["listen"] = "127.0.0.1:0".into();
    GatewayConfig::from_json(config.to_string().as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_drops_no_request_and_keeps_the_counters_of_unchanged_targets() {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 60;
    const RELOADS: usize = 20;
    let a = RawUpstream::start(OK_WITH_USAGE, false).await;
    let b = RawUpstream::start(OK_WITH_USAGE, false).await;
    let with_a = parse(config(&[("a", a.url())]));
    let with_b = parse(config(&[("b", b.url()), ("a", a.url())]));
    let (gateway, gw) = serve_gateway(&with_a).await;
    let url = gw.url("/v1/chat/completions");
    let load: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..PER_CLIENT {
                    statuses.push(post(&url, &[], CHAT).await.0.as_u16());
                }
                statuses
            })
        })
        .collect();
    // Parsed, but no target to build a layer from: every other reload is refused.
    let invalid = GatewayConfig::from_json(br#"{"targets": []}"#).unwrap();
    for i in 0..RELOADS {
        let next = if i % 2 == 0 { &with_b } else { &with_a };
        gateway.reload(next, |_| None).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(gateway.reload(&invalid, |_| None).is_err());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut statuses = Vec::new();
    for task in load {
        statuses.extend(task.await.unwrap());
    }
    let failures = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "reload under load: {} requests from {CLIENTS} clients, {RELOADS} reloads, {failures} failures",
        statuses.len()
    );
    assert_eq!((statuses.len(), failures), (CLIENTS * PER_CLIENT, 0));
    assert_eq!(a.count() + b.count(), CLIENTS * PER_CLIENT);
    assert!(
        a.count() > 0 && b.count() > 0,
        "the load ran across the reloads"
    );
    // The last config is `with_a`; target `a` was in every config: its counters carried over.
    let stats = gateway.stats().snapshot();
    assert_eq!(stats.requests as usize, CLIENTS * PER_CLIENT);
    assert_eq!(stats.targets[0].attempts as usize, a.count());
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_running_one_keeps_serving() {
    let a = RawUpstream::start(OK_WITH_USAGE, false).await;
    let (gateway, gw) = serve_gateway(&parse(config(&[("a", a.url())]))).await;
    // Valid JSON, but a key the environment lacks: refused before anything changes.
    let missing_key = parse(serde_json::json!({
        "targets": [{"name": "b", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "NOT_SET_ANYWHERE"}]
    }));
    let err = gateway.reload(&missing_key, |_| None).unwrap_err();
    assert!(err.to_string().contains("NOT_SET_ANYWHERE"), "{err}");
    let (status, headers, _) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(
        (
            status.as_u16(),
            headers["x-fallback-target"].to_str().unwrap()
        ),
        (200, "a")
    );
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    // `slow` answers after the reload has happened.
    let (release, wait) = tokio::sync::watch::channel(false);
    let slow = RawUpstream::scripted(|_| (OK_WITH_USAGE.to_vec(), false)).await;
    let slow_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_addr = slow_listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = slow_listener.accept().await.unwrap();
        let mut wait = wait;
        let _ = wait.wait_for(|go| *go).await;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        tcp.write_all(OK_WITH_USAGE).await.unwrap();
    });
    let old = parse(config(&[("old", format!("http://{slow_addr}/v1"))]));
    let new = parse(config(&[("new", slow.url())]));
    let (gateway, gw) = serve_gateway(&old).await;
    let url = gw.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move { post(&url, &[], CHAT).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gateway.reload(&new, |_| None).unwrap();
    let (status, headers, _) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(
        (
            status.as_u16(),
            headers["x-fallback-target"].to_str().unwrap()
        ),
        (200, "new")
    );
    release.send(true).unwrap();
    let (status, headers, _) = in_flight.await.unwrap();
    assert_eq!(
        (
            status.as_u16(),
            headers["x-fallback-target"].to_str().unwrap()
        ),
        (200, "old")
    );
}

#[test]
fn a_reload_that_changes_what_the_server_started_with_says_so_at_each_reload_until_it_is_back() {
    let file = |listen: &str, idle_ms: u64| {
        let json = serde_json::json!({
            "listen": listen,
            "idle_timeout_ms": idle_ms,
            "targets": [{"base_url": "http://127.0.0.1:9/v1"}],
        });
        GatewayConfig::from_json(json.to_string().as_bytes()).unwrap()
    };
    let running = file("127.0.0.1:8080", 5000);
    let gateway = Gateway::new(&running, |_| None).unwrap();
    let moved = file("127.0.0.1:8081", 5000);
    for _ in 0..2 {
        assert_eq!(
            gateway.reload(&moved, |_| None).unwrap().as_deref(),
            Some(
                "changed: listen (127.0.0.1:8080 -> 127.0.0.1:8081); the running server keeps \
                 what it started with until a restart"
            )
        );
    }
    let warning = gateway
        .reload(&file("127.0.0.1:8080", 9000), |_| None)
        .unwrap();
    assert!(
        warning.is_some_and(|w| w.starts_with("changed: header_read_timeout_ms / idle_timeout_ms")),
        "a client-side limit"
    );
    assert_eq!(gateway.reload(&running, |_| None).unwrap(), None);
}
