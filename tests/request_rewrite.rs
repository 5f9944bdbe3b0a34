//! What each target receives on the wire: its own model, its own key only, a correct
//! content-length, the caller's other headers and exactly the caller's bytes outside the model.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tower::ServiceExt;
use tower_model_fallback::{FallbackLayer, FallbackReport, Target};

const ODD_BODY: &str = "{ \"messages\" : [ {\"role\":\"user\",\"content\":\"caf\\u00e9 \\\"quoted\\\" \u{1F600}\",\"model\":\"nested-stays\"} ],\n\t\"model\" :\"caller-model\" , \"temperature\": 0.50, \"big\": 12345678901234567890, \"huge\": 1e400 }";

#[tokio::test]
async fn after_a_503_the_fallback_gets_its_own_model_and_key_and_the_callers_bytes() {
    let primary = Upstream::fixed(503, r#"{"error":{"message":"overloaded"}}"#).await;
    let fallback = Upstream::chat("hello").await;
    let layer = FallbackLayer::new([
        Target::new(primary.url_with("/v1"))
            .unwrap()
            .with_name("primary")
            .with_model("model-a")
            .bearer("key-primary")
            .unwrap(),
        Target::new(fallback.url_with("/v1"))
            .unwrap()
            .with_name("fallback")
            .with_model("model-\"b\"")
            .api_key_header("x-api-key", "key-fallback")
            .unwrap()
            .header("x-target-only", "fallback")
            .unwrap(),
    ])
    .unwrap();
    // As a proxy's server sees an HTTP/2 request: with its own authority, which is replaced.
    let request = Request::post("http://ignored.example:9999/chat/completions?trace=1&x=%20")
        .version(http::Version::HTTP_2)
        .header("content-type", "application/json")
        .header("authorization", "Bearer caller-key")
        .header("api-key", "caller-azure-key")
        .header("x-request-id", "req-42")
        .header("user-agent", "OpenAI/Python 1.0")
        .header("connection", "keep-alive")
        .header("content-length", ODD_BODY.len().to_string())
        .body(Full::new(Bytes::from_static(ODD_BODY.as_bytes())))
        .unwrap();
    let response = stack(&layer).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap();
    assert_eq!(report.requested_model(), Some("caller-model"));
    assert_eq!(report.served_by().unwrap().model(), Some("model-\"b\""));

    let p = &primary.requests()[0];
    let f = &fallback.requests()[0];
    assert_eq!(p.uri, "/v1/chat/completions?trace=1&x=%20");
    assert_eq!(f.uri, "/v1/chat/completions?trace=1&x=%20");
    assert_eq!(p.header("host"), Some(primary.addr.to_string().as_str()));
    assert_eq!(f.header("host"), Some(fallback.addr.to_string().as_str()));

    // Credentials: each target its own, never the caller's, never the other target's.
    assert_eq!(p.header("authorization"), Some("Bearer key-primary"));
    assert_eq!(p.header("x-api-key"), None);
    assert_eq!(f.header("x-api-key"), Some("key-fallback"));
    assert_eq!(f.header("authorization"), None);
    for seen in [p, f] {
        assert_eq!(seen.header("api-key"), None);
        let all: String = seen
            .headers
            .iter()
            .map(|(_, v)| v.to_str().unwrap_or(""))
            .collect();
        assert!(!all.contains("caller-key") && !all.contains("caller-azure-key"));
        assert_eq!(seen.header("x-request-id"), Some("req-42"));
        assert_eq!(seen.header("user-agent"), Some("OpenAI/Python 1.0"));
        assert_eq!(
            seen.header("content-length").unwrap(),
            seen.body.len().to_string()
        );
    }
    assert_eq!(f.header("x-target-only"), Some("fallback"));
    assert_eq!(p.header("x-target-only"), None);

    // Bytes: identical outside the model value.
    let expect = |lit: &str| ODD_BODY.replace("\"caller-model\"", lit);
    assert_eq!(std::str::from_utf8(&p.body).unwrap(), expect("\"model-a\""));
    assert_eq!(
        std::str::from_utf8(&f.body).unwrap(),
        expect("\"model-\\\"b\\\"\"")
    );
    assert_eq!(f.json()["messages"][0]["model"], "nested-stays");
}

#[tokio::test]
async fn a_target_without_a_model_sends_the_callers_model_and_the_report_says_so() {
    let primary = Upstream::chat("same model").await;
    let layer = FallbackLayer::new([Target::new(primary.url_with("/v1")).unwrap()]).unwrap();
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    let report = response.extensions().get::<FallbackReport>().unwrap();
    let attempt = report.served_by().unwrap();
    assert_eq!(attempt.model(), Some("caller-model"));
    assert!(!attempt.model_substituted());
    assert_eq!(&primary.requests()[0].body[..], CHAT.as_bytes());
}

#[tokio::test]
async fn a_body_without_a_model_gets_one() {
    let primary = Upstream::chat("inserted").await;
    let layer = FallbackLayer::new([Target::new(primary.url_with("/v1"))
        .unwrap()
        .with_model("m")])
    .unwrap();
    let response = stack(&layer)
        .oneshot(chat_request(r#"{"messages":[]}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        &primary.requests()[0].body[..],
        br#"{"model":"m","messages":[]}"#
    );
}

#[tokio::test]
async fn get_requests_and_non_json_bodies_go_through_unchanged() {
    let primary = Upstream::fixed(200, r#"{"data":[]}"#).await;
    let layer = FallbackLayer::new([Target::new(primary.url_with("/v1"))
        .unwrap()
        .with_model("m")])
    .unwrap();
    let svc = stack(&layer);
    let get = Request::get("/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = svc.clone().oneshot(get).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = response.extensions().get::<FallbackReport>().unwrap();
    assert!(!report.served_by().unwrap().model_substituted());
    let text = Request::post("/files")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(
            b"{\"model\":\"keep\"} not json",
        )))
        .unwrap();
    svc.oneshot(text).await.unwrap();
    let seen = primary.requests();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.path()),
        ("GET", "/v1/models")
    );
    assert!(seen[0].body.is_empty());
    assert_eq!(seen[0].header("content-length"), None);
    assert_eq!(&seen[1].body[..], b"{\"model\":\"keep\"} not json");
}

