//! [`Fallback`]: the service that re-issues a request to the next target.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::error::{BoxError, FallbackError};
use crate::future::ResponseFuture;
use crate::request::ReplayBody;
use crate::response::body::ResponseBody;
use crate::settings::Shared;

/// The middleware built by [`FallbackLayer`](crate::FallbackLayer).
///
/// It reads the caller's body once (bounded), then sends the request to the first target, and
/// to the next one while the policy says another target could do better. The inner service
/// receives a [`ReplayBody`]; it must be `Clone` (each request works on a clone, swapped in as
/// tower's docs advise) and its response body must be `Unpin` (hyper's `Incoming`, axum's `Body`
/// and boxed bodies are; wrap others with `http_body_util::BodyExt::boxed`).
///
/// `poll_ready` is the inner service's, and every attempt after the first waits for the inner
/// service's readiness again. Dropping the response future cancels the attempt in flight.
///
/// Its timers (the 10 s bound on reading an error body, first-byte timeouts, backoffs, the
/// deadline, hedging) run on tokio's time driver, as tower's `Timeout` does: inside a tokio
/// runtime, build it with the time driver enabled (`#[tokio::main]` does). Outside any tokio
/// runtime the layer still works, with reads bounded in size only and backoffs not waited.
#[derive(Clone)]
pub struct Fallback<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Fallback<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Fallback { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("targets", &self.shared.targets)
            .finish()
    }
}

impl<S, B, R> Service<Request<B>> for Fallback<S>
where
    S: Service<Request<ReplayBody>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Data: From<bytes::Bytes>,
    R::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<R>>;
    type Error = FallbackError;
    type Future = ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| FallbackError::upstream(e.into(), Default::default()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone-and-swap idiom: the service polled ready goes with this request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(inner, self.shared.clone(), request)
    }
}
