//! The `fallback-gateway` binary as a process: run to completion, or spawned and killed when
//! the test ends; its config in a temporary file; its log file waited on, bounded.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fallback-gateway");

/// The binary, with none of the environment's `RUST_LOG` and `OTEL_*` (the OpenTelemetry SDK
/// reads its sampler, headers and batch settings there): only what a test gives it.
fn command() -> Command {
    let mut command = Command::new(BIN);
    command.env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OTEL_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs the binary with `args` and `env` (and no `RUST_LOG` or `OTEL_*`) to its end.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = command();
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// Writes `json` to a temporary file named for `name` and this process; its path.
pub fn config_file(name: &str, json: &str) -> String {
    let path = std::env::temp_dir().join(format!("tmf-cli-{name}-{}.json", std::process::id()));
    std::fs::write(&path, json).unwrap();
    path.to_string_lossy().into_owned()
}

/// Spawns `fallback-gateway --config path` with `env` (and no `RUST_LOG` or `OTEL_*`), its
/// stderr to the file `log`.
pub fn serve(path: &str, log: &std::path::Path, env: &[(&str, &str)]) -> Killed {
    let mut command = command();
    command
        .args(["--config", path])
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    for (k, v) in env {
        command.env(k, v);
    }
    Killed(command.spawn().unwrap())
}

/// A spawned gateway, killed (if still running) and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Killed {
    /// Sends SIGTERM and waits (bounded by `within`) for the process to end; how it ended.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let kill = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let signalled = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(signalled.elapsed() < within, "the gateway exits");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits (bounded: 10 s) until something accepts connections on `addr`.
pub async fn listening(addr: SocketAddr) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{addr} listens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An address on 127.0.0.1 that nothing listens on (now).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits (bounded) until the log file holds `needle` `times` times.
pub async fn logged(path: &std::path::Path, needle: &str, times: usize) -> String {
    for _ in 0..500 {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.matches(needle).count() >= times {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{needle:?} was not logged {times} times");
}
