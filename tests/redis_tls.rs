//! The shared stores over TLS (`rediss://`, cargo feature `redis-tls`), against a `redis-server`
//! that each test starts on 127.0.0.1 with TLS only and certificates the test makes with
//! `openssl`. Redis keeps real time, so these tests wait on the wall clock, in loops bounded in
//! count and time.
#![cfg(feature = "redis-tls")]

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::redis_server::{RedisServer, TestCa};
use support::{hosts, send, Act, Captured, Scripted};
use tower::retry::budget::Budget;
use tower_model_fallback::{
    Cooldowns, FallbackConfig, FallbackLayer, RedisBudget, RedisHealth, RedisTls,
};

const PASSWORD: &str = "s3cr3t-tls-pass";

fn prefix(test: &str) -> String {
    format!("tmf-tls-{test}-{}", std::process::id())
}

fn store(url: &str, prefix: &str, tls: &RedisTls) -> RedisHealth {
    RedisHealth::new(url, prefix)
        .unwrap()
        .tls(tls)
        .unwrap()
        .cooldowns(Cooldowns::new().cooldown(Duration::from_secs(30)))
        .refresh(Duration::from_millis(50))
        .unwrap()
}

/// Sends through `layer` every 10 ms until a request skips primary; false if none did within
/// `limit`.
async fn skips_primary(layer: &FallbackLayer, limit: Duration) -> bool {
    let client = Scripted::new(&[]);
    let start = Instant::now();
    while start.elapsed() < limit {
        let (status, report) = send(layer, &client).await;
        assert_eq!(status, StatusCode::OK);
        if report.skipped().iter().any(|s| s.target() == "primary") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A 429 with `Retry-After` at replica A (on its own client), so that A writes a cooldown.
async fn rate_limit_primary_at(a: &FallbackLayer) {
    let client = Scripted::new(&[(
        "primary",
        vec![Act::status(429).header("retry-after", "30")],
    )]);
    let (status, report) = send(a, &client).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report.served_by().unwrap().target(), "secondary");
}

/// Two replicas over `url` with `tls`: after a 429 with `Retry-After` at A, B skips primary
/// (within 5 s).
async fn a_cooldown_reaches_the_other_replica(url: &str, prefix: &str, tls: &RedisTls) {
    let a = hosts(&["primary", "secondary"]).redis_health(store(url, prefix, tls));
    let b = hosts(&["primary", "secondary"]).redis_health(store(url, prefix, tls));
    rate_limit_primary_at(&a).await;
    assert!(
        skips_primary(&b, Duration::from_secs(5)).await,
        "B learns of A's cooldown through its TLS connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_a_private_ca_and_a_password_a_cooldown_reaches_the_other_replica() {
    let ca = TestCa::new("shared");
    let redis = RedisServer::start_tls(&ca, false, Some(PASSWORD));
    assert!(redis.url().starts_with("rediss://"));
    let p = prefix("shared");
    let tls = RedisTls::new().root_ca_pem(ca.pem("ca.crt"));
    a_cooldown_reaches_the_other_replica(&redis.url(), &p, &tls).await;
    let ttl = redis.pttl(&format!("{p}:cool:primary|http://primary/v1|"));
    assert!((25_000..=30_000).contains(&ttl), "TTL {ttl} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_is_shared_over_tls() {
    let ca = TestCa::new("budget");
    let redis = RedisServer::start_tls(&ca, false, Some(PASSWORD));
    let p = prefix("budget");
    let tls = RedisTls::new().root_ca_pem(ca.pem("ca.crt"));
    let new = || {
        RedisBudget::new(&redis.url(), &p, Duration::from_secs(10), 0, 0.1)
            .unwrap()
            .tls(&tls)
            .unwrap()
            .refresh(Duration::from_millis(20))
            .unwrap()
    };
    let (a, b) = (new(), new());
    for _ in 0..100 {
        a.deposit();
    }
    // B holds no deposits of its own: a withdrawal is granted only once A's reached it.
    let start = Instant::now();
    while !b.withdraw() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "B never saw A's deposits over TLS"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_asks_for_client_certificates_takes_the_identity_and_shuts_out_a_store_without_one(
) {
    let ca = TestCa::new("mtls");
    let redis = RedisServer::start_tls(&ca, true, None);
    let p = prefix("mtls");
    let trusted = RedisTls::new().root_ca_pem(ca.pem("ca.crt"));
    let identified = trusted
        .clone()
        .client_identity_pem(ca.pem("client.crt"), ca.pem("client.key"));
    a_cooldown_reaches_the_other_replica(&redis.url(), &p, &identified).await;
    // A store without a client certificate is refused at every handshake: what it learns
    // stays local, and it serves on its own state.
    let anonymous = store(&redis.url(), &p, &trusted);
    let key = "anonymous|http://elsewhere/v1|";
    failure_until_refused(anonymous, key).await;
    let written: i64 = redis::cmd("EXISTS")
        .arg(format!("{p}:fails:{key}"))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(
        written, 0,
        "a store without a client certificate wrote to Redis"
    );
}

/// Records a failure of target `key` at `store`, which makes its background task connect, and
/// waits until that connection has failed (at most 5 s); returns the store.
async fn failure_until_refused(mut store: RedisHealth, key: &str) -> RedisHealth {
    use tower_model_fallback::{HealthOutcome, HealthStore, TargetId};
    store.bind(&[TargetId { index: 0, key }]);
    let id = TargetId { index: 0, key };
    store.record(id, HealthOutcome::Failure { at_least: None }, false);
    let start = Instant::now();
    while store.redis_errors() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the handshake never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store
}

// Current-thread runtime: the store's background task runs on this thread, under the
// subscriber set here.
#[tokio::test]
async fn a_store_that_trusts_another_ca_never_connects_and_no_log_line_shows_the_password() {
    let ca = TestCa::new("other-ca");
    let redis = RedisServer::start_tls(&ca, false, Some(PASSWORD));
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let wrong = RedisTls::new().root_ca_pem(ca.pem("other-ca.crt"));
    let store = store(&redis.url(), &prefix("other-ca"), &wrong);
    assert!(!format!("{store:?} {wrong:?}").contains(PASSWORD));
    failure_until_refused(store, "primary|http://primary/v1|").await;
    let text = logs.text();
    assert!(text.contains("unreachable"), "the outage is logged: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", redis.port)),
        "the log names the server: {text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "a log line shows the password: {text}"
    );
}

/// A config over primary and secondary with this `health_store` section.
fn config(health_store: serde_json::Value) -> FallbackConfig {
    FallbackConfig::from_value(serde_json::json!({
        "targets": [
            {"name": "primary", "base_url": "http://primary/v1"},
            {"name": "secondary", "base_url": "http://secondary/v1"}
        ],
        "health_store": health_store,
        "retry_budget": {}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_tls_files_and_the_url_in_the_environment_shares_cooldowns() {
    let ca = TestCa::new("config");
    let redis = RedisServer::start_tls(&ca, true, Some(PASSWORD));
    let url = redis.url();
    let env = |name: &str| (name == "REDIS_URL").then(|| url.clone());
    let section = serde_json::json!({
        "redis_url_env": "REDIS_URL",
        "prefix": prefix("config"),
        "refresh_ms": 50,
        "tls_ca_file": ca.file("ca.crt"),
        "tls_cert_file": ca.file("client.crt"),
        "tls_key_file": ca.file("client.key"),
    });
    let a = config(section.clone()).layer_with_env(env).unwrap();
    let b = config(section).layer_with_env(env).unwrap();
    rate_limit_primary_at(&a).await;
    assert!(
        skips_primary(&b, Duration::from_secs(5)).await,
        "B learns of A's cooldown"
    );
}

#[test]
fn tls_settings_that_cannot_work_are_config_errors_that_never_show_the_password() {
    let ca = TestCa::new("errors");
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:6390/");
    let env = |name: &str| (name == "REDIS_URL").then(|| url.clone());
    let with = |extra: serde_json::Value| {
        let mut section = serde_json::json!({"redis_url_env": "REDIS_URL"});
        for (k, v) in extra.as_object().unwrap() {
            section[k] = v.clone();
        }
        config(section)
            .layer_with_env(env)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let missing = ca.file("missing.crt");
    for (extra, expected) in [
        (
            serde_json::json!({"tls_ca_file": missing}),
            "health_store.tls_ca_file: cannot read",
        ),
        (
            // A key is no certificate.
            serde_json::json!({"tls_ca_file": ca.file("server.key")}),
            "health_store.tls_ca_file: holds no PEM certificate",
        ),
        (
            serde_json::json!({"tls_cert_file": ca.file("client.crt")}),
            "health_store.tls_cert_file: and tls_key_file go together",
        ),
        (
            serde_json::json!({"tls_cert_file": ca.file("client.key"), "tls_key_file": ca.file("client.key")}),
            "health_store.tls_cert_file: holds no PEM certificate",
        ),
        (
            serde_json::json!({"tls_cert_file": ca.file("client.crt"), "tls_key_file": ca.file("client.crt")}),
            "health_store.tls: is not usable",
        ),
    ] {
        let err = with(extra.clone());
        assert!(err.starts_with(expected), "{extra}: {err}");
        assert!(!err.contains(PASSWORD), "{err}");
    }
    // TLS settings on a plain URL, and a URL that turns certificate checks off.
    let plain = format!("redis://:{PASSWORD}@127.0.0.1:6390/");
    let tls = RedisTls::new().root_ca_pem(ca.pem("ca.crt"));
    let err = RedisHealth::new(&plain, "p")
        .unwrap()
        .tls(&tls)
        .unwrap_err();
    assert!(
        err.to_string().starts_with("redis_url: is not rediss://"),
        "{err}"
    );
    let err = RedisBudget::new(&plain, "p", Duration::from_secs(10), 1, 0.2)
        .unwrap()
        .tls(&tls)
        .unwrap_err();
    assert!(
        err.to_string().starts_with("redis_url: is not rediss://"),
        "{err}"
    );
    let err = RedisHealth::new(&format!("{url}#insecure"), "p").unwrap_err();
    assert!(err.to_string().contains("#insecure"), "{err}");
    assert!(!err.to_string().contains(PASSWORD), "{err}");
}
