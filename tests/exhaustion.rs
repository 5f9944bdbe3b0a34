//! When every target fails: the last response is handed back untouched, or the error lists
//! every attempt.

mod support;

use std::error::Error as _;

use support::*;
use tower::ServiceExt;
use tower_model_fallback::{Decision, ErrorKind, FallbackLayer, FallbackReport, Target};

#[tokio::test]
async fn when_every_target_answers_503_the_last_response_is_handed_back_with_the_full_report() {
    let a = Upstream::fixed(503, r#"{"error":{"message":"a is busy"}}"#).await;
    let b = Upstream::start(|_| async {
        let mut r = reply(529, r#"{"error":{"message":"b is overloaded"}}"#);
        r.headers_mut().insert("retry-after", "7".parse().unwrap());
        r
    })
    .await;
    let layer = FallbackLayer::new([
        Target::new(a.url_with("/v1"))
            .unwrap()
            .with_name("a")
            .with_model("ma"),
        Target::new(b.url_with("/v1"))
            .unwrap()
            .with_name("b")
            .with_model("mb"),
    ])
    .unwrap();
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(response.headers()["retry-after"], "7");
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap();
    assert!(report.is_exhausted());
    assert_eq!(report.served_by().unwrap().target(), "b");
    let names: Vec<_> = report
        .attempts()
        .iter()
        .map(|a| (a.target(), a.model(), a.status().map(|s| s.as_u16())))
        .collect();
    assert_eq!(
        names,
        vec![("a", Some("ma"), Some(503)), ("b", Some("mb"), Some(529))]
    );
    assert!(report
        .attempts()
        .iter()
        .all(|a| a.decision() == Decision::NextTarget));
    assert_eq!(
        body_string(response.into_body()).await,
        r#"{"error":{"message":"b is overloaded"}}"#
    );
    assert_eq!((a.count(), b.count()), (1, 1));
    let shown = report.to_string();
    assert!(
        shown.starts_with("1. a (ma): 503 Service Unavailable after "),
        "{shown}"
    );
    assert!(
        shown.contains("\n2. b (mb): 529 <unknown status code> after "),
        "{shown}"
    );
}

#[tokio::test]
async fn when_the_last_failure_is_a_transport_error_the_error_lists_every_attempt() {
    let a = Upstream::fixed(502, "{}").await;
    let dead = refused_addr().await;
    let layer = FallbackLayer::new([
        Target::new(a.url_with("/v1"))
            .unwrap()
            .with_name("primary")
            .with_model("gpt-x"),
        Target::new(format!("http://{dead}/v1"))
            .unwrap()
            .with_name("backup")
            .with_model("gpt-y"),
    ])
    .unwrap();
    let err = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap_err();
    assert!(err.is_upstream() && err.is_connect() && !err.is_nothing_sent());
    assert!(err.report().is_exhausted());
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(
        lines[0],
        "no response after 2 attempts, every target failed:"
    );
    assert!(
        lines[1].starts_with("  1. primary (gpt-x): 502 Bad Gateway after "),
        "{text}"
    );
    assert!(
        lines[2].starts_with("  2. backup (gpt-y): connect error ("),
        "{text}"
    );
    assert!(lines[2].ends_with(", next target"), "{text}");
    let source = err.source().expect("the inner error");
    assert_eq!(ErrorKind::of(source), ErrorKind::Connect);
    assert!(!text.contains("all fallbacks failed"));
}

#[tokio::test]
async fn a_single_target_that_fails_returns_its_failure() {
    let dead = refused_addr().await;
    let layer = FallbackLayer::new([Target::new(format!("http://{dead}")).unwrap()]).unwrap();
    let err = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap_err();
    assert_eq!(err.report().attempts().len(), 1);
    assert!(err
        .to_string()
        .starts_with("no response after 1 attempt, every target failed:"));
}

#[tokio::test]
async fn three_targets_are_tried_in_order_until_one_answers() {
    let a = Upstream::fixed(429, "{}").await;
    let b = Upstream::fixed(500, "{}").await;
    let c = Upstream::chat("third time").await;
    let d = Upstream::chat("never").await;
    let layer =
        FallbackLayer::new([&a, &b, &c, &d].map(|u| Target::new(u.url_with("/v1")).unwrap()))
            .unwrap();
    let response = stack(&layer).oneshot(chat_request(CHAT)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!([a.count(), b.count(), c.count(), d.count()], [1, 1, 1, 0]);
    let report = response.extensions().get::<FallbackReport>().unwrap();
    assert_eq!(report.served_by().unwrap().target_index(), 2);
    assert!(!report.is_exhausted());
}
