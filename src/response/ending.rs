//! How a committed stream ends when its upstream fails: with the wire format's own terminal
//! error event (so an SDK raises an error it can name), then the body error. Events pass whole:
//! the bytes of an event not yet complete are held back, so the terminal event never lands in
//! the middle of one.

use bytes::{Buf, Bytes, BytesMut};

use super::sse::{self, Dialect};

/// A committed `text/event-stream` on its way to the caller.
#[derive(Debug)]
pub(crate) struct StreamEnding {
    dialect: Dialect,
    /// The start of an event whose end has not arrived.
    partial: BytesMut,
    /// An error event (the upstream's, or ours) has reached the caller.
    error_sent: bool,
    /// The body has paused once before its error.
    paused: bool,
}

/// Why a committed stream failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The upstream failed: a drop, a reset, a body error.
    Failed,
    /// The upstream sent nothing for the stream idle timeout.
    Idle,
}

impl StreamEnding {
    pub(crate) fn new(dialect: Dialect) -> StreamEnding {
        StreamEnding {
            dialect,
            partial: BytesMut::new(),
            error_sent: false,
            paused: false,
        }
    }

    /// The complete events of `data` (with what was held before them); the start of an event
    /// that is not complete is held back. Empty when nothing is complete yet.
    pub(crate) fn pass(&mut self, mut data: impl Buf) -> Bytes {
        // Zero-copy for `Bytes`, the data type of every hyper body.
        let data = data.copy_to_bytes(data.remaining());
        let whole = if self.partial.is_empty() {
            let end = sse::complete_prefix(&data);
            let mut data = data;
            if end < data.len() {
                self.partial.extend_from_slice(&data.split_off(end));
            }
            data
        } else {
            self.partial.extend_from_slice(&data);
            let end = sse::complete_prefix(&self.partial);
            self.partial.split_to(end).freeze()
        };
        if !self.error_sent && sse::has_error_event(&whole) {
            self.error_sent = true;
        }
        whole
    }

    /// What is held at a clean end of the stream (passed on as the upstream sent it).
    pub(crate) fn rest(&mut self) -> Bytes {
        self.partial.split().freeze()
    }

    /// True the first time: the body then answers `Pending` (and wakes itself) once before its
    /// error, so that a server writing the stream flushes the events before it — hyper drops
    /// what it has not yet written when a body fails.
    pub(crate) fn pause_before_error(&mut self) -> bool {
        !std::mem::replace(&mut self.paused, true)
    }

    /// Whether an error event has reached the caller: a clean end after it is no success.
    pub(crate) fn error_sent(&self) -> bool {
        self.error_sent
    }

    /// The terminal error event for a failure, once (none when an error event was already
    /// sent). The partial event held is dropped: half an event would not parse.
    pub(crate) fn terminal(&mut self, cut: Cut) -> Option<Bytes> {
        if std::mem::replace(&mut self.error_sent, true) {
            return None;
        }
        self.partial.clear();
        let (message, code) = match cut {
            Cut::Failed => ("the upstream stream was interrupted", "stream_interrupted"),
            Cut::Idle => (
                "the upstream stream stalled past the stream idle timeout",
                "stream_idle_timeout",
            ),
        };
        let event = match self.dialect {
            Dialect::Chat => {
                let error = serde_json::json!({"error": {
                    "message": message, "type": "server_error", "param": null, "code": code,
                }});
                format!("data: {error}\n\n")
            }
            Dialect::Responses => {
                let failed = serde_json::json!({"type": "response.failed", "response": {
                    "object": "response", "status": "failed",
                    "error": {"code": "server_error", "message": message},
                    "incomplete_details": null, "output": [],
                }});
                format!("event: response.failed\ndata: {failed}\n\n")
            }
            Dialect::Messages => {
                let error = serde_json::json!({"type": "error", "error": {
                    "type": "api_error", "message": message,
                }});
                format!("event: error\ndata: {error}\n\n")
            }
        };
        Some(Bytes::from(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_pass_whole_and_a_partial_one_waits_for_its_end() {
        let mut ending = StreamEnding::new(Dialect::Chat);
        assert_eq!(
            &ending.pass(Bytes::from_static(b"data: 1\n\ndata: 2")),
            &b"data: 1\n\n"[..]
        );
        assert_eq!(&ending.pass(Bytes::from_static(b"2\n")), &b""[..]);
        assert_eq!(
            &ending.pass(Bytes::from_static(b"\ndata: 3\r\n\r\n")),
            &b"data: 22\n\ndata: 3\r\n\r\n"[..]
        );
        assert_eq!(&ending.pass(Bytes::from_static(b"data: [DO")), &b""[..]);
        assert_eq!(&ending.rest()[..], b"data: [DO");
    }

    #[test]
    fn a_failure_ends_with_the_dialects_terminal_event_once() {
        for (dialect, start) in [
            (Dialect::Chat, "data: {\"error\":"),
            (Dialect::Responses, "event: response.failed\ndata: {"),
            (Dialect::Messages, "event: error\ndata: {"),
        ] {
            let mut ending = StreamEnding::new(dialect);
            let _ = ending.pass(Bytes::from_static(b"data: {\"partial\":"));
            let event = ending.terminal(Cut::Failed).unwrap();
            let text = std::str::from_utf8(&event).unwrap();
            assert!(text.starts_with(start), "{text}");
            assert!(
                text.ends_with("}\n\n") && text.contains("stream_interrupted")
                    || dialect != Dialect::Chat,
                "{text}"
            );
            assert!(ending.rest().is_empty(), "the partial event is dropped");
            assert!(ending.terminal(Cut::Idle).is_none());
        }
    }

    #[test]
    fn an_upstream_error_event_is_the_terminal_event() {
        let mut ending = StreamEnding::new(Dialect::Messages);
        let _ = ending.pass(Bytes::from_static(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n"));
        assert!(ending.error_sent());
        assert!(ending.terminal(Cut::Failed).is_none());
    }
}
