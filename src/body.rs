//! Body types: the bounded one-time read of the caller's body, the replayable body every attempt
//! sends, and the response body handed back to the caller.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::catalog::UsageMeter;
use crate::error::BoxError;
use crate::report::BodyCells;

/// The request body the inner service receives: slices of the caller's one buffered body (with
/// the target's model spliced in), replayed without copying.
///
/// Cloning is cheap (a few reference counts), and [`Body::size_hint`] is exact, so inner layers that
/// need `Request: Clone` (tower's `Retry`, `Hedge`) work, and `content-length` always matches.
///
/// ```
/// use http_body::Body;
/// use tower_model_fallback::ReplayBody;
///
/// let body = ReplayBody::from("{\"model\":\"m\"}");
/// assert_eq!(body.size_hint().exact(), Some(13));
/// ```
#[derive(Clone, Default)]
pub struct ReplayBody {
    segments: Segments,
    next: usize,
    remaining: u64,
}

/// How many segments a [`ReplayBody`] keeps without allocating.
const INLINE: usize = 3;

#[derive(Clone)]
enum Segments {
    Inline { parts: [Bytes; INLINE], len: usize },
    Shared(Arc<[Bytes]>),
}

impl Default for Segments {
    fn default() -> Self {
        Segments::Inline {
            parts: Default::default(),
            len: 0,
        }
    }
}

impl ReplayBody {
    /// A body that sends `segments` one after the other.
    pub(crate) fn from_segments(segments: Vec<Bytes>) -> Self {
        let remaining = segments.iter().map(|s| s.len() as u64).sum();
        let segments = if segments.len() <= INLINE {
            // The usual splice (prefix, model, suffix) is kept inline: no allocation.
            let mut parts: [Bytes; INLINE] = Default::default();
            let len = segments.len();
            for (slot, segment) in parts.iter_mut().zip(segments) {
                *slot = segment;
            }
            Segments::Inline { parts, len }
        } else {
            Segments::Shared(Arc::from(segments))
        };
        ReplayBody {
            segments,
            next: 0,
            remaining,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ReplayBody::default()
    }

    /// The bytes this body has left to send.
    pub fn len(&self) -> u64 {
        self.remaining
    }

    /// Whether this body has nothing left to send.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }
}

impl From<Bytes> for ReplayBody {
    fn from(bytes: Bytes) -> Self {
        ReplayBody::from_segments(vec![bytes])
    }
}

impl From<&'static str> for ReplayBody {
    fn from(s: &'static str) -> Self {
        ReplayBody::from(Bytes::from_static(s.as_bytes()))
    }
}

impl From<Vec<u8>> for ReplayBody {
    fn from(v: Vec<u8>) -> Self {
        ReplayBody::from(Bytes::from(v))
    }
}

impl fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let segments: &[Bytes] = match &this.segments {
            Segments::Inline { parts, len } => &parts[..*len],
            Segments::Shared(parts) => parts,
        };
        match segments.get(this.next) {
            Some(chunk) => {
                this.next += 1;
                this.remaining -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk.clone()))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Accumulates the caller's body up to a bound; a body that arrives in one chunk is kept as is.
pub(crate) struct Collector {
    limit: usize,
    len: usize,
    first: Option<Bytes>,
    rest: BytesMut,
}

/// The body grew past the bound.
pub(crate) struct TooLarge;

/// How far beyond the bytes received the collector reserves on the strength of a size hint.
const PREALLOCATE_AHEAD: u64 = 256 * 1024;

impl Collector {
    pub(crate) fn new(limit: usize) -> Self {
        Collector {
            limit,
            len: 0,
            first: None,
            rest: BytesMut::new(),
        }
    }

    /// Whether a body announcing `hint` can be rejected before reading a byte.
    pub(crate) fn rejects(&self, hint: &SizeHint) -> bool {
        hint.lower() > self.limit as u64
    }

