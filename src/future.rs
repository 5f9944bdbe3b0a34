//! The response future: read the body, then attempt targets one after the other.

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

use crate::body::{Collector, Frames, ReplayBody, ResponseBody};
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
        // Backing off before retrying the same target (no timer without a tokio runtime).
        Waiting { #[pin] sleep: Option<tokio::time::Sleep> },
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
    /// The targets to try, in order, when it is not the configured one (when all were cooling
    /// down: sorted by how soon they recover). `None`, the usual case, allocates nothing.
    order: Option<Vec<usize>>,
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
    /// The last failure, handed back if no further attempt is made: a response (with its index
    /// in the report) or an error. A response is dropped once the next attempt is sent.
    pending: Option<(Peek<R>, usize)>,
    last_error: Option<BoxError>,
    /// Hedged attempts in flight.
    flights: Vec<Flight<S::Future, R>>,
    /// A hedged attempt failed: start the next one without waiting for the timer.
    launch_now: bool,
    /// Why no further hedged attempt may start.
    stopped: Option<StopReason>,
    /// This request has moved past its first target (counted once in the stats).
    fell_back: bool,
    span: tracing::Span,
}

/// A target chosen for the next call.
#[derive(Clone, Copy)]
struct Upcoming {
    index: usize,
    /// The health store admitted it as the target's one probe.
    probe: bool,
    /// The health store admitted it: its outcome must be recorded there.
    admitted: bool,
    /// Not the request's first attempt: it draws on the retry budget when it is sent.
    charged: bool,
}

/// The attempt in flight.
struct Current {
    index: usize,
    admitted: bool,
    probe: bool,
    model: Option<Arc<str>>,
    substituted: bool,
    started: Instant,
}

/// One hedged attempt in flight: waiting for its head, or reading the start of its body.
struct Flight<F, R: Body> {
    current: Current,
    stage: Stage<F, R>,
}

enum Stage<F, R: Body> {
    Calling(Pin<Box<F>>),
    /// Boxed: hedged flights only, and a `Peek` holds its first frame inline.
    Reading(Box<Peek<R>>, Option<Pin<Box<tokio::time::Sleep>>>),
}

/// An attempt's outcome, assessed: its response (if any), what happened, what the policy says,
/// and the start of its body (for cooldown hints).
struct Assessment<R: Body> {
    peek: Peek<R>,
    outcome: AttemptOutcome,
    decision: Decision,
    body: Option<Vec<u8>>,
}

/// A response head: assessed on its own, or to be read further.
enum Head<R: Body> {
    Assessed(Assessment<R>),
    Read(Peek<R>),
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
    frames: Frames<R::Data>,
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
            frames: Frames::default(),
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
            record.cells(),
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
                order: None,
                cursor: 0,
                forced: false,
                upcoming: None,
                current: None,
                retries_here: 0,
                backoff: None,
                deadline: None,
                peek: None,
                pending: None,
                last_error: None,
                flights: Vec::new(),
                launch_now: false,
                stopped: None,
                fell_back: false,
                span,
            },
        }
    }
}

/// A tokio timer, when there is a tokio runtime to drive it (the layer's timers need its time
/// driver; without a runtime, reads are bounded in size only and backoffs are not waited).
fn timer(duration: Duration) -> Option<tokio::time::Sleep> {
    tokio::runtime::Handle::try_current().ok()?;
    Some(tokio::time::sleep(duration))
}

/// `now + duration`, saturating far in the future instead of overflowing.
pub(crate) fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}

impl<S, R: Body> Drop for Ctx<S, R>
where
    S: Service<Request<ReplayBody>>,
{
    fn drop(&mut self) {
        // An admitted attempt that never reached an outcome (the caller dropped the future) must
        // still release the target's probe.
        if let Some(c) = self.current.take() {
            self.release_admission(c.index, c.admitted, c.probe);
        }
        if let Some(u) = self.upcoming.take() {
            self.release_admission(u.index, u.admitted, u.probe);
        }
        for f in std::mem::take(&mut self.flights) {
            self.release_admission(f.current.index, f.current.admitted, f.current.probe);
        }
    }
}

