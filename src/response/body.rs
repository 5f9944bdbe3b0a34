//! The response body handed back to the caller, preceded by what the layer read ahead.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

use crate::error::BoxError;
use crate::report::BodyCells;
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
    /// or a success's first chunk).
    ///
    /// Its error type is [`BoxError`]: the inner body's error, boxed (downcast it to reach the
    /// original). An upstream failure after the answer started is such an error, never a clean,
    /// truncated end, and it is recorded in the [`FallbackReport`](crate::FallbackReport)
    /// ([`stream_error`](crate::FallbackReport::stream_error)).
    pub struct ResponseBody<B: Body> {
        buffered: Frames<B::Data>,
        error: Option<BoxError>,
        inner_done: bool,
        record: Arc<BodyCells>,
        meter: Option<Box<UsageMeter>>,
        #[pin]
        inner: B,
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn with_buffered(
        inner: B,
        buffered: Frames<B::Data>,
        error: Option<BoxError>,
        inner_done: bool,
        record: Arc<BodyCells>,
        meter: Option<Box<UsageMeter>>,
    ) -> Self {
        ResponseBody {
            buffered,
            inner_done: inner_done || error.is_some(),
            error,
            record,
            meter,
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

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        let frame = match this.buffered.pop_front() {
            Some(frame) => Some(frame),
            None => match this.error.take() {
                Some(error) => return failed(this.record, error),
                None if *this.inner_done => None,
                None => match ready!(this.inner.poll_frame(cx)) {
                    Some(Ok(frame)) => Some(frame),
                    Some(Err(error)) => {
                        *this.inner_done = true;
                        return failed(this.record, error.into());
                    }
                    None => {
                        *this.inner_done = true;
                        None
                    }
                },
            },
        };
        match frame.as_ref().map(Frame::data_ref) {
            Some(Some(data)) => {
                if let Some(meter) = this.meter {
                    meter.observe(data.chunk());
                }
            }
            Some(None) => {}
            None => {
                if let Some(mut meter) = this.meter.take() {
                    meter.finish();
                }
            }
        }
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        // A meter must see the end of the body, so the body never says it has ended early.
        self.meter.is_none()
            && self.buffered.is_empty()
            && self.error.is_none()
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.buffered.data().map(|d| d.remaining() as u64).sum();
        if self.inner_done {
            return SizeHint::with_exact(buffered);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
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
    use bytes::Bytes;

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
