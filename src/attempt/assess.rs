//! What an attempt's outcome is, as the policy sees it: the head alone, the start of the body,
//! or an error. Pure functions of the outcome and the layer's settings.

use std::time::Duration;

use http::Response;
use http_body::Body;

use super::peek::{Peek, Purpose, Stop};
use crate::error::{error_chain, BoxError};
use crate::policy::{hints, Decision, ErrorKind, Outcome};
use crate::report::AttemptOutcome;
use crate::response::sse::Found;
use crate::response::{sse, CommitPoint};
use crate::settings::Shared;

/// An attempt's outcome, assessed: what happened, what the policy says, what there is to hand
/// back, and what it asks of the next attempt.
pub(crate) struct Assessed<R: Body> {
    pub(crate) outcome: AttemptOutcome,
    /// The policy's decision, before retries and the order of targets are considered.
    pub(crate) decision: Decision,
    pub(crate) answer: Answer<R>,
    /// The cooldown the failure calls for (`Retry-After`, an exhausted quota).
    pub(crate) cooldown: Option<Duration>,
    /// The wait the upstream asked for before a retry.
    pub(crate) retry_after: Option<Duration>,
}

/// What an attempt leaves to hand back if it ends the request.
// Moved from the attempt to the engine once; boxing the response would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Answer<R: Body> {
    /// A response (its body's start read, or not).
    Response(Peek<R>),
    /// No response: the inner service failed, or a success's body failed before its first byte.
    Failed(BoxError),
}

/// A response head: assessed on its own, or to be read further.
pub(crate) enum Head<R: Body> {
    Assessed(Assessed<R>),
    Read(Peek<R>, Purpose),
}

/// Decides on a head, or asks for the start of its body: an error body the policy wants to
/// see, or a success held until its commit point.
pub(crate) fn head<R: Body>(response: Response<R>, shared: &Shared) -> Head<R> {
    let status = response.status();
    if status.as_u16() >= 400
        && shared.error_body_limit > 0
        && shared.classifier.wants_body(status, response.headers())
    {
        return Head::Read(Peek::new(response), Purpose::Classify);
    }
    let decision = shared.classifier.classify(&Outcome::Response {
        status,
        headers: response.headers(),
        body: None,
    });
    let mut peek = Peek::new(response);
    peek.first_event = shared.commit_on == CommitPoint::FirstEvent;
    if decision == Decision::Return
        && status.is_success()
        && shared.commit_on != CommitPoint::Head
        && !peek.body_at_end()
    {
        return Head::Read(peek, Purpose::Commit);
    }
    Head::Assessed(response_assessed(
        peek,
        AttemptOutcome::Status(status),
        decision,
        None,
        shared,
    ))
}

