//! What the layer adds to a request, in process: an inner service that answers at once, a 1 KiB
//! chat body, the response body read to its end.
//!
//! - `direct`: the inner service called with the body as a `ReplayBody` (the baseline);
//! - `layer`: the same request through `FallbackLayer` (first target succeeds), stats on;
//! - `layer_without_stats`: the same with `record_stats(false)`, to price the counters;
//! - `fallback`: the first target answers 503, the second succeeds;
//! - `group`: the same as `layer` with a group of three members in the first place: each request
//!   draws two members and compares their latency estimates (the balance's price).
//!
//! Before the timings it prints the heap allocations per request of each path, counted by a
//! counting global allocator. Run: `cargo bench --bench overhead`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_model_fallback::{FallbackLayer, ReplayBody, Target, TargetGroup};

mod common;
use common::{body, drain, now, Instant};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn direct(body: &Bytes) -> usize {
    let request = Request::post("http://up.test/v1/chat/completions")
        .header("content-type", "application/json")
        .body(ReplayBody::from(body.clone()))
        .unwrap();
    let response = now(Instant.oneshot(request)).unwrap();
    drain(response.into_body())
}

fn through<S>(service: &S, body: &Bytes) -> usize
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<tower_model_fallback::ResponseBody<Full<Bytes>>>,
        > + Clone,
    S::Error: std::fmt::Debug,
{
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let response = now(service.clone().oneshot(request)).unwrap();
    drain(response.into_body())
}

fn layers() -> [(&'static str, FallbackLayer); 4] {
    let target = |host: &str, model: &str| {
        Target::new(format!("http://{host}/v1"))
            .unwrap()
            .with_model(model)
    };
    [
        (
            "layer",
            FallbackLayer::new([target("up.test", "gpt-4o-mini"), target("up2.test", "b")])
                .unwrap(),
        ),
        (
            "layer_without_stats",
            FallbackLayer::new([target("up.test", "gpt-4o-mini"), target("up2.test", "b")])
                .unwrap()
                .record_stats(false),
        ),
        (
            "fallback",
            FallbackLayer::new([target("down.test", "a"), target("up.test", "b")]).unwrap(),
        ),
        (
            "group",
            FallbackLayer::new([
                TargetGroup::new("g")
                    .member(target("up.test", "gpt-4o-mini"))
                    .member(target("up3.test", "gpt-4o-mini"))
                    .member(target("up4.test", "gpt-4o-mini")),
                target("up2.test", "b").into(),
            ])
            .unwrap(),
        ),
    ]
}

fn allocations_per_request() {
    let body = body();
    let count = |f: &dyn Fn() -> usize| {
        for _ in 0..100 {
            black_box(f());
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..1000 {
            black_box(f());
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / 1000.0
    };
    println!("heap allocations per request (1 KiB body, response read to its end):");
    println!("  {:<22} {:>6.1}", "direct", count(&|| direct(&body)));
    for (name, layer) in layers() {
        let service = layer.layer(Instant);
        println!(
            "  {:<22} {:>6.1}",
            name,
            count(&|| through(&service, &body))
        );
    }
}

fn bench(c: &mut Criterion) {
    let body = body();
    let mut group = c.benchmark_group("overhead");
    group.warm_up_time(std::time::Duration::from_millis(500));
    group.measurement_time(std::time::Duration::from_secs(3));
    group.bench_function("direct", |b| b.iter(|| direct(black_box(&body))));
    for (name, layer) in layers() {
        let service = layer.layer(Instant);
        group.bench_function(name, |b| b.iter(|| through(&service, black_box(&body))));
    }
    group.finish();
}

criterion_group!(benches, bench);

/// `OVERHEAD_ONLY=path:iterations` runs one path a fixed number of times and exits, for
/// instruction counts under callgrind (`scripts/overhead-instructions.sh`).
fn main() {
    if let Ok(spec) = std::env::var("OVERHEAD_ONLY") {
        let (path, n) = spec.split_once(':').expect("OVERHEAD_ONLY=path:iterations");
        let n: usize = n.parse().expect("iterations");
        let body = body();
        if path == "direct" {
            for _ in 0..n {
                black_box(direct(&body));
            }
            return;
        }
        let (_, layer) = layers()
            .into_iter()
            .find(|(name, _)| *name == path)
            .expect("direct, layer, layer_without_stats, fallback or group");
        let service = layer.layer(Instant);
        for _ in 0..n {
            black_box(through(&service, &body));
        }
        return;
    }
    allocations_per_request();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
