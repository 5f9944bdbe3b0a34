//! Model substitution: the purpose-built scanner against serde_json, on chat bodies of
//! 1 KiB, 64 KiB, 1 MiB and 8 MiB.
//!
//! - `scanner`: what the layer does: a purpose-built validating scanner finds the top-level model
//!   values, and the body is sent as slices of the original around the new model.
//! - `serde_raw_value`: serde_json validates the body and lends each top-level value as a
//!   `RawValue` (`candidates/mod.rs`); its offset gives the span; spliced the same way.
//! - `serde_value_round_trip`: parse into `serde_json::Value`, set `model`, serialize (the baseline;
//!   not byte-faithful: it reorders keys and respells numbers and escapes).
//!
//! Run: `cargo bench --bench substitute`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};

mod candidates;

/// A chat request of about `size` bytes: many messages with escapes and non-ASCII text.
fn chat_body(size: usize) -> Bytes {
    let mut body =
        String::from(r#"{"model":"gpt-4o-mini","temperature":0.7,"stream":false,"messages":["#);
    let content = "Summarise the \\\"report\\\" below in one sentence; keep numbers like 12.5% and names like Zoë intact.\\n";
    let mut i = 0;
    while body.len() + 200 < size {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r#"{"role":"user","content":""#);
        body.push_str(content);
        body.push_str(r#""}"#);
        i += 1;
    }
    body.push_str(r#"],"user":"bench"}"#);
    Bytes::from(body)
}

/// What the layer does: the purpose-built scanner, then slices around the new model.
fn library(body: &Bytes) -> Vec<Bytes> {
    tower_model_fallback::__private::substitute(body, "claude-3-5-haiku").unwrap()
}

/// The serde_json `RawValue` candidate, spliced the same way.
fn serde_raw_value(body: &Bytes) -> Vec<Bytes> {
    let literal = Bytes::from(serde_json::to_vec("claude-3-5-haiku").unwrap());
    let mut out = Vec::with_capacity(3);
    match candidates::locate(body).unwrap() {
        candidates::ModelSlots::Replace(spans) => {
            let mut at = 0;
            for span in spans {
                out.push(body.slice(at..span.start));
                out.push(literal.clone());
                at = span.end;
            }
            out.push(body.slice(at..));
        }
        candidates::ModelSlots::Insert { .. } => unreachable!("the bench body has a model"),
    }
    out
}

fn serde_value_round_trip(body: &Bytes) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(body).unwrap();
    value["model"] = serde_json::Value::from("claude-3-5-haiku");
    serde_json::to_vec(&value).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("substitute");
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(2));
    group.sample_size(20);
    for (label, size) in [
        ("1KiB", 1 << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
        ("8MiB", 8 << 20),
    ] {
        let body = chat_body(size);
        // All candidates must agree on the spliced result before they are timed.
        assert_eq!(serde_raw_value(&body).concat(), library(&body).concat());
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("scanner", label), &body, |b, body| {
            b.iter(|| library(black_box(body)))
        });
        group.bench_with_input(
            BenchmarkId::new("serde_raw_value", label),
            &body,
            |b, body| b.iter(|| serde_raw_value(black_box(body))),
        );
        group.bench_with_input(
            BenchmarkId::new("serde_value_round_trip", label),
            &body,
            |b, body| b.iter(|| serde_value_round_trip(black_box(body))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);

/// `SUBSTITUTE_ONLY=candidate:bytes:iterations` runs one candidate a fixed number of times and
/// exits, for instruction counts under `valgrind --tool=callgrind` (wall-clock figures on a shared
/// machine are noisy; instruction counts are not). See `scripts/substitute-instructions.sh`.
fn main() {
    if let Ok(spec) = std::env::var("SUBSTITUTE_ONLY") {
        let mut parts = spec.split(':');
        let (Some(which), Some(size), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("SUBSTITUTE_ONLY=candidate:bytes:iterations");
        };
        let body = chat_body(size.parse().unwrap());
        for _ in 0..n.parse::<usize>().unwrap() {
            match which {
                "serde_raw_value" => drop(black_box(serde_raw_value(black_box(&body)))),
                "scanner" => drop(black_box(library(black_box(&body)))),
                "serde_value_round_trip" => {
                    drop(black_box(serde_value_round_trip(black_box(&body))))
                }
                other => panic!("unknown candidate {other}"),
            }
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
