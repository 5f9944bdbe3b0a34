//! [`PerTarget`]: one inner stack per target, chosen by the [`AttemptTarget`] of each attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::util::Oneshot;
use tower_service::Service;

use crate::error::BoxError;
use crate::target::AttemptTarget;

/// An inner service that gives each target its own stack: a provider's own rate limit,
/// concurrency limit, timeout or client. Each attempt goes to the service at its
/// [`AttemptTarget::index`]; build it with
/// [`FallbackLayer::per_target`](crate::FallbackLayer::per_target), which checks that there is
/// one service per target.
///
/// Readiness is each target's own: `poll_ready` is always ready, and an attempt waits for its
/// target's service to be ready inside the call, so one saturated target never holds back the
/// others. To move on rather than wait, put tower's `LoadShed` in a target's stack: its
/// `Overloaded` is a failure the layer moves on from (the report records it). A `RateLimit`
/// (not `Clone`) is shared through a `Buffer` placed above its `LoadShed`:
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_model_fallback::{FallbackLayer, ReplayBody, Target};
/// # use std::convert::Infallible;
/// # use http::{Request, Response};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let client = || tower::service_fn(|_: Request<ReplayBody>| async {
/// #     Ok::<_, Infallible>(Response::new(String::new()))
/// # });
/// let layer = FallbackLayer::new([
///     Target::new("https://api.cometapi.com/v1")?.with_name("cometapi"),
///     Target::new("https://api.openai.com/v1")?.with_name("openai"),
/// ])?;
/// let cometapi = ServiceBuilder::new()
///     .buffer(64)                              // RateLimit is not Clone; Buffer shares it
///     .load_shed()                             // out of slots: Overloaded, the next target
///     .rate_limit(60, Duration::from_secs(60)) // this provider's own limit
///     .timeout(Duration::from_secs(20))
///     .service(client());
/// let openai = ServiceBuilder::new()
///     .load_shed()
///     .concurrency_limit(8)
///     .timeout(Duration::from_secs(30))
///     .service(client());
/// // Services of different types: box them to one type.
/// let service = layer.per_target([
///     tower::util::BoxCloneSyncService::new(cometapi),
///     tower::util::BoxCloneSyncService::new(openai),
/// ])?;
/// # let _ = service;
/// # Ok(())
/// # }
/// ```
///
/// A request without an [`AttemptTarget`] (one that did not come through the layer), or whose
/// index has no service, fails with an error and reaches no service.
pub struct PerTarget<S> {
    services: Arc<[S]>,
}

impl<S> PerTarget<S> {
    /// One service per target, in the order of the layer's targets. Prefer
    /// [`FallbackLayer::per_target`](crate::FallbackLayer::per_target), which checks the count.
    pub fn new(services: impl IntoIterator<Item = S>) -> Self {
        PerTarget {
            services: services.into_iter().collect(),
        }
    }

    /// The services, in target order.
    pub fn services(&self) -> &[S] {
        &self.services
    }
}

impl<S> Clone for PerTarget<S> {
    fn clone(&self) -> Self {
        PerTarget {
            services: self.services.clone(),
        }
    }
}

impl<S> std::fmt::Debug for PerTarget<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerTarget")
            .field("services", &self.services.len())
            .finish()
    }
}

impl<S, B> Service<Request<B>> for PerTarget<S>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = PerTargetError;
    type Future = PerTargetFuture<S, Request<B>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), PerTargetError>> {
        // Each target's readiness is awaited in its own call (see the type's docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let index = request
            .extensions()
            .get::<AttemptTarget>()
            .map(|t| t.index());
        let state = match index.and_then(|i| self.services.get(i)) {
            Some(service) => State::Calling {
                call: Oneshot::new(service.clone(), request),
            },
            None => State::Unknown {
                error: Some(missing(index, self.services.len())),
            },
        };
        PerTargetFuture { state }
    }
}

fn missing(index: Option<usize>, services: usize) -> PerTargetError {
    let message = match index {
        None => {
            "the request has no AttemptTarget: PerTarget serves requests the fallback layer sends"
                .to_owned()
        }
        Some(i) => format!("no service for target {i}: PerTarget has {services}"),
    };
    PerTargetError(message.into())
}

/// The error of [`PerTarget`]: its target's service's error (its [`source`](std::error::Error::source),
/// where the layer recognises timeouts, connect errors and `Overloaded`), or a request it has no
/// service for. A concrete type rather than a `BoxError`, so the stack can be called in futures
/// that must be `Send` (a `BoxError` there can trip rustc's "`From` is not general enough").
#[derive(Debug)]
pub struct PerTargetError(BoxError);

impl PerTargetError {
    /// The error itself.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl std::fmt::Display for PerTargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for PerTargetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`PerTarget`].
    pub struct PerTargetFuture<S: Service<R>, R> {
        #[pin]
        state: State<S, R>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S: Service<R>, R> {
        Calling { #[pin] call: Oneshot<S, R> },
        Unknown { error: Option<PerTargetError> },
    }
}

impl<S, R> Future for PerTargetFuture<S, R>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, PerTargetError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Calling { call } => call.poll(cx).map_err(|e| PerTargetError(e.into())),
            StateProj::Unknown { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| PerTargetError("polled after completion".into())))),
        }
    }
}
