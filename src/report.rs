//! The history of one request: every attempt, what came of it, and which target served.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

use crate::policy::{Decision, ErrorKind};

/// The history of one request, in the extensions of every response the layer hands back (and in
/// every [`FallbackError`](crate::FallbackError)).
///
/// ```
/// # async fn demo(response: http::Response<()>) {
/// use tower_model_fallback::FallbackReport;
///
/// if let Some(report) = response.extensions().get::<FallbackReport>() {
///     if let Some(served) = report.served_by() {
///         println!("answered by {} with {:?}", served.target(), served.model());
///     }
///     println!("{report}"); // one line per attempt
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct FallbackReport {
    pub(crate) attempts: Vec<Attempt>,
    pub(crate) served: Option<usize>,
    /// The first target the request considered (tried, or skipped as cooling down).
    pub(crate) first_choice: Option<usize>,
    pub(crate) requested_model: Option<Arc<str>>,
    pub(crate) skipped: Vec<Skip>,
    pub(crate) stop: Option<StopReason>,
    /// Shared with the response body, which records a failure after the commit point and the
    /// answer's `usage` at its end.
    pub(crate) cells: Arc<BodyCells>,
}

/// What the response body learns after it was handed back.
#[derive(Debug, Default)]
pub(crate) struct BodyCells {
    pub(crate) stream_error: OnceLock<String>,
    pub(crate) usage: OnceLock<Usage>,
    /// Bit `n`: attempt `n`'s request body was read to its end by the inner service (sent).
    pub(crate) sent: std::sync::atomic::AtomicU64,
}

impl BodyCells {
    /// Records that attempt `id`'s request body was read to its end.
    pub(crate) fn mark_sent(&self, id: u32) {
        if id < 64 {
            self.sent
                .fetch_or(1 << id, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether attempt `id`'s request body was read to its end (attempts past the 64th are
    /// not tracked, and count as sent).
    pub(crate) fn was_sent(&self, id: u32) -> bool {
        id >= 64 || self.sent.load(std::sync::atomic::Ordering::Relaxed) & (1 << id) != 0
    }
}

impl FallbackReport {
    /// Every attempt, in order.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// The attempt whose response was handed back, if a response was.
    pub fn served_by(&self) -> Option<&Attempt> {
        self.served.and_then(|i| self.attempts.get(i))
    }

    /// Whether the request was served, or last failed, at a target other than the first it
    /// considered (tried, or skipped as cooling down). Retries of the same target are not a
    /// fallback. The stats' `fell_back` counts exactly these requests.
    pub fn fell_back(&self) -> bool {
        let outcome = self.served_by().or(self.attempts.last());
        match (self.first_choice, outcome) {
            (Some(first), Some(attempt)) => attempt.target_index != first,
            _ => false,
        }
    }

    /// Whether every target was tried and failed; the response (or error) is the last failure.
    /// The same as `stop_reason() == Some(StopReason::Exhausted)`.
    pub fn is_exhausted(&self) -> bool {
        self.stop == Some(StopReason::Exhausted)
    }

    /// Targets passed over because they were cooling down, in the order they were considered.
    pub fn skipped(&self) -> &[Skip] {
        &self.skipped
    }

    /// Why the layer stopped trying while a further attempt could have helped: every target
    /// was tried, the retry budget was spent, or the overall deadline passed. `None` when the
    /// outcome was not a retryable failure.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// The model the caller's body asked for (its top-level `"model"` string), if any.
    pub fn requested_model(&self) -> Option<&str> {
        self.requested_model.as_deref()
    }

    /// The error that ended the response body after it was handed back (the upstream failed
    /// mid-stream; the body yielded this error rather than a clean end). Shared by every clone of
    /// this report, so it can be read once the body has been consumed.
    pub fn stream_error(&self) -> Option<&str> {
        self.cells.stream_error.get().map(String::as_str)
    }

    /// Token counts and estimated cost of the answer, from its `usage`: set once a non-streamed
    /// JSON answer has been read to its end, when the layer has a
    /// [`ModelCatalog`](crate::ModelCatalog).
    pub fn usage(&self) -> Option<&Usage> {
        self.cells.usage.get()
    }

    /// Takes the report out, leaving an empty one that shares its cells (no allocation: the
    /// report is taken once per request, when the response or error is built).
    pub(crate) fn take(&mut self) -> FallbackReport {
        let empty = FallbackReport {
            attempts: Vec::new(),
            served: None,
            first_choice: None,
            requested_model: None,
            skipped: Vec::new(),
            stop: None,
            cells: self.cells.clone(),
        };
        std::mem::replace(self, empty)
    }

    pub(crate) fn cells(&self) -> Arc<BodyCells> {
        self.cells.clone()
    }

    pub(crate) fn push(&mut self, attempt: Attempt) {
        self.attempts.push(attempt);
    }
}

impl fmt::Display for FallbackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut line = |f: &mut fmt::Formatter<'_>| {
            let sep = if first { "" } else { "\n" };
            first = false;
            f.write_str(sep)
        };
        for skip in &self.skipped {
            line(f)?;
            write!(f, "skipped {skip}")?;
        }
        for (i, a) in self.attempts.iter().enumerate() {
            line(f)?;
            write!(f, "{}. {a}", i + 1)?;
        }
        if let Some(stop) = self.stop.filter(|s| *s != StopReason::Exhausted) {
            line(f)?;
            write!(f, "stopped: {stop}")?;
        }
        Ok(())
    }
}

