//! What the in-process benchmarks share: a 1 KiB chat body, an inner service that answers at
//! once, and a way to poll without a runtime.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tower::Service;
use tower_model_fallback::ReplayBody;

/// A chat request of about 1 KiB.
pub fn body() -> Bytes {
    let mut s = String::from(r#"{"model":"gpt-4o-mini","messages":["#);
    while s.len() < 980 {
        s.push_str(r#"{"role":"user","content":"Summarise this paragraph in one line."},"#);
    }
    s.push_str(r#"{"role":"user","content":"ok"}]}"#);
    Bytes::from(s)
}

/// Answers at once: 503 for the host `down.test`, else 200 with a small JSON body.
#[derive(Clone, Copy)]
pub struct Instant;

impl Service<Request<ReplayBody>> for Instant {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        let status = if req.uri().host() == Some("down.test") {
            503
        } else {
            200
        };
        let mut response =
            Response::new(Full::new(Bytes::from_static(br#"{"id":"x","choices":[]}"#)));
        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
        std::future::ready(Ok(response))
    }
}

/// Polls a future that completes without waiting.
pub fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// Reads a body to its end.
pub fn drain<B: Body + Unpin>(mut body: B) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0;
    while let Poll::Ready(Some(Ok(frame))) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        n += frame.data_ref().map_or(0, bytes::Buf::remaining);
    }
    n
}
