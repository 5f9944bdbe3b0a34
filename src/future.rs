//! The response future: read the body, then attempt targets one after the other.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::{request, response, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::time::Instant;
use tower_service::Service;

use crate::body::{Collector, ReplayBody, ResponseBody};
use crate::catalog::UsageMeter;
use crate::error::{BoxError, FallbackError};
use crate::health::{Admission, HealthOutcome, TargetId};
use crate::layer::Shared;
use crate::policy::{Decision, ErrorKind, Outcome};
use crate::report::{Attempt, AttemptOutcome, FallbackReport, Skip, StopReason};
use crate::request::Prepared;
use crate::sse;
use crate::stats::Tally;

/// How long an error body may take to arrive when no first-byte timeout is set.
const ERROR_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

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
        // Backing off before retrying the same target.
        Waiting { #[pin] sleep: tokio::time::Sleep },
        // Waiting for the inner service to be ready for the next attempt.
        Ready,
        // An attempt in flight.
        Calling { #[pin] future: F },
        // Hedged attempts in flight (`Ctx::flights`); the timer starts the next one.
        Hedging { #[pin] timer: Option<tokio::time::Sleep> },
        // Reading the start of a response body (`Ctx::peek`): an error body to classify it, or a
        // success up to its first chunk before committing to it. Bounded by the first-byte timer.
        Reading { #[pin] timer: Option<tokio::time::Sleep> },
        // Finished, or failed before the first attempt (`Ctx::failed`).
        Done,
    }
}

struct Ctx<S, R: Body>
where
    S: Service<Request<ReplayBody>>,
{
    inner: S,
    shared: Arc<Shared>,
    head: Option<request::Parts>,
    collector: Option<Collector>,
    prepared: Option<Prepared>,
    failed: Option<FallbackError>,
    report: FallbackReport,
    /// The targets to try, in order (every target's index, or, when all were cooling down,
    /// sorted by how soon they recover).
    order: Vec<usize>,
    /// The next position in `order`.
    cursor: usize,
    /// Every target was cooling down: try them without asking the health store.
    forced: bool,
    /// The target of the next call, chosen (and admitted) but not yet called.
    upcoming: Option<Upcoming>,
    current: Option<Current>,
    /// Retries made on the current target, and its backoff delays.
    retries_here: u32,
    backoff: Option<backon::ExponentialBackoff>,
    /// The overall deadline: when, and a timer that wakes us then.
    deadline: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
    peek: Option<Peek<R>>,
    /// The last response, dropped once the next attempt is sent.
    pending: Option<Peek<R>>,
    /// Hedged attempts in flight, and the last failure among finished ones when it was an error.
    flights: Vec<Flight<S::Future>>,
    last_error: Option<BoxError>,
    /// A hedged attempt failed: start the next one without waiting for the timer.
    launch_now: bool,
    /// This request has tried a second target (counted once in the stats).
    fell_back: bool,
    span: tracing::Span,
}

/// One hedged attempt in flight.
struct Flight<F> {
    current: Current,
    future: Pin<Box<F>>,
}

/// A target chosen for the next call.
#[derive(Clone, Copy)]
struct Upcoming {
    index: usize,
    /// The health store admitted it: its outcome must be recorded there.
    admitted: bool,
}

/// The attempt in flight.
struct Current {
    index: usize,
    admitted: bool,
    model: Option<Arc<str>>,
    substituted: bool,
    started: Instant,
}

/// What comes after an attempt that did not end the request.
enum Plan {
    /// Wait, then call the same target again.
    Retry(Duration),
    /// Call `upcoming`.
    Call,
    /// No further attempt.
    Stop(Option<StopReason>),
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

    fn into_response(
        self,
        record: &FallbackReport,
        meter: Option<Box<UsageMeter>>,
    ) -> Response<ResponseBody<R>> {
        let body = ResponseBody::with_buffered(
            self.body,
            self.frames,
            self.error,
            self.ended,
            record.stream_record(),
            meter,
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
        let span = tracing::info_span!(
            target: "tower_model_fallback",
            "model_fallback",
            method = %head.method,
            path = %head.uri.path(),
        );
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
                order: Vec::new(),
                cursor: 0,
                forced: false,
                upcoming: None,
                current: None,
                retries_here: 0,
                backoff: None,
                deadline: None,
                peek: None,
                pending: None,
                flights: Vec::new(),
                last_error: None,
                launch_now: false,
                fell_back: false,
                span,
            },
        }
    }
}

impl<S, R: Body> Drop for Ctx<S, R>
where
    S: Service<Request<ReplayBody>>,
{
    fn drop(&mut self) {
        // An admitted attempt that never reached an outcome (the caller dropped the future) must
        // still release the target's probe.
        let admitted = [
            self.current.as_ref().map(|c| (c.index, c.admitted)),
            self.upcoming.map(|u| (u.index, u.admitted)),
        ];
        let flights = self
            .flights
            .iter()
            .map(|f| (f.current.index, f.current.admitted));
        let all: Vec<(usize, bool)> = admitted.into_iter().flatten().chain(flights).collect();
        for (index, _) in all.into_iter().filter(|(_, a)| *a) {
            self.tell_health(index, HealthOutcome::Neutral);
        }
    }
}

impl<S, R: Body> Ctx<S, R>
where
    S: Service<Request<ReplayBody>>,
{
    fn tell_health(&self, index: usize, outcome: HealthOutcome) {
        if let (Some(health), Some(key)) = (&self.shared.health, self.shared.target_keys.get(index))
        {
            health.record(TargetId { index, key }, outcome);
        }
    }

    fn target_id(&self, index: usize) -> Option<TargetId<'_>> {
        let key = self.shared.target_keys.get(index)?;
        Some(TargetId { index, key })
    }

    fn deadline_passed(&self) -> bool {
        self.deadline
            .as_ref()
            .is_some_and(|(at, _)| Instant::now() >= *at)
    }

    /// Polls the deadline timer (registering a wake-up); true once it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            Some((_, sleep)) => sleep.as_mut().poll(cx).is_ready(),
            None => false,
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
    /// After the body is read: the order of targets, the budget deposit, the deadline timer, and
    /// the first target.
    fn start(&mut self, prepared: Prepared) -> Result<(), FallbackError> {
        self.report.requested_model = prepared.requested_model.clone();
        self.prepared = Some(prepared);
        if self.shared.record_stats {
            self.shared.stats.request();
        }
        if let Some(budget) = &self.shared.budget {
            budget.deposit();
        }
        if let Some(limit) = self.shared.deadline {
            if tokio::runtime::Handle::try_current().is_ok() {
                let at = Instant::now() + limit;
                self.deadline = Some((at, Box::pin(tokio::time::sleep_until(at))));
            }
        }
        let n = self.shared.targets.len();
        self.order = (0..n).collect();
        if let Some(health) = &self.shared.health {
            let cooling: Vec<Duration> = (0..n)
                .map(|i| {
                    self.target_id(i)
                        .map_or(Duration::ZERO, |id| health.cooling_for(id))
                })
                .collect();
            if cooling.iter().all(|c| !c.is_zero()) {
                // Every target is cooling down: try them anyway, soonest to recover first,
                // rather than fail without a call.
                self.forced = true;
                self.order.sort_by_key(|i| cooling[*i]);
            }
        }
        match self.choose_next() {
            true => Ok(()),
            false => Err(FallbackError::request("no target could be chosen".into())),
        }
    }

    /// Chooses the next target in `order` that the health store admits, recording the ones it
    /// skips. Sets `upcoming`; false when none is left.
    fn choose_next(&mut self) -> bool {
        while let Some(&index) = self.order.get(self.cursor) {
            self.cursor += 1;
            if self.forced || self.shared.health.is_none() {
                self.upcoming = Some(Upcoming {
                    index,
                    admitted: false,
                });
                return true;
            }
            if let Some(admitted) = self.admit(index) {
                self.upcoming = Some(admitted);
                return true;
            }
        }
        // Everything left was cooling down and nothing was tried yet: try those anyway.
        if self.report.attempts.is_empty() && !self.forced && !self.report.skipped.is_empty() {
            self.forced = true;
            let mut skipped: Vec<(Duration, usize)> = self
                .report
                .skipped
                .iter()
                .map(|s| (s.remaining, s.target_index))
                .collect();
            skipped.sort();
            self.order = skipped.into_iter().map(|(_, i)| i).collect();
            self.cursor = 0;
            return self.choose_next();
        }
        false
    }

    /// Asks the health store whether `index` may be tried now; records a skip when it may not.
    fn admit(&mut self, index: usize) -> Option<Upcoming> {
        let (Some(health), Some(id)) = (&self.shared.health, self.target_id(index)) else {
            return Some(Upcoming {
                index,
                admitted: false,
            });
        };
        match health.admit(id) {
            Admission::Open | Admission::Probe => Some(Upcoming {
                index,
                admitted: true,
            }),
            Admission::Cooling(remaining) => {
                let target = self.shared.targets.get(index).map(|t| t.name.clone());
                tracing::debug!(
                    target: "tower_model_fallback",
                    target_name = target.as_deref().unwrap_or("?"),
                    remaining_ms = remaining.as_millis() as u64,
                    "skipping a target that is cooling down",
                );
                if self.shared.record_stats {
                    self.shared.stats.skip(index);
                }
                self.report.skipped.push(Skip {
                    target: target.unwrap_or_else(|| Arc::from("?")),
                    target_index: index,
                    remaining,
                });
                None
            }
        }
    }

    /// Builds the upcoming target's request and calls the (ready) inner service.
    fn call_upcoming(&mut self) -> Result<S::Future, FallbackError> {
        let Some(upcoming) = self.upcoming.take() else {
            return Err(FallbackError::request("no target left to call".into()));
        };
        let index = upcoming.index;
        let (Some(prepared), Some(target)) = (&self.prepared, self.shared.targets.get(index))
        else {
            return Err(FallbackError::request("no target left to call".into()));
        };
        let plan = match prepared.attempt(target) {
            Ok(plan) => plan,
            Err(e) => {
                if upcoming.admitted {
                    self.tell_health(index, HealthOutcome::Neutral);
                }
                return Err(e);
            }
        };
        self.pending = None;
        self.current = Some(Current {
            index,
            admitted: upcoming.admitted,
            model: plan.model,
            substituted: plan.substituted,
            started: Instant::now(),
        });
        Ok(self.inner.call(plan.request))
    }

    /// Calls the upcoming target as a hedged flight.
    fn launch(&mut self) -> Result<(), FallbackError> {
        let future = self.call_upcoming()?;
        if let Some(current) = self.current.take() {
            self.flights.push(Flight {
                current,
                future: Box::pin(future),
            });
        }
        Ok(())
    }

    /// Drops every hedged flight still running, recording each with `outcome`.
    fn cancel_flights(&mut self, outcome: &AttemptOutcome) {
        let kept = self.current.take();
        for flight in std::mem::take(&mut self.flights) {
            self.current = Some(flight.current);
            self.note_health(HealthOutcome::Neutral);
            self.record(outcome.clone(), Decision::Return);
        }
        self.current = kept;
    }

    /// A hedged flight answered with a head: the winner, or one more failure.
    fn on_hedged_response(&mut self, response: Response<R>) -> Option<Step<R>> {
        let (head, body) = response.into_parts();
        let decision = self.decide(&head, None);
        if !decision.is_retryable() {
            self.cancel_flights(&AttemptOutcome::Superseded);
            return Some(self.on_response(Response::from_parts(head, body)));
        }
        let hint = self.cooldown_hint(head.status, &head.headers, None);
        self.note_health(HealthOutcome::Failure { at_least: hint });
        self.record(AttemptOutcome::Status(head.status), Decision::NextTarget);
        self.pending = Some(Peek::new(
            Response::from_parts(head, body),
            Purpose::Classify,
        ));
        self.last_error = None;
        self.launch_now = true;
        None
    }

    /// A hedged flight failed without a response.
    fn on_hedged_error(&mut self, error: BoxError) -> Result<(), FallbackError> {
        let kind = ErrorKind::of(&*error);
        let decision = self.shared.classifier.classify(&Outcome::Error {
            kind,
            error: &*error,
        });
        let outcome = AttemptOutcome::Error {
            kind,
            message: error_chain(&*error),
        };
        if !decision.is_retryable() {
            self.note_health(HealthOutcome::Neutral);
            self.record(outcome, Decision::Return);
            self.cancel_flights(&AttemptOutcome::Superseded);
            return Err(FallbackError::upstream(
                error,
                std::mem::take(&mut self.report),
            ));
        }
        self.note_health(HealthOutcome::Failure { at_least: None });
        self.record(outcome, Decision::NextTarget);
        self.pending = None;
        self.last_error = Some(error);
        self.launch_now = true;
        Ok(())
    }

    /// Nothing in flight and nothing more to start: the last failure is the outcome.
    fn hedging_exhausted(
        &mut self,
        reason: StopReason,
    ) -> Result<Response<ResponseBody<R>>, FallbackError> {
        if let Some(peek) = self.pending.take() {
            return Ok(self.hand_back(peek, Some(reason)));
        }
        self.report.exhausted = reason == StopReason::Exhausted;
        self.report.stop = Some(reason);
        let error = self
            .last_error
            .take()
            .unwrap_or_else(|| "no hedged attempt could be started".into());
        Err(FallbackError::upstream(
            error,
            std::mem::take(&mut self.report),
        ))
    }

    /// Tells the health store what the attempt in flight showed.
    fn note_health(&self, outcome: HealthOutcome) {
        if let Some(current) = &self.current {
            if current.admitted || self.forced {
                self.tell_health(current.index, outcome);
            }
        }
    }

    /// Records the attempt in flight in the report (and the log).
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
        if self.shared.record_stats {
            let tally = match (decision, &attempt.outcome) {
                (_, AttemptOutcome::Superseded) => Tally::Superseded,
                (Decision::RetrySame, _) => Tally::RetrySame,
                (Decision::NextTarget, _) => Tally::NextTarget,
                (Decision::Return, AttemptOutcome::Status(s)) if s.as_u16() < 400 => Tally::Success,
                (Decision::Return, _) => Tally::NonRetryable,
            };
            let error = matches!(attempt.outcome, AttemptOutcome::Error { .. });
            self.shared
                .stats
                .attempt(current.index, tally, error, attempt.elapsed);
            // A request falls back when it tries a second target, or starts past a skipped one.
            let first = self.report.attempts.first().map(|a| a.target_index);
            let moved_on = first.map_or(!self.report.skipped.is_empty(), |f| f != current.index);
            if !self.fell_back && moved_on {
                self.fell_back = true;
                self.shared.stats.fell_back();
            }
        }
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
                    decision = %decision,
                    $message,
                )
            };
        }
        let failed = !matches!(&attempt.outcome, AttemptOutcome::Status(s) if s.as_u16() < 400);
        match decision {
            Decision::NextTarget => {
                attempt_event!(
                    tracing::Level::WARN,
                    "attempt failed; falling back to the next target"
                )
            }
            Decision::RetrySame => {
                attempt_event!(
                    tracing::Level::WARN,
                    "attempt failed; retrying the same target"
                )
            }
            Decision::Return if failed => {
                attempt_event!(
                    tracing::Level::INFO,
                    "attempt failed; handed back without falling back"
                )
            }
            Decision::Return => attempt_event!(tracing::Level::DEBUG, "attempt succeeded"),
        }
        self.report.push(attempt);
    }

    /// After an attempt the policy called `classified`: retry here, call the next target, or
    /// stop. Records the attempt with what was done.
    fn plan(
        &mut self,
        outcome: AttemptOutcome,
        classified: Decision,
        retry_after: Option<Duration>,
    ) -> Plan {
        if !classified.is_retryable() {
            self.record(outcome, Decision::Return);
            return Plan::Stop(None);
        }
        let Some(index) = self.current.as_ref().map(|c| c.index) else {
            return Plan::Stop(None);
        };
        let retries = self.shared.retries;
        if classified == Decision::RetrySame && self.retries_here < retries.per_target {
            let wait = retry_after
                .or_else(|| self.backoff.get_or_insert_with(|| retries.backoff()).next());
            if let Some(wait) = wait.filter(|w| *w <= retries.max_wait) {
                let within_deadline = self
                    .deadline
                    .as_ref()
                    .is_none_or(|(at, _)| Instant::now() + wait < *at);
                if !within_deadline {
                    self.record(outcome, Decision::Return);
                    return Plan::Stop(Some(StopReason::Deadline));
                }
                let again = if self.forced {
                    Some(Upcoming {
                        index,
                        admitted: false,
                    })
                } else {
                    self.admit(index)
                };
                if let Some(again) = again {
                    if !self.withdraw() {
                        self.release(again);
                        self.record(outcome, Decision::Return);
                        return Plan::Stop(Some(StopReason::RetryBudget));
                    }
                    self.upcoming = Some(again);
                    self.retries_here += 1;
                    self.record(outcome, Decision::RetrySame);
                    return Plan::Retry(wait);
                }
                // The target's breaker opened: move on.
            }
        }
        if !self.choose_next() {
            self.record(outcome, Decision::NextTarget);
            return Plan::Stop(Some(StopReason::Exhausted));
        }
        if self.deadline_passed() || !self.withdraw() {
            let reason = if self.deadline_passed() {
                StopReason::Deadline
            } else {
                StopReason::RetryBudget
            };
            if let Some(upcoming) = self.upcoming.take() {
                self.release(upcoming);
            }
            self.record(outcome, Decision::Return);
            return Plan::Stop(Some(reason));
        }
        self.retries_here = 0;
        self.backoff = None;
        self.record(outcome, Decision::NextTarget);
        Plan::Call
    }

    fn withdraw(&self) -> bool {
        self.shared.budget.as_ref().is_none_or(|b| b.withdraw())
    }

    /// Gives back an admission that will not be used.
    fn release(&self, upcoming: Upcoming) {
        if upcoming.admitted {
            self.tell_health(upcoming.index, HealthOutcome::Neutral);
        }
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
        self.conclude(peek, AttemptOutcome::Status(status), decision, None)
    }

    /// Decides once the start of a body has been read (or failed, or timed out).
    fn on_read(&mut self, peek: Peek<R>, stop: Stop) -> Step<R> {
        let status = peek.head.status;
        match (peek.purpose, stop) {
            (Purpose::Classify, _) => {
                let bytes = contiguous(&peek.frames);
                let prefix = &bytes[..bytes.len().min(self.shared.error_body_limit)];
                let decision = self.decide(&peek.head, Some(prefix));
                self.conclude(peek, AttemptOutcome::Status(status), decision, Some(prefix))
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
                self.conclude(peek, outcome, decision, None)
            }
            (Purpose::Commit, Stop::Enough) => {
                let event = if peek.event_stream {
                    sse::error_event(&contiguous(&peek.frames))
                } else {
                    None
                };
                let Some(event) = event else {
                    return self.conclude(
                        peek,
                        AttemptOutcome::Status(status),
                        Decision::Return,
                        None,
                    );
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
                self.conclude(peek, outcome, decision, None)
            }
        }
    }

    /// Tells the health store, plans what comes next, and either keeps the response (until the
    /// next attempt is sent) or hands it back.
    fn conclude(
        &mut self,
        peek: Peek<R>,
        outcome: AttemptOutcome,
        decision: Decision,
        body: Option<&[u8]>,
    ) -> Step<R> {
        let status = peek.head.status;
        let health = match (&outcome, decision) {
            (AttemptOutcome::Status(s), Decision::Return) if s.as_u16() < 400 => {
                HealthOutcome::Success
            }
            (_, Decision::Return) => HealthOutcome::Neutral,
            _ => HealthOutcome::Failure {
                at_least: self.cooldown_hint(status, &peek.head.headers, body),
            },
        };
        self.note_health(health);
        let retry_after = if decision.is_retryable() {
            crate::retry::retry_after(&peek.head.headers)
        } else {
            None
        };
        match self.plan(outcome, decision, retry_after) {
            Plan::Retry(wait) => {
                self.pending = Some(peek);
                Step::Wait(wait)
            }
            Plan::Call => {
                // Kept until the next attempt is actually sent: if the inner service fails to
                // get ready, this is the last failure and goes back to the caller.
                self.pending = Some(peek);
                Step::Next
            }
            Plan::Stop(reason) => Step::Done(self.hand_back(peek, reason)),
        }
    }

    /// The cooldown a failed response asks for: a long one for an exhausted quota, else its
    /// `Retry-After` on a 429 or 503.
    fn cooldown_hint(
        &self,
        status: StatusCode,
        headers: &http::HeaderMap,
        body: Option<&[u8]>,
    ) -> Option<Duration> {
        if status == StatusCode::TOO_MANY_REQUESTS
            && body.and_then(crate::policy::error_code).as_deref() == Some("insufficient_quota")
        {
            return Some(self.shared.quota_cooldown);
        }
        match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                crate::retry::retry_after(headers)
            }
            _ => None,
        }
    }

    /// A meter for the answer's `usage`, when the layer has a catalog and the answer is a
    /// non-streamed JSON success.
    fn usage_meter(&self, peek: &Peek<R>) -> Option<Box<UsageMeter>> {
        let catalog = self.shared.catalog.as_ref()?;
        let json = peek
            .head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if !peek.head.status.is_success() || peek.event_stream || !json {
            return None;
        }
        let served = self.report.served_by()?;
        let pricing = served.model().and_then(|m| catalog.price(m)).copied();
        let stats = self
            .shared
            .record_stats
            .then(|| (self.shared.stats.clone(), served.target_index()));
        Some(Box::new(UsageMeter::new(
            pricing,
            stats,
            self.report.usage.clone(),
        )))
    }

    /// Hands a response back with the report.
    fn hand_back(
        &mut self,
        peek: Peek<R>,
        reason: Option<StopReason>,
    ) -> Response<ResponseBody<R>> {
        self.report.exhausted = reason == Some(StopReason::Exhausted);
        self.report.stop = reason;
        self.report.served = self.report.attempts.len().checked_sub(1);
        let meter = self.usage_meter(&peek);
        let mut response = peek.into_response(&self.report, meter);
        response
            .extensions_mut()
            .insert(std::mem::take(&mut self.report));
        response
    }

    /// Decides on an inner error: go on, or end with it.
    fn on_error(&mut self, error: BoxError) -> Result<Step<R>, FallbackError> {
        let kind = ErrorKind::of(&*error);
        let decision = self.shared.classifier.classify(&Outcome::Error {
            kind,
            error: &*error,
        });
        self.note_health(if decision.is_retryable() {
            HealthOutcome::Failure { at_least: None }
        } else {
            HealthOutcome::Neutral
        });
        let outcome = AttemptOutcome::Error {
            kind,
            message: error_chain(&*error),
        };
        match self.plan(outcome, decision, None) {
            Plan::Retry(wait) => Ok(Step::Wait(wait)),
            Plan::Call => Ok(Step::Next),
            Plan::Stop(reason) => {
                self.report.exhausted = reason == Some(StopReason::Exhausted);
                self.report.stop = reason;
                let report = std::mem::take(&mut self.report);
                Err(FallbackError::upstream(error, report))
            }
        }
    }

    /// The overall deadline passed while waiting: the last failure is the outcome.
    fn on_deadline(&mut self) -> Result<Response<ResponseBody<R>>, FallbackError> {
        if let Some(upcoming) = self.upcoming.take() {
            self.release(upcoming);
        }
        self.cancel_flights(&AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
            message: "the overall deadline passed".to_owned(),
        });
        if self.current.is_some() {
            // The attempt in flight is cancelled.
            self.note_health(HealthOutcome::Neutral);
            let outcome = AttemptOutcome::Error {
                kind: ErrorKind::Timeout,
                message: "the overall deadline passed".to_owned(),
            };
            self.record(outcome, Decision::Return);
        }
        if let Some(peek) = self.pending.take() {
            return Ok(self.hand_back(peek, Some(StopReason::Deadline)));
        }
        self.report.stop = Some(StopReason::Deadline);
        let report = std::mem::take(&mut self.report);
        Err(FallbackError::deadline(report))
    }

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
        Some(self.hand_back(peek, None))
    }
}

