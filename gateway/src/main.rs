//! `fallback-gateway`: the command line. See the crate's docs and README.md for the config.

use std::process::ExitCode;

use tower_model_fallback_gateway::config::LogFormat;
use tower_model_fallback_gateway::proxy::SERVER_SPAN_TARGET;
use tower_model_fallback_gateway::{demo, serve, Gateway, GatewayConfig};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

const USAGE: &str = "\
fallback-gateway: an OpenAI-compatible gateway with model fallback

usage:
  fallback-gateway                      run the demo (two upstreams of its own on 127.0.0.1)
  fallback-gateway --config PATH        serve the gateway that PATH describes
  fallback-gateway --check-config PATH  validate PATH (and its environment variables); exit 0 or 2
  fallback-gateway --healthcheck ADDR   GET http://ADDR/healthz; exit 0 when it answers 200, else 1
  fallback-gateway --help               this text
  fallback-gateway --version            the version

Keys come from the environment variables the config names. Logs go to stderr, one line per
request, as JSON or text (log_format; RUST_LOG=tower_model_fallback=debug shows every attempt).
SIGHUP reloads the config file: a valid one serves new requests at once, an invalid one is
logged and the running config goes on. SIGTERM or Ctrl-C stops accepting, lets requests in
flight finish for shutdown_timeout_ms, then cuts the rest (with otel, the last spans are
exported first, for at most twice otel.timeout_ms).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--help" | "-h"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["--version" | "-V"] => {
            println!("fallback-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["--healthcheck", addr] => match runtime() {
            Ok(rt) => rt.block_on(healthcheck(addr)),
            Err(e) => fail(format!("runtime: {e}")),
        },
        ["--check-config", path] => match runtime() {
            // In a runtime: the layer's Redis store (feature `redis`) starts its tasks on it.
            Ok(rt) => rt.block_on(async {
                match load(path) {
                    Ok((config, gateway)) => {
                        let traces = match &config.otel {
                            // Not the query: it could hold a token.
                            Some(otel) => format!(
                                ", traces to {}://{}{}",
                                otel.endpoint.scheme_str().unwrap_or("http"),
                                otel.endpoint.authority().map_or("", |a| a.as_str()),
                                otel.endpoint.path()
                            ),
                            None => String::new(),
                        };
                        println!(
                            "{path}: ok; listen {}, targets {}, {} clients{traces}",
                            config.listen,
                            gateway.targets().join(" -> "),
                            config.clients.len()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                }
            }),
            Err(e) => fail(format!("runtime: {e}")),
        },
        ["--config", path] => match runtime() {
            Ok(rt) => rt.block_on(async {
                match load(path) {
                    Ok((config, gateway)) => {
                        let (telemetry, otel) = match telemetry::start(&config) {
                            Ok(started) => started,
                            Err(e) => return fail(e),
                        };
                        init_logs(config.log_format, otel);
                        reload_on_hangup(path.to_string(), gateway.clone());
                        let code = run(config, gateway, false).await;
                        // The spans of the last requests go out before the process ends.
                        telemetry::stop(telemetry).await;
                        code
                    }
                    Err(e) => fail(e),
                }
            }),
            Err(e) => fail(format!("runtime: {e}")),
        },
        [] => {
            init_logs(Some(LogFormat::Text), None);
            match runtime() {
                Ok(rt) => rt.block_on(async {
                    let config = match demo::config().await {
                        Ok(config) => config,
                        Err(e) => return fail(format!("demo: {e}")),
                    };
                    match Gateway::new(&config, |_| None) {
                        Ok(gateway) => run(config, gateway, true).await,
                        Err(e) => fail(e.to_string()),
                    }
                }),
                Err(e) => fail(format!("runtime: {e}")),
            }
        }
        _ => {
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// A layer of the process's subscriber.
type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The log lines on stderr (`RUST_LOG`, or `info` and the layer's warnings), and beside them
/// `otel`, with a filter of its own (see `otel::filter`).
fn init_logs(format: Option<LogFormat>, otel: Option<BoxedLayer>) {
    use tracing_subscriber::filter::{filter_fn, FilterExt};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_model_fallback=warn".into())
        // The server spans are for OpenTelemetry: a log line has no span around it.
        // A hint of "any level" keeps the env filter's as the pair's: without one, the pair
        // would have none and every disabled debug callsite would be asked again.
        .and(
            filter_fn(|meta| meta.target() != SERVER_SPAN_TARGET)
                .with_max_level_hint(tracing_subscriber::filter::LevelFilter::TRACE),
        );
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match LogFormat::or_by_terminal(format) {
        // One flat object a line: the event's fields beside `timestamp`, `level`, `target`.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
    };
    let layers: Vec<BoxedLayer> = std::iter::once(logs).chain(otel).collect();
    tracing_subscriber::registry().with(layers).init();
}

/// The `otel` section at work: traces exported while the gateway serves, the last ones when
/// it stops.
mod telemetry {
    use tower_model_fallback_gateway::GatewayConfig;

    use super::BoxedLayer;

    /// The running export, if any.
    #[cfg(feature = "otel")]
    pub type Running = Option<tower_model_fallback_gateway::otel::Telemetry>;
    #[cfg(not(feature = "otel"))]
    pub type Running = ();

    /// Starts the export `config` asks for (in a runtime: it sends on this one), and the layer
    /// that feeds it.
    pub fn start(config: &GatewayConfig) -> Result<(Running, Option<BoxedLayer>), String> {
        #[cfg(feature = "otel")]
        if let Some(otel) = &config.otel {
            use tracing_subscriber::Layer;
            let headers = otel
                .headers(|var| std::env::var(var).ok())
                .map_err(|e| e.to_string())?;
            let runtime = tokio::runtime::Handle::current();
            let (telemetry, layer) =
                tower_model_fallback_gateway::otel::Telemetry::start(otel, headers, runtime)?;
            return Ok((Some(telemetry), Some(layer.boxed())));
        }
        // Without the feature, a config with `otel` was refused when it was parsed.
        let _ = config;
        Ok((Running::default(), None))
    }

    /// Exports the spans still queued, on a blocking thread while this runtime sends them.
    #[cfg(feature = "otel")]
    pub async fn stop(running: Running) {
        let Some(telemetry) = running else {
            return;
        };
        match tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(target: "gateway", "{e}"),
            Err(e) => tracing::warn!(target: "gateway", "otel: shutdown failed: {e}"),
        }
    }

    /// Nothing to export without the feature.
    #[cfg(not(feature = "otel"))]
    pub async fn stop(_: Running) {}
}

/// Reloads the config at `path` on every SIGHUP: validated first (file, fields, keys); an
/// invalid one is logged and the running config goes on serving. The handler is in place when
/// this returns (a SIGHUP before it would end the process).
fn reload_on_hangup(path: String, gateway: Gateway) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!(target: "gateway", "SIGHUP cannot be watched; no config reload");
            return;
        };
        tokio::spawn(reload_each(hangups, path, gateway));
    }
    #[cfg(not(unix))]
    let _ = (path, gateway);
}

