//! The request engine: every decision a request needs, as plain data and methods, with no I/O.
//!
//! The engine holds the request's progress (the order of targets, the retries made, the budget,
//! the deadline, the report) and turns each event into the next [`Step`]:
//!
//! | event | method |
//! |---|---|
//! | the body was read and prepared | [`Engine::start`] |
//! | the inner service is ready for the chosen target | [`Engine::launch`] |
//! | an attempt's outcome was assessed | [`Engine::on_outcome`] |
//! | the backoff or hedge timer fired | [`Engine::on_timer`] |
//! | the inner service failed to get ready | [`Engine::on_unready`] |
//! | the overall deadline passed | [`Engine::on_deadline`] |
//!
//! It takes the time as an argument and never polls, so every path is a unit test with plain
//! values (`tests.rs`); the response future only carries the steps out. Sequential requests are
//! the case of at most one attempt in flight; hedged ones allow more.
//!
//! Every request ends in [`Engine::end`], which sets the report's stop reason and builds the
//! response or the error.

mod order;
mod record;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::Body;

use crate::attempt::peek::Peek;
use crate::attempt::{Answer, Assessed};
use crate::error::{BoxError, FallbackError};
use crate::policy::{Decision, ErrorKind};
use crate::report::{AttemptOutcome, FallbackReport, SkipReason, StopReason};
use crate::request::{Prepared, ReplayBody};
use crate::resilience::health::HealthOutcome;
use crate::resilience::later;
use crate::response::body::{Extras, Idle, ResponseBody};
use crate::response::ending::StreamEnding;
use crate::response::usage::UsageMeter;
use crate::settings::Shared;
use crate::target::AttemptTarget;
use order::{Chosen, Order};
use record::{record, Flight};

/// What the response future does next. Small and `Copy`: the request's outcome stays in the
/// engine until [`Engine::take_output`], rather than being moved through every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Call the chosen target once the inner service is ready ([`Engine::launch`]).
    Call,
    /// Wait this long, then call the chosen target (a same-target retry's backoff).
    Wait(Duration),
    /// Poll the attempts in flight; with a delay, tell [`Engine::on_timer`] when it passes (the
    /// next hedged attempt).
    Poll(Option<Duration>),
    /// The request is over: its output is in [`Engine::take_output`].
    Done,
}

/// What a request produces.
pub(crate) type Output<R> = Result<Response<ResponseBody<R>>, FallbackError>;

/// The request built for the chosen target, and the engine's name for its attempt.
pub(crate) struct Launch {
    pub(crate) id: u32,
    pub(crate) request: Request<ReplayBody>,
    /// A hedged request: when to start the next attempt if this one has not answered.
    pub(crate) hedge_after: Option<Duration>,
}

/// The last failure, handed back when no further attempt can be made: a response (with its
/// place in the report) or an error. Dropped once the next attempt is sent.
#[allow(clippy::large_enum_variant)]
enum Last<R: Body> {
    Response(Peek<R>, usize),
    Failed(BoxError),
}

/// What the engine holds for the end of the request.
#[allow(clippy::large_enum_variant)]
enum Held<R: Body> {
    Nothing,
    Last(Last<R>),
    Output(Output<R>),
}

/// What a request ends with.
#[allow(clippy::large_enum_variant)]
enum Ending<R: Body> {
    /// A response to hand back, and its place in the report.
    Answer(Peek<R>, usize),
    /// An upstream failure with no response.
    Failed(BoxError),
    /// The inner service failed to get ready, with no earlier failure to hand back.
    Unready(BoxError),
    /// A local error (the request could not be built for a target).
    Local(FallbackError),
    /// Nothing was left to hand back.
    Nothing,
}

/// A request's progress and every decision on it.
pub(crate) struct Engine<R: Body> {
    shared: Arc<Shared>,
    prepared: Prepared,
    report: FallbackReport,
    order: Order,
    /// The target of the next call, chosen (and admitted) but not yet called.
    next: Option<Next>,
    /// The attempts in flight (one at most, unless hedging). The first is kept inline.
    flights: Flights,
    /// The last failure while the request runs, its output once it has ended: one slot, as
    /// the two never exist together.
    held: Held<R>,
    /// Retries made on the current target, and its backoff delays.
    retries_here: u32,
    backoff: Option<backon::ExponentialBackoff>,
    deadline: Option<Instant>,
    /// Why no further attempt may start while others are still in flight (hedging).
    stopped: Option<StopReason>,
    /// The timer the future runs is a hedge timer (else a backoff).
    hedge_timer: bool,
    ids: u32,
}

