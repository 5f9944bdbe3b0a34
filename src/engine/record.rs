//! Recording a finished attempt: the report, the stats and the log line, all from one place.

use std::sync::Arc;
use std::time::Instant;

use crate::policy::{Decision, ErrorKind};
use crate::report::{Attempt, AttemptOutcome, FallbackReport};
use crate::resilience::balance::{InFlight, FAILURE_PENALTY};
use crate::resilience::health::Ticket;
use crate::resilience::stats::Tally;
use crate::settings::Shared;

/// An attempt in flight, as the engine knows it.
pub(crate) struct Flight {
    pub(crate) id: u32,
    pub(crate) index: usize,
    /// Its standing with the health store; dropped unrecorded, it gives the admission back.
    pub(crate) ticket: Option<Ticket>,
    /// Counted in its member's load, for a target of a group of two or more.
    pub(crate) load: Option<InFlight>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) substituted: bool,
    pub(crate) started: Instant,
    /// Its request has no body: whether it was sent cannot be seen.
    pub(crate) empty_body: bool,
}

/// Records `flight` with what came of it and what was decided.
pub(crate) fn record(
    shared: &Shared,
    report: &mut FallbackReport,
    mut flight: Flight,
    outcome: AttemptOutcome,
    decision: Decision,
    now: Instant,
) {
    let elapsed = now.saturating_duration_since(flight.started);
    if let Some(load) = flight.load.take() {
        // A dropped hedge says nothing of its member's speed; a failure says it is no place to
        // go. Only an answer the caller can use counts at its real speed: a member whose revoked
        // key answers 401 in 20 ms is not the group's fastest, or it would win every draw.
        match &outcome {
            AttemptOutcome::Superseded => {}
            AttemptOutcome::Status(status)
                if decision == Decision::Return
                    && !status.is_client_error()
                    && !status.is_server_error() =>
            {
                load.finish(elapsed, now)
            }
            _ => load.finish(elapsed.max(FAILURE_PENALTY), now),
        }
    }
    let name = shared
        .targets
        .get(flight.index)
        .map(|t| t.name.clone())
        .unwrap_or_else(|| Arc::from("?"));
    let sent = flight.empty_body || report.cells.was_sent(flight.id);
    let outcome_unknown = match &outcome {
        AttemptOutcome::BodyFailed { .. } => true,
        AttemptOutcome::Error { kind, .. } => {
            sent && !matches!(kind, ErrorKind::Connect | ErrorKind::Overloaded)
        }
        AttemptOutcome::Superseded => sent,
        AttemptOutcome::Status(_) | AttemptOutcome::ErrorEvent { .. } => false,
    };
    let attempt = Attempt {
        outcome_unknown,
        group: shared.group_name(flight.index).cloned(),
        target: name,
        target_index: flight.index,
        model: flight.model,
        substituted: flight.substituted,
        outcome,
        elapsed,
        decision,
    };
    if shared.record_stats {
        let tally = match (decision, &attempt.outcome) {
            (_, AttemptOutcome::Superseded) => Tally::Superseded,
            (Decision::RetrySame, _) => Tally::RetrySame,
            (Decision::NextTarget, _) => Tally::NextTarget,
            (Decision::Return, AttemptOutcome::Status(s)) if s.as_u16() < 400 => Tally::Success,
            (Decision::Return, _) => Tally::NonRetryable,
        };
        shared
            .stats
            .attempt(flight.index, tally, &attempt.outcome, attempt.elapsed);
    }
    log(&attempt, report.attempts.len() + 1);
    report.push(attempt);
}

fn log(attempt: &Attempt, number: usize) {
    macro_rules! attempt_event {
        ($level:expr, $message:literal) => {
            tracing::event!(
                target: "tower_model_fallback",
                $level,
                attempt = number,
                target_name = %attempt.target,
                model = attempt.model.as_deref().unwrap_or("-"),
                // OpenTelemetry's GenAI and HTTP attribute names, beside the short ones.
                gen_ai.provider.name = %attempt.target,
                gen_ai.request.model = attempt.model.as_deref(),
                http.request.resend_count = (number > 1).then(|| number - 1),
                outcome = %attempt.outcome,
                elapsed_ms = attempt.elapsed.as_millis() as u64,
                decision = %attempt.decision,
                $message,
            )
        };
    }
    let failed = !matches!(&attempt.outcome, AttemptOutcome::Status(s) if s.as_u16() < 400);
    match attempt.decision {
        Decision::NextTarget => attempt_event!(
            tracing::Level::WARN,
            "attempt failed; falling back to the next target"
        ),
        Decision::RetrySame => attempt_event!(
            tracing::Level::WARN,
            "attempt failed; retrying the same target"
        ),
        Decision::Return if failed => attempt_event!(
            tracing::Level::INFO,
            "attempt failed; handed back without falling back"
        ),
        Decision::Return => attempt_event!(tracing::Level::DEBUG, "attempt succeeded"),
    }
}
