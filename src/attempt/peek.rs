//! The start of a response body, read before the layer decides on the response: an error body
//! to classify it, or a success up to its commit point.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{response, Response};
use http_body::{Body, Frame};

use crate::error::BoxError;
use crate::report::BodyCells;
use crate::response::body::{Extras, Frames, ResponseBody};
use crate::response::sse::{self, Dialect, Found};

/// How much of a success is held, at most, while waiting for its commit point (the first chunk,
/// or a stream's first content event): a stream whose preamble reaches it commits there. Separate from the error-body limit: a layer that
/// reads no error body still falls back when a success dies before its first byte.
pub(crate) const COMMIT_READ_LIMIT: usize = 64 * 1024;

/// Why a response's body is read before deciding.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Purpose {
    /// An error status: read up to the error-body limit, then classify with the bytes read.
    Classify,
    /// A success: hold the head until the first chunk (or first complete SSE event).
    Commit,
}

/// Why reading stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stop {
    /// Enough arrived to decide (or the body ended).
    Enough,
    /// The body failed.
    Failed,
    /// Its timer fired first.
    TimedOut,
}

/// A response whose body is being read before it is decided on.
pub(crate) struct Peek<R: Body> {
    pub(crate) head: response::Parts,
    body: R,
    frames: Frames<R::Data>,
    read: usize,
    pub(crate) error: Option<BoxError>,
    pub(crate) ended: bool,
    /// A `text/event-stream`: its commit point is its first content event (or first event).
    pub(crate) event_stream: bool,
    /// Any complete event commits (`CommitPoint::FirstEvent`), not only content.
    pub(crate) first_event: bool,
    /// What the read so far shows of the stream's commit point, as of `scanned_at` bytes read.
    pub(crate) found: Found,
    scanned_at: usize,
    /// An event stream's bytes while its commit point is not found, after every frame in
    /// `frames`: copied here once, in one buffer, however finely the upstream splits them. A
    /// preamble may be held for long (a model that thinks before its first token): as a copy it
    /// does not pin the read buffers the frames were slices of (hyper's: 8 KiB and up), and the
    /// scan reads it in place. It becomes one frame when the commit point is found or the
    /// response is handed on.
    held: BytesMut,
    /// Where in `held` the next scan starts: the end of the last complete event.
    scan_from: usize,
    /// Whether a complete preamble event (not only comments) has been read.
    preamble_seen: bool,
    /// The stream's wire format, once an event shows it.
    pub(crate) dialect: Option<Dialect>,
}

impl<R: Body> Peek<R> {
    pub(crate) fn new(response: Response<R>) -> Self {
        let (head, body) = response.into_parts();
        let event_stream = crate::media::is(&head.headers, "text/event-stream");
        Peek {
            head,
            body,
            frames: Frames::default(),
            read: 0,
            error: None,
            ended: false,
            event_stream,
            first_event: false,
            found: Found::Preamble {
                scanned: 0,
                events: 0,
            },
            scanned_at: 0,
            held: BytesMut::new(),
            scan_from: 0,
            preamble_seen: false,
            dialect: None,
        }
    }

    /// Whether the body has nothing to read (an empty success is handed back at once).
    pub(crate) fn body_at_end(&self) -> bool {
        self.body.is_end_stream()
    }

    /// Whether the body ended, cleanly, before its commit point: a stream before its first
    /// content event (preamble alone is no answer), or an announced body before its first byte.
    /// Nothing can be handed back.
    pub(crate) fn ended_early(&mut self) -> bool {
        if !self.ended || self.error.is_some() {
            return false;
        }
        if self.event_stream {
            self.scan();
            return matches!(self.found, Found::Preamble { .. });
        }
        // Looked up only on this rare path: the head announced a body that never came.
        let announced = self
            .head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        self.read == 0 && announced.unwrap_or(0) > 0
    }

    /// Whether enough has been read to decide.
    fn satisfied(&mut self, purpose: Purpose, limit: usize) -> bool {
        if purpose == Purpose::Commit && self.event_stream {
            self.scan();
        }
        if self.ended || self.error.is_some() || self.read >= limit {
            return true;
        }
        match purpose {
            Purpose::Classify => false,
            Purpose::Commit if self.event_stream => !matches!(self.found, Found::Preamble { .. }),
            Purpose::Commit => self.read > 0,
        }
    }

    /// Looks for the stream's commit point in what arrived since the last look (the preamble
    /// already scanned is not parsed again).
    pub(crate) fn scan(&mut self) {
        if !matches!(self.found, Found::Preamble { .. }) || self.scanned_at == self.read {
            return;
        }
        self.scanned_at = self.read;
        self.found = sse::scan(
            &self.held,
            self.scan_from,
            self.first_event,
            &mut self.dialect,
        );
        if let Found::Preamble { scanned, events } = self.found {
            self.preamble_seen |= events > 0;
            self.scan_from = scanned;
        }
    }

    /// Whether a complete preamble event has been read: the stream is alive, only slow to its
    /// first content. A comment (`: keep-alive`) or half an event is not enough.
    pub(crate) fn preamble_seen(&self) -> bool {
        self.preamble_seen
    }

    /// The bytes read so far, in one buffer (error paths and first chunks only).
    pub(crate) fn contiguous(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for data in self.frames.data() {
            out.extend_from_slice(data.chunk());
        }
        out.extend_from_slice(&self.held);
        out
    }

    /// What `held` holds, as the next frame.
    fn release_held(&mut self)
    where
        R::Data: From<Bytes>,
    {
        if !self.held.is_empty() {
            let held = self.held.split().freeze();
            self.frames.push_back(Frame::data(R::Data::from(held)));
        }
    }

    /// Hands the response on: what was read comes first, then the rest of the body.
    #[inline(always)]
    pub(crate) fn into_response(
        mut self,
        cells: Arc<BodyCells>,
        extras: Extras,
    ) -> Response<ResponseBody<R>>
    where
        R::Data: From<Bytes>,
    {
        self.release_held();
        let body = ResponseBody::with_buffered(
            self.body,
            self.frames,
            self.error,
            self.ended,
            cells,
            extras,
        );
        Response::from_parts(self.head, body)
    }
}

impl<R> Peek<R>
where
    R: Body + Unpin,
    R::Data: From<Bytes>,
    R::Error: Into<BoxError>,
{
    /// Reads until enough is there to decide or the body fails or ends.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        purpose: Purpose,
        limit: usize,
    ) -> Poll<Stop> {
        loop {
            if self.satisfied(purpose, limit) {
                return Poll::Ready(if self.error.is_some() {
                    Stop::Failed
                } else {
                    Stop::Enough
                });
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.has_remaining() => {}
                    Ok(data) => {
                        self.read += data.remaining();
                        if self.event_stream && matches!(self.found, Found::Preamble { .. }) {
                            self.held.put(data);
                        } else {
                            self.release_held();
                            self.frames.push_back(Frame::data(data));
                        }
                    }
                    Err(frame) => {
                        self.release_held();
                        self.frames.push_back(frame);
                    }
                },
                Poll::Ready(Some(Err(e))) => self.error = Some(e.into()),
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
