//! Bad input never goes upstream with a key: dot segments, unauthenticated clients, keys that
//! must not travel; compressed bodies (gzip, deflate, br, zstd) are decompressed (bounded) and
//! then rewritten; errors a client sees name targets, never URLs, sockets, env var names or keys.

mod support;

use std::io::Write;

use support::*;

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"choices\":[]}";
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

fn assert_openai_error(response: &[u8], status: u16, code: &str) {
    let (head, _) = split(response);
    assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
    let json: serde_json::Value = serde_json::from_slice(&body_of(response)).unwrap();
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(json["error"]["message"].is_string() && json["error"]["type"].is_string());
}

#[tokio::test]
async fn paths_with_dot_segments_get_a_400_and_nothing_goes_upstream() {
    let up = RawUpstream::start(OK, false).await;
    let gw = gateway(config(&[("only", up.url())]), &[]).await;
    for path in [
        "/v1/../admin/keys",
        "/v1/%2e%2e/admin/keys",
        "/v1/%2E%2E/admin",
        "/v1/chat/%2E./x",
        "/v1/files/.%2e/x",
        "/v1/./models",
        "/v1/files/..%2fadmin",
        "/v1/..",
    ] {
        for method in ["POST", "GET", "DELETE"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{CHAT}",
                CHAT.len()
            );
            let response = raw(gw.addr, request.as_bytes()).await;
            assert_openai_error(&response, 400, "invalid_path");
        }
    }
    assert_eq!(up.count(), 0, "the upstream saw no request");
    // A dotted name that is not a dot segment goes through.
    let response = raw(
        gw.addr,
        b"GET /v1/models/gpt-4.1 HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(split(&response).0.starts_with("http/1.1 200 "));
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_path_that_repeats_v1_gets_a_400_in_the_gateways_terms_and_nothing_goes_upstream() {
    let up = RawUpstream::start(OK, false).await;
    let gw = gateway(config(&[("only", up.url())]), &[]).await;
    for path in ["/v1/v1/chat/completions", "/v1/v1"] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{CHAT}",
            CHAT.len()
        );
        let response = raw(gw.addr, request.as_bytes()).await;
        assert_openai_error(&response, 400, "invalid_path");
        let json: serde_json::Value = serde_json::from_slice(&body_of(&response)).unwrap();
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("e.g. /v1/chat/completions"), "{message}");
    }
    assert_eq!(up.count(), 0, "the upstream saw no request");
}

fn with_clients(up: &RawUpstream) -> serde_json::Value {
    let mut c = config(&[("only", up.url())]);
    c["targets"][0]["api_key_env"] = "TARGET_KEY".into();
    c["clients"] = serde_json::json!([
        {"name": "web", "key_env": "WEB_CLIENT_KEY"},
        {"name": "batch", "key_env": "BATCH_CLIENT_KEY"}
    ]);
    c
}

const ENV: [(&str, &str); 3] = [
    ("TARGET_KEY", "sk-target-key"),
    ("WEB_CLIENT_KEY", "gw-web-client-key"),
    ("BATCH_CLIENT_KEY", "gw-batch-client-key"),
];

#[tokio::test]
async fn without_a_client_key_every_route_but_healthz_is_refused_and_nothing_is_sent() {
    let up = RawUpstream::start(OK, false).await;
    let gw = gateway(with_clients(&up), &ENV).await;
    for (method, path, auth) in [
        ("POST", "/v1/chat/completions", ""),
        (
            "POST",
            "/v1/chat/completions",
            "authorization: Bearer gw-web-client-kez\r\n",
        ),
        (
            "POST",
            "/v1/chat/completions",
            "authorization: Bearer gw-web-client-ke\r\n",
        ),
        (
            "POST",
            "/v1/chat/completions",
            "x-api-key: sk-target-key\r\n",
        ),
        ("DELETE", "/v1/files/x", ""),
        (
            "GET",
            "/v1/models",
            "authorization: Basic Z3ctd2ViLWNsaWVudC1rZXk=\r\n",
        ),
        ("GET", "/stats", ""),
    ] {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: gw\r\n{auth}content-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{CHAT}",
            CHAT.len()
        );
        let response = raw(gw.addr, request.as_bytes()).await;
        assert_openai_error(&response, 401, "invalid_api_key");
    }
    assert_eq!(up.count(), 0);
    let health = raw(
        gw.addr,
        b"GET /healthz HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(split(&health).0.starts_with("http/1.1 200 "));
}

