//! The `otel` feature with the real binary: traces over OTLP/HTTP to a receiver this test runs
//! on 127.0.0.1, decoded and checked span by span; a collector that is down costs the clients
//! nothing; `--check-config` names the `otel` field at fault. Real processes, real time: every
//! wait is bounded.
#![cfg(feature = "otel")]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::process::{config_file, free_addr, listening, run, serve, Killed};
use support::*;

const PRIMARY_KEY: &str = "sk-primary-target-secret";
const FALLBACK_KEY: &str = "sk-fallback-target-secret";
const COLLECTOR_KEY: &str = "collector-header-secret";

/// What the receiver got: each export's headers and body.
type Exports = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;

/// An OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces` is kept and answered 200 with an
/// empty `ExportTraceServiceResponse` (zero bytes of protobuf); anything else is a 404.
async fn receiver() -> (SocketAddr, Exports) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let exports = Exports::default();
    let kept = exports.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let kept = kept.clone();
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let kept = kept.clone();
                async move {
                    let (head, body) = request.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let status =
                        if head.method == http::Method::POST && head.uri.path() == "/v1/traces" {
                            kept.lock().unwrap().push((head.headers, body));
                            200
                        } else {
                            404
                        };
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/x-protobuf")
                        .body(Full::new(Bytes::new()))
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    (addr, exports)
}

/// The real binary over a primary that answers 503 and a fallback that answers 200 with usage,
/// each with its own key; the client `web`; text logs to a file; `otel` as given.
struct Running {
    child: Killed,
    listen: SocketAddr,
    primary: RawUpstream,
    fallback: RawUpstream,
    path: String,
    log: std::path::PathBuf,
}

impl Running {
    /// Spawns it and waits (bounded) until it listens.
    async fn start(name: &str, otel: serde_json::Value) -> Running {
        let primary = RawUpstream::start(DOWN, false).await;
        let fallback = RawUpstream::start(OK_WITH_USAGE, false).await;
        let listen = free_addr();
        let mut config = with_client(config(&[
            ("primary", primary.url()),
            ("fallback", fallback.url()),
        ]));
        config["targets"][0]["api_key_env"] = "OTEL_TEST_PRIMARY_KEY".into();
        config["targets"][1]["api_key_env"] = "OTEL_TEST_FALLBACK_KEY".into();
        config["listen"] = listen.to_string().into();
        config["log_format"] = "text".into();
        config["otel"] = otel;
        let path = config_file(name, &config.to_string());
        let log = std::env::temp_dir().join(format!("tmf-{name}-{}.log", std::process::id()));
        let env = [
            ("WEB_KEY", KEY),
            ("OTEL_TEST_PRIMARY_KEY", PRIMARY_KEY),
            ("OTEL_TEST_FALLBACK_KEY", FALLBACK_KEY),
            ("OTEL_TEST_COLLECTOR_KEY", COLLECTOR_KEY),
        ];
        let child = serve(&path, &log, &env);
        listening(listen).await;
        Running {
            child,
            listen,
            primary,
            fallback,
            path,
            log,
        }
    }

    /// SIGTERM; once it has ended (bounded), whether it ended well and its log.
    async fn stop(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.terminate(Duration::from_secs(30)).await;
        let stderr = std::fs::read_to_string(&self.log).unwrap();
        println!("{stderr}");
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.log);
        (status, stderr)
    }
}

/// One chat request with the client's key; it falls back from the primary to the fallback.
async fn falls_back(listen: SocketAddr) {
    let bearer = format!("Bearer {KEY}");
    let url = format!("http://{listen}/v1/chat/completions");
    let headers = [("authorization", bearer.as_str())];
    let asked = post(&url, &headers, CHAT);
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .expect("an answer within 10 s");
    assert_eq!(status, 200);
    assert_eq!(headers["x-fallback-target"], "fallback");
    assert!(body.starts_with(b"{\"choices\""));
}

/// A file asked for by its ID with `method` and the client's key; any answer will do.
async fn get_a_file(listen: SocketAddr, method: http::Method) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{listen}/v1/files/file-abc123"))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let asked = client.request(request);
    let response = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let _ = response.into_body().collect().await;
}

