//! OpenTelemetry (feature `otel`): the gateway's traces, exported over OTLP/HTTP (protobuf) to
//! the collector the config's `otel` section names.
//!
//! A proxied request is a trace of its own:
//!
//! - a server span named `METHOD /v1/route` (or `METHOD` for a path outside the known routes;
//!   target [`SERVER_SPAN_TARGET`]) with `http.route`,
//!   `http.request.method`, `url.path`, `http.response.status_code`, `fallback_gateway.client`
//!   and, when the answer reports them, `gen_ai.usage.input_tokens` / `output_tokens`;
//! - as its child, the layer's `model_fallback` span with `gen_ai.request.model`,
//!   `gen_ai.response.model` and `gen_ai.provider.name` (the target that served), and its
//!   events: one per attempt (`gen_ai.provider.name`, `gen_ai.request.model`,
//!   `http.request.resend_count` from the second attempt on);
//! - the layer's `usage` event, on the server span (the body is read after the layer's span
//!   has ended).
//!
//! No key, client key, header value or body is ever an attribute; the collector's own headers
//! (`headers_env`) are marked sensitive and never logged.
//!
//! The SDK's batch span processor exports from a thread of its own, where no tokio runtime
//! runs: [`ExportClient`] sends each export on the runtime it was made on and waits for the
//! answer through a channel, the whole bounded by `timeout_ms`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tokio::runtime::Handle;
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::OtelConfig;
pub use crate::proxy::SERVER_SPAN_TARGET;

/// The most of a collector's answer that is read (an `ExportTraceServiceResponse` is a few
/// bytes; a partial-success message a few hundred).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the OpenTelemetry layer sees, whatever `RUST_LOG` says for the log lines: the server
/// spans, and the layer's spans and events down to `debug` (the successful attempt and the
/// usage are `debug` events; the log lines show the layer's warnings only).
pub fn filter() -> Targets {
    Targets::new()
        .with_target(SERVER_SPAN_TARGET, tracing::Level::INFO)
        .with_target("tower_model_fallback", tracing::Level::DEBUG)
}

/// The exporter's HTTP client: the gateway's hyper client (HTTPS with the webpki roots, or
/// plain HTTP), driven on a tokio runtime whatever thread asks.
pub struct ExportClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: Handle,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
}

impl ExportClient {
    /// A client that sends on `runtime`, adds `headers` to every export and gives up on one
    /// after `timeout` (connecting, sending and reading the answer).
    pub fn new(
        runtime: Handle,
        headers: Vec<(HeaderName, HeaderValue)>,
        timeout: Duration,
    ) -> ExportClient {
        ExportClient {
            client: Client::builder(TokioExecutor::new()).build(crate::upstream::connector()),
            runtime,
            headers,
            timeout,
        }
    }
}

impl std::fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header names only: their values are the collector's credentials.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ExportClient")
            .field("headers", &names)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (mut head, body) = request.into_parts();
        for (name, value) in &self.headers {
            head.headers.insert(name.clone(), value.clone());
        }
        let request = Request::from_parts(head, Full::new(body));
        let (client, timeout) = (self.client.clone(), self.timeout);
        let (answer, answered) = tokio::sync::oneshot::channel();
        // Spawned, not awaited here: the batch processor's thread polls this future with a
        // plain executor, where hyper's I/O and tokio's timers have no reactor.
        self.runtime.spawn(async move {
            let sent = match tokio::time::timeout(timeout, send(client, request)).await {
                Ok(sent) => sent,
                Err(_) => Err(format!("no answer within {timeout:?}").into()),
            };
            let _ = answer.send(sent);
        });
        // A runtime that is shutting down drops the task, and with it the sender.
        answered
            .await
            .unwrap_or_else(|_| Err("the export was dropped: the runtime is shutting down".into()))
    }
}

async fn send(
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Response<Bytes>, HttpError> {
    let (head, body) = client.request(request).await?.into_parts();
    let body = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        // The status is the answer; past the bound its message is left unread, not turned
        // into a network error the exporter would retry (sending the batch again).
        Err(e) if e.is::<LengthLimitError>() => Bytes::new(),
        Err(e) => return Err(e),
    };
    Ok(Response::from_parts(head, body))
}

/// The running export: the tracer provider behind the layer of [`Telemetry::start`].
pub struct Telemetry {
    provider: SdkTracerProvider,
    timeout: Duration,
}

impl Telemetry {
    /// Starts exporting to `config`'s collector with `headers` (see
    /// [`OtelConfig::headers`]), sending on `runtime`; the layer to add to the subscriber,
    /// already filtered by [`filter`].
    pub fn start<S>(
        config: &OtelConfig,
        headers: Vec<(HeaderName, HeaderValue)>,
        runtime: Handle,
    ) -> Result<(Telemetry, impl Layer<S> + Send + Sync), String>
    where
        S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(ExportClient::new(runtime, headers, config.timeout))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.endpoint.to_string())
            .with_timeout(config.timeout)
            .build()
            .map_err(|e| format!("otel: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("fallback-gateway");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // The file and line of each event mean little to an operator; the thread less.
            .with_location(false)
            .with_threads(false)
            .with_filter(filter());
        let telemetry = Telemetry {
            provider,
            timeout: config.timeout,
        };
        Ok((telemetry, layer))
    }

    /// Exports the spans still queued and stops. Blocks the thread (for at most twice the
    /// export timeout: one export, and its retries) while the runtime sends: call it from a
    /// blocking task.
    pub fn shutdown(self) -> Result<(), String> {
        self.provider
            .shutdown_with_timeout(self.timeout * 2)
            .map_err(|e| format!("otel: the last spans were not exported: {e}"))
    }
}
