//! The bounded one-time read of the caller's body.

use bytes::{Buf, Bytes, BytesMut};
use http_body::SizeHint;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