/// A target passed over without an attempt: it was cooling down, or it could not be sent this
/// request's body with its own model in it.
#[derive(Debug, Clone)]
pub struct Skip {
    pub(crate) group: Option<Arc<str>>,
    pub(crate) target: Arc<str>,
    pub(crate) target_index: usize,
    pub(crate) remaining: Duration,
    pub(crate) reason: SkipReason,
}

/// Why a target was passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// It was cooling down ([`Skip::remaining`] says how much longer).
    CoolingDown,
    /// It names a model, and the body could not be rewritten to carry it (it is compressed):
    /// it would have been sent the caller's model instead of its own.
    BodyNotRewritable,
}

impl Skip {
    /// The target's name.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The name of the target's [group](crate::TargetGroup); `None` for a target on its own.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The target's position in the layer's list.
    pub fn target_index(&self) -> usize {
        self.target_index
    }

    /// How long it was still to cool down (zero while another request probed it, and for a
    /// target skipped for another reason).
    pub fn remaining(&self) -> Duration {
        self.remaining
    }

    /// Why it was passed over.
    pub fn reason(&self) -> SkipReason {
        self.reason
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(group) = &self.group {
            write!(f, "{group}/")?;
        }
        match self.reason {
            SkipReason::CoolingDown => write!(
                f,
                "{}: cooling down for {:.1?} more",
                self.target, self.remaining
            ),
            SkipReason::BodyNotRewritable => write!(
                f,
                "{}: the compressed body cannot carry its model",
                self.target
            ),
        }
    }
}

/// Why the layer stopped while the last failure was retryable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// Every target was tried.
    Exhausted,
    /// The retry budget was spent: retries and fallbacks are limited to a share of recent
    /// requests, so an outage cannot multiply load.
    RetryBudget,
    /// The overall deadline passed.
    Deadline,
    /// The inner service failed while getting ready for the next attempt.
    Unready,
    /// The request is not sent to another target: its body is not rewritten for targets (not
    /// a JSON object, no multipart `model` field) and its method is not idempotent, so it may
    /// already have taken effect (see
    /// [`replay_unrewritable_bodies`](crate::FallbackLayer::replay_unrewritable_bodies)).
    NotReplayable,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::Exhausted => "every target was tried",
            StopReason::RetryBudget => "the retry budget is spent",
            StopReason::Deadline => "the overall deadline passed",
            StopReason::Unready => "the inner service failed to get ready for the next attempt",
            StopReason::NotReplayable => {
                "the request is not sent elsewhere: its body is not rewritten per target and its method is not idempotent"
            }
        })
    }
}

