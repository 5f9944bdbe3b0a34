//! Load on loopback: the gateway against a plain reverse proxy, and peak memory with large bodies.
//!
//! `cargo run --release -p tower-model-fallback-gateway --example loadbench -- throughput [connections] [seconds]` starts
//! upstreams on 127.0.0.1 (one answering a fixed chat completion, one answering 503) and drives,
//! for `seconds` each, over `connections` keep-alive connections:
//!   (a) a plain hyper reverse proxy with no fallback (the baseline);
//!   (b) the gateway, primary healthy;
//!   (c) the gateway, primary answering 503, served by the fallback, cooldowns off;
//!   (d) the same with the default config, cooldowns on (the primary is skipped after 3
//!       failures).
//! It prints requests/s, p50, p99 and p99.9, and each one's throughput against (a).
//!
//! `cargo run --release -p tower-model-fallback-gateway --example loadbench -- nginx [seconds] [rounds]`
//! compares the gateway with nginx as a plain reverse proxy on the same upstreams, all driven by
//! `wrk -t1 -c32` (both must be installed: Debian's `nginx` and `wrk`): nginx in front of the
//! healthy upstream, the gateway with the primary healthy, and the gateway with a failing primary
//! under the default config, in interleaved rounds (default 5 of 5 s each, so that a neighbour's
//! load falls on every scenario alike). It prints each one's median requests/s and CPU time per
//! request (of everything but wrk: nginx's processes and this one), and the gateway's ratios to
//! nginx in both.
//!
//! `cargo run --release -p tower-model-fallback-gateway --example loadbench -- memory [requests]` sends `requests` (default 200)
//! concurrent 1 MiB bodies through the layer over 3 targets (the first two answer 503) and prints
//! the peak resident memory against the idle baseline.
//!
//! Everything runs in this one process on this machine's cores, so figures compare within a run.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;
use tower_model_fallback_gateway::{serve, Gateway, GatewayConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CHAT: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence, please."}]}"#;
const ANSWER: &[u8] = br#"{"id":"chatcmpl-bench","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("memory") => memory(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200)).await,
        Some("throughput") | None => {
            let connections = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
            let seconds = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
            throughput(connections, Duration::from_secs(seconds)).await
        }
        Some("nginx") => {
            let seconds = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
            let rounds = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
            nginx(Duration::from_secs(seconds), rounds).await
        }
        Some(other) => Err(format!("unknown mode {other}; use throughput, memory or nginx").into()),
    }
}

/// Connections the upstreams accepted: a proxy that reuses its connections opens a few.
static UPSTREAM_CONNECTIONS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// An upstream answering every request with `status` and `body`, reading (and dropping) the
/// request body as it comes.
async fn upstream(status: u16, body: &'static [u8]) -> Result<SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            UPSTREAM_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let service =
                hyper::service::service_fn(move |request: http::Request<Incoming>| async move {
                    let mut incoming = request.into_body();
                    while let Some(Ok(_)) = incoming.frame().await {}
                    let mut response = http::Response::new(Full::new(Bytes::from_static(body)));
                    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                    response.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                });
            // Upstreams read with hyper's smallest buffer, so that their own buffering (which a
            // real upstream does in another process) does not count against the layer.
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .max_buf_size(8192)
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// The baseline: a hyper server forwarding to one upstream with a plain hyper client.
async fn plain_proxy(upstream: SocketAddr) -> Result<SocketAddr, BoxError> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let client = client.clone();
                async move {
                    let (mut head, body) = request.into_parts();
                    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
                    let path = path.strip_prefix("/v1").unwrap_or(path);
                    head.uri = format!("http://{upstream}/v1{path}").parse()?;
                    head.headers.remove(http::header::HOST);
                    let response = client
                        .request(http::Request::from_parts(head, body))
                        .await?;
                    Ok::<_, BoxError>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// The gateway over `targets` on 127.0.0.1 (cooldowns on, its default, unless `cooldowns` is
/// false); returns its address.
async fn gateway(targets: [SocketAddr; 2], cooldowns: bool) -> Result<SocketAddr, BoxError> {
    let cooldown = if cooldowns {
        ""
    } else {
        r#", "cooldown": "off""#
    };
    let json = format!(
        r#"{{"targets": [{{"name": "primary", "base_url": "http://{}/v1", "model": "gpt-4o-mini"}},
                         {{"name": "fallback", "base_url": "http://{}/v1", "model": "gpt-4o-mini"}}],
             "attempt_timeout_ms": 30000{cooldown}}}"#,
        targets[0], targets[1]
    );
    let config = GatewayConfig::from_json(json.as_bytes())?;
    let gateway = Gateway::new(&config, |_| None)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve::serve(
        listener,
        gateway,
        (&config).into(),
        std::future::pending(),
    ));
    Ok(addr)
}

