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

/// `redis-server` on 127.0.0.1 without persistence; waits until it accepts connections. With
/// `tls`, it takes TLS connections only (its certificate signed by `tls`'s CA) and wants
/// `PASSWORD`.
fn redis_server(tls: Option<&TestCa>) -> (Killed, String) {
    let port = free_port();
    let mut command = Command::new("redis-server");
    command
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let url = match tls {
        None => {
            command.args(["--port", &port.to_string()]);
            format!("redis://127.0.0.1:{port}/")
        }
        Some(ca) => {
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cert-file", &ca.file("server.crt")])
                .args(["--tls-key-file", &ca.file("server.key")])
                .args(["--tls-ca-cert-file", &ca.file("ca.crt")])
                .args(["--tls-auth-clients", "no", "--requirepass", PASSWORD]);
            format!("rediss://:{PASSWORD}@127.0.0.1:{port}/")
        }
    };
    let child = command
        .spawn()
        .expect("redis-server (the Debian package redis-server; .ci/run installs it)");
    let child = Killed(child);
    wait_listening(([127, 0, 0, 1], port).into());
    (child, url)
}

const PASSWORD: &str = "s3cr3t-gw-redis-pass";

/// A CA and a server certificate for 127.0.0.1 that it signed, made with `openssl` in a
/// directory removed when dropped.
struct TestCa(std::path::PathBuf);

impl TestCa {
    fn new() -> TestCa {
        let dir = std::env::temp_dir().join(format!("tmf-gw-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let ca = TestCa(dir);
        for args in [
            "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=gw-test-ca -keyout ca.key -out ca.crt",
            "req -newkey rsa:2048 -nodes -subj /CN=gw-test-redis -keyout server.key -out server.csr",
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile server.ext -out server.crt",
        ] {
            let out = Command::new("openssl")
                .args(args.split(' '))
                .current_dir(&ca.0)
                .output()
                .expect("openssl (Debian's package openssl; .ci/run installs it)");
            assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
        }
        ca
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// The gateway binary for `config`, on a free port of 127.0.0.1, with `env` set; its stderr
/// goes to `log`.
fn start_gateway(
    mut config: serde_json::Value,
    name: &str,
    env: &[(&str, &str)],
    log: &std::path::Path,
) -> (Killed, SocketAddr) {
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
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
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
    let (_redis, redis_url) = redis_server(None);
    let logs = share_a_cooldown(serde_json::json!({"redis_url": redis_url}), &[]).await;
    assert!(logs.contains("shared health store connected"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_the_password_in_the_environment_they_share_a_cooldown_and_never_log_it() {
    let ca = TestCa::new();
    let (_redis, redis_url) = redis_server(Some(&ca));
    let store =
        serde_json::json!({"redis_url_env": "TEST_REDIS_URL", "tls_ca_file": ca.file("ca.crt")});
    let logs = share_a_cooldown(store, &[("TEST_REDIS_URL", &redis_url)]).await;
    assert!(logs.contains("shared health store connected"), "{logs}");
    assert!(
        !logs.contains(PASSWORD),
        "a log line shows the password: {logs}"
    );

    // The same config with a CA file that is no CA: --check-config names the field, and
    // neither it nor the error shows the password.
    let mut config = config(&[("primary", "http://127.0.0.1:9/v1".into())]);
    config["health_store"] = serde_json::json!({"redis_url_env": "TEST_REDIS_URL", "tls_ca_file": ca.file("server.key")});
    let path =
        std::env::temp_dir().join(format!("tmf-redis-tls-check-{}.json", std::process::id()));
    std::fs::write(&path, config.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fallback-gateway"))
        .arg("--check-config")
        .arg(&path)
        .env("TEST_REDIS_URL", &redis_url)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("health_store.tls_ca_file: holds no PEM certificate"),
        "{said}"
    );
    assert!(!said.contains(PASSWORD), "{said}");
}

/// Two gateways over primary (429 once, then 200) and secondary with this `health_store`
/// section (and `env`): once gateway one has seen the 429, gateway two skips primary, and
/// neither calls it again. Returns both gateways' logs.
async fn share_a_cooldown(mut store: serde_json::Value, env: &[(&str, &str)]) -> String {
    let primary = RawUpstream::limited_once(OK).await;
    let secondary = RawUpstream::start(OK, false).await;
    store["prefix"] = format!("tmf-gw-test-{}-{}", std::process::id(), free_port()).into();
    store["refresh_ms"] = 50.into();
    let mut config = config(&[("primary", primary.url()), ("secondary", secondary.url())]);
    config["health_store"] = store;
    let log = |name: &str| {
        std::env::temp_dir().join(format!(
            "tmf-redis-gw-{name}-{}-{}.log",
            std::process::id(),
            free_port()
        ))
    };
    let (log_one, log_two) = (log("one"), log("two"));
    let (one_process, one) = start_gateway(config.clone(), "one", env, &log_one);
    let (two_process, two) = start_gateway(config, "two", env, &log_two);

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
    drop((one_process, two_process));
    let mut logs = String::new();
    for path in [log_one, log_two] {
        logs.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        let _ = std::fs::remove_file(&path);
    }
    logs
}
