//! A hand-written tower client wrapped by the layer: a minimal service that opens one HTTP/1
//! connection per request with hyper's low-level API. Its errors are its own type; the layer
//! still recognises a refused connection by walking `source()` down to the `io::Error`.
//!
//! The primary's address has nothing listening, so its attempt fails to connect and the
//! fallback answers.
//!
//! Run: `cargo run --example custom_client`

mod upstream;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::{Service, ServiceExt};
use tower_model_fallback::{FallbackLayer, FallbackReport, ReplayBody, Target};

/// One connection per request; `Clone` and always ready.
#[derive(Clone, Copy, Debug)]
struct OneConnectionClient;

/// The client's own error type, with the cause reachable through `source()`.
#[derive(Debug)]
enum ClientError {
    Connect(std::io::Error),
    Http(hyper::Error),
    NoAuthority,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(_) => f.write_str("could not connect"),
            ClientError::Http(_) => f.write_str("HTTP exchange failed"),
            ClientError::NoAuthority => f.write_str("the request has no host"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(e) => Some(e),
            ClientError::Http(e) => Some(e),
            ClientError::NoAuthority => None,
        }
    }
}

impl Service<Request<ReplayBody>> for OneConnectionClient {
    type Response = Response<Incoming>;
    type Error = ClientError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, ClientError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<ReplayBody>) -> Self::Future {
        Box::pin(async move {
            let authority = request
                .uri()
                .authority()
                .cloned()
                .ok_or(ClientError::NoAuthority)?;
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(ClientError::Connect)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(ClientError::Http)?;
            tokio::spawn(connection);
            // HTTP/1 wants the path in the request line; the layer set the `host` header.
            *request.uri_mut() = request
                .uri()
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .parse()
                .unwrap_or_default();
            sender
                .send_request(request)
                .await
                .map_err(ClientError::Http)
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let nothing_listens = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        listener.local_addr()?
    };
    let fallback = upstream::serve(Duration::ZERO, upstream::chat_completion).await?;
    let client = tower::Layer::layer(
        &FallbackLayer::new([
            Target::new(format!("http://{nothing_listens}/v1"))?
                .with_name("down")
                .with_model("model-a"),
            Target::new(format!("http://{}/v1", fallback.addr))?
                .with_name("up")
                .with_model("model-b"),
        ])?,
        OneConnectionClient,
    );
    let request = Request::post("/chat/completions")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"x","messages":[]}"#,
        )))?;
    let response = client.oneshot(request).await?;
    let report = response
        .extensions()
        .get::<FallbackReport>()
        .cloned()
        .unwrap_or_default();
    for attempt in report.attempts() {
        println!("{attempt}");
    }
    let body = response.into_body().collect().await?.to_bytes();
    println!("answer: {}", String::from_utf8_lossy(&body));
    Ok(())
}
