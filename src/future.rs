//! The response future: read the body, then attempt targets one after the other.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http::{request, response, Request, Response};
use http_body::{Body, Frame};
use tokio::time::Instant;
use tower_service::Service;

use crate::body::{Collector, ReplayBody, ResponseBody};
use crate::error::{BoxError, FallbackError};
use crate::layer::Shared;
use crate::policy::{Decision, ErrorKind, Outcome};
use crate::report::{Attempt, AttemptOutcome, FallbackReport};
use crate::request::Prepared;

pin_project_lite::pin_project! {
    /// The response future of [`Fallback`](crate::Fallback).
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<ReplayBody>, Response = Response<R>>,
        R: Body,
    {
        #[pin]
        state: State<B, S::Future>,
        ctx: Ctx<S, R>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<B, F> {
        // Reading the caller's body.
        Collecting { #[pin] body: B },
        // Waiting for the inner service to be ready for the next attempt.
        Ready,
        // An attempt in flight.
        Calling { #[pin] future: F },
        // Reading the start of an error response to classify it (`Ctx::peek`).
        Peeking,
        // Finished, or failed before the first attempt (`Ctx::failed`).
        Done,
    }
}

struct Ctx<S, R: Body> {
    inner: S,
    shared: Arc<Shared>,
    head: Option<request::Parts>,
    collector: Option<Collector>,
    prepared: Option<Prepared>,
    failed: Option<FallbackError>,
    report: FallbackReport,
    next: usize,
    current: Option<Current>,
    peek: Option<Peek<R>>,
}

/// The attempt in flight.
struct Current {
    index: usize,
    model: Option<Arc<str>>,
    substituted: bool,
    started: Instant,
}

/// An error response whose body is being read, within the error-body limit.
struct Peek<R: Body> {
    head: response::Parts,
    body: R,
    frames: VecDeque<Frame<R::Data>>,
    read: usize,
    error: Option<R::Error>,
    ended: bool,
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    B: Body,
    R: Body,
{
    pub(crate) fn new(inner: S, shared: Arc<Shared>, request: Request<B>) -> Self {
        let (head, body) = request.into_parts();
        let collector = Collector::new(shared.max_body_bytes);
        let failed = collector
            .rejects(&body.size_hint())
            .then(|| FallbackError::body_too_large(shared.max_body_bytes));
        let state = if failed.is_some() {
            State::Done
        } else {
            State::Collecting { body }
        };
        ResponseFuture {
            state,
            ctx: Ctx {
                inner,
                shared,
                head: Some(head),
                collector: Some(collector),
                prepared: None,
                failed,
                report: FallbackReport::default(),
                next: 0,
                current: None,
                peek: None,
            },
        }
    }
}

/// What to do after recording an attempt.
enum Next<T> {
    Continue,
    Finish(T),
}

impl<S, R> Ctx<S, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body + Unpin,
{
    fn has_next(&self) -> bool {
        self.next < self.shared.targets.len()
    }

    /// Builds the next target's request and calls the (ready) inner service.
    fn call_next(&mut self) -> Result<S::Future, FallbackError> {
        let index = self.next;
        self.next += 1;
        let (Some(prepared), Some(target)) = (&self.prepared, self.shared.targets.get(index))
        else {
            return Err(FallbackError::request("no target left to call".into()));
        };
        let plan = prepared.attempt(target)?;
        self.current = Some(Current {
            index,
            model: plan.model,
            substituted: plan.substituted,
            started: Instant::now(),
        });
        Ok(self.inner.call(plan.request))
    }

    /// Records the attempt in flight.
    fn record(&mut self, outcome: AttemptOutcome, decision: Decision) {
        let Some(current) = self.current.take() else {
            return;
        };
        let name = self
            .shared
            .targets
            .get(current.index)
            .map(|t| t.name.clone())
            .unwrap_or_else(|| Arc::from("?"));
        let attempt = Attempt {
            target: name,
            target_index: current.index,
            model: current.model,
            substituted: current.substituted,
            outcome,
            elapsed: current.started.elapsed(),
            decision,
        };
        macro_rules! attempt_event {
            ($level:expr, $message:literal) => {
                tracing::event!(
                    target: "tower_model_fallback",
                    $level,
                    attempt = self.report.attempts.len() + 1,
                    target_name = %attempt.target,
                    model = attempt.model.as_deref().unwrap_or("-"),
                    outcome = %attempt.outcome,
                    elapsed_ms = attempt.elapsed.as_millis() as u64,
                    $message,
                )
            };
        }
        match decision {
            Decision::NextTarget => {
                attempt_event!(
                    tracing::Level::WARN,
                    "attempt failed; trying the next target"
                )
            }
            Decision::Return => attempt_event!(tracing::Level::DEBUG, "attempt done"),
        }
        self.report.push(attempt);
    }

    /// Decides on a response: hand it back, or drop it and go on.
    fn on_response(
        &mut self,
        response: Response<ResponseBody<R>>,
        body: Option<&[u8]>,
    ) -> Next<Response<ResponseBody<R>>> {
        let status = response.status();
        let decision = self.shared.classifier.classify(&Outcome::Response {
            status,
            headers: response.headers(),
            body,
        });
        self.record(AttemptOutcome::Status(status), decision);
        if decision == Decision::NextTarget && self.has_next() {
            return Next::Continue;
        }
        self.report.exhausted = decision == Decision::NextTarget;
        self.report.served = Some(self.report.attempts.len() - 1);
        let mut response = response;
        response
            .extensions_mut()
            .insert(std::mem::take(&mut self.report));
        Next::Finish(response)
    }

    /// Decides on an inner error: go on, or end with it.
    fn on_error(&mut self, error: BoxError) -> Next<FallbackError> {
        let kind = ErrorKind::of(&*error);
        let decision = self.shared.classifier.classify(&Outcome::Error {
            kind,
            error: &*error,
        });
        self.record(
            AttemptOutcome::Error {
                kind,
                message: error_chain(&*error),
            },
            decision,
        );
        if decision == Decision::NextTarget && self.has_next() {
            return Next::Continue;
        }
        self.report.exhausted = decision == Decision::NextTarget;
        Next::Finish(FallbackError::upstream(
            error,
            std::mem::take(&mut self.report),
        ))
    }
}

/// An error's message followed by its sources'.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !message.contains(&next) {
            message.push_str(": ");
            message.push_str(&next);
        }
        source = e.source();
    }
    message
}

/// The bytes read from an error body, in one buffer (error paths only).
fn contiguous<D: Buf>(frames: &VecDeque<Frame<D>>) -> Vec<u8> {
    let mut out = Vec::new();
    for data in frames.iter().filter_map(Frame::data_ref) {
        out.extend_from_slice(data.chunk());
    }
    out
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    R: Body + Unpin,
{
    type Output = Result<Response<ResponseBody<R>>, FallbackError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let ctx = this.ctx;
        loop {
            match this.state.as_mut().project() {
                StateProj::Collecting { mut body } => {
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    let Some(collector) = ctx.collector.as_mut() else {
                        this.state.set(State::Done);
                        continue;
                    };
                    match frame {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                if collector.push(data, &body.size_hint()).is_err() {
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(FallbackError::body_too_large(
                                        ctx.shared.max_body_bytes,
                                    )));
                                }
                            }
                        }
                        Some(Err(e)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(FallbackError::body_unreadable(e.into())));
                        }
                        None => {
                            let bytes = ctx.collector.take().map(Collector::finish);
                            let prepared = match (ctx.head.take(), bytes) {
                                (Some(head), Some(bytes)) => {
                                    Prepared::new(head, bytes, &ctx.shared.credential_names)
                                }
                                _ => Err(FallbackError::request("polled after completion".into())),
                            };
                            let first = prepared.and_then(|p| {
                                ctx.report.requested_model = p.requested_model.clone();
                                ctx.prepared = Some(p);
                                // The caller polled our readiness, hence the inner service's.
                                ctx.call_next()
                            });
                            match first {
                                Ok(future) => this.state.set(State::Calling { future }),
                                Err(e) => {
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(e));
                                }
                            }
                        }
                    }
                }
                StateProj::Ready => {
                    if let Err(e) = ready!(ctx.inner.poll_ready(cx)) {
                        // A failed service cannot take the next attempt: end here.
                        let index = ctx.next;
                        ctx.current = Some(Current {
                            index,
                            model: None,
                            substituted: false,
                            started: Instant::now(),
                        });
                        let error: BoxError = e.into();
                        ctx.record(
                            AttemptOutcome::Error {
                                kind: ErrorKind::of(&*error),
                                message: error_chain(&*error),
                            },
                            Decision::Return,
                        );
                        this.state.set(State::Done);
                        let report = std::mem::take(&mut ctx.report);
                        return Poll::Ready(Err(FallbackError::upstream(error, report)));
                    }
                    match ctx.call_next() {
                        Ok(future) => this.state.set(State::Calling { future }),
                        Err(e) => {
                            this.state.set(State::Done);
                            let report = std::mem::take(&mut ctx.report);
                            return Poll::Ready(Err(e.with_report(report)));
                        }
                    }
                }
                StateProj::Calling { future } => match ready!(future.poll(cx)) {
                    Ok(response) => {
                        let status = response.status();
                        let limit = ctx.shared.error_body_limit;
                        if status.as_u16() >= 400
                            && limit > 0
                            && ctx.shared.classifier.wants_body(status, response.headers())
                        {
                            let (head, body) = response.into_parts();
                            ctx.peek = Some(Peek {
                                head,
                                body,
                                frames: VecDeque::new(),
                                read: 0,
                                error: None,
                                ended: false,
                            });
                            this.state.set(State::Peeking);
                            continue;
                        }
                        let response = response.map(ResponseBody::new);
                        match ctx.on_response(response, None) {
                            Next::Continue => this.state.set(State::Ready),
                            Next::Finish(response) => {
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(response));
                            }
                        }
                    }
                    Err(e) => match ctx.on_error(e.into()) {
                        Next::Continue => this.state.set(State::Ready),
                        Next::Finish(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    },
                },
                StateProj::Peeking => {
                    let limit = ctx.shared.error_body_limit;
                    let Some(peek) = ctx.peek.as_mut() else {
                        this.state.set(State::Done);
                        continue;
                    };
                    while peek.read < limit && !peek.ended && peek.error.is_none() {
                        match ready!(Pin::new(&mut peek.body).poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Some(data) = frame.data_ref() {
                                    peek.read += data.remaining();
                                }
                                peek.frames.push_back(frame);
                            }
                            Some(Err(e)) => peek.error = Some(e),
                            None => peek.ended = true,
                        }
                    }
                    let Some(peek) = ctx.peek.take() else {
                        continue;
                    };
                    let bytes = contiguous(&peek.frames);
                    let prefix = &bytes[..bytes.len().min(limit)];
                    let body =
                        ResponseBody::with_buffered(peek.body, peek.frames, peek.error, peek.ended);
                    let response = Response::from_parts(peek.head, body);
                    match ctx.on_response(response, Some(prefix)) {
                        Next::Continue => this.state.set(State::Ready),
                        Next::Finish(response) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                    }
                }
                StateProj::Done => {
                    return Poll::Ready(Err(ctx.failed.take().unwrap_or_else(|| {
                        FallbackError::request("response future polled after completion".into())
                    })));
                }
            }
        }
    }
}
