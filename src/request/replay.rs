//! The replayable request body every attempt sends.

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

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
    /// Where to record that the body was read to its end, and as which attempt.
    sent: Option<(Arc<BodyCells>, u32)>,
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
            sent: None,
        }
    }

    /// This body records in `cells` when it has been read to its end, as attempt `id`.
    pub(crate) fn tracked(mut self, cells: Arc<BodyCells>, id: u32) -> Self {
        self.sent = Some((cells, id));
        self
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
                if this.next == segments.len() {
                    if let Some((cells, id)) = &this.sent {
                        cells.mark_sent(*id);
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;

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