/// What comes after an attempt's response.
enum Step<R: Body> {
    /// Read the start of its body first.
    Read(Peek<R>),
    /// Back off, then retry the same target.
    Wait(Duration),
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
        Step::Wait(wait) => {
            state.set(State::Waiting {
                sleep: tokio::time::sleep(wait),
            });
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

/// Calls the upcoming target (the inner service is ready): one attempt, or the first of a
/// hedged race.
fn call<B, S, R>(
    state: &mut Pin<&mut State<B, S::Future>>,
    ctx: &mut Ctx<S, R>,
) -> Result<(), FallbackError>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Error: Into<BoxError>,
{
    match ctx.shared.hedge {
        Some(hedge) => {
            ctx.launch()?;
            state.set(State::Hedging {
                timer: Some(tokio::time::sleep(hedge.delay)),
            });
        }
        None => {
            let future = ctx.call_upcoming()?;
            state.set(State::Calling { future });
        }
    }
    Ok(())
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

/// The bytes read from a body, in one buffer (error paths and first chunks only).
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
        let span = ctx.span.clone();
        let _entered = span.enter();
        loop {
            // Past the overall deadline nothing new starts and nothing in flight continues.
            let waiting = matches!(
                this.state.as_mut().project(),
                StateProj::Waiting { .. }
                    | StateProj::Ready
                    | StateProj::Calling { .. }
                    | StateProj::Hedging { .. }
            );
            if waiting && ctx.poll_deadline(cx) {
                this.state.set(State::Done);
                return Poll::Ready(ctx.on_deadline());
            }
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
                            // The caller polled our readiness, hence the inner service's: the
                            // first target is called at once.
                            if let Err(e) = prepared.and_then(|p| ctx.start(p)) {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(e));
                            }
                            if let Err(e) = call(&mut this.state, ctx) {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    if let Err(e) = ready!(ctx.inner.poll_ready(cx)) {
                        // A failed service cannot take the next attempt: the last failure is
                        // the outcome, its response if it had one.
                        this.state.set(State::Done);
                        if let Some(upcoming) = ctx.upcoming.take() {
                            ctx.release(upcoming);
                        }
                        if let Some(response) = ctx.hand_back_pending() {
                            return Poll::Ready(Ok(response));
                        }
                        let report = std::mem::take(&mut ctx.report);
                        return Poll::Ready(Err(FallbackError::unready(e.into(), report)));
                    }
                    if let Err(e) = call(&mut this.state, ctx) {
                        this.state.set(State::Done);
                        let report = std::mem::take(&mut ctx.report);
                        return Poll::Ready(Err(e.with_report(report)));
                    }
                }
                StateProj::Calling { future } => {
                    let step = match ready!(future.poll(cx)) {
                        Ok(response) => ctx.on_response(response),
                        Err(e) => match ctx.on_error(e.into()) {
                            Ok(step) => step,
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
                StateProj::Hedging { mut timer } => {
                    // A flight that finished: the winner, or one more failure.
                    let finished = ctx.flights.iter_mut().enumerate().find_map(|(i, f)| {
                        match f.future.as_mut().poll(cx) {
                            Poll::Ready(result) => Some((i, result)),
                            Poll::Pending => None,
                        }
                    });
                    if let Some((i, result)) = finished {
                        let flight = ctx.flights.swap_remove(i);
                        ctx.current = Some(flight.current);
                        let step = match result {
                            Ok(response) => ctx.on_hedged_response(response),
                            Err(e) => match ctx.on_hedged_error(e.into()) {
                                Ok(()) => None,
                                Err(error) => {
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(error));
                                }
                            },
                        };
                        if let Some(step) = step {
                            if let Some(done) = step_to(&mut this.state, ctx, step) {
                                return Poll::Ready(Ok(done));
                            }
                        }
                        continue;
                    }
                    if timer
                        .as_mut()
                        .as_pin_mut()
                        .is_some_and(|t| t.poll(cx).is_ready())
                    {
                        timer.set(None);
                        ctx.launch_now = true;
                    }
                    let room = ctx.flights.len() < ctx.shared.hedge.map_or(1, |h| h.max_in_flight);
                    if ctx.launch_now && room {
                        if ctx.upcoming.is_none() {
                            let stop = if !ctx.choose_next() {
                                Some(StopReason::Exhausted)
                            } else if ctx.deadline_passed() {
                                Some(StopReason::Deadline)
                            } else if !ctx.withdraw() {
                                Some(StopReason::RetryBudget)
                            } else {
                                None
                            };
                            if stop.is_some() {
                                if let Some(upcoming) = ctx.upcoming.take() {
                                    ctx.release(upcoming);
                                }
                            }
                            if let Some(reason) = stop {
                                ctx.launch_now = false;
                                if ctx.flights.is_empty() {
                                    this.state.set(State::Done);
                                    return Poll::Ready(ctx.hedging_exhausted(reason));
                                }
                                return Poll::Pending;
                            }
                        }
                        match ctx.inner.poll_ready(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Err(e)) => {
                                if let Some(upcoming) = ctx.upcoming.take() {
                                    ctx.release(upcoming);
                                }
                                ctx.launch_now = false;
                                if ctx.flights.is_empty() {
                                    this.state.set(State::Done);
                                    if let Some(response) = ctx.hand_back_pending() {
                                        return Poll::Ready(Ok(response));
                                    }
                                    let report = std::mem::take(&mut ctx.report);
                                    return Poll::Ready(Err(FallbackError::unready(
                                        e.into(),
                                        report,
                                    )));
                                }
                            }
                            Poll::Ready(Ok(())) => {
                                if let Err(e) = ctx.launch() {
                                    this.state.set(State::Done);
                                    let report = std::mem::take(&mut ctx.report);
                                    return Poll::Ready(Err(e.with_report(report)));
                                }
                                ctx.launch_now = false;
                                let delay = ctx.shared.hedge.map(|h| h.delay);
                                timer.set(delay.map(tokio::time::sleep));
                                continue;
                            }
                        }
                    }
                    if ctx.flights.is_empty() {
                        this.state.set(State::Done);
                        return Poll::Ready(ctx.hedging_exhausted(StopReason::Exhausted));
                    }
                    return Poll::Pending;
                }
                StateProj::Reading { mut timer } => {
                    let limit = ctx.shared.error_body_limit;
                    let deadline_passed = ctx.poll_deadline(cx);
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
                        if deadline_passed {
                            // Decide on what has arrived; no attempt follows (see `plan`).
                            break Stop::Enough;
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
