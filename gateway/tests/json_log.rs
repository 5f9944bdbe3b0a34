//! The log line of a request with `"log_format": "json"`: one object, flat, with the client,
//! the targets tried, the served target and model, the status, attempts, latency and tokens;
//! never a key or a body. Its own test binary: the subscriber it installs sees every event.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

/// Collects what the log writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn a_request_logs_one_json_line_with_its_targets_status_latency_and_tokens() {
    let captured = Captured::default();
    let writer = captured.clone();
    // The format `log_format: "json"` sets up in the binary.
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let _running = after_a_fallback().await;
    // The line is written when the body is done: wait for it, bounded.
    let mut line = None;
    for _ in 0..100 {
        line = captured
            .text()
            .lines()
            .find(|l| l.contains(r#""message":"request""#))
            .map(str::to_owned);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let line = line.expect("a request line");
    println!("{line}");
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(json["client"], "web");
    assert_eq!(json["status"], 200);
    assert_eq!(json["targets_tried"], "primary,fallback");
    assert_eq!(json["served_target"], "fallback");
    assert_eq!(json["served_model"], "model-fallback");
    assert_eq!(json["attempts"], 2);
    assert_eq!(
        (&json["input_tokens"], &json["output_tokens"]),
        (&12.into(), &34.into())
    );
    assert!(json["latency_ms"].is_u64());
    let all = captured.text();
    assert_eq!(all.matches(r#""message":"request""#).count(), 1);
    assert!(
        !all.contains(KEY) && !all.contains(r#""Hi""#),
        "no key, no body"
    );
}
