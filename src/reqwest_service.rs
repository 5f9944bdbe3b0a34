//! [`ReqwestService`]: a reqwest client as the layer's inner service (cargo feature `reqwest`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use crate::request::ReplayBody;

/// The future reqwest's own tower service returns.
type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

/// A [`reqwest::Client`] as the inner service of [`FallbackLayer`](crate::FallbackLayer)
/// (cargo feature `reqwest`): each attempt's `http::Request` goes out through the client, and
/// its answer comes back as an `http::Response<reqwest::Body>`, streamed.
///
/// The client's own settings apply to every attempt: a `.timeout(…)`, `.connect_timeout(…)` or
/// `.read_timeout(…)` that fires is a timeout, and a refused connection or failed DNS lookup a
/// connect error — failures the layer moves on from (reqwest's errors are recognised by
/// [`ErrorKind::of`](crate::ErrorKind::of) wherever they occur). A reqwest `.timeout` bounds the
/// whole attempt, body included; the layer's
/// [`attempt_timeout`](crate::FallbackLayer::attempt_timeout) bounds only the wait for the head.
/// Give each target its own client with [`FallbackLayer::per_target`](crate::FallbackLayer::per_target).
///
/// The feature builds reqwest without its default features (no TLS, no HTTP/2): enable the ones
/// you need on your own `reqwest` dependency (`features = ["rustls"]`) and cargo unifies them.
/// A reqwest user can also build this crate with `default-features = false` and leave out
/// hyper-util's error recognition; reqwest itself still builds on hyper-util.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_model_fallback::{FallbackLayer, ReqwestService, Target};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
/// let service = ServiceBuilder::new()
///     .layer(FallbackLayer::new([
///         Target::new("http://127.0.0.1:8001/v1")?.with_model("primary-model"),
///         Target::new("http://127.0.0.1:8002/v1")?.with_model("fallback-model"),
///     ])?)
///     .service(ReqwestService::new(client));
/// # let _ = service;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ReqwestService {
    client: reqwest::Client,
}

impl ReqwestService {
    /// Sends every attempt through `client`.
    pub fn new(client: reqwest::Client) -> Self {
        ReqwestService { client }
    }

    /// The client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Service<Request<ReplayBody>> for ReqwestService {
    type Response = Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), reqwest::Error>> {
        Service::<reqwest::Request>::poll_ready(&mut self.client, cx)
    }

    fn call(&mut self, request: Request<ReplayBody>) -> ReqwestFuture {
        let (parts, body) = request.into_parts();
        // The body streams from the layer's one buffer: nothing is copied.
        let request = Request::from_parts(parts, reqwest::Body::wrap(body));
        let state = match reqwest::Request::try_from(request) {
            Ok(request) => State::Sending {
                pending: self.client.call(request),
            },
            Err(error) => State::Refused { error: Some(error) },
        };
        ReqwestFuture { state }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ReqwestService`].
    pub struct ReqwestFuture {
        #[pin]
        state: State,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State {
        Sending { #[pin] pending: Pending },
        // reqwest could not take the request (a URI it does not accept).
        Refused { error: Option<reqwest::Error> },
    }
}

impl Future for ReqwestFuture {
    type Output = Result<Response<reqwest::Body>, reqwest::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending { pending } => pending.poll(cx).map_ok(Response::from),
            StateProj::Refused { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                // Polled again after it answered: nothing more will come.
                None => Poll::Pending,
            },
        }
    }
}

impl std::fmt::Debug for ReqwestFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReqwestFuture").finish_non_exhaustive()
    }
}