#[tokio::test]
async fn duplicate_top_level_models_are_all_substituted() {
    let primary = Upstream::chat("dup").await;
    let layer = FallbackLayer::new([Target::new(primary.url_with("/v1"))
        .unwrap()
        .with_model("m")])
    .unwrap();
    stack(&layer)
        .oneshot(chat_request(r#"{"model":"a","messages":[],"model":"b"}"#))
        .await
        .unwrap();
    assert_eq!(
        &primary.requests()[0].body[..],
        br#"{"model":"m","messages":[],"model":"m"}"#
    );
}

#[tokio::test]
async fn request_extensions_reach_the_inner_service() {
    #[derive(Clone, Debug, PartialEq)]
    struct TenantId(u32);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let inner = tower::service_fn(move |req: Request<tower_model_fallback::ReplayBody>| {
        s.lock()
            .unwrap()
            .push(req.extensions().get::<TenantId>().cloned());
        async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(503)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let layer = FallbackLayer::new([
        Target::new("http://a.test").unwrap(),
        Target::new("http://b.test").unwrap(),
    ])
    .unwrap();
    let mut request = chat_request(CHAT);
    request.extensions_mut().insert(TenantId(7));
    let response = tower::Layer::layer(&layer, inner)
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Some(TenantId(7)), Some(TenantId(7))]
    );
}

// Contract 9: a target that names a model never gets a body that still carries another one.

/// Some bytes that stand for a gzip-compressed JSON body: the layer cannot look inside.
const GZIPPED: &[u8] =
    b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xabV\xca\xcdOI\xcdQ\xb2RJ,\xae\x06\x00";

fn gzipped_request() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Full::new(Bytes::from_static(GZIPPED)))
        .unwrap()
}

#[tokio::test]
async fn a_compressed_body_skips_the_targets_with_a_model_of_their_own() {
    let with_model = Upstream::chat("wrong").await;
    let without_model = Upstream::chat("right").await;
    let layer = FallbackLayer::new([
        Target::new(with_model.url())
            .unwrap()
            .with_name("pinned")
            .with_model("their-model"),
        Target::new(without_model.url())
            .unwrap()
            .with_name("as-sent"),
    ])
    .unwrap();
    let response = stack(&layer).oneshot(gzipped_request()).await.unwrap();
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        with_model.count(),
        0,
        "the pinned target is never sent the caller's model"
    );
    let seen = &without_model.requests()[0];
    assert_eq!(
        &seen.body[..],
        GZIPPED,
        "sent exactly as the caller wrote it"
    );
    assert_eq!(seen.header("content-encoding"), Some("gzip"));
    let skip = &report.skipped()[0];
    assert_eq!(
        (skip.target(), skip.reason()),
        (
            "pinned",
            tower_model_fallback::SkipReason::BodyNotRewritable
        )
    );
    assert_eq!(report.served_by().unwrap().target(), "as-sent");
    assert!(report.fell_back(), "served past its first choice");
}

#[tokio::test]
async fn a_compressed_body_no_target_can_take_is_an_error_and_nothing_is_sent() {
    let a = Upstream::chat("a").await;
    let b = Upstream::chat("b").await;
    let layer = FallbackLayer::new([
        Target::new(a.url())
            .unwrap()
            .with_name("a")
            .with_model("model-a"),
        Target::new(b.url())
            .unwrap()
            .with_name("b")
            .with_model("model-b"),
    ])
    .unwrap();
    let error = stack(&layer).oneshot(gzipped_request()).await.unwrap_err();
    assert!(error.is_body_not_rewritable(), "{error}");
    assert!(error.is_nothing_sent());
    assert!(error.to_string().contains("gzip"), "{error}");
    assert_eq!(error.report().skipped().len(), 2);
    assert_eq!((a.count(), b.count()), (0, 0));
}
