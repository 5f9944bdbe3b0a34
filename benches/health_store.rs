//! The shared health store against the in-memory one (cargo feature `redis`), in the same run,
//! against a `redis-server` on 127.0.0.1 that this benchmark starts itself.
//!
//! - `cooldowns` and `redis`: the success path of a request through the layer (an inner service
//!   that answers at once, a 1 KiB chat body, the response read to its end), cooldowns on, kept
//!   in memory or in Redis. The request path never waits on Redis, so the two should match.
//! - Before the timings, the propagation delay: how long after one replica records a
//!   `Retry-After` another replica skips the target, over 100 trials, for two refresh intervals.
//!
//! Run: `cargo bench --features redis --bench health_store` (needs `redis-server` on the PATH).

use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_model_fallback::{
    Admission, Cooldowns, FallbackLayer, HealthOutcome, HealthStore, RedisHealth, Target, TargetId,
};

mod common;
use common::{body, drain, now, Instant as Answer};

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> (RedisServer, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let server = RedisServer(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (Debian package redis-server)"),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, format!("redis://127.0.0.1:{port}/"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server did not start");
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

fn targets() -> [Target; 2] {
    [
        Target::new("http://up.test/v1").unwrap().with_model("a"),
        Target::new("http://up2.test/v1").unwrap().with_model("b"),
    ]
}

/// Milliseconds from one store's failure to another store's skip, for `trials` targets.
fn propagation(runtime: &tokio::runtime::Runtime, url: &str, refresh: Duration) -> Vec<f64> {
    const TRIALS: usize = 100;
    let _guard = runtime.enter();
    let prefix = format!("bench-propagation-{}", refresh.as_millis());
    let keys: Vec<String> = (0..TRIALS).map(|i| format!("t{i}")).collect();
    let ids: Vec<TargetId<'_>> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| TargetId { index, key })
        .collect();
    let store = || {
        let mut s = RedisHealth::new(url, &prefix)
            .unwrap()
            .cooldowns(Cooldowns::new())
            .refresh(refresh)
            .unwrap();
        s.bind(&ids);
        s
    };
    let (a, b) = (store(), store());
    // Let both connect.
    std::thread::sleep(Duration::from_millis(300));
    let mut delays = Vec::with_capacity(TRIALS);
    for id in &ids {
        // Start at a random point of B's refresh cycle.
        std::thread::sleep(Duration::from_millis(random_pause_ms(refresh)));
        let start = Instant::now();
        a.record(
            *id,
            HealthOutcome::Failure {
                at_least: Some(Duration::from_secs(60)),
            },
            false,
        );
        while b.admit(*id) == Admission::Open {
            assert!(start.elapsed() < Duration::from_secs(10), "never arrived");
            std::thread::sleep(Duration::from_micros(200));
        }
        delays.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    delays
}

/// A pseudo-random pause below `refresh`, from the clock's low bits.
fn random_pause_ms(refresh: Duration) -> u64 {
    let nanos = u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos(),
    );
    nanos % (refresh.as_millis() as u64).max(1)
}

fn bench(c: &mut Criterion) {
    let (_redis, url) = start_redis();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    println!("propagation delay, one replica's Retry-After to another's skip (100 trials):");
    for refresh in [Duration::from_millis(50), Duration::from_millis(200)] {
        let d = propagation(&runtime, &url, refresh);
        println!(
            "  refresh {:>4} ms: p50 {:>6.1} ms, p90 {:>6.1} ms, max {:>6.1} ms",
            refresh.as_millis(),
            d[d.len() / 2],
            d[d.len() * 9 / 10],
            d[d.len() - 1]
        );
    }

    let body = body();
    let _guard = runtime.enter();
    let memory = FallbackLayer::new(targets())
        .unwrap()
        .cooldowns(Cooldowns::new())
        .layer(Answer);
    let shared = FallbackLayer::new(targets())
        .unwrap()
        .redis_health(RedisHealth::new(&url, "bench-overhead").unwrap())
        .layer(Answer);
    // Let the store connect, so that the timing includes its background refreshes.
    black_box(through(&shared, &body));
    std::thread::sleep(Duration::from_millis(300));

    let mut group = c.benchmark_group("health_store");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("cooldowns", |b| {
        b.iter(|| through(&memory, black_box(&body)))
    });
    group.bench_function("redis", |b| b.iter(|| through(&shared, black_box(&body))));
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