/// The value of attribute `key`, as text (strings as they are, integers in decimal).
fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The span's events that have attribute `key`, in order.
fn events_with<'a>(span: &'a Span, key: &str) -> Vec<&'a Event> {
    let has = |e: &&Event| e.attributes.iter().any(|kv| kv.key == key);
    span.events.iter().filter(has).collect()
}

fn attr(attributes: &[KeyValue], key: &str) -> String {
    attribute(attributes, key).unwrap_or_else(|| panic!("no {key} in {attributes:?}"))
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_is_exported_as_a_server_span_with_the_layers_span_events_and_usage() {
    let (collector, exports) = receiver().await;
    // No path: the exporter posts to /v1/traces.
    let otel = serde_json::json!({
        "endpoint": format!("http://{collector}"),
        "service_name": "gateway-under-test",
        "headers_env": {"x-collector-key": "OTEL_TEST_COLLECTOR_KEY"},
        "timeout_ms": 5000,
    });
    let gateway = Running::start("otel", otel).await;
    falls_back(gateway.listen).await;
    let upstreams = (gateway.primary.count(), gateway.fallback.count());
    // A path with an ID in it: the span is named by its method alone (low-cardinality names).
    get_a_file(gateway.listen, http::Method::GET).await;
    // A method outside HTTP's own, not idempotent: one target only, whose 503 is the answer.
    get_a_file(gateway.listen, http::Method::from_bytes(b"QUERY").unwrap()).await;
    // The spans are queued for the next batch; shutting down exports them.
    let (status, stderr) = gateway.stop().await;
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(upstreams, (1, 1));

    let exports = exports.lock().unwrap().clone();
    assert!(!exports.is_empty(), "nothing exported; stderr: {stderr}");
    let mut spans: Vec<Span> = Vec::new();
    for (headers, body) in &exports {
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert_eq!(headers["x-collector-key"], COLLECTOR_KEY);
        // No key of a target, of the client or of the collector in what left the gateway.
        for secret in [KEY, PRIMARY_KEY, FALLBACK_KEY, COLLECTOR_KEY] {
            assert!(find(body, secret.as_bytes()).is_none(), "{secret} exported");
        }
        let request = ExportTraceServiceRequest::decode(body.clone()).unwrap();
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.unwrap_or_default();
            assert_eq!(
                attr(&resource.attributes, "service.name"),
                "gateway-under-test"
            );
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    println!("exported spans: {names:?}");

    let server = spans
        .iter()
        .find(|s| s.name == "POST /v1/chat/completions")
        .unwrap_or_else(|| panic!("no server span in {names:?}"));
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert!(server.parent_span_id.is_empty(), "a root span");
    let a = &server.attributes;
    assert_eq!(attr(a, "http.request.method"), "POST");
    assert_eq!(attr(a, "http.route"), "/v1/chat/completions");
    assert_eq!(attr(a, "url.scheme"), "http");
    assert_eq!(attribute(a, "error.type"), None);
    assert_eq!(attr(a, "url.path"), "/v1/chat/completions");
    assert_eq!(attr(a, "http.response.status_code"), "200");
    assert_eq!(attr(a, "fallback_gateway.client"), "web");
    assert_eq!(attr(a, "gen_ai.usage.input_tokens"), "12");
    assert_eq!(attr(a, "gen_ai.usage.output_tokens"), "34");
    // The layer's usage event, read while the body streamed, is the server span's.
    let usage = events_with(server, "gen_ai.usage.input_tokens");
    assert_eq!(usage.len(), 1, "{:?}", server.events);
    assert_eq!(
        attr(&usage[0].attributes, "gen_ai.usage.input_tokens"),
        "12"
    );
    assert_eq!(
        attr(&usage[0].attributes, "gen_ai.usage.output_tokens"),
        "34"
    );

    let file = spans
        .iter()
        .find(|s| s.name == "GET")
        .unwrap_or_else(|| panic!("no span named GET in {names:?}"));
    assert_eq!(attr(&file.attributes, "url.path"), "/v1/files/file-abc123");
    assert_eq!(attribute(&file.attributes, "http.route"), None);
    assert!(
        !names.iter().any(|n| n.contains("file-abc123")),
        "{names:?}"
    );
    let other = spans
        .iter()
        .find(|s| s.name == "HTTP")
        .unwrap_or_else(|| panic!("no span named HTTP in {names:?}"));
    let a = &other.attributes;
    assert_eq!(attr(a, "http.request.method"), "_OTHER");
    assert_eq!(attr(a, "http.request.method_original"), "QUERY");
    assert_eq!(attr(a, "http.response.status_code"), "503");
    assert_eq!(attr(a, "error.type"), "503");
    assert_eq!(
        other.status.as_ref().map(|s| s.code),
        Some(2),
        "status error"
    );

    let layer = spans
        .iter()
        .find(|s| s.name == "model_fallback" && s.parent_span_id == server.span_id)
        .unwrap_or_else(|| panic!("no model_fallback span in {names:?}"));
    assert_eq!(layer.trace_id, server.trace_id, "one trace");
    assert_eq!(
        layer.parent_span_id, server.span_id,
        "the server span's child"
    );
    let a = &layer.attributes;
    assert_eq!(attr(a, "gen_ai.request.model"), "caller-model");
    assert_eq!(attr(a, "gen_ai.response.model"), "model-fallback");
    assert_eq!(attr(a, "gen_ai.provider.name"), "fallback");
    // One event per attempt: the first to the primary, the second a resend to the fallback.
    let attempts = events_with(layer, "gen_ai.provider.name");
    assert_eq!(attempts.len(), 2, "{:?}", layer.events);
    let first = &attempts[0].attributes;
    assert_eq!(attr(first, "gen_ai.provider.name"), "primary");
    assert_eq!(attr(first, "gen_ai.request.model"), "model-primary");
    assert_eq!(attribute(first, "http.request.resend_count"), None);
    let second = &attempts[1].attributes;
    assert_eq!(attr(second, "gen_ai.provider.name"), "fallback");
    assert_eq!(attr(second, "gen_ai.request.model"), "model-fallback");
    assert_eq!(attr(second, "http.request.resend_count"), "1");

    // The log lines are as without OpenTelemetry (one a request: the chat, the GET, the QUERY):
    // no span around them, no secret.
    assert_eq!(stderr.matches(" request ").count(), 3, "{stderr}");
    for leaked in [
        "model_fallback{",
        "request{",
        "otel.name",
        COLLECTOR_KEY,
        KEY,
        PRIMARY_KEY,
        FALLBACK_KEY,
    ] {
        assert!(!stderr.contains(leaked), "{leaked} in the log: {stderr}");
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_the_clients_nothing_and_is_logged() {
    let nobody = free_addr();
    let otel =
        serde_json::json!({"endpoint": format!("http://{nobody}/v1/traces"), "timeout_ms": 500});
    let gateway = Running::start("otel-down", otel).await;
    for _ in 0..3 {
        falls_back(gateway.listen).await;
    }
    let (status, stderr) = gateway.stop().await;
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stderr.matches(" request ").count(), 3, "{stderr}");
    assert!(
        stderr.contains("ExportError"),
        "the failed export is logged: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_config_names_the_otel_field_at_fault() {
    let target = r#"{"name": "a", "base_url": "http://127.0.0.1:9/v1"}"#;
    let file = |otel: &str| format!(r#"{{"targets": [{target}], "otel": {otel}}}"#);
    let env = [("OTEL_CHECK_KEY", "secret-in-env")];
    let valid = config_file(
        "otel-valid",
        &file(
            r#"{"endpoint": "http://127.0.0.1:4318", "headers_env": {"x-api-key": "OTEL_CHECK_KEY"}}"#,
        ),
    );
    let ok = run(&["--check-config", &valid], &env);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("traces to http://127.0.0.1:4318/v1/traces"),
        "{stdout}"
    );
    for (name, otel, expected) in [
        (
            "bad-url",
            r#"{"endpoint": "http://exa mple:4318"}"#,
            "otel.endpoint: is not a URL",
        ),
        (
            "scheme",
            r#"{"endpoint": "grpc://127.0.0.1:4317"}"#,
            "otel.endpoint: must be an http:// or https:// URL",
        ),
        (
            "empty",
            r#"{"endpoint": ""}"#,
            "otel.endpoint: must not be empty",
        ),
        (
            "no-endpoint",
            r#"{"service_name": "gw"}"#,
            "otel.endpoint: is required",
        ),
        (
            "credentials",
            r#"{"endpoint": "https://user:hunter2@collector.example"}"#,
            "otel.endpoint: holds credentials",
        ),
        (
            "missing-env",
            r#"{"endpoint": "http://127.0.0.1:4318", "headers_env": {"x-api-key": "OTEL_CHECK_MISSING"}}"#,
            "otel.headers_env.x-api-key: environment variable OTEL_CHECK_MISSING is not set",
        ),
        (
            "header-name",
            r#"{"endpoint": "http://127.0.0.1:4318", "headers_env": {"bad header": "OTEL_CHECK_KEY"}}"#,
            "otel.headers_env.bad header: is not a valid header name",
        ),
        (
            "timeout",
            r#"{"endpoint": "http://127.0.0.1:4318", "timeout_ms": 0}"#,
            "otel.timeout_ms: must be from 1 to 60000",
        ),
        (
            "timeout-long",
            r#"{"endpoint": "http://127.0.0.1:4318", "timeout_ms": 600000}"#,
            "otel.timeout_ms: must be from 1 to 60000",
        ),
        (
            "query",
            r#"{"endpoint": "https://collector.example/v1/traces?api_key=hunter2"}"#,
            "otel.endpoint: has a query; give credentials as headers in headers_env",
        ),
        (
            "exporter-header",
            r#"{"endpoint": "http://127.0.0.1:4318", "headers_env": {"Content-Type": "OTEL_CHECK_KEY"}}"#,
            "otel.headers_env.Content-Type: is set by the exporter or the connection",
        ),
        (
            "twice",
            r#"{"endpoint": "http://127.0.0.1:4318", "headers_env": {"X-Key": "OTEL_CHECK_KEY", "x-key": "OTEL_CHECK_KEY"}}"#,
            "is given twice (header names are not case-sensitive)",
        ),
        (
            "unknown",
            r#"{"endpoint": "http://127.0.0.1:4318", "colour": 1}"#,
            "otel.colour: unknown field",
        ),
        (
            "not-object",
            r#""http://127.0.0.1:4318""#,
            "otel: expected an object",
        ),
    ] {
        let path = config_file(name, &file(otel));
        let out = run(&["--check-config", &path], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            !stderr.contains("hunter2") && !stderr.contains("secret-in-env"),
            "{name}: {stderr}"
        );
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(valid);
}

#[tokio::test]
async fn a_reload_that_changes_otel_serves_on_and_says_it_needs_a_restart() {
    use tower_model_fallback_gateway::{Gateway, GatewayConfig};
    let file = |endpoint: &str| {
        let json = format!(
            r#"{{"targets": [{{"base_url": "http://127.0.0.1:9/v1"}}],
                "otel": {{"endpoint": "{endpoint}"}}}}"#
        );
        GatewayConfig::from_json(json.as_bytes()).unwrap()
    };
    let running = file("http://127.0.0.1:4318");
    let gateway = Gateway::new(&running, |_| None).unwrap();
    assert_eq!(gateway.reload(&running, |_| None).unwrap(), None);
    let changed = file("http://127.0.0.1:4319");
    let expected = "changed: otel; the running server keeps what it started with until a restart";
    // Said at each reload while the file differs from what runs, not only at the first.
    for _ in 0..2 {
        let warning = gateway.reload(&changed, |_| None).unwrap();
        assert_eq!(warning.as_deref(), Some(expected));
    }
    // Back to what runs: nothing to say.
    assert_eq!(gateway.reload(&running, |_| None).unwrap(), None);
}