struct Figures {
    requests_per_sec: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    errors: u64,
}

/// Drives `addr` with `connections` keep-alive connections for `duration`.
async fn drive(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<Figures, BoxError> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                return (latencies, 1);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut sender, connection)) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
            else {
                return (latencies, 1);
            };
            tokio::spawn(connection);
            while Instant::now() < deadline {
                let request = http::Request::post("/v1/chat/completions")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(CHAT)))
                    .unwrap_or_default();
                let started = Instant::now();
                if sender.ready().await.is_err() {
                    errors += 1;
                    break;
                }
                match sender.send_request(request).await {
                    Ok(response) if response.status() == 200 => {
                        let _ = response.into_body().collect().await;
                        latencies.push(started.elapsed());
                    }
                    Ok(response) => {
                        let _ = response.into_body().collect().await;
                        errors += 1;
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e) = task.await?;
        all.extend(latencies);
        errors += e;
    }
    all.sort();
    let pct = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Figures {
        requests_per_sec: all.len() as f64 / duration.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
        p999: pct(0.999),
        errors,
    })
}

async fn throughput(connections: usize, duration: Duration) -> Result<(), BoxError> {
    let ok = upstream(200, ANSWER).await?;
    let down = upstream(
        503,
        br#"{"error":{"message":"overloaded","type":"server_error"}}"#,
    )
    .await?;
    let scenarios = [
        ("(a) plain proxy, no fallback", plain_proxy(ok).await?),
        (
            "(b) gateway, primary healthy",
            gateway([ok, down], false).await?,
        ),
        (
            "(c) gateway, primary 503",
            gateway([down, ok], false).await?,
        ),
        (
            "(d) gateway, primary 503, cooldowns",
            gateway([down, ok], true).await?,
        ),
    ];
    println!(
        "{connections} connections, {}s per scenario, loopback, one process",
        duration.as_secs()
    );
    println!(
        "{:<38} {:>10} {:>9} {:>9} {:>9} {:>8} {:>12} {:>8} {:>7} {:>9}",
        "scenario",
        "req/s",
        "p50",
        "p99",
        "p99.9",
        "vs (a)",
        "CPU/request",
        "vs (a)",
        "errors",
        "upstream connections"
    );
    // LOADBENCH_ONLY=ab runs the scenarios named (b alone, for a profiler); ratios are to the
    // first one run.
    let only = std::env::var("LOADBENCH_ONLY").ok();
    let mut baseline = None;
    let mut cpu_baseline = None;
    for (name, addr) in scenarios {
        if only.as_deref().is_some_and(|o| !o.contains(&name[1..2])) {
            continue;
        }
        // Warm the connections and pools.
        drive(addr, connections, Duration::from_millis(500)).await?;
        let opened = UPSTREAM_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed);
        let cpu = cpu_time();
        let f = drive(addr, connections, duration).await?;
        let cpu = cpu_time().saturating_sub(cpu);
        let served = (f.requests_per_sec * duration.as_secs_f64()).max(1.0);
        let cpu_per_request = cpu.as_secs_f64() * 1e6 / served;
        let cpu_base = *cpu_baseline.get_or_insert(cpu_per_request);
        let opened = UPSTREAM_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed) - opened;
        let base = *baseline.get_or_insert(f.requests_per_sec);
        println!(
            "{name:<38} {:>10.0} {:>9.1?} {:>9.1?} {:>9.1?} {:>7.2}x {:>9.1} µs {:>7.2}x {:>7} {:>9}",
            f.requests_per_sec,
            f.p50,
            f.p99,
            f.p999,
            f.requests_per_sec / base,
            cpu_per_request,
            cpu_base / cpu_per_request,
            f.errors,
            opened
        );
    }
    Ok(())
}