    pub(crate) fn push(&mut self, mut data: impl Buf, hint: &SizeHint) -> Result<(), TooLarge> {
        let n = data.remaining();
        if n == 0 {
            return Ok(());
        }
        self.len = self.len.checked_add(n).ok_or(TooLarge)?;
        if self.len > self.limit {
            return Err(TooLarge);
        }
        if self.first.is_none() && self.rest.is_empty() {
            // `Bytes::copy_to_bytes` is a reference-counted slice: the common single-chunk body
            // is never copied.
            self.first = Some(data.copy_to_bytes(n));
            return Ok(());
        }
        if let Some(first) = self.first.take() {
            // Trust the announced size only a little beyond what has arrived: a caller announcing
            // 32 MiB and trickling bytes must not make us hold 32 MiB.
            let announced = hint.lower().saturating_add(first.len() as u64);
            let capacity = announced
                .min(self.len as u64 + PREALLOCATE_AHEAD)
                .min(self.limit as u64) as usize;
            self.rest.reserve(capacity.max(self.len));
            self.rest.extend_from_slice(&first);
        }
        while data.has_remaining() {
            let chunk = data.chunk();
            let k = chunk.len();
            self.rest.extend_from_slice(chunk);
            data.advance(k);
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Bytes {
        match self.first {
            Some(first) => first,
            None => self.rest.freeze(),
        }
    }
}

/// Frames read ahead of the caller, in order. The first is kept inline: the usual read-ahead is
/// one chunk, and it then costs no allocation.
pub(crate) struct Frames<D> {
    first: Option<Frame<D>>,
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
            self.first = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<Frame<D>> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Frame<D>> {
        self.first.iter().chain(self.rest.iter())
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
        let buffered: u64 = self
            .buffered
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.remaining() as u64))
            .sum();
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
    let message = crate::future::error_chain(&*error);
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

    #[test]
    fn a_single_chunk_is_kept_without_copying() {
        let chunk = Bytes::from(vec![b'x'; 1024]);
        let ptr = chunk.as_ptr();
        let mut c = Collector::new(4096);
        assert!(c.push(chunk, &SizeHint::new()).is_ok());
        assert_eq!(c.finish().as_ptr(), ptr);
    }

    #[test]
    fn several_chunks_are_joined_and_bounded() {
        let mut c = Collector::new(5);
        assert!(c.push(Bytes::from_static(b"ab"), &SizeHint::new()).is_ok());
        assert!(c.push(Bytes::from_static(b"cde"), &SizeHint::new()).is_ok());
        assert!(c.push(Bytes::from_static(b"f"), &SizeHint::new()).is_err());
        let mut c = Collector::new(5);
        assert!(c.push(Bytes::from_static(b"ab"), &SizeHint::new()).is_ok());
        assert!(c.push(Bytes::from_static(b"cde"), &SizeHint::new()).is_ok());
        assert_eq!(&c.finish()[..], b"abcde");
    }

    #[test]
    fn an_announced_size_does_not_reserve_memory_that_never_arrives() {
        let mut c = Collector::new(32 << 20);
        let hint = SizeHint::with_exact(32 << 20);
        assert!(c.push(Bytes::from_static(b"a"), &hint).is_ok());
        assert!(c.push(Bytes::from_static(b"b"), &hint).is_ok());
        assert!(c.rest.capacity() <= 1 << 20, "{}", c.rest.capacity());
        let mut unbounded = Collector::new(usize::MAX);
        let huge = SizeHint::with_exact(u64::MAX - 1);
        assert!(unbounded.push(Bytes::from_static(b"ab"), &huge).is_ok());
        assert!(unbounded.push(Bytes::from_static(b"cd"), &huge).is_ok());
        assert_eq!(&unbounded.finish()[..], b"abcd");
    }

    #[test]
    fn replay_body_reports_an_exact_size_and_clones_from_its_position() {
        let body =
            ReplayBody::from_segments(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]);
        assert_eq!(body.size_hint().exact(), Some(5));
        let mut polled = body.clone();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut polled).poll_frame(&mut cx) else {
            panic!("expected a frame");
        };
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"ab"));
        assert_eq!(polled.size_hint().exact(), Some(3));
        assert_eq!(
            body.size_hint().exact(),
            Some(5),
            "the original is untouched"
        );
    }
}
