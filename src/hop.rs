//! Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the message.

use http::header::{self, HeaderMap, HeaderName};

/// The response headers that belong to one hop. `proxy-authenticate` is the hop's own
/// challenge; `content-length` is not here: it describes the body, and hyper checks it.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The header names listed in `connection` (`connection: close, x-trace` names `x-trace`),
/// which are hop-by-hop too.
pub(crate) fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// Removes the hop-by-hop headers of an upstream's response head — `connection` and those it
/// names, `keep-alive`, `proxy-connection`, `proxy-authenticate`, `te`, `trailer`,
/// `transfer-encoding`, `upgrade` — before a proxy hands it to its own client.
///
/// A proxy built on the layer (an axum handler, a gateway) needs it: the layer passes the
/// upstream's head through untouched while it may know the body's exact size (it read an error
/// body, or a stream up to its first chunk), and hyper refuses to send a head with both
/// `transfer-encoding` and `content-length`. The gateway calls it on every answer.
///
/// ```
/// use http::HeaderMap;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("connection", "keep-alive, x-trace".parse().unwrap());
/// headers.insert("transfer-encoding", "chunked".parse().unwrap());
/// headers.insert("x-trace", "1".parse().unwrap());
/// headers.insert("content-type", "application/json".parse().unwrap());
/// tower_model_fallback::strip_hop_by_hop(&mut headers);
/// assert_eq!(headers.len(), 1);
/// assert!(headers.contains_key("content-type"));
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named = named_by_connection(headers);
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}
