//! `fallback-gateway`: an OpenAI-compatible gateway with model fallback, built on
//! [`tower_model_fallback`].
//!
//! Point an OpenAI SDK at `http://HOST:PORT/v1`: every request goes to the first target, and on
//! to the next one when it is rate limited, overloaded, down or missing the model. Responses
//! stream back with `x-fallback-target`, `x-fallback-model` and `x-fallback-attempts`.
//!
//! The parts, each a module: [`config`] (the file), [`auth`] (client keys), [`proxy`] (one
//! request: routing, checks, decompression, the fallback stack, the response head),
//! [`upstream`] (the attempt service), [`serve`] (connections, timeouts, shutdown), [`demo`],
//! and with the `otel` feature, `otel` (traces over OTLP/HTTP).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tower_model_fallback_gateway::{serve, Gateway, GatewayConfig};
//!
//! let config = GatewayConfig::from_file("gateway.json")?;
//! let gateway = Gateway::new(&config, |var| std::env::var(var).ok())?;
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! serve::serve(listener, gateway, (&config).into(), std::future::pending()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod demo;
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
pub mod proxy;
pub mod serve;
pub mod upstream;

pub use config::GatewayConfig;
pub use proxy::Gateway;
