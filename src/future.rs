//! The response future: reads the caller's body once, then carries out the engine's steps,
//! polling the attempts in flight and the timers. Every decision is the engine's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{request, Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::attempt::{timer, Attempt};
use crate::engine::{Engine, Output, Step};
use crate::error::{BoxError, FallbackError};
use crate::request::collect::Collector;
use crate::request::{Prepared, ReplayBody};
use crate::resilience::later;
use crate::settings::Shared;

pin_project_lite::pin_project! {
    /// The response future of [`Fallback`](crate::Fallback).
    #[project = Proj]
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<ReplayBody>, Response = Response<R>>,
        R: Body,
    {
        #[pin]
        phase: Phase<B, R>,
        inner: S,
        shared: Arc<Shared>,
        // The attempt in flight, inline; further hedged attempts are boxed.
        #[pin]
        attempt: Option<Attempt<S::Future, R>>,
        racers: Vec<Pin<Box<Attempt<S::Future, R>>>>,
        // The engine's timer: a backoff, or the next hedged attempt (boxed: rarely needed, and
        // the future is moved whole).
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        // The engine asked for a call, made once the inner service is ready.
        calling: bool,
        // The inner service is known to be ready: the caller polled it for this request.
        ready: bool,
        span: tracing::Span,
    }
}

