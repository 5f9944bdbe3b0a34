//! A group of three members, one of which answers 429, in process: how many requests still
//! reach the rate-limited member, and the throughput, against the same group with three healthy
//! members and against a single target, in the same run.
//!
//! Cooldowns open after one failure for 200 ms, so a run of a few seconds holds many cooldowns:
//! the rate-limited member should see its first failure and then one probe per cooldown, and
//! nothing between. Run: `cargo bench --bench groups`.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_model_fallback::{Cooldowns, FallbackLayer, ReplayBody, Target, TargetGroup};

mod common;
use common::{body, drain, now};

const COOLDOWN: Duration = Duration::from_millis(200);
const RUN: Duration = Duration::from_secs(3);

/// The calls that reached `limited.test`, when.
type Calls = Arc<Mutex<Vec<std::time::Instant>>>;

/// The benches' upstream, with `limited.test` answering 429 and its calls timed in `calls`.
fn upstream(
    calls: Calls,
) -> impl Service<Request<ReplayBody>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    tower::service_fn(move |req: Request<ReplayBody>| {
        let limited = req.uri().host() == Some("limited.test");
        if limited {
            let mut calls = calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.push(std::time::Instant::now());
        }
        let answer = common::Instant.call(req);
        async move {
            let mut response = answer.await?;
            if limited {
                *response.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
            }
            Ok(response)
        }
    })
}

fn target(host: &str) -> Target {
    Target::new(format!("http://{host}/v1"))
        .unwrap()
        .with_name(host)
        .with_model("m")
}

fn layer(first: TargetGroup) -> FallbackLayer {
    FallbackLayer::new([first, target("fallback.test").into()])
        .unwrap()
        .cooldowns(Cooldowns::new().failures(1).cooldown(COOLDOWN))
}

fn group(hosts: [&str; 3]) -> TargetGroup {
    hosts
        .iter()
        .fold(TargetGroup::new("g"), |g, h| g.member(target(h)))
}

/// Requests sent one after another for `RUN`: how many, and how many per second.
fn run(layer: &FallbackLayer, calls: &Calls) -> (u64, f64) {
    let service = layer.layer(upstream(calls.clone()));
    let body = body();
    let start = std::time::Instant::now();
    let mut requests = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..256 {
            let request = Request::post("/chat/completions")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .unwrap();
            let response = now(service.clone().oneshot(request)).unwrap();
            black_box(drain(response.into_body()));
        }
        requests += 256;
    }
    (requests, requests as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks for criterion's list; there is nothing to list.
    }
    let single = run(&layer(target("a.test").into()), &Calls::default());
    let healthy = run(
        &layer(group(["a.test", "b.test", "c.test"])),
        &Calls::default(),
    );
    let calls = Calls::default();
    let limited = run(&layer(group(["limited.test", "b.test", "c.test"])), &calls);
    let calls = calls.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    let shortest = gaps
        .iter()
        .min()
        .map_or_else(|| "none (a single call)".to_owned(), |d| format!("{d:?}"));
    let cooldowns = (RUN.as_millis() / COOLDOWN.as_millis()) as usize;
    println!("group of 3, one member answering 429, cooldown {COOLDOWN:?} after 1 failure, {RUN:?} of sequential requests:");
    println!(
        "  {:<34} {:>10} {:>14} {:>8}",
        "layer", "requests", "requests/s", "ratio"
    );
    for (name, (n, rate)) in [
        ("single target", single),
        ("group, 3 healthy", healthy),
        ("group, 1 of 3 rate-limited", limited),
    ] {
        println!("  {name:<34} {n:>10} {rate:>14.0} {:>8.3}", rate / single.1);
    }
    println!(
        "  requests that reached the rate-limited member: {} of {} ({:.4} %); at most 1 + one probe per cooldown = {}",
        calls.len(),
        limited.0,
        100.0 * calls.len() as f64 / limited.0 as f64,
        1 + cooldowns
    );
    println!("  shortest time between two of them: {shortest} (the cooldown is {COOLDOWN:?})");
}
