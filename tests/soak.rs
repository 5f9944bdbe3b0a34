//! Load and soak on loopback: many requests at once through the layer over three upstreams that
//! fail 30 % of the time (503, 429, connection reset before the head, or a reset after the first
//! chunk), each fault fixed by the request's ID so that every request's outcome is known in
//! advance. Checks that every request gets exactly its one expected outcome, that every upstream
//! saw exactly the requests the policy sends it (none twice), and that memory stays flat.
//!
//! CI runs 2 000 requests at 100 at a time. The full run:
//! `SOAK_REQUESTS=10000 SOAK_CONCURRENCY=200 cargo test --release --test soak -- --nocapture`.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use support::client;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_model_fallback::{FallbackLayer, FallbackReport, Target};

const TARGETS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Status503,
    Status429,
    /// The connection closes before a response head.
    Reset,
    /// A 200 head and a first chunk, then the connection fails.
    ResetAfterFirstChunk,
}

/// The fault target `t` shows to request `id`: 30 % of the time, from a hash of both.
fn fault(id: u64, t: usize) -> Fault {
    let mut x =
        id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    match x % 100 {
        0..=9 => Fault::Status503,
        10..=17 => Fault::Status429,
        18..=24 => Fault::Reset,
        25..=29 => Fault::ResetAfterFirstChunk,
        _ => Fault::None,
    }
}

/// What the caller must see for request `id`.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    /// Served by this target, whose body ends cleanly (or fails after the first chunk).
    Served { target: usize, body_fails: bool },
    /// Every target failed; the last one answered this status.
    Exhausted(u16),
    /// Every target failed; the last one reset: an error.
    Error,
}

fn expected(id: u64) -> (Expected, usize) {
    for t in 0..TARGETS {
        match fault(id, t) {
            Fault::None => {
                return (
                    Expected::Served {
                        target: t,
                        body_fails: false,
                    },
                    t + 1,
                )
            }
            Fault::ResetAfterFirstChunk => {
                return (
                    Expected::Served {
                        target: t,
                        body_fails: true,
                    },
                    t + 1,
                )
            }
            _ => {}
        }
    }
    let last = match fault(id, TARGETS - 1) {
        Fault::Status503 => Expected::Exhausted(503),
        Fault::Status429 => Expected::Exhausted(429),
        _ => Expected::Error,
    };
    (last, TARGETS)
}

/// How many times each request ID reached an upstream: allocated before the run, so that the
/// bookkeeping does not grow the memory being measured.
type Seen = Arc<Vec<AtomicU8>>;

