//! The attempt service: one shared hyper client (HTTPS by ALPN, or plain HTTP; h2c when asked).
//! The layer bounds each attempt (`attempt_timeout_ms`), so this service has no timer of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::BoxError;
use tower_model_fallback::{Fallback, FallbackLayer, ReplayBody};

/// The client the gateway forwards with.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, ReplayBody>;

/// HTTPS (ALPN, the webpki roots) or plain HTTP: the attempts', and the OTLP exporter's.
pub(crate) fn connector() -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true); // a proxy forwards small writes at once
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// The clients of one gateway: `default` for `https://` (HTTP/1.1 or HTTP/2 by ALPN) and for
/// `http://` (HTTP/1.1); `h2c`, when set, for `http://` in HTTP/2 with prior knowledge.
struct Clients {
    default: HttpsClient,
    h2c: Option<HttpsClient>,
}

/// One attempt: the shared clients. Cloned for every request (the layer's clone-and-swap), so a
/// clone is one reference count.
#[derive(Clone)]
pub struct Attempt {
    clients: Arc<Clients>,
}

impl Attempt {
    /// The attempt service; `h2c` speaks HTTP/2 with prior knowledge to `http://` targets.
    pub fn new(h2c: bool) -> Attempt {
        let default = Client::builder(TokioExecutor::new()).build(connector());
        let h2c = h2c.then(|| {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector())
        });
        Attempt {
            clients: Arc::new(Clients { default, h2c }),
        }
    }
}

impl tower::Service<http::Request<ReplayBody>> for Attempt {
    type Response = http::Response<Incoming>;
    type Error = AttemptError;
    type Future = AttemptFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        // hyper-util's client is always ready; its pool waits inside the response future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<ReplayBody>) -> AttemptFuture {
        let client = match &self.clients.h2c {
            Some(h2c) if request.uri().scheme_str() == Some("http") => h2c,
            _ => &self.clients.default,
        };
        AttemptFuture {
            response: client.request(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// An attempt in flight: the client's response future, its error made concrete.
    pub struct AttemptFuture {
        #[pin]
        response: hyper_util::client::legacy::ResponseFuture,
    }
}

impl Future for AttemptFuture {
    type Output = Result<http::Response<Incoming>, AttemptError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = self.project().response;
        response.poll(cx).map_err(|e| AttemptError(e.into()))
    }
}

/// An attempt's error. A concrete type rather than `BoxError`: with `BoxError` as the inner
/// error, rustc cannot prove the handler's future `Send` ("implementation of `From` is not
/// general enough", a known compiler limitation that tower's `Buffer` shares).
#[derive(Debug)]
pub struct AttemptError(BoxError);

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for AttemptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The service the gateway calls: the fallback layer over the attempt service.
pub type Stack = Fallback<Attempt>;

/// The fallback layer over a new attempt service.
pub fn stack(layer: &FallbackLayer, h2c: bool) -> Stack {
    tower::Layer::layer(layer, Attempt::new(h2c))
}