#[cfg(unix)]
async fn reload_each(mut hangups: tokio::signal::unix::Signal, path: String, gateway: Gateway) {
    {
        while hangups.recv().await.is_some() {
            let reloaded = GatewayConfig::from_file(&path)
                .and_then(|config| gateway.reload(&config, |var| std::env::var(var).ok()));
            match reloaded {
                Ok(warning) => {
                    if let Some(warning) = warning {
                        tracing::warn!(target: "gateway", "config reload: {warning}");
                    }
                    tracing::info!(
                        target: "gateway",
                        targets = %gateway.targets().join(" -> "),
                        "config reloaded from {path}"
                    );
                }
                Err(e) => tracing::error!(
                    target: "gateway",
                    "config reload refused, the running config goes on: {e}"
                ),
            }
        }
    }
}

/// The config at `path` and the gateway it describes, keys from the environment.
fn load(path: &str) -> Result<(GatewayConfig, Gateway), String> {
    let config = GatewayConfig::from_file(path).map_err(|e| e.to_string())?;
    let gateway =
        Gateway::new(&config, |var| std::env::var(var).ok()).map_err(|e| e.to_string())?;
    if let Some(otel) = &config.otel {
        // The collector's headers are checked with the rest; `--config` reads them again.
        otel.headers(|var| std::env::var(var).ok())
            .map_err(|e| e.to_string())?;
    }
    Ok((config, gateway))
}

async fn run(config: GatewayConfig, gateway: Gateway, demo: bool) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("listen: cannot bind {}: {e}", config.listen)),
    };
    let listen = listener.local_addr().unwrap_or(config.listen);
    eprintln!(
        "gateway on http://{listen}/v1, targets in order: {}",
        gateway.targets().join(" -> ")
    );
    if demo {
        eprintln!(
            "try:\n  curl -s http://{listen}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}' -D -"
        );
        eprintln!(
            "  (add \"stream\": true for server-sent events; every other request falls back)"
        );
    }
    tokio::spawn(log_stats(gateway.clone()));
    match serve::serve(listener, gateway, (&config).into(), shutdown()).await {
        Ok(()) => {
            eprintln!("gateway stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("serve: {e}")),
    }
}

/// A container's health check without a shell or curl in the image: the binary asks itself.
async fn healthcheck(addr: &str) -> ExitCode {
    use http_body_util::Empty;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let Ok(uri) = format!("http://{addr}/healthz").parse::<http::Uri>() else {
        return fail(format!(
            "--healthcheck: {addr:?} is not an address like 127.0.0.1:8080"
        ));
    };
    let asked = tokio::time::timeout(std::time::Duration::from_secs(3), client.get(uri)).await;
    match asked {
        Ok(Ok(response)) if response.status() == http::StatusCode::OK => ExitCode::SUCCESS,
        Ok(Ok(response)) => unhealthy(format!("/healthz answered {}", response.status())),
        Ok(Err(e)) => unhealthy(format!("/healthz: {e}")),
        Err(_) => unhealthy("/healthz: no answer within 3 s"),
    }
}

fn unhealthy(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("fallback-gateway: unhealthy: {message}");
    ExitCode::from(1)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("fallback-gateway: {message}");
    ExitCode::from(2)
}

/// Logs a one-line summary of the counters every minute.
async fn log_stats(gateway: Gateway) {
    let mut ticks = tokio::time::interval(std::time::Duration::from_secs(60));
    ticks.tick().await;
    loop {
        ticks.tick().await;
        tracing::info!(target: "gateway", "stats: {}", gateway.stats().snapshot());
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("shutting down: no new connections; finishing requests in flight");
}