/// Resident memory now and at its peak, in KiB (Linux; zero elsewhere).
/// CPU time this process has used (user + system), from `/proc/self/stat` (Linux; zero
/// elsewhere). All of the benchmark (load, proxy, upstreams) is in this process, so CPU time per
/// request is the figure a busy, shared machine disturbs least.
fn cpu_time() -> Duration {
    cpu_of("self")
}

/// CPU time (user + system) of process `pid` ("self" for this one), from `/proc/PID/stat`.
fn cpu_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks/s.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of process `pid` and of its children (nginx's master and its workers).
fn cpu_of_tree(pid: u32) -> Duration {
    let mut total = cpu_of(&pid.to_string());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{name}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            total += cpu_of(&name);
        }
    }
    total
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn memory(requests: usize) -> Result<(), BoxError> {
    let down_a = upstream(503, b"{}").await?;
    let down_b = upstream(503, b"{}").await?;
    let ok = upstream(200, ANSWER).await?;
    let layer = tower_model_fallback::FallbackLayer::new(
        [down_a, down_b, ok]
            .map(|a| tower_model_fallback::Target::new(format!("http://{a}/v1")).unwrap()),
    )?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, tower_model_fallback::ReplayBody> =
        Client::builder(TokioExecutor::new()).build(connector);
    let service = tower::Layer::layer(&layer, client);
    // Warm up: one request, so that the idle figure includes the runtime and the pools.
    let mut body = vec![b' '; 1 << 20];
    body[..CHAT.len()].copy_from_slice(CHAT);
    let warm = http::Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.clone())))?;
    service.clone().oneshot(warm).await?;
    let (idle, _) = rss_kib();
    let mut tasks = Vec::new();
    for _ in 0..requests {
        // Each caller's body is its own 1 MiB buffer, made just before it is sent.
        let mut own = vec![b' '; 1 << 20];
        own[..CHAT.len()].copy_from_slice(CHAT);
        let request = http::Request::post("/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(own)))?;
        tasks.push(tokio::spawn(service.clone().oneshot(request)));
    }
    let mut served = 0;
    for task in tasks {
        let response = task.await??;
        let report = response
            .extensions()
            .get::<tower_model_fallback::FallbackReport>()
            .cloned()
            .unwrap_or_default();
        if response.status() == 200 && report.attempts().len() == 3 {
            served += 1;
        }
        let _ = response.into_body().collect().await;
    }
    let (_, peak) = rss_kib();
    let bodies = requests as u64 * 1024;
    let limit = (bodies + idle) as f64 * 1.2;
    println!("{requests} concurrent 1 MiB requests, each through 3 targets ({served} served by the third)");
    println!("idle RSS            {:>8.1} MiB", idle as f64 / 1024.0);
    println!("peak RSS            {:>8.1} MiB", peak as f64 / 1024.0);
    println!("bodies alone        {:>8.1} MiB", bodies as f64 / 1024.0);
    println!(
        "peak / (bodies + idle) = {:.2} (goal: at most 1.2, i.e. {:.1} MiB)",
        peak as f64 / (bodies + idle) as f64,
        limit / 1024.0
    );
    Ok(())
}

