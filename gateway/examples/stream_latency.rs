//! Time to the first content chunk of a streamed answer: straight to the upstream vs through the
//! gateway (the fallback layer inside the gateway's proxy), measured in the same run,
//! interleaved, over loopback. The upstream opens as OpenAI does, with a role-only delta (the
//! preamble the layer holds until the first content), then content. Prints percentiles and the
//! difference.
//!
//! Run: `cargo run --release -p tower-model-fallback-gateway --example stream_latency -- [requests]` (default 500 each way).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower_model_fallback_gateway::{serve, Gateway, GatewayConfig};

/// OpenAI's first chunk: a role-only delta.
const ROLE: &[u8] = b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"finish_reason\":null}]}\n\n";

const BODY: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let upstream = streaming_upstream().await?;

    let config = GatewayConfig::from_json(
        format!(r#"{{"targets": [{{"name": "upstream", "base_url": "http://{upstream}/v1", "model": "gpt-4o-mini"}}], "attempt_timeout_ms": 30000}}"#)
            .as_bytes(),
    )?;
    let service = Gateway::new(&config, |_| None)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway = listener.local_addr()?;
    tokio::spawn(serve::serve(
        listener,
        service,
        (&config).into(),
        std::future::pending(),
    ));

    // The measuring client sets TCP_NODELAY like the gateway's own client, so that neither path
    // waits on Nagle's algorithm.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let direct_url = format!("http://{upstream}/v1/chat/completions");
    let gateway_url = format!("http://{gateway}/v1/chat/completions");
    // Warm both paths' connection pools.
    for _ in 0..20 {
        first_chunk(&client, &direct_url).await?;
        first_chunk(&client, &gateway_url).await?;
    }
    let (mut direct, mut through) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        direct.push(first_chunk(&client, &direct_url).await?);
        through.push(first_chunk(&client, &gateway_url).await?);
    }
    direct.sort();
    through.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    println!(
        "time to the first content chunk over loopback, {n} streamed requests each way, interleaved"
    );
    println!("{:<10} {:>10} {:>10} {:>10}", "", "p50", "p90", "p99");
    for (name, v) in [("direct", &direct), ("gateway", &through)] {
        println!(
            "{name:<10} {:>10.1?} {:>10.1?} {:>10.1?}",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99)
        );
    }
    let (d, g) = (pct(&direct, 0.5), pct(&through, 0.5));
    println!(
        "gateway adds {:.1?} at the median ({:.2}x the direct time)",
        g.saturating_sub(d),
        g.as_secs_f64() / d.as_secs_f64()
    );
    Ok(())
}

/// Sends one streamed chat request and returns the time until the first chunk that carries
/// content (past the role-only preamble).
async fn first_chunk(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))?;
    let started = Instant::now();
    let response = client.request(request).await?;
    let mut body = response.into_body();
    loop {
        let frame = body.frame().await.ok_or("no content chunk")??;
        if frame
            .data_ref()
            .is_some_and(|d| d.windows(3).any(|w| w == b"Hel"))
        {
            break;
        }
    }
    let elapsed = started.elapsed();
    while body.frame().await.transpose()?.is_some() {}
    Ok(elapsed)
}

/// An upstream that sends the head and a role-only delta at once, then content in two events.
async fn streaming_upstream() -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                let _ = request.into_body().collect().await;
                let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                tokio::spawn(async move {
                    let _ = tx.send(Bytes::from_static(ROLE)).await;
                    let _ = tx
                        .send(Bytes::from_static(
                            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
                        ))
                        .await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let _ = tx
                        .send(Bytes::from_static(
                            b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
                        ))
                        .await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                });
                let mut response = Response::new(Channel(rx));
                response.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("text/event-stream"),
                );
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(http_body::Frame::data(b))))
    }
}
