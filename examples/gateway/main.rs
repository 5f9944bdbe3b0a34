//! An OpenAI-compatible gateway with model fallback.
//!
//! `cargo run --example gateway -- --config gateway.json` serves `/v1/*`: point an OpenAI SDK at
//! `http://127.0.0.1:8080/v1` and every request goes to the first target, and on to the next one
//! when it is rate limited, overloaded, down or missing the model. Responses stream back with
//! `x-fallback-target`, `x-fallback-model` and `x-fallback-attempts` headers. With no `--config`
//! it runs a demo against two upstreams of its own on 127.0.0.1, the first one flaky.
//!
//! The config (unknown fields are errors; keys come from environment variables):
//!
//! ```json
//! {"listen": "127.0.0.1:8080",
//!  "targets": [
//!    {"name": "cometapi", "base_url": "https://api.cometapi.com/v1", "model": "gpt-4o-mini", "api_key_env": "COMETAPI_KEY"},
//!    {"name": "openai",   "base_url": "https://api.openai.com/v1",   "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}],
//!  "attempt_timeout_ms": 30000,
//!  "max_body_bytes": 33554432}
//! ```
//!
//! Several replicas share cooldowns and the retry budget through Redis with
//! `"health_store": {"redis_url_env": "REDIS_URL", "prefix": "llm-gateway"}`, built with
//! `cargo run --features redis --example gateway -- --config gateway.json`.
//!
//! Logs go to stderr (`RUST_LOG=tower_model_fallback=debug` shows every attempt); they never
//! contain keys or bodies. Ctrl-C stops accepting and finishes the requests in flight.

mod app;

use std::process::ExitCode;

use tower_model_fallback::{FallbackConfig, TargetConfig};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_model_fallback=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.as_slice() {
        [] => match demo_config().await {
            Ok(config) => config,
            Err(e) => return fail(format!("demo: {e}")),
        },
        [flag, path] if flag == "--config" => {
            let loaded = std::fs::read(path)
                .map_err(|e| format!("config: cannot read {path}: {e}"))
                .and_then(|bytes| app::parse_config(&bytes).map_err(|e| e.to_string()));
            match loaded {
                Ok(config) => config,
                Err(e) => return fail(e),
            }
        }
        _ => return fail("usage: gateway [--config PATH]".into()),
    };
    let layer = match config.fallback.layer() {
        Ok(layer) => layer,
        Err(e) => return fail(e.to_string()),
    };
    let stack = app::stack(&layer, config.fallback.attempt_timeout());
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("listen: cannot bind {}: {e}", config.listen)),
    };
    let names: Vec<&str> = layer.targets().iter().map(|t| t.get_name()).collect();
    eprintln!(
        "gateway on http://{}/v1, targets in order: {}",
        config.listen,
        names.join(" -> ")
    );
    if args.is_empty() {
        eprintln!(
            "try:\n  curl -s http://{}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}' -D -",
            config.listen
        );
        eprintln!(
            "  (add \"stream\": true for server-sent events; every other request falls back)"
        );
    }
    tokio::spawn(app::log_stats(
        layer.stats(),
        std::time::Duration::from_secs(60),
    ));
    match app::serve(listener, app::router(stack, layer.stats()), shutdown()).await {
        Ok(()) => {
            eprintln!("gateway stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("serve: {e}")),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("gateway: {message}");
    ExitCode::from(2)
}

/// Ctrl-C (or SIGTERM): stop accepting, let requests in flight finish.
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
    eprintln!("shutting down: finishing requests in flight");
}

/// The demo: two upstreams of our own, no keys.
async fn demo_config() -> std::io::Result<app::GatewayConfig> {
    let (flaky, steady) = app::demo_upstreams().await?;
    let target = |name: &str, addr: std::net::SocketAddr, model: &str| {
        let json = serde_json::json!({"name": name, "base_url": format!("http://{addr}/v1"), "model": model});
        serde_json::from_value::<TargetConfig>(json).map_err(std::io::Error::other)
    };
    let mut fallback =
        FallbackConfig::from_json(br#"{"targets": [], "attempt_timeout_ms": 10000}"#)
            .map_err(std::io::Error::other)?;
    fallback.targets = vec![
        target("flaky", flaky, "demo-primary")?,
        target("steady", steady, "demo-fallback")?,
    ];
    Ok(app::GatewayConfig {
        listen: "127.0.0.1:8080".parse().map_err(std::io::Error::other)?,
        fallback,
    })
}