/// nginx as a plain reverse proxy to `upstream`, with upstream keep-alive and no access log, as
/// a child process (stopped with the returned guard); its address.
fn start_nginx(
    upstream: SocketAddr,
    dir: &std::path::Path,
) -> Result<(Child, SocketAddr), BoxError> {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream mock {{ server {upstream}; keepalive 64; }}\n\
           server {{\n    listen {listen};\n    location /v1/ {{\n      proxy_pass http://mock;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = std::process::Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let child = Child(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok((child, listen));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err("nginx did not start listening".into())
}

/// A child process, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // SIGTERM, so that nginx's master stops its workers too (SIGKILL would orphan them).
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `wrk -t1 -c32` POSTing the chat body to `addr` for `duration`: requests/s, and the count of
/// non-2xx answers and socket errors.
async fn wrk(
    addr: SocketAddr,
    duration: Duration,
    dir: &std::path::Path,
) -> Result<(f64, String), BoxError> {
    let script = dir.join("post.lua");
    let body = String::from_utf8_lossy(CHAT).replace('\'', "\\'");
    std::fs::write(
        &script,
        format!("wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"),
    )?;
    let url = format!("http://{addr}/v1/chat/completions");
    let seconds = format!("{}s", duration.as_secs());
    let script = script.display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("wrk")
            .args(["-t1", "-c32", "-d", &seconds, "-s", &script, &url])
            .output()
    })
    .await??;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output: {text}"))?;
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect();
    Ok((rps, problems.join("; ")))
}

async fn nginx(duration: Duration, rounds: usize) -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join(format!("loadbench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ok = upstream(200, ANSWER).await?;
    let down = upstream(
        503,
        br#"{"error":{"message":"overloaded","type":"server_error"}}"#,
    )
    .await?;
    let (nginx_child, nginx_addr) = start_nginx(ok, &dir)?;
    let scenarios = [
        ("nginx, plain reverse proxy", nginx_addr),
        ("gateway, primary healthy", gateway([ok, down], true).await?),
        (
            "gateway, primary 503, default config",
            gateway([down, ok], true).await?,
        ),
    ];
    println!(
        "wrk -t1 -c32 -d{}s, POST /v1/chat/completions, loopback upstreams in this process; \
         {rounds} rounds, the scenarios interleaved, medians",
        duration.as_secs()
    );
    for (_, addr) in &scenarios {
        // Warm the pools (and, for the failing primary, open its breaker).
        wrk(*addr, Duration::from_secs(1), &dir).await?;
    }
    // Interleaved rounds: a neighbour's load on this shared machine falls on every scenario.
    let mut figures = vec![Vec::new(); scenarios.len()];
    let mut problems = vec![String::new(); scenarios.len()];
    // CPU per request of everything but wrk: this process (the upstreams, and the gateway when
    // it is the one driven) and nginx's processes; a busy neighbour moves it less than req/s.
    let mut cpu = vec![Vec::new(); scenarios.len()];
    let nginx_pid = nginx_child.0.id();
    for _ in 0..rounds.max(1) {
        for (i, (_, addr)) in scenarios.iter().enumerate() {
            let before = cpu_time() + cpu_of_tree(nginx_pid);
            let (rps, p) = wrk(*addr, duration, &dir).await?;
            let used = (cpu_time() + cpu_of_tree(nginx_pid)).saturating_sub(before);
            figures[i].push(rps);
            cpu[i].push(used.as_secs_f64() * 1e6 / (rps * duration.as_secs_f64()).max(1.0));
            if !p.is_empty() {
                problems[i] = p;
            }
        }
    }
    println!(
        "{:<40} {:>10} {:>9} {:>12} {:>9}  rounds (req/s)  problems",
        "scenario", "req/s", "vs nginx", "CPU/request", "vs nginx"
    );
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&figures[0]);
    let cpu_base = median(&cpu[0]);
    for (i, (name, _)) in scenarios.iter().enumerate() {
        let m = median(&figures[i]);
        let c = median(&cpu[i]);
        let rounds: Vec<String> = figures[i].iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "{name:<40} {m:>10.0} {:>8.2}x {c:>9.1} µs {:>8.2}x  {}  {}",
            m / base,
            cpu_base / c,
            rounds.join(" "),
            problems[i]
        );
    }
    drop(nginx_child);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
