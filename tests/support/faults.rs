//! The faults of a misbehaving upstream, each served by a fault server on 127.0.0.1.

use std::net::SocketAddr;

use tower_model_fallback::ErrorKind;

use super::{refused_addr, RawUpstream, Then, SSE_HEAD};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    Refused,
    ResetBeforeHead,
    Garbage,
    StallBeforeHead,
    HeadThenStall,
    Status503,
    Status503RetryAfter,
    Status429,
    Status429RetryAfterMs,
    ResetMidBody,
    StreamThenDrop,
}

use Fault::*;

pub const FAULTS: [Fault; 11] = [
    Refused,
    ResetBeforeHead,
    Garbage,
    StallBeforeHead,
    HeadThenStall,
    Status503,
    Status503RetryAfter,
    Status429,
    Status429RetryAfterMs,
    ResetMidBody,
    StreamThenDrop,
];

impl Fault {
    /// Whether the fault shows after the first byte of an answer reached the caller.
    pub fn after_commit(self) -> bool {
        matches!(self, ResetMidBody | StreamThenDrop)
    }

    /// The status a faulty target answers with, when it answers one.
    pub fn status(self) -> Option<u16> {
        match self {
            Status503 | Status503RetryAfter => Some(503),
            Status429 | Status429RetryAfterMs => Some(429),
            HeadThenStall | ResetMidBody | StreamThenDrop => Some(200),
            _ => None,
        }
    }

    /// The error kind an attempt on it records, when it ends in an error.
    pub fn kind(self) -> Option<ErrorKind> {
        match self {
            Refused => Some(ErrorKind::Connect),
            ResetBeforeHead => Some(ErrorKind::Closed),
            Garbage => Some(ErrorKind::Protocol),
            StallBeforeHead => Some(ErrorKind::Timeout),
            _ => None,
        }
    }

    pub async fn start(self) -> (SocketAddr, Option<RawUpstream>) {
        let raw = |bytes: &'static [u8], then| async move {
            let up = RawUpstream::start(bytes, then).await;
            (up.addr, Some(up))
        };
        match self {
            Refused => (refused_addr().await, None),
            ResetBeforeHead => raw(b"", Then::Close).await,
            Garbage => raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", Then::Close).await,
            StallBeforeHead => raw(b"", Then::Stall).await,
            HeadThenStall => raw(SSE_HEAD, Then::Stall).await,
            Status503 => raw(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}", Then::Close).await,
            Status503RetryAfter => {
                raw(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}", Then::Close)
                    .await
            }
            Status429 => raw(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}", Then::Close).await,
            Status429RetryAfterMs => {
                raw(b"HTTP/1.1 429 Too Many Requests\r\nretry-after-ms: 500\r\ncontent-length: 2\r\n\r\n{}", Then::Close)
                    .await
            }
            ResetMidBody => {
                raw(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":\"x\",",
                    Then::Close,
                )
                .await
            }
            StreamThenDrop => raw(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n13\r\ndata: {\"n\":\"one\"}\n\n\r\n",
                Then::Close,
            )
            .await,
        }
    }
}