impl<S, R: Body> Ctx<S, R>
where
    S: Service<Request<ReplayBody>>,
{
    fn tell_health(&self, index: usize, outcome: HealthOutcome, probe: bool) {
        if let (Some(health), Some(id)) = (&self.shared.health, self.target_id(index)) {
            health.record(id, outcome, probe);
        }
    }

    /// Gives back an admission that will not be used.
    fn release_admission(&self, index: usize, admitted: bool, probe: bool) {
        if admitted {
            self.tell_health(index, HealthOutcome::Neutral, probe);
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
            if let Some(sleep) = timer(limit) {
                let at = later(Instant::now(), limit);
                self.deadline = Some((at, Box::pin(sleep)));
            }
        }
        let n = self.shared.targets.len();
        self.order = None;
        if let Some(health) = &self.shared.health {
            let cooling = |i: usize| {
                self.target_id(i)
                    .map_or(Duration::ZERO, |id| health.cooling_for(id))
            };
            // Usually answered by the first target, without collecting anything.
            if (0..n).all(|i| !cooling(i).is_zero()) {
                // Every target is cooling down: try them anyway, soonest to recover first,
                // rather than fail without a call.
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_cached_key(|&i| cooling(i));
                self.order = Some(order);
                self.forced = true;
            }
        }
        if self.choose_next(false) {
            return Ok(());
        }
        // Every target turned out to be cooling (or probed by another request): the same rule.
        let mut cooling: Vec<(Duration, usize)> = std::mem::take(&mut self.report.skipped)
            .into_iter()
            .map(|s| (s.remaining, s.target_index))
            .collect();
        cooling.sort();
        self.order = Some(cooling.into_iter().map(|(_, i)| i).collect());
        self.cursor = 0;
        self.forced = true;
        if self.choose_next(false) {
            Ok(())
        } else {
            Err(FallbackError::request("no target could be chosen".into()))
        }
    }

    /// The target at `position` in the order of trial.
    fn order_at(&self, position: usize) -> Option<usize> {
        match &self.order {
            Some(order) => order.get(position).copied(),
            None => (position < self.shared.targets.len()).then_some(position),
        }
    }

    /// Chooses the next target in `order` that the health store admits, recording the ones it
    /// skips. Sets `upcoming`; false when none is left.
    fn choose_next(&mut self, charged: bool) -> bool {
        while let Some(index) = self.order_at(self.cursor) {
            self.cursor += 1;
            let upcoming = if self.forced || self.shared.health.is_none() {
                Some(Upcoming {
                    index,
                    probe: false,
                    admitted: false,
                    charged,
                })
            } else {
                self.admit(index, charged)
            };
            if let Some(upcoming) = upcoming {
                self.upcoming = Some(upcoming);
                return true;
            }
        }
        false
    }

    /// Asks the health store whether `index` may be tried now; records a skip when it may not.
    fn admit(&mut self, index: usize, charged: bool) -> Option<Upcoming> {
        let admission = match (&self.shared.health, self.target_id(index)) {
            (Some(health), Some(id)) => health.admit(id),
            _ => Admission::Open,
        };
        match admission {
            Admission::Open | Admission::Probe => Some(Upcoming {
                index,
                probe: admission == Admission::Probe,
                admitted: true,
                charged,
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

    /// Builds the upcoming target's request and calls the (ready) inner service. `Ok(None)`
    /// when the retry budget refuses the attempt.
    fn call_upcoming(&mut self) -> Result<Option<S::Future>, FallbackError> {
        let Some(upcoming) = self.upcoming.take() else {
            return Err(FallbackError::request("no target left to call".into()));
        };
        let index = upcoming.index;
        let release = |ctx: &Self| ctx.release_admission(index, upcoming.admitted, upcoming.probe);
        // The budget is drawn on only for an attempt that is actually sent.
        if upcoming.charged && !self.withdraw() {
            release(self);
            return Ok(None);
        }
        let (Some(prepared), Some(target)) = (&self.prepared, self.shared.targets.get(index))
        else {
            release(self);
            return Err(FallbackError::request("no target left to call".into()));
        };
        let plan = match prepared.attempt(target) {
            Ok(plan) => plan,
            Err(e) => {
                release(self);
                return Err(e);
            }
        };
        self.pending = None;
        self.last_error = None;
        self.current = Some(Current {
            index,
            admitted: upcoming.admitted,
            probe: upcoming.probe,
            model: plan.model,
            substituted: plan.substituted,
            started: Instant::now(),
        });
        Ok(Some(self.inner.call(plan.request)))
    }

    /// Calls the upcoming target as a hedged flight. False when the budget refuses it.
    fn launch(&mut self) -> Result<bool, FallbackError> {
        let Some(future) = self.call_upcoming()? else {
            return Ok(false);
        };
        if let Some(current) = self.current.take() {
            self.flights.push(Flight {
                current,
                stage: Stage::Calling(Box::pin(future)),
            });
        }
        Ok(true)
    }

    /// Ends a hedged race: drops the flights still running (recording each with `outcome`) and
    /// gives back an admission chosen but not launched.
    fn abandon_race(&mut self, outcome: &AttemptOutcome) {
        if let Some(u) = self.upcoming.take() {
            self.release_admission(u.index, u.admitted, u.probe);
        }
        self.launch_now = false;
        let kept = self.current.take();
        for flight in std::mem::take(&mut self.flights) {
            self.current = Some(flight.current);
            self.note_health(HealthOutcome::Neutral);
            self.record(outcome.clone(), Decision::Return);
        }
        self.current = kept;
    }

    /// A hedged flight finished (its head, and the start of its body when that was needed):
    /// the winner, or one more failure. `Some` when the request is over.
    #[allow(clippy::type_complexity)]
    fn on_hedged(
        &mut self,
        assessed: Assessment<R>,
    ) -> Option<Result<Response<ResponseBody<R>>, FallbackError>> {
        let body_failed = matches!(assessed.outcome, AttemptOutcome::BodyFailed { .. });
        if !assessed.decision.is_retryable() {
            self.abandon_race(&AttemptOutcome::Superseded);
            if body_failed {
                // No answer started: the body's error is the outcome, as in `conclude`.
                self.note_health(HealthOutcome::Neutral);
                self.record(assessed.outcome, Decision::Return);
                let error = body_error(assessed.peek);
                return Some(Err(FallbackError::upstream(
                    error,
                    std::mem::take(&mut self.report),
                )));
            }
            return Some(Ok(self.finish(assessed, None)));
        }
        let hint = self.cooldown_hint(&assessed);
        self.note_health(HealthOutcome::Failure { at_least: hint });
        self.record(assessed.outcome, Decision::NextTarget);
        if body_failed {
            self.pending = None;
            self.last_error = Some(body_error(assessed.peek));
        } else {
            let index = self.report.attempts.len() - 1;
            self.pending = Some((assessed.peek, index));
            self.last_error = None;
        }
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
            self.abandon_race(&AttemptOutcome::Superseded);
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

    /// No further attempt: the last failure is the outcome, its response if it had one.
    fn stop_with_last_failure(
        &mut self,
        reason: StopReason,
    ) -> Result<Response<ResponseBody<R>>, FallbackError> {
        if let Some((peek, index)) = self.pending.take() {
            return Ok(self.hand_back(peek, Some(reason), Some(index)));
        }
        self.report.exhausted = reason == StopReason::Exhausted;
        self.report.stop = Some(reason);
        let report = std::mem::take(&mut self.report);
        let last = self.last_error.take();
        Err(match (reason, last) {
            (StopReason::Deadline, last) => FallbackError::deadline(last, report),
            (_, Some(error)) => FallbackError::upstream(error, report),
            (_, None) => FallbackError::upstream("no attempt could be made".into(), report),
        })
    }

    /// Tells the health store what the attempt in flight showed. Attempts the store did not
    /// admit (made because every target was cooling, or same-target retries) count too, but
    /// never as a probe.
    fn note_health(&self, outcome: HealthOutcome) {
        if let Some(current) = &self.current {
            if current.admitted || outcome != HealthOutcome::Neutral {
                self.tell_health(current.index, outcome, current.probe);
            }
        }
    }

    /// Records the attempt in flight in the report, the stats and the log.
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
                    .is_none_or(|(at, _)| later(Instant::now(), wait) < *at);
                if !within_deadline {
                    self.record(outcome, Decision::Return);
                    return Plan::Stop(Some(StopReason::Deadline));
                }
                // A retry of this request's own target, after the wait the target asked for: the
                // health store is told its outcome but is not asked for admission, since this
                // target's cooldown is this very failure.
                self.upcoming = Some(Upcoming {
                    index,
                    probe: false,
                    admitted: false,
                    charged: true,
                });
                self.retries_here += 1;
                self.record(outcome, Decision::RetrySame);
                return Plan::Retry(wait);
            }
        }
        if !self.choose_next(true) {
            self.record(outcome, Decision::NextTarget);
            return Plan::Stop(Some(StopReason::Exhausted));
        }
        if self.deadline_passed() {
            if let Some(u) = self.upcoming.take() {
                self.release_admission(u.index, u.admitted, u.probe);
            }
            self.record(outcome, Decision::Return);
            return Plan::Stop(Some(StopReason::Deadline));
        }
        self.retries_here = 0;
        self.backoff = None;
        self.record(outcome, Decision::NextTarget);
        Plan::Call
    }

    fn withdraw(&self) -> bool {
        self.shared.budget.as_ref().is_none_or(|b| b.withdraw())
    }

    /// The policy's decision on a response head (and the start of its body, when read).
    fn decide(&self, head: &response::Parts, body: Option<&[u8]>) -> Decision {
        self.shared.classifier.classify(&Outcome::Response {
            status: head.status,
            headers: &head.headers,
            body,
        })
    }

    /// A response head: read the start of its body first, or assess it on its head alone.
    fn on_head(&self, response: Response<R>) -> Head<R> {
        let status = response.status();
        let limit = self.shared.error_body_limit;
        if status.as_u16() >= 400
            && limit > 0
            && self
                .shared
                .classifier
                .wants_body(status, response.headers())
        {
            return Head::Read(Peek::new(response, Purpose::Classify));
        }
        let (head, body) = response.into_parts();
        let decision = self.decide(&head, None);
        let response = Response::from_parts(head, body);
        if decision == Decision::Return
            && status.is_success()
            && self.shared.wait_for_first_chunk
            && !response.body().is_end_stream()
        {
            return Head::Read(Peek::new(response, Purpose::Commit));
        }
        Head::Assessed(Assessment {
            peek: Peek::new(response, Purpose::Classify),
            outcome: AttemptOutcome::Status(status),
            decision,
            body: None,
        })
    }

    /// The start of a body has been read (or failed, or timed out): what it shows.
    fn assess(&self, peek: Peek<R>, stop: Stop) -> Assessment<R> {
        let status = peek.head.status;
        match (peek.purpose, stop) {
            (Purpose::Classify, _) => {
                let mut bytes = contiguous(&peek.frames);
                bytes.truncate(self.shared.error_body_limit);
                let decision = self.decide(&peek.head, Some(&bytes));
                Assessment {
                    peek,
                    outcome: AttemptOutcome::Status(status),
                    decision,
                    body: Some(bytes),
                }
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
                Assessment {
                    peek,
                    outcome: AttemptOutcome::BodyFailed {
                        status,
                        kind,
                        message,
                    },
                    decision,
                    body: None,
                }
            }
            (Purpose::Commit, Stop::Enough) => {
                let event = if peek.event_stream {
                    sse::error_event(&contiguous(&peek.frames))
                } else {
                    None
                };
                let Some(event) = event else {
                    return Assessment {
                        peek,
                        outcome: AttemptOutcome::Status(status),
                        decision: Decision::Return,
                        body: None,
                    };
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
                Assessment {
                    peek,
                    outcome,
                    decision,
                    body: None,
                }
            }
        }
    }

    /// Tells the health store, plans what comes next, and either keeps the response (until the
    /// next attempt is sent) or hands it back.
    fn conclude(&mut self, assessed: Assessment<R>) -> Step<R> {
        let health = match (&assessed.outcome, assessed.decision) {
            (AttemptOutcome::Status(s), Decision::Return) if s.as_u16() < 400 => {
                HealthOutcome::Success
            }
            (_, Decision::Return) => HealthOutcome::Neutral,
            _ => HealthOutcome::Failure {
                at_least: self.cooldown_hint(&assessed),
            },
        };
        self.note_health(health);
        let retry_after = if assessed.decision.is_retryable() {
            crate::retry::retry_after(&assessed.peek.head.headers)
        } else {
            None
        };
        let body_failed = matches!(assessed.outcome, AttemptOutcome::BodyFailed { .. });
        let plan = self.plan(assessed.outcome, assessed.decision, retry_after);
        let index = self.report.attempts.len().saturating_sub(1);
        if body_failed {
            // The answer failed before its first byte (dropped, or no byte within the
            // first-byte timeout): there is no response to hand back, only its error.
            let error = body_error(assessed.peek);
            return match plan {
                Plan::Retry(wait) => {
                    self.last_error = Some(error);
                    Step::Wait(wait)
                }
                Plan::Call => {
                    self.last_error = Some(error);
                    Step::Next
                }
                Plan::Stop(reason) => {
                    self.report.exhausted = reason == Some(StopReason::Exhausted);
                    self.report.stop = reason;
                    let report = std::mem::take(&mut self.report);
                    Step::Fail(if reason == Some(StopReason::Deadline) {
                        FallbackError::deadline(Some(error), report)
                    } else {
                        FallbackError::upstream(error, report)
                    })
                }
            };
        }
        match plan {
            // Kept until the next attempt is actually sent: if it cannot be, this is the last
            // failure and goes back to the caller.
            Plan::Retry(wait) => {
                self.pending = Some((assessed.peek, index));
                Step::Wait(wait)
            }
            Plan::Call => {
                self.pending = Some((assessed.peek, index));
                Step::Next
            }
            Plan::Stop(reason) => Step::Done(self.hand_back(assessed.peek, reason, Some(index))),
        }
    }

    /// Records a hedged winner and hands it back.
    fn finish(
        &mut self,
        assessed: Assessment<R>,
        reason: Option<StopReason>,
    ) -> Response<ResponseBody<R>> {
        let success = matches!(&assessed.outcome, AttemptOutcome::Status(s) if s.as_u16() < 400);
        self.note_health(if success {
            HealthOutcome::Success
        } else {
            HealthOutcome::Neutral
        });
        self.record(assessed.outcome, Decision::Return);
        let index = self.report.attempts.len().checked_sub(1);
        self.hand_back(assessed.peek, reason, index)
    }

    /// The cooldown a failed response asks for: a long one for an exhausted quota, else its
    /// `Retry-After` on a 429 or 503.
    fn cooldown_hint(&self, assessed: &Assessment<R>) -> Option<Duration> {
        let head = &assessed.peek.head;
        let quota = assessed
            .body
            .as_deref()
            .and_then(crate::policy::error_code)
            .is_some_and(|c| c == "insufficient_quota");
        if head.status == StatusCode::TOO_MANY_REQUESTS && quota {
            return Some(self.shared.quota_cooldown);
        }
        match head.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                crate::retry::retry_after(&head.headers)
            }
            _ => None,
        }
    }

    /// A meter for the answer's `usage`, when the layer has a catalog and the answer is a
    /// non-streamed JSON success.
    fn usage_meter(&self, peek: &Peek<R>, served: Option<usize>) -> Option<Box<UsageMeter>> {
        let catalog = self.shared.catalog.as_ref()?;
        let json = peek
            .head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if !peek.head.status.is_success() || peek.event_stream || !json {
            return None;
        }
        let served = self.report.attempts.get(served?)?;
        let pricing = served.model().and_then(|m| catalog.price(m)).copied();
        let stats = self
            .shared
            .record_stats
            .then(|| (self.shared.stats.clone(), served.target_index()));
        Some(Box::new(UsageMeter::new(
            pricing,
            stats,
            self.report.cells(),
        )))
    }

    /// Hands a response back with the report; `served` is its attempt's index in the report.
    fn hand_back(
        &mut self,
        peek: Peek<R>,
        reason: Option<StopReason>,
        served: Option<usize>,
    ) -> Response<ResponseBody<R>> {
        self.report.exhausted = reason == Some(StopReason::Exhausted);
        self.report.stop = reason;
        self.report.served = served;
        let meter = self.usage_meter(&peek, served);
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
            Plan::Retry(wait) => {
                self.last_error = Some(error);
                Ok(Step::Wait(wait))
            }
            Plan::Call => {
                self.last_error = Some(error);
                Ok(Step::Next)
            }
            Plan::Stop(reason) => {
                self.report.exhausted = reason == Some(StopReason::Exhausted);
                self.report.stop = reason;
                let report = std::mem::take(&mut self.report);
                Err(if reason == Some(StopReason::Deadline) {
                    FallbackError::deadline(Some(error), report)
                } else {
                    FallbackError::upstream(error, report)
                })
            }
        }
    }

    /// The overall deadline passed while waiting: the last failure is the outcome.
    fn on_deadline(&mut self) -> Result<Response<ResponseBody<R>>, FallbackError> {
        let cancelled = AttemptOutcome::Error {
            kind: ErrorKind::Timeout,
            message: "the overall deadline passed".to_owned(),
        };
        self.abandon_race(&cancelled);
        if self.current.is_some() {
            // The attempt in flight is cancelled: it becomes the last failure.
            self.note_health(HealthOutcome::Neutral);
            self.record(cancelled, Decision::Return);
            self.pending = None;
            self.last_error = None;
        }
        self.stop_with_last_failure(StopReason::Deadline)
    }

    /// The timer bounding a body read.
    fn read_timer(&self, purpose: Purpose) -> Option<tokio::time::Sleep> {
        let limit = match purpose {
            Purpose::Commit => self.shared.first_byte_timeout,
            // An error body is read to decide; it must not hold the request forever.
            Purpose::Classify => self
                .shared
                .first_byte_timeout
                .or(Some(ERROR_BODY_READ_TIMEOUT)),
        }?;
        timer(limit)
    }

    /// Moves the hedged flights along; returns the first that finished (its assessment, or the
    /// error it failed with), removed from the race.
    #[allow(clippy::type_complexity)]
    fn poll_flights(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<(Current, Result<Assessment<R>, BoxError>)> {
        let limit = self.shared.error_body_limit;
        for i in 0..self.flights.len() {
            loop {
                let event = match &mut self.flights[i].stage {
                    Stage::Calling(future) => match future.as_mut().poll(cx) {
                        Poll::Pending => break,
                        Poll::Ready(result) => Ok(result.map_err(Into::into)),
                    },
                    Stage::Reading(peek, t) => {
                        match poll_read(peek, t.as_mut().map(|t| t.as_mut()), false, limit, cx) {
                            Poll::Pending => break,
                            Poll::Ready(stop) => Err(stop),
                        }
                    }
                };
                match event {
                    Ok(Err(error)) => {
                        let flight = self.flights.swap_remove(i);
                        return Some((flight.current, Err(error)));
                    }
                    Ok(Ok(response)) => match self.on_head(response) {
                        Head::Assessed(assessed) => {
                            let flight = self.flights.swap_remove(i);
                            return Some((flight.current, Ok(assessed)));
                        }
                        Head::Read(peek) => {
                            // Its body decides: keep racing the others while it is read.
                            let t = self.read_timer(peek.purpose).map(Box::pin);
                            self.flights[i].stage = Stage::Reading(Box::new(peek), t);
                        }
                    },
                    Err(stop) => {
                        let flight = self.flights.swap_remove(i);
                        let assessed = match flight.stage {
                            Stage::Reading(peek, _) => Ok(self.assess(*peek, stop)),
                            Stage::Calling(_) => Err("a hedged attempt lost its state".into()),
                        };
                        return Some((flight.current, assessed));
                    }
                }
            }
        }
        None
    }
}

/// Reads the start of a body until enough is there to decide, the body fails, or the timer
/// fires.
fn poll_read<R>(
    peek: &mut Peek<R>,
    mut timer: Option<Pin<&mut tokio::time::Sleep>>,
    deadline_passed: bool,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<Stop>
where
    R: Body + Unpin,
    R::Error: Into<BoxError>,
{
    loop {
        if peek.satisfied(limit) {
            return Poll::Ready(if peek.error.is_some() {
                Stop::Failed
            } else {
                Stop::Enough
            });
        }
        if deadline_passed {
            // Decide on what has arrived; no attempt follows (see `Ctx::plan`).
            return Poll::Ready(Stop::Enough);
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
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                return if expired {
                    Poll::Ready(Stop::TimedOut)
                } else {
                    Poll::Pending
                };
            }
        }
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
    /// End with this error.
    Fail(FallbackError),
}

/// The error of a body that failed before its first byte: its own, or the first-byte timeout.
fn body_error<R: Body>(mut peek: Peek<R>) -> BoxError {
    peek.error
        .take()
        .unwrap_or_else(|| Box::new(tower::timeout::error::Elapsed::new()))
}

/// Moves the state machine to the step's state; returns the outcome when it is done.
#[allow(clippy::type_complexity)]
fn step_to<B, S, R>(
    state: &mut Pin<&mut State<B, S::Future>>,
    ctx: &mut Ctx<S, R>,
    step: Step<R>,
) -> Option<Result<Response<ResponseBody<R>>, FallbackError>>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Error: Into<BoxError>,
{
    match step {
        Step::Read(peek) => {
            let timer = ctx.read_timer(peek.purpose);
            ctx.peek = Some(peek);
            state.set(State::Reading { timer });
            None
        }
        Step::Wait(wait) => {
            state.set(State::Waiting { sleep: timer(wait) });
            None
        }
        Step::Next => {
            state.set(State::Ready);
            None
        }
        Step::Done(response) => {
            state.set(State::Done);
            Some(Ok(response))
        }
        Step::Fail(error) => {
            state.set(State::Done);
            Some(Err(error))
        }
    }
}

/// Calls the upcoming target (the inner service is ready): one attempt, or the first of a
/// hedged race. `Ok(false)` when the retry budget refused it.
fn call<B, S, R>(
    state: &mut Pin<&mut State<B, S::Future>>,
    ctx: &mut Ctx<S, R>,
) -> Result<bool, FallbackError>
where
    S: Service<Request<ReplayBody>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body + Unpin,
    R::Error: Into<BoxError>,
{
    match ctx.shared.hedge {
        Some(hedge) => {
            if !ctx.launch()? {
                return Ok(false);
            }
            state.set(State::Hedging {
                timer: timer(hedge.delay),
            });
        }
        None => {
            let Some(future) = ctx.call_upcoming()? else {
                return Ok(false);
            };
            state.set(State::Calling { future });
        }
    }
    Ok(true)
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
fn contiguous<D: Buf>(frames: &Frames<D>) -> Vec<u8> {
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
                            // first target is called at once (the first attempt is not charged
                            // to the budget, so it is always made).
                            let first = prepared
                                .and_then(|p| ctx.start(p))
                                .and_then(|()| call(&mut this.state, ctx));
                            if let Err(e) = first {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                }
                StateProj::Waiting { sleep } => {
                    if let Some(sleep) = sleep.as_pin_mut() {
                        ready!(sleep.poll(cx));
                    }
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    if let Err(e) = ready!(ctx.inner.poll_ready(cx)) {
                        // A failed service cannot take the next attempt: the last failure is
                        // the outcome, its response if it had one.
                        this.state.set(State::Done);
                        if let Some(u) = ctx.upcoming.take() {
                            ctx.release_admission(u.index, u.admitted, u.probe);
                        }
                        if ctx.pending.is_some() {
                            return Poll::Ready(ctx.stop_with_last_failure(StopReason::Unready));
                        }
                        let report = std::mem::take(&mut ctx.report);
                        return Poll::Ready(Err(FallbackError::unready(e.into(), report)));
                    }
                    match call(&mut this.state, ctx) {
                        Ok(true) => {}
                        Ok(false) => {
                            this.state.set(State::Done);
                            return Poll::Ready(
                                ctx.stop_with_last_failure(StopReason::RetryBudget),
                            );
                        }
                        Err(e) => {
                            this.state.set(State::Done);
                            let report = std::mem::take(&mut ctx.report);
                            return Poll::Ready(Err(e.with_report(report)));
                        }
                    }
                }
                StateProj::Calling { future } => {
                    let step = match ready!(future.poll(cx)) {
                        Ok(response) => match ctx.on_head(response) {
                            Head::Assessed(assessed) => ctx.conclude(assessed),
                            Head::Read(peek) => Step::Read(peek),
                        },
                        Err(e) => match ctx.on_error(e.into()) {
                            Ok(step) => step,
                            Err(error) => {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(error));
                            }
                        },
                    };
                    if let Some(done) = step_to(&mut this.state, ctx, step) {
                        return Poll::Ready(done);
                    }
                }
                StateProj::Hedging { mut timer } => {
                    if let Some((current, finished)) = ctx.poll_flights(cx) {
                        ctx.current = Some(current);
                        let done = match finished {
                            Ok(assessed) => ctx.on_hedged(assessed),
                            Err(error) => ctx.on_hedged_error(error).err().map(Err),
                        };
                        if let Some(done) = done {
                            this.state.set(State::Done);
                            return Poll::Ready(done);
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
                    if ctx.launch_now && room && ctx.stopped.is_none() {
                        if ctx.upcoming.is_none() {
                            if !ctx.choose_next(true) {
                                ctx.stopped = Some(StopReason::Exhausted);
                            } else if ctx.deadline_passed() {
                                ctx.stopped = Some(StopReason::Deadline);
                            }
                        }
                        if ctx.stopped.is_none() {
                            match ctx.inner.poll_ready(cx) {
                                Poll::Pending => return Poll::Pending,
                                Poll::Ready(Err(_)) => ctx.stopped = Some(StopReason::Unready),
                                Poll::Ready(Ok(())) => match ctx.launch() {
                                    Ok(true) => {
                                        ctx.launch_now = false;
                                        let delay = ctx.shared.hedge.map(|h| h.delay);
                                        timer.set(delay.and_then(self::timer));
                                        continue;
                                    }
                                    Ok(false) => ctx.stopped = Some(StopReason::RetryBudget),
                                    Err(e) => {
                                        this.state.set(State::Done);
                                        ctx.abandon_race(&AttemptOutcome::Superseded);
                                        let report = std::mem::take(&mut ctx.report);
                                        return Poll::Ready(Err(e.with_report(report)));
                                    }
                                },
                            }
                        }
                        if let Some(u) = ctx.upcoming.take() {
                            ctx.release_admission(u.index, u.admitted, u.probe);
                        }
                    }
                    if ctx.flights.is_empty() {
                        this.state.set(State::Done);
                        let reason = ctx.stopped.unwrap_or(StopReason::Exhausted);
                        return Poll::Ready(ctx.stop_with_last_failure(reason));
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
                    let stop = ready!(poll_read(
                        peek,
                        timer.as_mut().as_pin_mut(),
                        deadline_passed,
                        limit,
                        cx
                    ));
                    let Some(peek) = ctx.peek.take() else {
                        continue;
                    };
                    let assessed = ctx.assess(peek, stop);
                    let step = ctx.conclude(assessed);
                    if let Some(done) = step_to(&mut this.state, ctx, step) {
                        return Poll::Ready(done);
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