#[tokio::test]
async fn a_client_key_in_either_header_is_let_through_and_never_forwarded() {
    let up = RawUpstream::start(OK, false).await;
    let gw = gateway(with_clients(&up), &ENV).await;
    for header in [
        ("authorization", "Bearer gw-web-client-key"),
        ("x-api-key", "gw-batch-client-key"),
    ] {
        let (status, _, _) = post(&gw.url("/v1/chat/completions"), &[header], CHAT).await;
        assert_eq!(status, 200, "{header:?}");
    }
    let stats = raw(
        gw.addr,
        b"GET /stats HTTP/1.1\r\nhost: gw\r\nx-api-key: gw-web-client-key\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(split(&stats).0.starts_with("http/1.1 200 "));
    let seen = up.received();
    assert!(seen.len() >= 2);
    for request in &seen {
        let lower = request.to_lowercase();
        assert!(
            !lower.contains("client-key"),
            "a client key went upstream: {request}"
        );
        assert!(
            lower.contains("authorization: bearer sk-target-key"),
            "{request}"
        );
    }
}

#[tokio::test]
async fn errors_name_the_targets_but_no_url_socket_error_env_var_or_key() {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let busy = RawUpstream::start(BUSY, false).await;
    let mut c = config(&[
        (
            "edge-primary",
            format!("http://{refused}/zq-secret-deployment/v1"),
        ),
        ("edge-backup", format!("{}/zq-other-path", busy.url())),
    ]);
    c["targets"][0]["api_key_env"] = "ZQ_DISTINCTIVE_ENV".into();
    c["targets"][1]["api_key_env"] = "ZQ_OTHER_ENV".into();
    c["cooldown"] = "off".into();
    let gw = gateway(
        c,
        &[
            ("ZQ_DISTINCTIVE_ENV", "sk-zq-distinctive-key"),
            ("ZQ_OTHER_ENV", "sk-zq-other"),
        ],
    )
    .await;
    // Both fail: a connect error, then a 503 handed back as the last failure.
    let (status, headers, body) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(
        &body[..],
        b"{}",
        "the last failure, as the upstream sent it"
    );
    // Both fail with transport errors: the gateway's own OpenAI-shaped 502.
    let mut c = config(&[
        (
            "edge-primary",
            format!("http://{refused}/zq-secret-deployment/v1"),
        ),
        ("edge-backup", format!("http://{refused}/zq-other-path")),
    ]);
    c["targets"][0]["api_key_env"] = "ZQ_DISTINCTIVE_ENV".into();
    c["cooldown"] = "off".into();
    let gw = gateway(c, &[("ZQ_DISTINCTIVE_ENV", "sk-zq-distinctive-key")]).await;
    let (status, headers, body2) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-should-retry"], "false");
    let text = String::from_utf8_lossy(&body2).into_owned();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["error"]["code"], "all_targets_failed");
    assert_eq!(json["error"]["type"], "upstream_error");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("edge-primary (model-edge-primary): connect error"),
        "{message}"
    );
    assert!(
        message.contains("edge-backup (model-edge-backup): connect error"),
        "{message}"
    );
    for secret in [
        "zq-secret-deployment",
        "zq-other-path",
        "127.0.0.1",
        &refused.port().to_string(),
        "ZQ_DISTINCTIVE_ENV",
        "sk-zq",
        "refused",
        "os error",
        "http://",
    ] {
        assert!(!text.contains(secret), "{secret:?} in {text}");
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn compressed_post(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         content-encoding: {encoding}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

#[tokio::test]
async fn a_compressed_body_is_decompressed_and_each_target_gets_its_own_model() {
    let primary = RawUpstream::start(BUSY, false).await;
    let fallback = RawUpstream::start(OK, false).await;
    let mut c = config(&[("primary", primary.url()), ("fallback", fallback.url())]);
    c["cooldown"] = "off".into();
    let gw = gateway(c, &[]).await;
    let deflate = {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(CHAT.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    let br = {
        let mut out = Vec::new();
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        w.write_all(CHAT.as_bytes()).unwrap();
        drop(w);
        out
    };
    let zstd = zstd::encode_all(CHAT.as_bytes(), 3).unwrap();
    for (encoding, body) in [
        ("gzip", gzip(CHAT.as_bytes())),
        ("deflate", deflate),
        ("br", br),
        ("zstd", zstd),
    ] {
        let response = raw(gw.addr, &compressed_post(encoding, &body)).await;
        assert!(
            split(&response).0.starts_with("http/1.1 200 "),
            "{encoding}"
        );
    }
    for (upstream, model) in [(&primary, "model-primary"), (&fallback, "model-fallback")] {
        for seen in upstream.received() {
            assert!(seen.contains(&format!("\"model\":\"{model}\"")), "{seen}");
            assert!(!seen.contains("caller-model"), "{seen}");
            assert!(!seen.to_lowercase().contains("content-encoding"), "{seen}");
        }
        assert_eq!(upstream.count(), 4);
    }
}

#[tokio::test]
async fn a_zip_bomb_gets_a_413_bounded_after_decompression_and_bad_encodings_are_refused() {
    let up = RawUpstream::start(OK, false).await;
    let mut c = config(&[("only", up.url())]);
    c["max_body_bytes"] = (1 << 20).into();
    let gw = gateway(c, &[]).await;
    let mut bomb = b"{\"model\":\"m\",\"pad\":\"".to_vec();
    bomb.resize(16 << 20, b'a');
    let bomb = gzip(&bomb);
    assert!(
        bomb.len() < 1 << 20,
        "the compressed body is under the limit"
    );
    let response = raw(gw.addr, &compressed_post("gzip", &bomb)).await;
    assert_openai_error(&response, 413, "request_too_large");
    let response = raw(gw.addr, &compressed_post("gzip", b"not gzip at all")).await;
    assert_openai_error(&response, 400, "body_unreadable");
    let response = raw(gw.addr, &compressed_post("compress", CHAT.as_bytes())).await;
    assert_openai_error(&response, 415, "unsupported_content_encoding");
    assert_eq!(up.count(), 0);
}
