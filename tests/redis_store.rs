//! Cooldowns, failure counts and the retry budget shared through a real `redis-server` on
//! 127.0.0.1 that each test starts itself (cargo feature `redis`). Redis keeps real time, so
//! these tests wait on the wall clock, always in loops bounded in count and time.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::redis_server::RedisServer;
use support::{hosts, send, Act, Scripted};
use tower::retry::budget::Budget;
use tower_model_fallback::{
    Admission, Cooldowns, FallbackLayer, HealthOutcome, HealthStore, RedisBudget, RedisHealth,
    TargetId,
};

fn prefix(test: &str) -> String {
    format!("tmf-test-{test}-{}", std::process::id())
}

fn store(redis: &RedisServer, prefix: &str) -> RedisHealth {
    RedisHealth::new(&redis.url(), prefix)
        .unwrap()
        .cooldowns(Cooldowns::new().cooldown(Duration::from_secs(30)))
        .refresh(Duration::from_millis(50))
        .unwrap()
}

/// Sends through `layer` every 10 ms until a request skips `target` (at most `limit`); returns
/// how long that took and the report of that request.
async fn until_skipped(
    layer: &FallbackLayer,
    client: &Scripted,
    target: &str,
    limit: Duration,
) -> (Duration, tower_model_fallback::FallbackReport) {
    let start = Instant::now();
    for _ in 0..1000 {
        let (status, report) = send(layer, client).await;
        assert_eq!(status, StatusCode::OK);
        if report.skipped().iter().any(|s| s.target() == target) {
            return (start.elapsed(), report);
        }
        assert!(
            start.elapsed() < limit,
            "{target} was not skipped within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{target} was never skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_seen_by_one_replica_makes_the_other_skip_the_target() {
    let redis = RedisServer::start();
    let p = prefix("retry-after");
    let a = hosts(&["primary", "secondary"]).redis_health(store(&redis, &p));
    let b = hosts(&["primary", "secondary"]).redis_health(store(&redis, &p));
    let client_a = Scripted::new(&[(
        "primary",
        vec![Act::status(429).header("retry-after", "30")],
    )]);
    let client_b = Scripted::new(&[]);

    let (status, report) = send(&a, &client_a).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report.served_by().unwrap().target(), "secondary");

    let (_, report) = until_skipped(&b, &client_b, "primary", Duration::from_secs(5)).await;
    assert_eq!(report.served_by().unwrap().target(), "secondary");
    let skip = &report.skipped()[0];
    assert!(
        skip.remaining() > Duration::from_secs(25) && skip.remaining() <= Duration::from_secs(30),
        "B skips primary for the rest of A's Retry-After: {:?}",
        skip.remaining()
    );
    // From now on B leaves primary alone.
    let before = client_b.count("primary");
    for _ in 0..5 {
        let (_, report) = send(&b, &client_b).await;
        assert_eq!(report.served_by().unwrap().target(), "secondary");
    }
    assert_eq!(client_b.count("primary"), before);
    // The shared key's TTL is the cooldown.
    let ttl = redis.pttl(&format!("{p}:cool:primary|http://primary/v1|"));
    assert!((25_000..=30_000).contains(&ttl), "TTL {ttl} ms");
}

/// A replica over primary and secondary, sharing `redis` under `prefix`, refreshing every 50 ms.
fn replica(redis: &RedisServer, prefix: &str, cooldowns: Cooldowns) -> FallbackLayer {
    hosts(&["primary", "secondary"]).redis_health(
        RedisHealth::new(&redis.url(), prefix)
            .unwrap()
            .cooldowns(cooldowns)
            .refresh(Duration::from_millis(50))
            .unwrap(),
    )
}

/// Sends through `layer` every 10 ms until primary serves it again (at most 5 s).
async fn until_primary_serves(layer: FallbackLayer, client: Scripted) {
    let start = Instant::now();
    loop {
        let (status, report) = send(&layer, &client).await;
        assert_eq!(status, StatusCode::OK);
        if report.served_by().map(|a| a.target()) == Some("primary") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "primary never served again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_shared_cooldown_one_replica_probes_for_the_fleet_and_its_success_reopens_it() {
    let redis = RedisServer::start();
    let p = prefix("fleet-probe");
    let cooldowns = || {
        Cooldowns::new()
            .failures(1)
            .cooldown(Duration::from_millis(800))
    };
    let (a, b) = (
        replica(&redis, &p, cooldowns()),
        replica(&redis, &p, cooldowns()),
    );
    // primary: a 429 opens the cooldown; the probe after it takes 400 ms and succeeds.
    let probe_time = Duration::from_millis(400);
    let client = Scripted::new(&[(
        "primary",
        vec![
            Act::status(429),
            Act::status(200).after(probe_time),
            Act::status(200),
        ],
    )]);
    let start = tokio::time::Instant::now();
    let (_, report) = send(&a, &client).await;
    assert_eq!(report.served_by().unwrap().target(), "secondary");
    // B learns of it (over a client of its own: B's calls before it learns are not counted).
    until_skipped(&b, &Scripted::new(&[]), "primary", Duration::from_secs(5)).await;
    // Both replicas send all along; each replica's cooldown ends at the same moment.
    let both =
        [a.clone(), b.clone()].map(|l| tokio::spawn(until_primary_serves(l, client.clone())));
    for replica in both {
        replica.await.unwrap();
    }
    let calls = client.times("primary", start);
    assert!(calls.len() >= 3, "{calls:?}");
    // The second call is the probe; nothing else reached primary until it answered.
    assert!(
        calls[2] - calls[1] >= probe_time,
        "a second probe went out while the first was in flight: {calls:?}"
    );
    let key = |kind: &str| format!("{p}:{kind}:primary|http://primary/v1|");
    let exists = |key: String| -> i64 {
        redis::cmd("EXISTS")
            .arg(key)
            .query(&mut redis.conn())
            .expect("EXISTS")
    };
    assert_eq!(exists(key("probe")), 0, "the probe's lock was given back");
    assert_eq!(
        exists(key("open")),
        0,
        "its success closed the target for the fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_counted_by_several_replicas_open_the_breaker_for_all() {
    let redis = RedisServer::start();
    let p = prefix("counts");
    let shared = |_| {
        let cooldowns = Cooldowns::new()
            .failures(3)
            .cooldown(Duration::from_secs(20));
        replica(&redis, &p, cooldowns)
    };
    let replicas: Vec<FallbackLayer> = (0..3).map(shared).collect();
    let failing = Scripted::new(&[("primary", vec![Act::status(503)])]);
    // One 503 at each replica: no replica reaches 3 on its own, together they do.
    for layer in &replicas {
        let (status, report) = send(layer, &failing).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(report.attempts().len(), 2, "no replica was cooling yet");
    }
    let fresh = Scripted::new(&[]);
    for layer in &replicas {
        let (_, report) = until_skipped(layer, &fresh, "primary", Duration::from_secs(5)).await;
        assert!(report.skipped()[0].remaining() <= Duration::from_secs(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_replicas_keep_serving_and_resync_when_it_returns() {
    let mut redis = RedisServer::start();
    let p = prefix("outage");
    let a = hosts(&["primary", "secondary"]).redis_health(store(&redis, &p));
    let b = hosts(&["primary", "secondary"]).redis_health(store(&redis, &p));
    let healthy = Scripted::new(&[]);
    for layer in [&a, &b] {
        let (status, _) = send(layer, &healthy).await;
        assert_eq!(status, StatusCode::OK);
    }

    redis.stop();
    // Every request is still served, and none waits on the store: a request that went to
    // Redis would take the one-second response timeout at least.
    let limited = Scripted::new(&[(
        "primary",
        vec![Act::status(429).header("retry-after", "30")],
    )]);
    let (status, report) = send(&a, &limited).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report.served_by().unwrap().target(), "secondary");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let start = Instant::now();
        let (status, report) = send(&a, &healthy).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            report.served_by().unwrap().target(),
            "secondary",
            "A keeps its local cooldown"
        );
        let (status, report) = send(&b, &healthy).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(report.served_by().unwrap().target(), "primary");
        slowest = slowest.max(start.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?}: as long as a Redis time-out"
    );

    // Redis returns, empty: A writes back what it learnt meanwhile, and B picks it up.
    redis.restart();
    let (_, report) = until_skipped(&b, &healthy, "primary", Duration::from_secs(10)).await;
    assert!(report.skipped()[0].remaining() > Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_shorten_a_cooldown() {
    let redis = RedisServer::start();
    let p = prefix("extend");
    let key = "name|http://primary/v1|";
    let stores: Vec<Arc<RedisHealth>> = (0..8)
        .map(|_| {
            let mut s = RedisHealth::new(&redis.url(), &p)
                .unwrap()
                .cooldowns(Cooldowns::new().failures(1_000_000))
                .refresh(Duration::from_millis(50))
                .unwrap();
            s.bind(&[TargetId { index: 0, key }]);
            Arc::new(s)
        })
        .collect();
    let id = TargetId { index: 0, key };
    let fail = |secs| HealthOutcome::Failure {
        at_least: Some(Duration::from_secs(secs)),
    };
    // 8 writers at once, 50 failures each, asking for 1 to 50 s; one of them asks for 120 s
    // half-way through.
    let mut tasks = Vec::new();
    for (w, s) in stores.iter().enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 1..=50u64 {
                let secs = if w == 3 && i == 25 { 120 } else { i };
                s.record(id, fail(secs), false);
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Wait until every failure has been counted in Redis.
    let fails_key = format!("{p}:fails:{key}");
    let start = Instant::now();
    loop {
        let count: Option<u64> = redis::cmd("GET")
            .arg(&fails_key)
            .query(&mut redis.conn())
            .unwrap();
        if count == Some(400) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "counted {count:?} of 400 failures"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ttl = redis.pttl(&format!("{p}:cool:{key}"));
    assert!(
        ttl > 110_000 && ttl <= 120_000,
        "the 120 s cooldown survives 399 shorter ones: {ttl} ms"
    );
    assert!(stores
        .iter()
        .all(|s| s.dropped_events() == 0 && s.redis_errors() == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_is_spent_across_replicas() {
    let redis = RedisServer::start();
    let p = prefix("budget");
    // 10 % of requests, nothing per second.
    let new = || {
        RedisBudget::new(&redis.url(), &p, Duration::from_secs(10), 0, 0.1)
            .unwrap()
            .refresh(Duration::from_millis(20))
            .unwrap()
    };
    let (a, b) = (new(), new());
    // A sees 100 requests; B none.
    for _ in 0..100 {
        a.deposit();
    }
    // Wait until B has read A's deposits: B may then withdraw about 10.
    let start = Instant::now();
    while !b.withdraw() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "B never saw A's deposits"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut granted = 1;
    while b.withdraw() {
        granted += 1;
        assert!(granted <= 100, "B's withdrawals are bounded");
    }
    assert_eq!(granted, 10, "10 % of A's 100 requests");
    // B's withdrawals reach A at the next refreshes: A has nothing left either.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a.withdraw(), "A sees that B spent the shared budget");
}

#[test]
fn bad_urls_and_prefixes_are_config_errors() {
    let err = RedisHealth::new("http://127.0.0.1:6379", "p").unwrap_err();
    assert!(
        err.to_string().starts_with("redis_url: is not a Redis URL"),
        "{err}"
    );
    let err = RedisHealth::new("redis://127.0.0.1:6379", "a b").unwrap_err();
    assert!(err.to_string().starts_with("prefix:"), "{err}");
    let err = RedisHealth::new("redis://127.0.0.1:6379", "p")
        .unwrap()
        .refresh(Duration::ZERO)
        .unwrap_err();
    assert!(err.to_string().starts_with("refresh_ms:"), "{err}");
    let err =
        RedisBudget::new("redis://127.0.0.1/", "p", Duration::from_millis(5), 1, 0.2).unwrap_err();
    assert!(err.to_string().starts_with("ttl:"), "{err}");
    // Without TLS built in, a rediss:// URL is refused rather than sent in the clear.
    if cfg!(not(feature = "redis-tls")) {
        let err = RedisHealth::new("rediss://127.0.0.1:6379/", "p").unwrap_err();
        assert!(err.to_string().contains("`redis-tls` feature"), "{err}");
    }
    // The password never shows in Debug.
    let store = RedisHealth::new("redis://:s3cr3t-pass@127.0.0.1:6379/", "p").unwrap();
    assert!(!format!("{store:?}").contains("s3cr3t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_cooldown_writes_no_key_and_the_next_failure_still_lands() {
    let redis = RedisServer::start();
    let p = prefix("zero");
    let key = "t|http://t/v1|";
    let mut store = RedisHealth::new(&redis.url(), &p)
        .unwrap()
        .cooldowns(Cooldowns::new().failures(1).cooldown(Duration::ZERO))
        .refresh(Duration::from_millis(50))
        .unwrap();
    store.bind(&[TargetId { index: 0, key }]);
    let id = TargetId { index: 0, key };
    let counted = |n: u64| {
        let start = Instant::now();
        loop {
            let count: Option<u64> = redis::cmd("GET")
                .arg(format!("{p}:fails:{key}"))
                .query(&mut redis.conn())
                .unwrap();
            if count == Some(n) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "counted {count:?} of {n} failures"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // One at a time: the second must not be written before the first.
    store.record(id, HealthOutcome::Failure { at_least: None }, false);
    counted(1);
    assert_eq!(
        redis.pttl(&format!("{p}:cool:{key}")),
        -2,
        "no cooldown key"
    );
    store.record(
        id,
        HealthOutcome::Failure {
            at_least: Some(Duration::from_secs(5)),
        },
        false,
    );
    counted(2);
    let ttl = redis.pttl(&format!("{p}:cool:{key}"));
    assert!(
        (4_000..=5_000).contains(&ttl),
        "only the asked-for 5 s: {ttl} ms"
    );
    assert_eq!(store.redis_errors(), 0, "no script failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_opens_the_shared_cooldown_again() {
    let redis = RedisServer::start();
    let p = prefix("probe");
    let key = "t|http://t/v1|";
    let id = TargetId { index: 0, key };
    // Two failures within 1 s open the breaker for 1 s.
    let store = || {
        let mut s = RedisHealth::new(&redis.url(), &p)
            .unwrap()
            .cooldowns(
                Cooldowns::new()
                    .failures(2)
                    .window(Duration::from_secs(1))
                    .cooldown(Duration::from_secs(1)),
            )
            .refresh(Duration::from_millis(20))
            .unwrap();
        s.bind(&[id]);
        s
    };
    let (a, b) = (store(), store());
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let fail = HealthOutcome::Failure { at_least: None };
    a.record(id, fail, false);
    a.record(id, fail, false);
    until("B learns of the cooldown", &|| {
        matches!(b.admit(id), Admission::Cooling(_))
    });
    // The cooldown and the failure window run out; A's probe fails. The shared count starts a
    // new window at 1, below the threshold, yet the probe's failure opens the breaker again
    // for every replica, as it does for A.
    until("the cooldown ends", &|| a.cooling_for(id).is_zero());
    std::thread::sleep(Duration::from_millis(1100));
    // One probe for the fleet: A asks for the lock and is granted it within a refresh or two;
    // B, whose cooldown ended too, asks and keeps skipping while A holds it.
    until("A is granted the fleet's probe", &|| {
        a.admit(id) == Admission::Probe
    });
    for _ in 0..20 {
        assert_eq!(b.admit(id), Admission::Cooling(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(10));
    }
    a.record(id, fail, true);
    assert!(!a.cooling_for(id).is_zero());
    until("B learns that the probe failed", &|| {
        !b.cooling_for(id).is_zero()
    });
    assert!(redis.pttl(&format!("{p}:cool:{key}")) > 0);
    assert_eq!(a.redis_errors() + b.redis_errors(), 0);
}
