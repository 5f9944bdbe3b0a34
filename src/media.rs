//! Media types, compared as RFC 9110 says: the type and subtype are case-insensitive, and
//! parameters (`; charset=utf-8`) do not change the essence.

use http::header::{HeaderMap, CONTENT_TYPE};

/// The essence (`type/subtype`) of the `content-type`, without parameters or white space.
pub(crate) fn essence(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(CONTENT_TYPE)?.as_bytes();
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    Some(value[..end].trim_ascii())
}

/// Whether the `content-type`'s essence is `expected` (given in lower case).
pub(crate) fn is(headers: &HeaderMap, expected: &str) -> bool {
    essence(headers).is_some_and(|e| e.eq_ignore_ascii_case(expected.as_bytes()))
}

/// Whether the `content-type` is JSON: `application/json` or any `+json` type.
pub(crate) fn is_json(essence: &[u8]) -> bool {
    let suffix = essence.len().checked_sub(5).map(|at| &essence[at..]);
    essence.eq_ignore_ascii_case(b"application/json")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case(b"+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, content_type.parse().unwrap());
        h
    }

    #[test]
    fn media_types_compare_without_case_or_parameters() {
        assert!(is(
            &headers("Text/Event-Stream; charset=utf-8"),
            "text/event-stream"
        ));
        assert!(is(&headers(" APPLICATION/JSON "), "application/json"));
        assert!(!is(&headers("text/event-streamx"), "text/event-stream"));
        assert!(!is(&HeaderMap::new(), "application/json"));
        assert!(is_json(b"application/vnd.api+JSON"));
        assert!(is_json(b"Application/Json"));
        assert!(!is_json(b"json"));
        assert!(!is_json(b"text/plain"));
    }
}
