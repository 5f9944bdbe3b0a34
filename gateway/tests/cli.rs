//! The `fallback-gateway` binary: the demo with no arguments, `--help`, `--version`,
//! `--check-config` (0 valid, 2 invalid, the reason on stderr), and SIGTERM: accepting stops at
//! once, and after `shutdown_timeout_ms` a hung request is cut so the process always exits. Real
//! processes, real time: every wait is bounded.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::process::{config_file, free_addr, listening, logged, run, serve, Killed, BIN};

#[test]
fn help_and_version_print_to_stdout_and_exit_0() {
    let help = run(&["--help"], &[]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--config PATH", "--check-config PATH", "--version"] {
        assert!(text.contains(flag), "{text}");
    }
    let version = run(&["--version"], &[]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("fallback-gateway {}", env!("CARGO_PKG_VERSION"))
    );
    let bad = run(&["--colour"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage"));
}

#[test]
fn check_config_exits_0_for_a_valid_file_and_2_naming_the_field_otherwise() {
    let target =
        r#"{"name": "a", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "CLI_TARGET_KEY"}"#;
    let clients = r#"[{"name": "web", "key_env": "CLI_WEB_KEY"}]"#;
    let env = [("CLI_TARGET_KEY", "k"), ("CLI_WEB_KEY", "w")];
    let valid = config_file(
        "valid",
        &format!(r#"{{"listen": "0.0.0.0:8080", "clients": {clients}, "targets": [{target}]}}"#),
    );
    let ok = run(&["--check-config", &valid], &env);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (name, json, env, expected) in [
        (
            "unknown",
            format!(r#"{{"targets": [{target}], "colour": 1}}"#),
            &env[..],
            "colour: unknown field",
        ),
        (
            "client-env",
            format!(r#"{{"clients": {clients}, "targets": [{target}]}}"#),
            &env[..1],
            "clients[0].key_env: environment variable CLI_WEB_KEY is not set",
        ),
        (
            "target-env",
            format!(r#"{{"targets": [{target}]}}"#),
            &env[1..],
            "targets[0].api_key_env: environment variable CLI_TARGET_KEY is not set",
        ),
        (
            "anonymous",
            format!(r#"{{"listen": "0.0.0.0:8080", "targets": [{target}]}}"#),
            &env[..],
            "clients: are required to listen on 0.0.0.0:8080",
        ),
        ("json", "{".to_owned(), &env[..], "config: not valid JSON"),
    ] {
        let path = config_file(name, &json);
        let out = run(&["--check-config", &path], env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        let _ = std::fs::remove_file(path);
    }
    let missing = run(&["--check-config", "/nonexistent/gateway.json"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read"));
    let _ = std::fs::remove_file(valid);
}

/// Built without the `otel` feature, a file that asks for traces is refused, not served
/// without them (`tests/otel.rs` has the feature's own tests).
#[cfg(not(feature = "otel"))]
#[test]
fn an_otel_section_needs_the_otel_feature() {
    let path = config_file(
        "otel-off",
        r#"{"targets": [{"base_url": "http://127.0.0.1:9/v1"}],
            "otel": {"endpoint": "http://127.0.0.1:4318"}}"#,
    );
    for flag in ["--check-config", "--config"] {
        let out = run(&[flag, &path], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains("otel: this fallback-gateway was built without OpenTelemetry")
                && stderr.contains("--features otel"),
            "{flag}: {stderr}"
        );
    }
    let _ = std::fs::remove_file(path);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_accepting_at_once_and_cuts_a_hung_request_after_the_shutdown_timeout() {
    use std::io::{Read, Write};
    // An upstream that takes requests and never answers.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        if let Ok((tcp, _)) = upstream.accept() {
            held.push(tcp);
        }
        std::thread::sleep(Duration::from_secs(8));
    });
    let listen = free_addr();
    let path = config_file(
        "sigterm",
        &format!(
            r#"{{"listen": "{listen}", "shutdown_timeout_ms": 1000, "attempt_timeout_ms": 60000,
                "targets": [{{"name": "hung", "base_url": "http://{upstream_addr}/v1"}}]}}"#
        ),
    );
    let child = Command::new(BIN)
        .args(["--config", &path])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let started = Instant::now();
    while TcpStream::connect(listen).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the gateway listens"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut client = TcpStream::connect(listen).unwrap();
    client
        .write_all(&support::chat_post("", support::CHAT))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Accepting stops at once.
    let mut refused = false;
    while signalled.elapsed() < Duration::from_millis(800) {
        if TcpStream::connect(listen).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused, "new connections are refused right after SIGTERM");
    // The process exits once the shutdown timeout has passed, the hung request cut.
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(6),
            "the process exits"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let waited = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the cut request gets no answer");
    let _ = std::fs::remove_file(path);
    drop(held);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_arguments_it_runs_the_demo_on_8080_and_falls_back() {
    let demo: SocketAddr = ([127, 0, 0, 1], 8080).into();
    if TcpListener::bind(demo).is_err() {
        eprintln!("skipped: 127.0.0.1:8080, the demo's address, is in use");
        return;
    }
    let child = Command::new(BIN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    listening(demo).await;
    let url = format!("http://{demo}/v1/chat/completions");
    let mut served_by = Vec::new();
    for _ in 0..2 {
        let (status, headers, body) = support::post(&url, &[], support::CHAT).await;
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["model"], headers["x-fallback-model"].to_str().unwrap());
        served_by.push(headers["x-fallback-target"].to_str().unwrap().to_owned());
    }
    // The flaky primary answers 503 to every other request: the first falls back.
    assert_eq!(served_by, ["steady", "flaky"]);
    let status = child.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
}

/// Sends one chat request with `connection: close`; the `x-fallback-target` it got.
async fn served_by(listen: SocketAddr) -> String {
    let response = support::raw(listen, &support::chat_post("", support::CHAT)).await;
    let (head, _) = support::split(&response);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    head.lines()
        .find_map(|l| l.strip_prefix("x-fallback-target: "))
        .unwrap_or("-")
        .trim()
        .to_owned()
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_config_and_keeps_serving_through_an_invalid_one() {
    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let a = support::RawUpstream::start(OK, false).await;
    let b = support::RawUpstream::start(OK, false).await;
    let listen = free_addr();
    let file = |target: &str, url: String| {
        format!(
            r#"{{"listen": "{listen}", "log_format": "json",
                "targets": [{{"name": "{target}", "base_url": "{url}"}}]}}"#
        )
    };
    let path = config_file("sighup", &file("a", a.url()));
    let log_path = std::env::temp_dir().join(format!("tmf-cli-sighup-{}.log", std::process::id()));
    let child = serve(&path, &log_path, &[]);
    let hangup = || {
        let kill = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    };
    listening(listen).await;
    assert_eq!(served_by(listen).await, "a");
    // Not JSON: refused, logged, and the running config goes on.
    std::fs::write(&path, r#"{"targets": ["#).unwrap();
    hangup();
    let log = logged(&log_path, "config reload refused", 1).await;
    assert!(log.contains("not valid JSON"), "{log}");
    assert_eq!(served_by(listen).await, "a");
    // Valid: new requests go to the new target at once.
    std::fs::write(&path, file("b", b.url())).unwrap();
    hangup();
    logged(&log_path, "config reloaded", 1).await;
    assert_eq!(served_by(listen).await, "b");
    assert_eq!((a.count(), b.count()), (2, 1));
    // Every line of the log is a JSON object.
    let log = logged(&log_path, r#""message":"request""#, 3).await;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(log_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_for_a_live_gateway_and_1_otherwise() {
    let up =
        support::RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false).await;
    let gw = support::gateway(support::config(&[("a", up.url())]), &[]).await;
    let addr = gw.addr.to_string();
    let live = tokio::task::spawn_blocking(move || run(&["--healthcheck", &addr], &[]));
    assert_eq!(live.await.unwrap().status.code(), Some(0));
    let closed = free_addr().to_string();
    let dead = tokio::task::spawn_blocking(move || run(&["--healthcheck", &closed], &[]));
    let dead = dead.await.unwrap();
    assert_eq!(dead.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dead.stderr).contains("unhealthy"));
}

#[test]
fn the_sample_config_passes_check_config() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.sample.json");
    let keys = [
        ("WEB_CLIENT_KEY", "k"),
        ("COMETAPI_KEY", "k"),
        ("OPENAI_API_KEY", "k"),
    ];
    let out = run(&["--check-config", sample], &keys);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("targets cometapi -> openai, 1 clients"),
        "{stdout}"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_drops_no_request() {
    const CLIENTS: usize = 6;
    const PER_CLIENT: usize = 80;
    const RELOADS: usize = 20;
    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let a = support::RawUpstream::start(OK, false).await;
    let b = support::RawUpstream::start(OK, false).await;
    let listen = free_addr();
    let file = |first: (&str, String), second: (&str, String)| {
        format!(
            r#"{{"listen": "{listen}", "targets": [{{"name": "{}", "base_url": "{}"}},
                {{"name": "{}", "base_url": "{}"}}]}}"#,
            first.0, first.1, second.0, second.1
        )
    };
    let a_first = file(("a", a.url()), ("b", b.url()));
    let b_first = file(("b", b.url()), ("a", a.url()));
    let path = config_file("sighup-load", &a_first);
    let log_path =
        std::env::temp_dir().join(format!("tmf-cli-sighup-load-{}.log", std::process::id()));
    let child = serve(&path, &log_path, &[]);
    listening(listen).await;
    let url = format!("http://{listen}/v1/chat/completions");
    let load: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::with_capacity(PER_CLIENT);
                for _ in 0..PER_CLIENT {
                    statuses.push(support::post(&url, &[], support::CHAT).await.0.as_u16());
                }
                statuses
            })
        })
        .collect();
    // Each new file is written beside the config and renamed over it, as a deploy tool does.
    let staged = format!("{path}.next");
    for i in 0..RELOADS {
        let next = if i % 2 == 0 { &b_first } else { &a_first };
        std::fs::write(&staged, next).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        let kill = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut statuses = Vec::new();
    for task in load {
        statuses.extend(task.await.unwrap());
    }
    let failures = statuses.iter().filter(|s| **s != 200).count();
    let log = logged(&log_path, "config reloaded", RELOADS).await;
    println!(
        "SIGHUP under load: {} requests from {CLIENTS} clients, {} reloads logged, {failures} failures; served by a {}, b {}",
        statuses.len(),
        log.matches("config reloaded").count(),
        a.count(),
        b.count()
    );
    assert_eq!((statuses.len(), failures), (CLIENTS * PER_CLIENT, 0));
    assert_eq!(a.count() + b.count(), CLIENTS * PER_CLIENT);
    assert!(
        a.count() > 0 && b.count() > 0,
        "the load ran across the reloads"
    );
    assert!(!log.contains("config reload refused"), "{log}");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(log_path);
}