/// One attempt: which target, which model, what happened, how long it took, what was decided.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub(crate) group: Option<Arc<str>>,
    pub(crate) target: Arc<str>,
    pub(crate) target_index: usize,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) substituted: bool,
    pub(crate) outcome: AttemptOutcome,
    pub(crate) elapsed: Duration,
    pub(crate) decision: Decision,
    pub(crate) outcome_unknown: bool,
}

impl Attempt {
    /// Whether the request reached the upstream and what came of it is unknown: a timeout, a
    /// reset or a dropped stream after the request was sent (or a success head whose body then
    /// failed). The provider may have processed — and billed — it.
    pub fn outcome_unknown(&self) -> bool {
        self.outcome_unknown
    }

    /// The target's name (a member's, for a target of a group).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The name of the target's [group](crate::TargetGroup); `None` for a target on its own.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The target's position in the layer's list (0 is the primary).
    pub fn target_index(&self) -> usize {
        self.target_index
    }

    /// The model this attempt asked for: the target's model, or the caller's when the target
    /// sets none or the body could not carry one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether the target's model was written into the body. `false` for bodies that are not a
    /// JSON object (empty, not JSON, compressed) and for targets without a model.
    pub fn model_substituted(&self) -> bool {
        self.substituted
    }

    /// What happened.
    pub fn outcome(&self) -> &AttemptOutcome {
        &self.outcome
    }

    /// The response status, when there was a response.
    pub fn status(&self) -> Option<StatusCode> {
        match self.outcome {
            AttemptOutcome::Status(status)
            | AttemptOutcome::BodyFailed { status, .. }
            | AttemptOutcome::ErrorEvent { status, .. } => Some(status),
            AttemptOutcome::Error { .. } | AttemptOutcome::Superseded => None,
        }
    }

    /// From the call to the inner service until the decision.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// What the policy decided.
    pub fn decision(&self) -> Decision {
        self.decision
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(group) = &self.group {
            write!(f, "{group}/")?;
        }
        write!(f, "{}", self.target)?;
        if let Some(model) = &self.model {
            write!(f, " ({model})")?;
        }
        write!(
            f,
            ": {} after {:.1?}, {}",
            self.outcome, self.elapsed, self.decision
        )
    }
}

/// What an attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// A response with this status.
    Status(StatusCode),
    /// No response: the inner service failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// The error's message (its `Display` and its sources').
        message: String,
    },
    /// A success whose body failed (or timed out) before its first byte reached the caller.
    BodyFailed {
        /// The response status.
        status: StatusCode,
        /// What kind of failure.
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
    /// A hedged attempt dropped because another one answered first (billed all the same).
    Superseded,
    /// A streamed success whose first event was an error object.
    ErrorEvent {
        /// The response status.
        status: StatusCode,
        /// The error's `code` (or `type`), when it has one.
        code: Option<String>,
    },
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptOutcome::Status(s) => write!(f, "{s}"),
            AttemptOutcome::Error { kind, message } => write!(f, "{kind} ({message})"),
            AttemptOutcome::BodyFailed {
                status,
                kind,
                message,
            } => write!(f, "{status}, then {kind} before the first byte ({message})"),
            AttemptOutcome::Superseded => f.write_str("dropped: another hedged attempt won"),
            AttemptOutcome::ErrorEvent { status, code } => {
                write!(f, "{status}, then an error event")?;
                match code {
                    Some(code) => write!(f, " ({code})"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Token counts and estimated cost of one answer, from its `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Estimated cost in USD, when the served model is priced in the catalog.
    pub cost_usd: Option<f64>,
}