/// An upstream's own failure (a concrete type: rustc cannot prove `Send` for a boxed error here).
#[derive(Debug)]
struct Broken(&'static str);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Broken {}

/// Upstream `t`: answers each request as `fault(id, t)` says, and counts the IDs it sees.
async fn upstream(t: usize, requests: u64) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::new((0..requests).map(|_| AtomicU8::new(0)).collect());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map_err(|_| Broken("unreadable request"))?
                            .to_bytes();
                        let id: u64 = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["user"].as_str()?.strip_prefix('r')?.parse().ok())
                            .ok_or(Broken("no request ID"))?;
                        s.get(usize::try_from(id).unwrap_or(usize::MAX))
                            .ok_or(Broken("unknown request ID"))?
                            .fetch_add(1, Ordering::Relaxed);
                        respond(fault(id, t), t)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn respond(fault: Fault, t: usize) -> Result<Response<Body>, Broken> {
    let ok = format!(r#"{{"object":"chat.completion","served_by":{t},"choices":[]}}"#);
    let frames: Vec<Result<Bytes, Broken>> = match fault {
        Fault::None => vec![Ok(Bytes::from(ok))],
        Fault::Status503 | Fault::Status429 => {
            let status = if fault == Fault::Status503 { 503 } else { 429 };
            let mut response = Response::new(Body::new(vec![Ok(Bytes::from_static(b"{}"))]));
            *response.status_mut() =
                http::StatusCode::from_u16(status).map_err(|_| Broken("status"))?;
            return Ok(response);
        }
        Fault::Reset => return Err(Broken("reset before the head")),
        Fault::ResetAfterFirstChunk => vec![
            Ok(Bytes::from_static(br#"{"object":"chat.completion","#)),
            Err(Broken("reset after the first chunk")),
        ],
    };
    Ok(Response::new(Body::new(frames)))
}

/// A body of fixed chunks, the last of which may be an error (hyper then resets the
/// connection). It pauses 20 ms before an error so that the chunks before it are on the wire.
struct Body {
    frames: std::collections::VecDeque<Result<Bytes, Broken>>,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Body {
    fn new(frames: Vec<Result<Bytes, Broken>>) -> Body {
        Body {
            frames: frames.into(),
            pause: None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Broken;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Broken>>> {
        if matches!(self.frames.front(), Some(Err(_))) {
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
            std::task::ready!(pause.as_mut().poll(cx));
        }
        std::task::Poll::Ready(self.frames.pop_front().map(|r| r.map(Frame::data)))
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one request came to.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    outcome: Expected,
    attempts: usize,
}

async fn one(service: &tower_model_fallback::Fallback<support::HttpClient>, id: u64) -> Observed {
    let body = format!(
        r#"{{"model":"caller","user":"r{id}","messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    match service.clone().oneshot(request).await {
        Ok(response) => {
            let report = response
                .extensions()
                .get::<FallbackReport>()
                .unwrap()
                .clone();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await;
            let outcome = if report.is_exhausted() {
                Expected::Exhausted(status)
            } else {
                Expected::Served {
                    target: report.served_by().unwrap().target_index(),
                    body_fails: body.is_err(),
                }
            };
            Observed {
                outcome,
                attempts: report.attempts().len(),
            }
        }
        Err(error) => Observed {
            outcome: Expected::Error,
            attempts: error.report().attempts().len(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_exactly_its_expected_outcome_under_load_with_faults() {
    let requests = env_or("SOAK_REQUESTS", 2000) as u64;
    let concurrency = env_or("SOAK_CONCURRENCY", 100);
    let mut seen = Vec::new();
    let mut targets = Vec::new();
    for t in 0..TARGETS {
        let (addr, s) = upstream(t, requests).await;
        seen.push(s);
        targets.push(
            Target::new(format!("http://{addr}/v1"))
                .unwrap()
                .with_name(format!("t{t}"))
                .with_model(format!("m{t}")),
        );
    }
    let layer = FallbackLayer::new(targets).unwrap();
    let service = tower::Layer::layer(&layer, client());

    let next = Arc::new(AtomicUsize::new(0));
    // Outcomes are checked as they come; only counts are kept.
    let ended: Arc<Vec<AtomicU8>> = Arc::new((0..requests).map(|_| AtomicU8::new(0)).collect());
    let tally: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let warm = requests / 10;
    let rss_warm = Arc::new(AtomicUsize::new(0));
    let rss_start = rss_kib();
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (service, next, rss_warm) = (service.clone(), next.clone(), rss_warm.clone());
            let (ended, tally, attempts) = (ended.clone(), tally.clone(), attempts.clone());
            tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed) as u64;
                    if id >= requests {
                        return;
                    }
                    if id == warm {
                        rss_warm.store(rss_kib() as usize, Ordering::Relaxed);
                    }
                    let observed = tokio::time::timeout(Duration::from_secs(30), one(&service, id))
                        .await
                        .unwrap_or_else(|_| panic!("request {id} never ended"));
                    let (outcome, n) = expected(id);
                    assert_eq!(
                        observed,
                        Observed {
                            outcome,
                            attempts: n
                        },
                        "request {id}"
                    );
                    attempts.fetch_add(n, Ordering::Relaxed);
                    let label = match observed.outcome {
                        Expected::Served { target, body_fails } => {
                            format!(
                                "served by t{target}{}",
                                if body_fails {
                                    ", body failed after its first chunk"
                                } else {
                                    ""
                                }
                            )
                        }
                        other => format!("{other:?}"),
                    };
                    *tally.lock().unwrap().entry(label).or_default() += 1;
                    let before = ended[id as usize].fetch_add(1, Ordering::Relaxed);
                    assert_eq!(before, 0, "request {id} ended twice");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed();
    let rss_end = rss_kib();

    assert!(
        ended.iter().all(|e| e.load(Ordering::Relaxed) == 1),
        "every request has exactly one outcome"
    );
    let attempts = attempts.load(Ordering::Relaxed);
    // Each upstream saw exactly the requests that reached it, each once.
    for (t, seen) in seen.iter().enumerate() {
        for (id, count) in seen.iter().enumerate() {
            let reached = expected(id as u64).1 > t;
            assert_eq!(
                count.load(Ordering::Relaxed),
                u8::from(reached),
                "t{t} and request {id}"
            );
        }
    }
    let total: usize = seen
        .iter()
        .flat_map(|s| s.iter())
        .map(|c| usize::from(c.load(Ordering::Relaxed)))
        .sum();
    assert_eq!(
        total, attempts,
        "the upstreams saw every attempt and nothing else"
    );

    let rss_warm = rss_warm.load(Ordering::Relaxed) as u64;
    println!(
        "soak: {requests} requests at {concurrency} at a time in {:.2} s ({:.0} req/s), {attempts} attempts",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64()
    );
    let mut tally: Vec<_> = std::mem::take(&mut *tally.lock().unwrap())
        .into_iter()
        .collect();
    tally.sort();
    println!("soak: outcomes {tally:?}");
    println!(
        "soak: RSS {} KiB at the start, {rss_warm} KiB after {warm} requests, {rss_end} KiB at the end",
        rss_start
    );
    assert!(
        rss_end <= rss_warm + 32 * 1024,
        "memory grew from {rss_warm} KiB to {rss_end} KiB after the warm-up"
    );
}