/// Decides on a response whose body's start was read (or failed, or timed out).
pub(crate) fn body<R: Body>(
    mut peek: Peek<R>,
    purpose: Purpose,
    stop: Stop,
    shared: &Shared,
) -> Assessed<R> {
    let status = peek.head.status;
    if purpose == Purpose::Classify {
        let mut bytes = peek.contiguous();
        bytes.truncate(shared.error_body_limit);
        let decision = shared.classifier.classify(&Outcome::Response {
            status,
            headers: &peek.head.headers,
            body: Some(&bytes),
        });
        let outcome = AttemptOutcome::Status(status);
        return response_assessed(peek, outcome, decision, Some(&bytes), shared);
    }
    let failure = match stop {
        // A stream that sent a preamble event but no content within the first-byte timeout is
        // slow, not gone: it commits. Comments alone (a queue's keep-alives) are no sign of a
        // model at work: the attempt times out and moves on.
        Stop::TimedOut if peek.event_stream && peek.preamble_seen() => {
            return committed(peek, shared)
        }
        Stop::TimedOut => Some((
            Box::new(tower::timeout::error::Elapsed::new()) as BoxError,
            "no first byte within the first-byte timeout".to_owned(),
        )),
        Stop::Failed | Stop::Enough if peek.error.is_some() => None,
        Stop::Failed | Stop::Enough if peek.ended_early() => {
            let what = if peek.event_stream {
                "the stream ended before its first content event"
            } else {
                "the body ended before its first byte"
            };
            let error = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what);
            Some((Box::new(error) as BoxError, what.to_owned()))
        }
        Stop::Failed | Stop::Enough => return committed(peek, shared),
    };
    let (error, message) = match failure {
        Some(failure) => failure,
        None => {
            let error = peek
                .error
                .take()
                .unwrap_or_else(|| "the body failed".into());
            let message = error_chain(&*error);
            (error, message)
        }
    };
    let kind = ErrorKind::of(&*error);
    let decision = shared.classifier.classify(&Outcome::Error {
        kind,
        error: &*error,
    });
    let retry_after = decision
        .is_retryable()
        .then(|| hints::retry_after(&peek.head.headers))
        .flatten();
    Assessed {
        outcome: AttemptOutcome::BodyFailed {
            status,
            kind,
            message,
        },
        decision,
        answer: Answer::Failed(error),
        cooldown: None,
        retry_after,
    }
}

/// A success read up to its commit point: handed back, unless a stream opens with an error.
// Inlined: the response is moved into place once rather than through each call.
#[inline(always)]
fn committed<R: Body>(mut peek: Peek<R>, shared: &Shared) -> Assessed<R> {
    let status = peek.head.status;
    if peek.event_stream {
        peek.scan();
    }
    let Found::Error(event) = std::mem::replace(&mut peek.found, Found::Content) else {
        return Assessed {
            outcome: AttemptOutcome::Status(status),
            decision: Decision::Return,
            answer: Answer::Response(peek),
            cooldown: None,
            retry_after: None,
        };
    };
    let (stands_for, code) = sse::error_status(&event);
    let decision = shared.classifier.classify(&Outcome::ErrorEvent {
        status,
        headers: &peek.head.headers,
        event: &event,
        stands_for,
        code: code.as_deref(),
    });
    let (cooldown, retry_after) = if decision.is_retryable() {
        let head = &peek.head.headers;
        let quota = shared.quota_cooldown;
        let cooldown = hints::cooldown(stands_for, head, code.as_deref(), quota);
        (cooldown, hints::retry_after(head))
    } else {
        (None, None)
    };
    Assessed {
        outcome: AttemptOutcome::ErrorEvent { status, code },
        decision,
        answer: Answer::Response(peek),
        cooldown,
        retry_after,
    }
}

/// A response decided on, with the hints a retryable failure gives.
#[inline(always)]
fn response_assessed<R: Body>(
    peek: Peek<R>,
    outcome: AttemptOutcome,
    decision: Decision,
    body: Option<&[u8]>,
    shared: &Shared,
) -> Assessed<R> {
    let (cooldown, retry_after) = if decision.is_retryable() {
        let head = &peek.head;
        (
            hints::cooldown(
                head.status,
                &head.headers,
                body.and_then(crate::policy::error_code).as_deref(),
                shared.quota_cooldown,
            ),
            hints::retry_after(&head.headers),
        )
    } else {
        (None, None)
    };
    Assessed {
        outcome,
        decision,
        answer: Answer::Response(peek),
        cooldown,
        retry_after,
    }
}

/// Decides on an inner service error (or the layer's own attempt timeout).
pub(crate) fn error<R: Body>(error: BoxError, shared: &Shared) -> Assessed<R> {
    let kind = ErrorKind::of(&*error);
    let decision = shared.classifier.classify(&Outcome::Error {
        kind,
        error: &*error,
    });
    Assessed {
        outcome: AttemptOutcome::Error {
            kind,
            message: error_chain(&*error),
        },
        decision,
        answer: Answer::Failed(error),
        cooldown: None,
        retry_after: None,
    }
}
