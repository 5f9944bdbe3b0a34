//! Defaults that protect upstreams: cooldowns are on in the gateway, so a 429 with
//! `retry-after: 30` keeps every request off that target until then; `"cooldown": "off"` turns
//! them off. A failure handed back after every target carries `x-should-retry: false`.

mod support;

use std::time::Duration;

use support::*;

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"choices\":[]}";

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_keeps_every_request_off_the_target_until_then() {
    let primary = RawUpstream::limited_once(OK).await;
    let fallback = RawUpstream::start(OK, false).await;
    let gw = gateway(
        config(&[("primary", primary.url()), ("fallback", fallback.url())]),
        &[],
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let (status, headers, _) = post(&url, &[], CHAT).await;
    assert_eq!(
        (
            status.as_u16(),
            headers["x-fallback-target"].to_str().unwrap()
        ),
        (200, "fallback")
    );
    for _ in 0..3 {
        let (status, headers, _) = post(&url, &[], CHAT).await;
        assert_eq!(
            (
                status.as_u16(),
                headers["x-fallback-target"].to_str().unwrap()
            ),
            (200, "fallback")
        );
        assert_eq!(
            headers["x-fallback-attempts"], "1",
            "the primary is skipped"
        );
    }
    assert_eq!(
        primary.count(),
        1,
        "the second request did not reach the primary"
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    let (_, headers, _) = post(&url, &[], CHAT).await;
    assert_eq!(
        headers["x-fallback-target"], "primary",
        "after 30 s the primary is tried again"
    );
    assert_eq!(primary.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn with_cooldowns_off_every_request_tries_the_primary_first() {
    let primary = RawUpstream::limited_once(OK).await;
    let fallback = RawUpstream::start(OK, false).await;
    let mut c = config(&[("primary", primary.url()), ("fallback", fallback.url())]);
    c["cooldown"] = "off".into();
    let gw = gateway(c, &[]).await;
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        post(&url, &[], CHAT).await.1["x-fallback-target"],
        "fallback"
    );
    assert_eq!(
        post(&url, &[], CHAT).await.1["x-fallback-target"],
        "primary"
    );
    assert_eq!(primary.count(), 2);
}

#[tokio::test]
async fn an_exhausted_chain_says_x_should_retry_false_and_keeps_retry_after() {
    let limited = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n{}";
    let a = RawUpstream::start(limited, false).await;
    let b = RawUpstream::start(limited, false).await;
    let mut c = config(&[("a", a.url()), ("b", b.url())]);
    c["cooldown"] = "off".into();
    let gw = gateway(c, &[]).await;
    let (status, headers, body) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert_eq!(status, 429);
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(headers["x-fallback-attempts"], "2");
    assert_eq!(&body[..], b"{}");
    // A success carries no such header.
    let ok = RawUpstream::start(OK, false).await;
    let gw = gateway(config(&[("ok", ok.url())]), &[]).await;
    let (_, headers, _) = post(&gw.url("/v1/chat/completions"), &[], CHAT).await;
    assert!(headers.get("x-should-retry").is_none());
}
