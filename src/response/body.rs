//! The response body handed back to the caller, preceded by what the layer read ahead.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use crate::error::BoxError;
use crate::report::BodyCells;
use crate::response::ending::{Cut, StreamEnding};
use crate::response::usage::UsageMeter;

/// Frames read ahead of the caller, in order. A first data chunk is kept inline: the usual
/// read-ahead is one chunk, and it then costs no allocation. (Only its data: a frame can hold
/// trailers, and the response that carries this is moved several times.)
pub(crate) struct Frames<D> {
    first: Option<D>,
    rest: VecDeque<Frame<D>>,
}

impl<D> Default for Frames<D> {
    fn default() -> Self {
        Frames {
            first: None,
            rest: VecDeque::new(),
        }
    }
}

impl<D> Frames<D> {
    pub(crate) fn push_back(&mut self, frame: Frame<D>) {
        if self.first.is_none() && self.rest.is_empty() {
            match frame.into_data() {
                Ok(data) => self.first = Some(data),
                Err(frame) => self.rest.push_back(frame),
            }
        } else {
            self.rest.push_back(frame);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<Frame<D>> {
        match self.first.take() {
            Some(data) => Some(Frame::data(data)),
            None => self.rest.pop_front(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// The data read ahead, in order.
    pub(crate) fn data(&self) -> impl Iterator<Item = &D> {
        self.first
            .iter()
            .chain(self.rest.iter().filter_map(Frame::data_ref))
    }
}

pin_project_lite::pin_project! {
    /// The response body handed to the caller: the inner response's body, streamed through
    /// unchanged, preceded by the frames the layer read before deciding (an error body's start,
    /// or a success's preamble and first content).
    ///
    /// Its error type is [`BoxError`]: the inner body's error, boxed (downcast it to reach the
    /// original). An upstream failure after the answer started is such an error, never a clean,
    /// truncated end, and it is recorded in the [`FallbackReport`](crate::FallbackReport)
    /// ([`stream_error`](crate::FallbackReport::stream_error)). A committed
    /// `text/event-stream` that fails (or stalls past the
    /// [stream idle timeout](crate::FallbackLayer::stream_idle_timeout)) first gets its wire
    /// format's terminal error event — chat: `data: {"error": {…}}`; Responses:
    /// `event: response.failed`; Anthropic: `event: error` — unless
    /// [`stream_error_events`](crate::FallbackLayer::stream_error_events) is off; its events
    /// pass whole, so that event never lands inside another.
    ///
    /// It is a [`Body`] when its data type can be made from [`Bytes`] (hyper's bodies, and
    /// every body with `Data = Bytes`): the terminal event is such data.
    pub struct ResponseBody<B: Body> {
        buffered: Frames<B::Data>,
        error: Option<BoxError>,
        inner_done: bool,
        record: Arc<BodyCells>,
        meter: Option<Box<UsageMeter>>,
        ending: Option<StreamEnding>,
        idle: Option<Idle>,
        #[pin]
        inner: B,
    }
}

/// The stream idle timeout of a body: armed when the body waits for the upstream.
pub(crate) struct Idle {
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl Idle {
    /// A stream idle timeout, when there is a tokio runtime to time it.
    pub(crate) fn new(limit: Duration) -> Option<Idle> {
        tokio::runtime::Handle::try_current().ok()?;
        let sleep = Box::pin(tokio::time::sleep(limit));
        Some(Idle {
            limit,
            sleep,
            armed: false,
        })
    }

    /// Whether the upstream has been silent for the whole limit (the caller's own pauses,
    /// between its polls, do not count: the timer starts when the body waits).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            self.armed = true;
            let at = tokio::time::Instant::now() + self.limit;
            self.sleep.as_mut().reset(at);
        }
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

/// What the layer adds to a body it hands back after its commit point.
#[derive(Default)]
pub(crate) struct Extras {
    pub(crate) meter: Option<Box<UsageMeter>>,
    pub(crate) ending: Option<StreamEnding>,
    pub(crate) idle: Option<Idle>,
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn with_buffered(
        inner: B,
        buffered: Frames<B::Data>,
        error: Option<BoxError>,
        inner_done: bool,
        record: Arc<BodyCells>,
        extras: Extras,
    ) -> Self {
        ResponseBody {
            buffered,
            inner_done: inner_done || error.is_some(),
            error,
            record,
            meter: extras.meter,
            ending: extras.ending,
            idle: extras.idle,
            inner,
        }
    }

    /// The inner response body (frames already read by the layer are not in it).
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body + fmt::Debug> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("buffered_frames", &self.buffered.len())
            .field("inner", &self.inner)
            .finish()
    }
}

type Polled<D> = Poll<Option<Result<Frame<D>, BoxError>>>;

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled<B::Data> {
        let mut this = self.project();
        loop {
            let frame = match this.buffered.pop_front() {
                Some(frame) => frame,
                None => {
                    let polled = match this.error.take() {
                        Some(error) => Err((error, Cut::Failed)),
                        None if *this.inner_done => Ok(None),
                        None => ready!(poll_inner(this.inner.as_mut(), this.idle, cx)),
                    };
                    match polled {
                        Ok(Some(frame)) => frame,
                        Ok(None) => return end(this.ending, this.meter, this.record, cx),
                        Err((error, cut)) => {
                            *this.inner_done = true;
                            let Some(ending) = this.ending.as_mut() else {
                                return failed(this.record, error);
                            };
                            let terminal = ending.terminal(cut);
                            let pause = terminal.is_none() && ending.pause_before_error();
                            if terminal.is_none() && !pause {
                                return failed(this.record, error);
                            }
                            // The error follows the terminal event, and a pause.
                            *this.error = Some(error);
                            return match terminal {
                                Some(event) => Poll::Ready(Some(Ok(Frame::data(event.into())))),
                                None => pause_once(cx),
                            };
                        }
                    }
                }
            };
            let frame = match (frame.into_data(), this.ending.as_mut()) {
                (Ok(data), Some(ending)) => {
                    let whole = ending.pass(data);
                    if whole.is_empty() {
                        continue;
                    }
                    Frame::data(B::Data::from(whole))
                }
                (Ok(data), None) => Frame::data(data),
                (Err(frame), _) => frame,
            };
            if let (Some(meter), Some(data)) = (this.meter.as_mut(), frame.data_ref()) {
                meter.observe(data.chunk());
            }
            // A server that wrote the content-length it announced stops polling (hyper's
            // does): the last data frame is the end the meter sees.
            let ended = *this.inner_done || this.inner.is_end_stream();
            if this.buffered.is_empty() && this.ending.is_none() && ended {
                if let Some(mut meter) = this.meter.take() {
                    meter.finish();
                }
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        // A meter must see the end of the body, and a stream's ending may still add to it, so
        // such a body never says it has ended early.
        self.meter.is_none()
            && self.ending.is_none()
            && self.buffered.is_empty()
            && self.error.is_none()
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.buffered.data().map(|d| d.remaining() as u64).sum();
        if self.inner_done && self.ending.is_none() {
            return SizeHint::with_exact(buffered);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let (Some(upper), None) = (inner.upper(), &self.ending) {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

/// The inner body's next frame, or its failure (a stall past the idle timeout is one).
#[allow(clippy::type_complexity)]
fn poll_inner<B>(
    inner: Pin<&mut B>,
    idle: &mut Option<Idle>,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<B::Data>>, (BoxError, Cut)>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    match inner.poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => {
            if let Some(idle) = idle {
                idle.armed = false;
            }
            Poll::Ready(Ok(Some(frame)))
        }
        Poll::Ready(Some(Err(error))) => Poll::Ready(Err((error.into(), Cut::Failed))),
        Poll::Ready(None) => Poll::Ready(Ok(None)),
        Poll::Pending => {
            let Some(idle) = idle.as_mut() else {
                return Poll::Pending;
            };
            if !idle.expired(cx) {
                return Poll::Pending;
            }
            let limit = idle.limit;
            let error = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the upstream sent nothing for {limit:?} (the stream idle timeout)"),
            );
            Poll::Ready(Err((Box::new(error), Cut::Idle)))
        }
    }
}

/// The inner body ended cleanly: what a stream held back goes out, an error event sent before
/// makes the end an error, and the meter sees the end.
fn end<D: From<Bytes>>(
    ending: &mut Option<StreamEnding>,
    meter: &mut Option<Box<UsageMeter>>,
    record: &BodyCells,
    cx: &mut Context<'_>,
) -> Polled<D> {
    if let Some(stream) = ending {
        let rest = stream.rest();
        if !rest.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(rest.into()))));
        }
        let error_sent = stream.error_sent();
        if error_sent && stream.pause_before_error() {
            return pause_once(cx);
        }
        *ending = None;
        if error_sent {
            return failed(
                record,
                "the upstream ended its stream after an error event".into(),
            );
        }
    }
    if let Some(mut meter) = meter.take() {
        meter.finish();
    }
    Poll::Ready(None)
}

/// `Pending`, with the task woken at once: the writer flushes what it holds, then polls again.
fn pause_once<D>(cx: &mut Context<'_>) -> Polled<D> {
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Records a failure of the body after it was handed back, and yields it.
fn failed<D>(record: &BodyCells, error: BoxError) -> Poll<Option<Result<Frame<D>, BoxError>>> {
    let message = crate::error::error_chain(&*error);
    tracing::warn!(
        target: "tower_model_fallback",
        error = %message,
        "the response body failed after it was handed back",
    );
    let _ = record.stream_error.set(message);
    Poll::Ready(Some(Err(error)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_frames_come_back_in_order() {
        let mut frames = Frames::default();
        assert!(frames.is_empty());
        for chunk in ["a", "b", "c"] {
            frames.push_back(Frame::data(Bytes::from_static(chunk.as_bytes())));
        }
        assert_eq!(frames.len(), 3);
        let first = frames.pop_front().and_then(|f| f.into_data().ok());
        assert_eq!(first.as_deref(), Some(&b"a"[..]));
        // Pushed after the inline one was taken: still behind the queued ones.
        frames.push_back(Frame::data(Bytes::from_static(b"d")));
        let rest: Vec<Bytes> = std::iter::from_fn(|| frames.pop_front())
            .filter_map(|f| f.into_data().ok())
            .collect();
        assert_eq!(rest, ["b", "c", "d"]);
        assert!(frames.is_empty());
    }
}
