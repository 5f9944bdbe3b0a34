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
use crate::sse;

/// How long an error body may take to arrive when no first-byte timeout is set.
const ERROR_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
        // Reading the start of a response body (`Ctx::peek`): an error body to classify it, or a
        // success up to its first chunk before committing to it. Bounded by the first-byte timer.
        Reading { #[pin] timer: Option<tokio::time::Sleep> },
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
    /// The last response, dropped once the next attempt is sent.
    pending: Option<Peek<R>>,
}

/// The attempt in flight.
struct Current {
    index: usize,
    model: Option<Arc<str>>,
    substituted: bool,
    started: Instant,
}

/// A response whose body is being read before it is decided on.
struct Peek<R: Body> {
    head: response::Parts,
    body: R,
    frames: VecDeque<Frame<R::Data>>,
    read: usize,
    error: Option<BoxError>,
    ended: bool,
    purpose: Purpose,
    /// An SSE stream: commit only once its first event is complete.
    event_stream: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// An error status: read up to the error-body limit, then classify with the bytes read.
    Classify,
    /// A success: hold the head until the first chunk (or first SSE event) arrives.
    Commit,
}

/// Why reading stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Enough,
    Failed,
    TimedOut,
}

impl<R: Body> Peek<R> {
    fn new(response: Response<R>, purpose: Purpose) -> Self {
        let (head, body) = response.into_parts();
        let event_stream = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        Peek {
            head,
            body,
            frames: VecDeque::new(),
            read: 0,
            error: None,
            ended: false,
            purpose,
            event_stream,
        }
    }

    /// Whether enough has been read to decide.
    fn satisfied(&self, limit: usize) -> bool {
        if self.ended || self.error.is_some() || self.read >= limit {
            return true;
        }
        match self.purpose {
            Purpose::Classify => false,
            Purpose::Commit if self.event_stream => {
                sse::first_event(&contiguous(&self.frames)).is_some()
            }
            Purpose::Commit => self.read > 0,
        }
    }

    fn into_response(self, record: &FallbackReport) -> Response<ResponseBody<R>> {
        let body = ResponseBody::with_buffered(
            self.body,
            self.frames,
            self.error,
            self.ended,
            record.stream_record(),
        );
        Response::from_parts(self.head, body)
    }
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
                pending: None,
            },
        }
    }
}

impl<S, R> Ctx<S, R>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Error: Into<BoxError>,
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

    /// The policy's decision on a response head (and the start of its body, when read).
    fn decide(&self, head: &response::Parts, body: Option<&[u8]>) -> Decision {
        self.shared.classifier.classify(&Outcome::Response {
            status: head.status,
            headers: &head.headers,
            body,
        })
    }

    /// Starts reading a response's body, or decides on its head alone.
    fn on_response(&mut self, response: Response<R>) -> Step<R> {
        let status = response.status();
        let limit = self.shared.error_body_limit;
        if status.as_u16() >= 400
            && limit > 0
            && self
                .shared
                .classifier
                .wants_body(status, response.headers())
        {
            return Step::Read(Peek::new(response, Purpose::Classify));
        }
        let (head, body) = response.into_parts();
        let decision = self.decide(&head, None);
        let response = Response::from_parts(head, body);
        if decision == Decision::Return
            && status.is_success()
            && self.shared.wait_for_first_chunk
            && !response.body().is_end_stream()
        {
            return Step::Read(Peek::new(response, Purpose::Commit));
        }
        let peek = Peek::new(response, Purpose::Classify);
        self.conclude(peek, AttemptOutcome::Status(status), decision)
    }

    /// Decides once the start of a body has been read (or failed, or timed out).
    fn on_read(&mut self, peek: Peek<R>, stop: Stop) -> Step<R> {
        let status = peek.head.status;
        match (peek.purpose, stop) {
            (Purpose::Classify, _) => {
                let bytes = contiguous(&peek.frames);
                let prefix = &bytes[..bytes.len().min(self.shared.error_body_limit)];
                let decision = self.decide(&peek.head, Some(prefix));
                self.conclude(peek, AttemptOutcome::Status(status), decision)
            }
            (Purpose::Commit, Stop::Failed | Stop::TimedOut) => {
                let timeout: BoxError = Box::new(tower::timeout::error::Elapsed::new());
                let error = peek.error.as_deref().unwrap_or(&*timeout);
                let kind = ErrorKind::of(error);
                let decision = self
                    .shared
                    .classifier
                    .classify(&Outcome::Error { kind, error });
                let message = match stop {
                    Stop::TimedOut => "no first byte within the first-byte timeout".to_owned(),
                    _ => error_chain(error),
                };
                let outcome = AttemptOutcome::BodyFailed {
                    status,
                    kind,
                    message,
                };
                self.conclude(peek, outcome, decision)
            }
            (Purpose::Commit, Stop::Enough) => {
                let event = if peek.event_stream {
                    sse::error_event(&contiguous(&peek.frames))
                } else {
                    None
                };
                let Some(event) = event else {
                    return self.conclude(peek, AttemptOutcome::Status(status), Decision::Return);
                };
                let decision = self.shared.classifier.classify(&Outcome::ErrorEvent {
                    status,
                    headers: &peek.head.headers,
                    event: &event,
                });
                let outcome = AttemptOutcome::ErrorEvent {
                    status,
                    code: crate::policy::error_code(&event),
                };
                self.conclude(peek, outcome, decision)
            }
        }
    }

    /// Records the attempt, then drops the response and goes on, or hands it back.
    fn conclude(&mut self, peek: Peek<R>, outcome: AttemptOutcome, decision: Decision) -> Step<R> {
        self.record(outcome, decision);
        if decision == Decision::NextTarget && self.has_next() {
            // Kept until the next attempt is actually sent: if the inner service fails to get
            // ready, this is the last failure and goes back to the caller.
            self.pending = Some(peek);
            return Step::Next;
        }
        self.report.exhausted = decision == Decision::NextTarget;
        self.report.served = Some(self.report.attempts.len() - 1);
        let mut response = peek.into_response(&self.report);
        response
            .extensions_mut()
            .insert(std::mem::take(&mut self.report));
        Step::Done(response)
    }

    /// Decides on an inner error: go on, or end with it.
    fn on_error(&mut self, error: BoxError) -> Result<(), FallbackError> {
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
            return Ok(());
        }
        self.report.exhausted = decision == Decision::NextTarget;
        Err(FallbackError::upstream(
            error,
            std::mem::take(&mut self.report),
        ))
    }

    /// A timer for reading a body, when a first-byte timeout is set.
    fn timer(&self, purpose: Purpose) -> Option<tokio::time::Sleep> {
        let limit = match purpose {
            Purpose::Commit => self.shared.first_byte_timeout,
            // An error body is read to decide; it must not hold the request forever.
            Purpose::Classify => self
                .shared
                .first_byte_timeout
                .or(Some(ERROR_BODY_READ_TIMEOUT)),
        }?;
        // Timers need tokio's time driver; without a runtime, reads are bounded in size only.
        tokio::runtime::Handle::try_current().ok()?;
        Some(tokio::time::sleep(limit))
    }

    /// Hands back the last response, kept while the next attempt waited for readiness.
    fn hand_back_pending(&mut self) -> Option<Response<ResponseBody<R>>> {
        let peek = self.pending.take()?;
        self.report.served = Some(self.report.attempts.len().checked_sub(1)?);
        let mut response = peek.into_response(&self.report);
        response
            .extensions_mut()
            .insert(std::mem::take(&mut self.report));
        Some(response)
    }
}