struct Next {
    chosen: Chosen,
    /// Not the request's first attempt: it draws on the retry budget when it is sent.
    charged: bool,
}

impl<R: Body> Engine<R>
where
    R::Data: From<bytes::Bytes>,
{
    /// A request whose body was read and prepared: counts it, makes its budget deposit, and
    /// chooses its first target. `deadline` is when the overall deadline passes, if the future
    /// can time it.
    #[inline(always)] // built in its place in the future, not moved there
    pub(crate) fn start(
        shared: Arc<Shared>,
        prepared: Prepared,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Self, FallbackError> {
        let mut report = FallbackReport {
            requested_model: prepared.requested_model.clone(),
            ..FallbackReport::default()
        };
        if shared.record_stats {
            shared.stats.request();
        }
        if let Some(budget) = &shared.budget {
            budget.deposit();
        }
        let mut order = Order::new(&shared);
        let mut chosen = order.choose(&shared, &prepared, &mut report, now);
        if chosen.is_none() {
            order.force_by_recovery(&mut report);
            chosen = order.choose(&shared, &prepared, &mut report, now);
        }
        let Some(chosen) = chosen else {
            if report
                .skipped
                .iter()
                .any(|s| s.reason == SkipReason::BodyNotRewritable)
            {
                let encoding = prepared.encoding().to_owned();
                return Err(FallbackError::not_rewritable(encoding, report));
            }
            return Err(FallbackError::request("no target could be chosen".into()));
        };
        Ok(Engine {
            shared,
            prepared,
            report,
            order,
            next: Some(Next {
                chosen,
                charged: false,
            }),
            flights: Flights::default(),
            held: Held::Nothing,
            retries_here: 0,
            backoff: None,
            deadline,
            stopped: None,
            hedge_timer: false,
            ids: 0,
        })
    }

    /// The request's outcome, after a [`Step::Done`].
    pub(crate) fn take_output(&mut self) -> Option<Output<R>> {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Output(output) => Some(output),
            other => {
                self.held = other;
                None
            }
        }
    }

    /// The layer's settings.
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    fn max_in_flight(&self) -> usize {
        self.shared.hedge.map_or(1, |h| h.max_in_flight.max(1))
    }

    /// Whether the request may go to another target (see [`Prepared::replayable`]).
    fn may_move_on(&self) -> bool {
        self.shared.replay_unrewritable || self.prepared.replayable()
    }

    fn deadline_passed(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|at| now >= at)
    }

    /// The inner service is ready: the request for the chosen target, or the step to take when
    /// it cannot be sent (the retry budget refused it, or the request cannot be built).
    pub(crate) fn launch(&mut self, now: Instant) -> Result<Launch, Step> {
        let Some(next) = self.next.take() else {
            let error = FallbackError::request("no target left to call".into());
            return Err(self.end(Ending::Local(error), None, now));
        };
        // The budget is drawn on only for an attempt that is actually sent.
        let refused = next.charged && self.shared.budget.as_ref().is_some_and(|b| !b.withdraw());
        if refused {
            return Err(self.stop(StopReason::RetryBudget, now));
        }
        let index = next.chosen.index;
        let Some(target) = self.shared.targets.get(index) else {
            let error = FallbackError::request("no target left to call".into());
            return Err(self.end(Ending::Local(error), None, now));
        };
        let mut plan = match self.prepared.attempt(target) {
            Ok(plan) => plan,
            Err(error) => return Err(self.end(Ending::Local(error), None, now)),
        };
        let identity = AttemptTarget::new(index, target);
        plan.request.extensions_mut().insert(identity);
        self.held = Held::Nothing;
        self.report.first_choice.get_or_insert(index);
        let id = self.ids;
        self.ids = self.ids.wrapping_add(1);
        let balanced = self
            .shared
            .group_of
            .get(index)
            .and_then(|&g| self.shared.groups.get(g));
        let load = balanced
            .filter(|g| g.len() > 1)
            .map(|_| self.shared.loads.start(index));
        let mut request = plan.request;
        let empty_body = request.body().is_empty();
        let body = std::mem::take(request.body_mut());
        *request.body_mut() = body.tracked(self.report.cells(), id);
        self.flights.push(Flight {
            empty_body,
            id,
            index,
            ticket: next.chosen.ticket,
            load,
            model: plan.model,
            substituted: plan.substituted,
            started: now,
        });
        let hedge_after = self.shared.hedge.map(|h| h.delay);
        self.hedge_timer = hedge_after.is_some();
        Ok(Launch {
            id,
            request,
            hedge_after,
        })
    }

    /// Attempt `id` has an assessed outcome: hand it back, or go on.
    pub(crate) fn on_outcome(&mut self, id: u32, assessed: Assessed<R>, now: Instant) -> Step {
        let Some(mut flight) = self.flights.remove(id) else {
            return Step::Poll(None);
        };
        let retryable = assessed.decision.is_retryable();
        let success = matches!(assessed.outcome, AttemptOutcome::Status(s) if s.as_u16() < 400);
        let health = match (retryable, success) {
            (false, true) => HealthOutcome::Success,
            (false, false) => HealthOutcome::Neutral,
            (true, _) => HealthOutcome::Failure {
                at_least: assessed.cooldown,
            },
        };
        if let Some(ticket) = flight.ticket.take() {
            ticket.record(health);
        }
        let index = flight.index;
        if !retryable {
            // The race is over: the others are recorded as dropped before the winner.
            self.abandon(None, now);
            self.record(flight, assessed.outcome, Decision::Return, now);
            let ending = match assessed.answer {
                Answer::Response(peek) => Ending::Answer(peek, self.report.attempts.len() - 1),
                Answer::Failed(error) => Ending::Failed(error),
            };
            return self.end(ending, None, now);
        }
        if !member_could_fix(&assessed.outcome) {
            self.order.leave_group(&self.shared, index);
            // A hedge already chosen in the same group (its call waiting for readiness) goes
            // too; its ticket gives the admission back.
            let group = self.shared.group_of.get(index);
            if (self.next.as_ref())
                .is_some_and(|n| self.shared.group_of.get(n.chosen.index) == group)
            {
                self.next = None;
            }
        }
        let (decision, plan) = self.plan(index, assessed.decision, assessed.retry_after, now);
        self.record(flight, assessed.outcome, decision, now);
        self.held = Held::Last(match assessed.answer {
            Answer::Response(peek) => Last::Response(peek, self.report.attempts.len() - 1),
            Answer::Failed(error) => Last::Failed(error),
        });
        match plan {
            Plan::Retry(wait) => {
                self.hedge_timer = false;
                Step::Wait(wait)
            }
            Plan::Call => Step::Call,
            Plan::Stop(reason) => self.stop(reason, now),
        }
    }

    /// The timer of the last [`Step`] fired: a backoff ends in the call it delayed; a hedge
    /// timer starts the next attempt when there is room for one.
    pub(crate) fn on_timer(&mut self, now: Instant) -> Step {
        if !self.hedge_timer {
            return Step::Call;
        }
        if self.stopped.is_some()
            || self.flights.len() >= self.max_in_flight()
            || !self.may_move_on()
        {
            return Step::Poll(None);
        }
        if self.next.is_none() {
            match self
                .order
                .choose(&self.shared, &self.prepared, &mut self.report, now)
            {
                Some(chosen) => {
                    let charged = true;
                    self.next = Some(Next { chosen, charged });
                }
                None => return self.stop(StopReason::Exhausted, now),
            }
        }
        if self.deadline_passed(now) {
            self.next = None;
            return self.stop(StopReason::Deadline, now);
        }
        Step::Call
    }

    /// The inner service failed while getting ready for the next attempt: the last failure is
    /// the outcome, or this error when there is none.
    pub(crate) fn on_unready(&mut self, error: BoxError, now: Instant) -> Step {
        self.next = None;
        if self.flights.is_empty() && !matches!(self.held, Held::Last(_)) {
            return self.end(Ending::Unready(error), Some(StopReason::Unready), now);
        }
        self.stop(StopReason::Unready, now)
    }

    /// The overall deadline passed: the attempts still waiting for a head are cancelled, and
    /// the last failure is the outcome. (The future first lets attempts that were reading a
    /// body decide on what they had, through [`Engine::on_outcome`].)
    pub(crate) fn on_deadline(&mut self, now: Instant) -> Step {
        self.end_with_last(StopReason::Deadline, now)
    }

    /// After a retryable failure of target `index`: retry it, call the next target, or stop.
    /// Returns the decision to record with the failure.
    fn plan(
        &mut self,
        index: usize,
        classified: Decision,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> (Decision, Plan) {
        if let Some(reason) = self.stopped {
            return (Decision::NextTarget, Plan::Stop(reason));
        }
        if classified == Decision::RetrySame && self.shared.hedge.is_none() {
            if let Some(plan) = self.retry(index, retry_after, now) {
                return plan;
            }
        }
        if !self.may_move_on() {
            return (Decision::Return, Plan::Stop(StopReason::NotReplayable));
        }
        if self.next.is_none() {
            let Some(chosen) =
                self.order
                    .choose(&self.shared, &self.prepared, &mut self.report, now)
            else {
                return (Decision::NextTarget, Plan::Stop(StopReason::Exhausted));
            };
            self.next = Some(Next {
                chosen,
                charged: true,
            });
        }
        if self.deadline_passed(now) {
            self.next = None;
            return (Decision::Return, Plan::Stop(StopReason::Deadline));
        }
        self.retries_here = 0;
        self.backoff = None;
        (Decision::NextTarget, Plan::Call)
    }

    /// A same-target retry, when [`Retries`](crate::Retries) allow one and its wait is within
    /// bounds; `None` to move on instead.
    fn retry(
        &mut self,
        index: usize,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> Option<(Decision, Plan)> {
        let retries = self.shared.retries;
        if self.retries_here >= retries.per_target {
            return None;
        }
        let wait =
            retry_after.or_else(|| self.backoff.get_or_insert_with(|| retries.backoff()).next());
        let wait = wait.filter(|w| *w <= retries.max_wait)?;
        if self.deadline.is_some_and(|at| later(now, wait) >= at) {
            return Some((Decision::Return, Plan::Stop(StopReason::Deadline)));
        }
        // This request's own target, after the wait it asked for: the health store is told
        // the outcome but not asked for admission, since its cooldown is this very failure.
        let ticket = self.shared.health.as_ref().map(|h| h.unadmitted(index));
        self.next = Some(Next {
            chosen: Chosen { index, ticket },
            charged: true,
        });
        self.retries_here += 1;
        Some((Decision::RetrySame, Plan::Retry(wait)))
    }

    /// No further attempt may start: the request ends with its last failure once no attempt is
    /// left in flight.
    fn stop(&mut self, reason: StopReason, now: Instant) -> Step {
        self.next = None;
        if self.flights.is_empty() {
            return self.end_with_last(reason, now);
        }
        self.stopped = Some(reason);
        Step::Poll(None)
    }

    fn end_with_last(&mut self, reason: StopReason, now: Instant) -> Step {
        let ending = match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Last(Last::Response(peek, index)) => Ending::Answer(peek, index),
            Held::Last(Last::Failed(error)) => Ending::Failed(error),
            Held::Nothing | Held::Output(_) => Ending::Nothing,
        };
        self.end(ending, Some(reason), now)
    }

    /// The one way a request ends: the attempts still in flight are recorded as dropped (their
    /// admissions given back), the stop reason is set, and the response or error is built.
    fn end(&mut self, ending: Ending<R>, reason: Option<StopReason>, now: Instant) -> Step {
        self.abandon(reason, now);
        self.next = None;
        self.held = Held::Nothing;
        self.report.stop = reason;
        if let Ending::Answer(_, served) = &ending {
            self.report.served = Some(*served);
        }
        if self.shared.record_stats && self.report.fell_back() {
            self.shared.stats.fell_back(&self.report);
        }
        let ending = match ending {
            Ending::Answer(peek, served) => {
                self.held = Held::Output(Ok(self.hand_back(peek, served)));
                return Step::Done;
            }
            other => other,
        };
        let report = self.report.take();
        let deadline = reason == Some(StopReason::Deadline);
        self.held = Held::Output(Err(match ending {
            Ending::Failed(error) if deadline => FallbackError::deadline(Some(error), report),
            Ending::Failed(error) => FallbackError::upstream(error, report),
            Ending::Unready(error) => FallbackError::unready(error, report),
            Ending::Local(error) => error.with_report(report),
            Ending::Nothing if deadline => FallbackError::deadline(None, report),
            Ending::Nothing | Ending::Answer(..) => {
                FallbackError::upstream("no attempt could be made".into(), report)
            }
        }));
        Step::Done
    }

    /// Records the attempts still in flight as dropped: superseded, or cancelled by the
    /// deadline. Their tickets give their admissions back.
    fn abandon(&mut self, reason: Option<StopReason>, now: Instant) {
        if self.flights.is_empty() {
            return;
        }
        let dropped = if reason == Some(StopReason::Deadline) {
            AttemptOutcome::Error {
                kind: ErrorKind::Timeout,
                message: "the overall deadline passed".to_owned(),
            }
        } else {
            AttemptOutcome::Superseded
        };
        for flight in self.flights.drain() {
            self.record(flight, dropped.clone(), Decision::Return, now);
        }
    }

    fn record(
        &mut self,
        flight: Flight,
        outcome: AttemptOutcome,
        decision: Decision,
        now: Instant,
    ) {
        record(
            &self.shared,
            &mut self.report,
            flight,
            outcome,
            decision,
            now,
        );
    }

    /// Hands a response back with the report; `served` is its attempt's place in the report.
    #[inline(always)]
    fn hand_back(&mut self, peek: Peek<R>, served: usize) -> Response<ResponseBody<R>> {
        let committed_stream = peek.event_stream && peek.head.status.is_success();
        let extras = Extras {
            meter: self.usage_meter(&peek, served),
            ending: (committed_stream && self.shared.stream_error_events)
                .then(|| StreamEnding::new(peek.dialect.unwrap_or_default())),
            idle: self.shared.stream_idle_timeout.and_then(Idle::new),
        };
        let mut response = peek.into_response(self.report.cells(), extras);
        response.extensions_mut().insert(self.report.take());
        response
    }

    /// A meter for the answer's `usage`, when the layer has a catalog and the answer is a
    /// non-streamed JSON success.
    fn usage_meter(&self, peek: &Peek<R>, served: usize) -> Option<Box<UsageMeter>> {
        let catalog = self.shared.catalog.as_ref()?;
        let json = crate::media::essence(&peek.head.headers).is_some_and(crate::media::is_json);
        if !peek.head.status.is_success() || peek.event_stream || !json {
            return None;
        }
        let served = self.report.attempts.get(served)?;
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
}

/// Whether another member of the same group could answer where this attempt failed: a rate
/// limit, an overload, a 5xx, a timeout or a broken connection are the member's own; any other
/// retryable failure (404 `model_not_found`, an opted-in context length or content-policy 400)
/// is the model's, and every member serves the same model.
fn member_could_fix(outcome: &AttemptOutcome) -> bool {
    match outcome {
        AttemptOutcome::Status(status) => {
            matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
        }
        // Content-policy codes (`content_filter`, `content_policy_violation`, …) are the model's
        // too: every member would refuse the same prompt.
        AttemptOutcome::ErrorEvent { code, .. } => !code.as_deref().is_some_and(|c| {
            c.contains("model_not_found")
                || c.contains("context_length")
                || c.starts_with("content_")
        }),
        AttemptOutcome::Error { .. }
        | AttemptOutcome::BodyFailed { .. }
        | AttemptOutcome::Superseded => true,
    }
}

/// What comes after a retryable failure.
enum Plan {
    /// Wait, then call the same target again.
    Retry(Duration),
    /// Call the chosen next target.
    Call,
    /// No further attempt.
    Stop(StopReason),
}

/// The attempts in flight; the first is inline, so a sequential request allocates nothing.
#[derive(Default)]
struct Flights {
    first: Option<Flight>,
    more: Vec<Flight>,
}

impl Flights {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, flight: Flight) {
        match self.first {
            None => self.first = Some(flight),
            Some(_) => self.more.push(flight),
        }
    }

    fn remove(&mut self, id: u32) -> Option<Flight> {
        if self.first.as_ref().is_some_and(|f| f.id == id) {
            return self.first.take();
        }
        let at = self.more.iter().position(|f| f.id == id)?;
        Some(self.more.remove(at))
    }

    /// Every flight, in the order they started.
    fn drain(&mut self) -> impl Iterator<Item = Flight> {
        let mut all: Vec<Flight> = self.first.take().into_iter().collect();
        all.append(&mut self.more);
        all.sort_by_key(|f| f.id);
        all.into_iter()
    }
}
