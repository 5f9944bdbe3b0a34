//! Server-sent events, just enough to tell whether a stream opens with an error event.

/// The first event of an SSE stream, once complete: the block before the first blank line that
/// has a `data:` or `event:` field (comment-only blocks, such as keep-alives, are skipped).
/// `None` while no such block is complete.
pub(crate) fn first_event(buf: &[u8]) -> Option<&[u8]> {
    let mut rest = buf;
    loop {
        let (block, next) = split_block(rest)?;
        if lines(block).any(|l| l.starts_with(b"data") || l.starts_with(b"event")) {
            return Some(block);
        }
        rest = next;
    }
}

/// The data of the first event when that event is an error: `event: error`, or data that is a
/// JSON object with an `error` member or `"type": "error"`.
pub(crate) fn error_event(buf: &[u8]) -> Option<Vec<u8>> {
    let event = first_event(buf)?;
    let mut data = Vec::new();
    let mut named_error = false;
    for line in lines(event) {
        if let Some(value) = field(line, b"data") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(value);
        } else if let Some(value) = field(line, b"event") {
            named_error = value == b"error";
        }
    }
    let json: Option<serde_json::Value> = serde_json::from_slice(&data).ok();
    let error_object = json.as_ref().is_some_and(|v| {
        v.get("error").is_some() || v.get("type").and_then(|t| t.as_str()) == Some("error")
    });
    (named_error || error_object).then_some(data)
}

/// The block before the first blank line, and what follows it.
fn split_block(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut i = 0;
    while i < buf.len() {
        let end_of_line = match buf[i] {
            b'\n' => Some(i + 1),
            b'\r' if buf.get(i + 1) == Some(&b'\n') => Some(i + 2),
            b'\r' => Some(i + 1),
            _ => None,
        };
        if let Some(next) = end_of_line {
            let blank = match buf.get(next) {
                Some(b'\n') => Some(next + 1),
                Some(b'\r') if buf.get(next + 1) == Some(&b'\n') => Some(next + 2),
                Some(b'\r') => Some(next + 1),
                _ => None,
            };
            if let Some(after) = blank {
                return Some((&buf[..i], &buf[after..]));
            }
            i = next;
        } else {
            i += 1;
        }
    }
    None
}

fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    block
        .split(|b| *b == b'\n' || *b == b'\r')
        .filter(|l| !l.is_empty())
}

/// The value of `name: value` (one optional space after the colon, as the SSE spec says).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_complete_event() {
        assert_eq!(first_event(b"data: {\"a\":1}\n"), None);
        assert_eq!(
            first_event(b"data: {\"a\":1}\n\ndata: x"),
            Some(&b"data: {\"a\":1}"[..])
        );
        assert_eq!(
            first_event(b": keep-alive\n\ndata: 1\r\n\r\n"),
            Some(&b"data: 1"[..])
        );
        assert_eq!(first_event(b": keep-alive\n\n"), None);
    }

    #[test]
    fn recognises_error_events() {
        let openai =
            b"data: {\"error\":{\"message\":\"overloaded\",\"code\":\"server_error\"}}\n\n";
        assert_eq!(
            error_event(openai).as_deref(),
            Some(&b"{\"error\":{\"message\":\"overloaded\",\"code\":\"server_error\"}}"[..])
        );
        let anthropic =
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        assert!(error_event(anthropic).is_some());
        assert!(error_event(b"event: error\ndata: oops\n\n").is_some());
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"error\"}}]}\n\n";
        assert!(error_event(chunk).is_none());
        assert!(error_event(b"data: [DONE]\n\n").is_none());
    }
}