/// What comes after an attempt's response.
enum Step<R: Body> {
    /// Read the start of its body first.
    Read(Peek<R>),
    /// Drop it and try the next target.
    Next,
    /// Hand it back.
    Done(Response<ResponseBody<R>>),
}

/// Moves the state machine to the step's state; returns the response when it is done.
fn step_to<B, S, R>(
    state: &mut Pin<&mut State<B, S::Future>>,
    ctx: &mut Ctx<S, R>,
    step: Step<R>,
) -> Option<Response<ResponseBody<R>>>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Error: Into<BoxError>,
{
    match step {
        Step::Read(peek) => {
            let timer = ctx.timer(peek.purpose);
            ctx.peek = Some(peek);
            state.set(State::Reading { timer });
            None
        }
        Step::Next => {
            state.set(State::Ready);
            None
        }
        Step::Done(response) => {
            state.set(State::Done);
            Some(response)
        }
    }
}

/// An error's message followed by its sources'.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
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
    R::Error: Into<BoxError>,
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
                        // A failed service cannot take the next attempt: the last failure is
                        // the outcome, its response if it had one.
                        this.state.set(State::Done);
                        if let Some(response) = ctx.hand_back_pending() {
                            return Poll::Ready(Ok(response));
                        }
                        let report = std::mem::take(&mut ctx.report);
                        return Poll::Ready(Err(FallbackError::unready(e.into(), report)));
                    }
                    ctx.pending = None;
                    match ctx.call_next() {
                        Ok(future) => this.state.set(State::Calling { future }),
                        Err(e) => {
                            this.state.set(State::Done);
                            let report = std::mem::take(&mut ctx.report);
                            return Poll::Ready(Err(e.with_report(report)));
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let step = match ready!(future.poll(cx)) {
                        Ok(response) => ctx.on_response(response),
                        Err(e) => match ctx.on_error(e.into()) {
                            Ok(()) => Step::Next,
                            Err(error) => {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(error));
                            }
                        },
                    };
                    if let Some(done) = step_to(&mut this.state, ctx, step) {
                        return Poll::Ready(Ok(done));
                    }
                }
                StateProj::Reading { mut timer } => {
                    let limit = ctx.shared.error_body_limit;
                    let Some(peek) = ctx.peek.as_mut() else {
                        this.state.set(State::Done);
                        continue;
                    };
                    let stop = loop {
                        if peek.satisfied(limit) {
                            break if peek.error.is_some() {
                                Stop::Failed
                            } else {
                                Stop::Enough
                            };
                        }
                        match Pin::new(&mut peek.body).poll_frame(cx) {
                            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                                Some(data) if !data.has_remaining() => {}
                                Some(data) => {
                                    peek.read += data.remaining();
                                    peek.frames.push_back(frame);
                                }
                                None => peek.frames.push_back(frame),
                            },
                            Poll::Ready(Some(Err(e))) => peek.error = Some(e.into()),
                            Poll::Ready(None) => peek.ended = true,
                            Poll::Pending => {
                                let expired = timer
                                    .as_mut()
                                    .as_pin_mut()
                                    .is_some_and(|t| t.poll(cx).is_ready());
                                if expired {
                                    break Stop::TimedOut;
                                }
                                return Poll::Pending;
                            }
                        }
                    };
                    let Some(peek) = ctx.peek.take() else {
                        continue;
                    };
                    let step = ctx.on_read(peek, stop);
                    if let Some(done) = step_to(&mut this.state, ctx, step) {
                        return Poll::Ready(Ok(done));
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
