//! Two `fallback-gateway` processes (built with the `redis` feature, as this test is) share a
//! cooldown through a `redis-server` on 127.0.0.1 that the test starts itself. Redis keeps real
//! time, so the test waits on the wall clock, in loops bounded in count and time.
#![cfg(feature = "redis")]

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` on 127.0.0.1 without persistence; waits until it accepts connections.
fn redis_server() -> (Killed, String) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (the Debian package redis-server; .ci/run installs it)");
    let child = Killed(child);
    wait_listening(([127, 0, 0, 1], port).into());
    (child, format!("redis://127.0.0.1:{port}/"))
}

fn wait_listening(addr: SocketAddr) {
    for _ in 0..400 {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {addr}");
}

/// The gateway binary for `config`, on a free port of 127.0.0.1.
fn start_gateway(mut config: serde_json::Value, name: &str) -> (Killed, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    config["listen"] = addr.to_string().into();
    let path = std::env::temp_dir().join(format!(
        "tmf-redis-gateway-{name}-{}.json",
        std::process::id()
    ));
    std::fs::write(&path, config.to_string()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fallback-gateway"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    wait_listening(addr);
    let _ = std::fs::remove_file(&path);
    (child, addr)
}

/// One chat request: the status and the target that served it.
async fn through(addr: SocketAddr) -> (u16, String) {
    let (status, headers, _) = post(&format!("http://{addr}/v1/chat/completions"), &[], CHAT).await;
    let target = headers
        .get("x-fallback-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status.as_u16(), target)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"choices\":[]}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_share_a_cooldown() {
    let (_redis, redis_url) = redis_server();
    let primary = RawUpstream::limited_once(OK).await;
    let secondary = RawUpstream::start(OK, false).await;
    let prefix = format!("tmf-gw-test-{}", std::process::id());
    let mut config = config(&[("primary", primary.url()), ("secondary", secondary.url())]);
    config["health_store"] =
        serde_json::json!({"redis_url": redis_url, "prefix": prefix, "refresh_ms": 50});
    let (_one, one) = start_gateway(config.clone(), "one");
    let (_two, two) = start_gateway(config, "two");

    assert_eq!(through(one).await, (200, "secondary".into()));
    assert_eq!(primary.count(), 1);
    let start = Instant::now();
    loop {
        let (status, target) = through(two).await;
        assert_eq!(status, 200);
        if target == "secondary" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "gateway two never learnt of the cooldown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = primary.count();
    for _ in 0..5 {
        assert_eq!(through(two).await, (200, "secondary".into()));
        assert_eq!(through(one).await, (200, "secondary".into()));
    }
    assert_eq!(primary.count(), seen, "no gateway calls the cooling target");
}
