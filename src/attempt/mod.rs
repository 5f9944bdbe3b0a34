//! One attempt, from the inner service's call to its assessed outcome: the head (bounded by the
//! attempt timeout), then, when the policy needs it, the start of the body (an error body read
//! to classify it, or a success read up to its commit point, bounded by their own timers).
//!
//! The same type serves sequential and hedged requests; it never calls into the engine. It
//! yields an [`Assessed`] outcome and the engine decides what follows.

pub(crate) mod assess;
pub(crate) mod peek;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use http_body::Body;

use assess::Head;
pub(crate) use assess::{Answer, Assessed};
use peek::{Peek, Purpose, Stop, COMMIT_READ_LIMIT};

use crate::error::BoxError;
use crate::settings::Shared;

/// How long an error body may take to arrive when no first-byte timeout is set.
const ERROR_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A tokio timer, when there is a tokio runtime to drive it (the layer's timers need its time
/// driver; without a runtime, reads are bounded in size only and backoffs are not waited).
pub(crate) fn timer(duration: Duration) -> Option<tokio::time::Sleep> {
    tokio::runtime::Handle::try_current().ok()?;
    Some(tokio::time::sleep(duration))
}

pin_project_lite::pin_project! {
    /// One attempt in flight.
    pub(crate) struct Attempt<F, R: Body> {
        id: u32,
        #[pin]
        stage: Stage<F, R>,
        // The attempt timeout while calling; the read's bound while reading.
        #[pin]
        timer: Option<tokio::time::Sleep>,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<F, R: Body> {
        Calling { #[pin] future: F },
        Reading { peek: Option<Peek<R>>, purpose: Purpose },
        Done,
    }
}

impl<F, R, E> Attempt<F, R>
where
    F: Future<Output = Result<Response<R>, E>>,
    E: Into<BoxError>,
    R: Body + Unpin,
    R::Data: From<bytes::Bytes>,
    R::Error: Into<BoxError>,
{
    /// An attempt whose call returned `future`; `id` is the engine's name for it.
    #[inline(always)] // built where it is kept, not moved there
    pub(crate) fn new(id: u32, future: F, shared: &Shared) -> Self {
        Attempt {
            id,
            stage: Stage::Calling { future },
            timer: shared.attempt_timeout.and_then(timer),
        }
    }

    /// The engine's name for this attempt.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// Moves the attempt along; ready once its outcome is assessed.
    pub(crate) fn poll_outcome(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        shared: &Shared,
    ) -> Poll<Assessed<R>> {
        let mut this = self.project();
        loop {
            match this.stage.as_mut().project() {
                StageProj::Calling { future } => {
                    let result = match future.poll(cx) {
                        Poll::Ready(result) => result.map_err(Into::into),
                        Poll::Pending if fired(this.timer.as_mut(), cx) => {
                            // As a tower `TimeoutLayer` inside the layer would say it.
                            Err(Box::new(tower::timeout::error::Elapsed::new()) as BoxError)
                        }
                        Poll::Pending => return Poll::Pending,
                    };
                    let response = match result {
                        Ok(response) => response,
                        Err(error) => {
                            this.stage.set(Stage::Done);
                            return Poll::Ready(assess::error(error, shared));
                        }
                    };
                    match assess::head(response, shared) {
                        Head::Assessed(assessed) => {
                            this.stage.set(Stage::Done);
                            return Poll::Ready(assessed);
                        }
                        Head::Read(peek, purpose) => {
                            this.timer.set(read_timer(purpose, shared));
                            let peek = Some(peek);
                            this.stage.set(Stage::Reading { peek, purpose });
                        }
                    }
                }
                StageProj::Reading { peek, purpose } => {
                    let purpose = *purpose;
                    let Some(reading) = peek.as_mut() else {
                        return Poll::Pending;
                    };
                    let stop = match reading.poll_read(cx, purpose, read_limit(purpose, shared)) {
                        Poll::Ready(stop) => stop,
                        Poll::Pending if fired(this.timer.as_mut(), cx) => Stop::TimedOut,
                        Poll::Pending => return Poll::Pending,
                    };
                    let Some(read) = peek.take() else {
                        return Poll::Pending;
                    };
                    this.stage.set(Stage::Done);
                    return Poll::Ready(assess::body(read, purpose, stop, shared));
                }
                StageProj::Done => return Poll::Pending,
            }
        }
    }

    /// The overall deadline passed: an attempt reading a body decides on what has arrived
    /// (`Some`); one still waiting for its head has nothing to decide on (`None`).
    pub(crate) fn conclude_now(self: Pin<&mut Self>, shared: &Shared) -> Option<Assessed<R>> {
        let mut this = self.project();
        let StageProj::Reading { peek, purpose } = this.stage.as_mut().project() else {
            return None;
        };
        let purpose = *purpose;
        let read = peek.take()?;
        this.stage.set(Stage::Done);
        Some(assess::body(read, purpose, Stop::Enough, shared))
    }
}

/// Polls an optional timer; true once it has fired.
fn fired(timer: Pin<&mut Option<tokio::time::Sleep>>, cx: &mut Context<'_>) -> bool {
    timer.as_pin_mut().is_some_and(|t| t.poll(cx).is_ready())
}

fn read_limit(purpose: Purpose, shared: &Shared) -> usize {
    match purpose {
        Purpose::Classify => shared.error_body_limit,
        Purpose::Commit => COMMIT_READ_LIMIT,
    }
}

/// The timer bounding a body read.
fn read_timer(purpose: Purpose, shared: &Shared) -> Option<tokio::time::Sleep> {
    let limit = match purpose {
        Purpose::Commit => shared.first_byte_timeout,
        // An error body is read to decide; it must not hold the request forever.
        Purpose::Classify => shared.first_byte_timeout.or(Some(ERROR_BODY_READ_TIMEOUT)),
    }?;
    timer(limit)
}
