//! Prints the models that offer a feature, cheapest first, from a models list: a file, or
//! CometAPI's `GET /api/models` with the key from an environment variable.
//!
//! Run:
//!   cargo run --example list_models -- tests/fixtures/models.json text-to-text
//!   COMETAPI_KEY=... cargo run --example list_models -- https://api.cometapi.com/api/models text-to-text COMETAPI_KEY

use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_model_fallback::ModelCatalog;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (source, feature, key_env) = match args.as_slice() {
        [source, feature] => (source, feature, None),
        [source, feature, key_env] => (source, feature, Some(key_env)),
        _ => {
            eprintln!("usage: list_models <file or URL> <feature> [API key env var]");
            return ExitCode::from(2);
        }
    };
    let catalog = if source.starts_with("http://") || source.starts_with("https://") {
        fetch(source, key_env.map(String::as_str)).await
    } else {
        ModelCatalog::from_file(source).map_err(|e| e.to_string())
    };
    let catalog = match catalog {
        Ok(c) => c,
        Err(e) => {
            eprintln!("list_models: {e}");
            return ExitCode::from(2);
        }
    };
    let candidates = catalog.candidates(feature);
    println!(
        "{} models offer {feature}, cheapest first (USD per million tokens):",
        candidates.len()
    );
    println!(
        "{:<28} {:<12} {:>9} {:>9} {:>12}",
        "model", "provider", "input", "output", "per request"
    );
    let price = |p: Option<f64>| p.map_or_else(|| "-".to_owned(), |p| format!("{p:.3}"));
    for m in candidates {
        let p = m.pricing.unwrap_or_default();
        println!(
            "{:<28} {:<12} {:>9} {:>9} {:>12}",
            m.id,
            m.provider.as_deref().unwrap_or("-"),
            price(p.input),
            price(p.output),
            price(p.per_request)
        );
    }
    ExitCode::SUCCESS
}

/// GETs a models list over HTTPS, with `Authorization: Bearer $key_env` when a variable is named.
async fn fetch(url: &str, key_env: Option<&str>) -> Result<ModelCatalog, String> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut request = http::Request::get(url);
    if let Some(var) = key_env {
        let key =
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    ModelCatalog::from_json(&body).map_err(|e| e.to_string())
}