pin_project_lite::pin_project! {
    #[project = PhaseProj]
    enum Phase<B, R: Body> {
        // Reading the caller's body.
        Collecting { #[pin] body: B, head: Option<request::Parts>, collector: Collector },
        // The engine runs the request (in the space the body's reading used).
        Running { engine: Engine<R> },
        // Failed before any attempt, or finished.
        Done { error: Option<FallbackError> },
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    B: Body,
    R: Body,
{
    pub(crate) fn new(inner: S, shared: Arc<Shared>, request: Request<B>) -> Self {
        let (head, body) = request.into_parts();
        // OpenTelemetry's GenAI attribute names, so that a `tracing-opentelemetry` pipeline
        // exports them as such; filled in when the request ends.
        let empty = tracing::field::Empty;
        let span = tracing::info_span!(
            target: "tower_model_fallback",
            "model_fallback",
            method = %head.method,
            path = %head.uri.path(),
            gen_ai.request.model = empty,
            gen_ai.response.model = empty,
            gen_ai.provider.name = empty,
        );
        let collector = Collector::new(shared.max_body_bytes);
        let phase = if collector.rejects(&body.size_hint()) {
            let error = Some(FallbackError::body_too_large(shared.max_body_bytes));
            Phase::Done { error }
        } else {
            let head = Some(head);
            Phase::Collecting {
                body,
                head,
                collector,
            }
        };
        ResponseFuture {
            phase,
            inner,
            shared,
            attempt: None,
            racers: Vec::new(),
            timer: None,
            deadline: None,
            calling: false,
            ready: false,
            span,
        }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Data: From<bytes::Bytes>,
    R::Error: Into<BoxError>,
{
    type Output = Output<R>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Output<R>> {
        let mut this = self.project();
        let span = this.span.clone();
        let _entered = span.enter();
        loop {
            let step = match this.phase.as_mut().project() {
                PhaseProj::Collecting { .. } => match ready!(this.poll_collect(cx)) {
                    Ok(()) => Step::Call,
                    Err(error) => {
                        this.phase.set(Phase::Done { error: None });
                        return Poll::Ready(Err(error));
                    }
                },
                PhaseProj::Running { .. } => ready!(this.poll_step(cx)),
                PhaseProj::Done { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(|| {
                        FallbackError::request("response future polled after completion".into())
                    })));
                }
            };
            if let Some(output) = this.apply(step) {
                record_outcome(&span, &output);
                return Poll::Ready(output);
            }
        }
    }
}

impl<S, B, R> Proj<'_, S, B, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Data: From<bytes::Bytes>,
    R::Error: Into<BoxError>,
{
    /// Reads the caller's body to its end, then starts the engine.
    fn poll_collect(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FallbackError>> {
        let PhaseProj::Collecting {
            mut body,
            head,
            collector,
        } = self.phase.as_mut().project()
        else {
            return Poll::Ready(Err(FallbackError::request("not collecting".into())));
        };
        loop {
            match ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if collector.push(data, &body.size_hint()).is_err() {
                            let limit = self.shared.max_body_bytes;
                            return Poll::Ready(Err(FallbackError::body_too_large(limit)));
                        }
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(FallbackError::body_unreadable(e.into()))),
                None => break,
            }
        }
        let bytes = std::mem::replace(collector, Collector::new(0)).finish();
        let Some(head) = head.take() else {
            return Poll::Ready(Err(FallbackError::request(
                "polled after completion".into(),
            )));
        };
        let prepared = Prepared::new(
            head,
            bytes,
            &self.shared.credential_names,
            &self.shared.targets,
        )?;
        let deadline = self.shared.deadline.and_then(|limit| {
            let sleep = timer(limit)?;
            *self.deadline = Some(Box::pin(sleep));
            Some(later(now(), limit))
        });
        let engine = Engine::start(self.shared.clone(), prepared, deadline, now())?;
        self.phase.set(Phase::Running { engine });
        // The caller polled our readiness, hence the inner service's: the first target is
        // called at once.
        *self.ready = true;
        Poll::Ready(Ok(()))
    }

    /// Polls what is in flight (the deadline, the attempts, the timer, the inner service's
    /// readiness for a call); ready with the engine's answer to the first event.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        let PhaseProj::Running { engine } = self.phase.as_mut().project() else {
            return Poll::Ready(Step::Done);
        };
        if self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
        {
            // Past the overall deadline nothing new starts: attempts reading a body decide on
            // what arrived, the others are cancelled.
            *self.deadline = None;
            let attempts = self.attempt.as_mut().as_pin_mut().into_iter();
            for attempt in attempts.chain(self.racers.iter_mut().map(Pin::as_mut)) {
                let id = attempt.id();
                if let Some(assessed) = attempt.conclude_now(engine.shared()) {
                    if engine.on_outcome(id, assessed, now()) == Step::Done {
                        return Poll::Ready(Step::Done);
                    }
                }
            }
            return Poll::Ready(engine.on_deadline(now()));
        }
        if let Some(attempt) = self.attempt.as_mut().as_pin_mut() {
            if let Poll::Ready(assessed) = attempt.poll_outcome(cx, engine.shared()) {
                let id = self.attempt.as_ref().as_pin_ref().map_or(0, |a| a.id());
                self.attempt.set(None);
                return Poll::Ready(engine.on_outcome(id, assessed, now()));
            }
        }
        for i in 0..self.racers.len() {
            if let Poll::Ready(assessed) = self.racers[i].as_mut().poll_outcome(cx, engine.shared())
            {
                let id = self.racers.swap_remove(i).id();
                return Poll::Ready(engine.on_outcome(id, assessed, now()));
            }
        }
        if self
            .timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
        {
            *self.timer = None;
            return Poll::Ready(engine.on_timer(now()));
        }
        if !*self.calling {
            return Poll::Pending;
        }
        if !*self.ready {
            if let Err(e) = ready!(self.inner.poll_ready(cx)) {
                *self.calling = false;
                return Poll::Ready(engine.on_unready(e.into(), now()));
            }
        }
        *self.calling = false;
        *self.ready = false;
        let launch = match engine.launch(now()) {
            Ok(launch) => launch,
            Err(step) => return Poll::Ready(step),
        };
        let attempt = Attempt::new(launch.id, self.inner.call(launch.request), self.shared);
        if self.attempt.is_none() {
            self.attempt.set(Some(attempt));
        } else {
            self.racers.push(Box::pin(attempt));
        }
        Poll::Ready(Step::Poll(launch.hedge_after))
    }

    /// Carries out a step; the output once the request is over.
    fn apply(&mut self, step: Step) -> Option<Output<R>> {
        match step {
            Step::Call => *self.calling = true,
            Step::Wait(wait) => match timer(wait) {
                Some(sleep) => *self.timer = Some(Box::pin(sleep)),
                // Without a runtime there is no timer: the backoff is not waited.
                None => *self.calling = true,
            },
            Step::Poll(Some(delay)) => *self.timer = timer(delay).map(Box::pin),
            Step::Poll(None) => {}
            Step::Done => {
                let output = match self.phase.as_mut().project() {
                    PhaseProj::Running { engine } => engine.take_output(),
                    _ => None,
                };
                let output = output.unwrap_or_else(|| {
                    Err(FallbackError::request("polled after completion".into()))
                });
                // Whatever is still in flight is cancelled now, not when the future is dropped.
                self.attempt.set(None);
                self.racers.clear();
                *self.timer = None;
                *self.deadline = None;
                self.phase.set(Phase::Done { error: None });
                return Some(output);
            }
        }
        None
    }
}

/// The request's GenAI attributes on its span: the model asked for, and the target and model
/// that served it.
fn record_outcome<R: Body>(span: &tracing::Span, output: &Output<R>) {
    let report = match output {
        Ok(response) => response.extensions().get::<crate::FallbackReport>(),
        Err(error) => Some(error.report()),
    };
    let Some(report) = report else {
        return;
    };
    if let Some(model) = report.requested_model() {
        span.record("gen_ai.request.model", model);
    }
    if let Some(served) = report.served_by() {
        span.record("gen_ai.provider.name", served.target());
        if let Some(model) = served.model() {
            span.record("gen_ai.response.model", model);
        }
    }
}
