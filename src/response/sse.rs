//! Server-sent events, just enough to find a stream's commit point: which events are preamble
//! (held while the next target can still be tried), which carry content, which are a provider's
//! error, in the three dialects the layer knows (OpenAI chat completions, OpenAI Responses,
//! Anthropic Messages).

use http::StatusCode;

/// The wire format of a stream, as its events show it; it decides the terminal error event the
/// caller gets when the stream fails after its commit point.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) enum Dialect {
    /// OpenAI chat completions (`data: {"choices": …}`), and any stream not recognised.
    #[default]
    Chat,
    /// OpenAI Responses (`event: response.*`).
    Responses,
    /// Anthropic Messages (`event: message_start`, `content_block_delta`, …).
    Messages,
}

/// What one complete event is, for the commit point.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// Sent before any content: a role-only chat delta, `response.created`, `message_start`,
    /// `ping`. Held; dropped if the attempt fails.
    Preamble,
    /// Content, or an event the layer does not recognise as preamble: the commit point.
    Content,
    /// A provider's error event: the attempt is classified like the status it stands for.
    Error,
}

/// Responses events sent before the first output delta.
const RESPONSES_PREAMBLE: [&str; 6] = [
    "response.created",
    "response.in_progress",
    "response.queued",
    "response.output_item.added",
    "response.content_part.added",
    "response.reasoning_summary_part.added",
];

/// Responses events that end a response without an answer.
const RESPONSES_FAILED: [&str; 2] = ["response.failed", "response.incomplete"];

/// Anthropic Messages events sent before the first `content_block_delta`.
const MESSAGES_PREAMBLE: [&str; 3] = ["message_start", "content_block_start", "ping"];

/// Anthropic Messages events after the preamble (they name the dialect).
const MESSAGES_CONTENT: [&str; 4] = [
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
];

/// One complete event: its `event:` name and its data (the `data:` lines joined by `\n`).
pub(crate) struct Event {
    name: Option<Vec<u8>>,
    pub(crate) data: Vec<u8>,
}

impl Event {
    fn parse(block: &[u8]) -> Event {
        let mut data = Vec::new();
        let mut name = None;
        let mut any_data = false;
        for line in lines(block) {
            if let Some(value) = field(line, b"data") {
                if any_data {
                    data.push(b'\n');
                }
                any_data = true;
                data.extend_from_slice(value);
            } else if let Some(value) = field(line, b"event") {
                name = Some(value.to_vec());
            }
        }
        Event { name, data }
    }

    /// What the event is, and the dialect it shows (`None` when it shows none).
    /// An unnamed event with empty data: no content, no preamble, only a keep-alive.
    fn is_heartbeat(&self) -> bool {
        self.name.is_none() && self.data.iter().all(u8::is_ascii_whitespace)
    }

    pub(crate) fn kind(&self) -> (Kind, Option<Dialect>) {
        let json: Option<serde_json::Value> = serde_json::from_slice(&self.data).ok();
        let typ = json
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(|t| t.as_str());
        let name = self
            .name
            .as_deref()
            .and_then(|n| std::str::from_utf8(n).ok());
        let what = name.or(typ).unwrap_or("");
        if what == "error" {
            // Both Anthropic and Responses name it; Anthropic's data nests an `error` object.
            let nested = json.as_ref().is_some_and(|v| v.get("error").is_some());
            let dialect = if nested {
                Dialect::Messages
            } else {
                Dialect::Responses
            };
            return (Kind::Error, Some(dialect));
        }
        if what.starts_with("response.") {
            let kind = if RESPONSES_PREAMBLE.contains(&what) {
                Kind::Preamble
            } else if RESPONSES_FAILED.contains(&what) {
                Kind::Error
            } else {
                Kind::Content
            };
            return (kind, Some(Dialect::Responses));
        }
        if MESSAGES_PREAMBLE.contains(&what) {
            return (Kind::Preamble, Some(Dialect::Messages));
        }
        if MESSAGES_CONTENT.contains(&what) {
            return (Kind::Content, Some(Dialect::Messages));
        }
        let Some(json) = json else {
            return (Kind::Content, None);
        };
        if json.get("error").is_some() {
            return (Kind::Error, Some(Dialect::Chat));
        }
        match json.get("choices") {
            Some(choices) if chat_preamble(&json, choices) => (Kind::Preamble, Some(Dialect::Chat)),
            Some(_) => (Kind::Content, Some(Dialect::Chat)),
            None => (Kind::Content, None),
        }
    }
}

/// Whether a chat chunk carries nothing yet: every choice's delta holds at most a role and empty
/// `content` / `refusal` / `tool_calls`, no choice has finished, and there is no `usage`. (A
/// chunk with no choices at all, such as Azure's prompt-filter results, is preamble too.)
fn chat_preamble(chunk: &serde_json::Value, choices: &serde_json::Value) -> bool {
    use serde_json::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    let quiet_choice = |choice: &Value| {
        let finished = choice.get("finish_reason").is_some_and(|f| !f.is_null());
        let delta_quiet = match choice.get("delta") {
            None | Some(Value::Null) => true,
            Some(Value::Object(delta)) => delta.iter().all(|(k, v)| k == "role" || empty(v)),
            Some(_) => false,
        };
        !finished && delta_quiet
    };
    let usage = chunk.get("usage").is_some_and(|u| !u.is_null());
    !usage
        && choices
            .as_array()
            .is_some_and(|c| c.iter().all(quiet_choice))
}

/// Where a stream's commit point is, in the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// Not yet: every complete block so far was preamble (or a comment); `scanned` bytes of
    /// them, `events` of which were events.
    Preamble { scanned: usize, events: usize },
    /// A content event (or an unrecognised one) completes at this offset.
    Content,
    /// An error event, with its data.
    Error(Vec<u8>),
}

/// Looks for the commit point in `buf`, from `from` (the end of the preamble already scanned).
/// With `first_event`, the first event of any kind is the commit point.
pub(crate) fn scan(
    buf: &[u8],
    from: usize,
    first_event: bool,
    dialect: &mut Option<Dialect>,
) -> Found {
    let mut offset = from.min(buf.len());
    let mut events = 0;
    loop {
        let Some((block, next)) = split_block(&buf[offset..]) else {
            return Found::Preamble {
                scanned: offset,
                events,
            };
        };
        let consumed = buf.len() - offset - next.len();
        offset += consumed;
        if !is_event(block) {
            continue;
        }
        let event = Event::parse(block);
        if event.is_heartbeat() {
            // `data:` with nothing in it, unnamed: a keep-alive, like a comment.
            continue;
        }
        let (kind, shown) = event.kind();
        if dialect.is_none() {
            *dialect = shown;
        }
        match kind {
            Kind::Error => return Found::Error(event.data),
            Kind::Preamble if !first_event => events += 1,
            Kind::Preamble | Kind::Content => return Found::Content,
        }
    }
}

/// Whether a block is an event a client dispatches: it has a `data` field (a block of
/// comments, or of an `event` name alone, dispatches nothing, as the SSE spec says).
fn is_event(block: &[u8]) -> bool {
    lines(block).any(|l| l.starts_with(b"data"))
}

/// The status an error event stands for, and its code: Anthropic's `error.type`
/// (`overloaded_error` stands for 529), OpenAI's `error.code` / `error.type`, a Responses
/// `error` event's `code`, a `response.failed`'s `response.error.code`, a
/// `response.incomplete`'s reason. An error the layer does not recognise stands for a 500.
pub(crate) fn error_status(data: &[u8]) -> (StatusCode, Option<String>) {
    let json: Option<serde_json::Value> = serde_json::from_slice(data).ok();
    let Some(json) = json else {
        return (StatusCode::INTERNAL_SERVER_ERROR, None);
    };
    let response = json.get("response");
    let candidates = [
        json.get("error").and_then(|e| e.get("code")),
        json.get("error").and_then(|e| e.get("type")),
        json.get("code"),
        response
            .and_then(|r| r.get("error"))
            .and_then(|e| e.get("code")),
        response
            .and_then(|r| r.get("incomplete_details"))
            .and_then(|d| d.get("reason")),
    ];
    let mut code = None;
    for value in candidates.into_iter().flatten() {
        // Some gateways put an HTTP status in `code`.
        if let Some(status) = value.as_u64().and_then(|n| u16::try_from(n).ok()) {
            if let Ok(status) = StatusCode::from_u16(status) {
                if status.as_u16() >= 400 {
                    return (status, code);
                }
            }
        }
        let Some(name) = value.as_str() else { continue };
        if let Some(status) = status_for(name) {
            return (status, code.or_else(|| Some(name.to_owned())));
        }
        code.get_or_insert_with(|| name.to_owned());
    }
    (StatusCode::INTERNAL_SERVER_ERROR, code)
}

/// The HTTP status a provider's error code or type stands for.
fn status_for(code: &str) -> Option<StatusCode> {
    let status = match code {
        "rate_limit_exceeded" | "rate_limit_error" | "rate_limited" | "insufficient_quota" => 429,
        "overloaded_error" | "overloaded" | "server_overloaded" => 529,
        "service_unavailable" | "service_unavailable_error" => 503,
        "server_error" | "api_error" | "internal_error" | "internal_server_error" => 500,
        "timeout_error" | "timeout" => 504,
        "authentication_error" | "invalid_api_key" => 401,
        "permission_error" | "permission_denied" => 403,
        "not_found_error" | "model_not_found" => 404,
        "request_too_large" => 413,
        "invalid_request_error"
        | "context_length_exceeded"
        | "max_output_tokens"
        | "content_filter"
        | "content_filtered"
        | "content_policy_violation" => 400,
        other if other.starts_with("invalid_") || other.starts_with("image_") => 400,
        _ => return None,
    };
    StatusCode::from_u16(status).ok()
}

/// How many bytes of `buf` are complete events (or comments): the end of its last blank line.
pub(crate) fn complete_prefix(buf: &[u8]) -> usize {
    let mut offset = 0;
    while let Some((_, next)) = split_block(&buf[offset..]) {
        offset = buf.len() - next.len();
    }
    offset
}

/// Whether complete events hold an error event, by a look at their lines (no JSON is parsed on
/// this path, which every chunk of a committed stream takes): `event: error`,
/// `event: response.failed`, or data that opens with an `error` member.
pub(crate) fn has_error_event(events: &[u8]) -> bool {
    events.split(|b| *b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match (field(line, b"event"), field(line, b"data")) {
            (Some(name), _) => name == b"error" || name == b"response.failed",
            (None, Some(data)) => data.starts_with(b"{\"error\""),
            (None, None) => false,
        }
    })
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

    fn scan_all(buf: &[u8]) -> (Found, Option<Dialect>) {
        let mut dialect = None;
        (scan(buf, 0, false, &mut dialect), dialect)
    }

    #[test]
    fn comments_and_incomplete_events_are_not_a_commit_point() {
        assert_eq!(
            scan_all(b"data: {\"a\":1}\n").0,
            Found::Preamble {
                scanned: 0,
                events: 0
            }
        );
        assert_eq!(
            scan_all(b": keep-alive\n\n").0,
            Found::Preamble {
                scanned: 14,
                events: 0
            }
        );
        assert_eq!(
            scan_all(b": keep-alive\r\n\r\ndata: 1\r\n\r\n").0,
            Found::Content
        );
    }

    #[test]
    fn an_empty_data_heartbeat_and_a_name_alone_are_not_content() {
        let (found, _) = scan_all(b"data:\n\nevent: ping\n\n");
        assert_eq!(
            found,
            Found::Preamble {
                scanned: 20,
                events: 0
            }
        );
    }

    #[test]
    fn chat_preamble_is_a_role_only_delta() {
        let role = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"finish_reason\":null}]}\n\n";
        assert_eq!(
            scan_all(role),
            (
                Found::Preamble {
                    scanned: role.len(),
                    events: 1
                },
                Some(Dialect::Chat)
            )
        );
        let mut dialect = None;
        assert_eq!(
            scan(role, 0, true, &mut dialect),
            Found::Content,
            "first_event commits on it"
        );
        for content in [
            &b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"[..],
            b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\n",
            b"data: {\"choices\":[{\"delta\":{\"refusal\":\"No\"}}]}\n\n",
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n",
            b"data: [DONE]\n\n",
            b"data: not json\n\n",
        ] {
            let mut buf = role.to_vec();
            buf.extend_from_slice(content);
            assert_eq!(
                scan_all(&buf).0,
                Found::Content,
                "{}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn responses_and_messages_preambles() {
        let responses = b"event: response.created\ndata: {\"type\":\"response.created\"}\n\nevent: response.in_progress\ndata: {\"type\":\"response.in_progress\"}\n\n";
        assert_eq!(scan_all(responses).1, Some(Dialect::Responses));
        assert!(matches!(scan_all(responses).0, Found::Preamble { .. }));
        let messages = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n";
        assert_eq!(scan_all(messages).1, Some(Dialect::Messages));
        assert!(matches!(scan_all(messages).0, Found::Preamble { .. }));
        let mut delta = messages.to_vec();
        delta.extend_from_slice(b"event: content_block_delta\ndata: {}\n\n");
        assert_eq!(scan_all(&delta).0, Found::Content);
    }

    #[test]
    fn error_events_and_the_status_they_stand_for() {
        let cases: [(&[u8], u16, Option<&str>); 8] = [
            (b"data: {\"error\":{\"message\":\"m\",\"type\":\"server_error\",\"code\":null}}\n\n", 500, Some("server_error")),
            (b"data: {\"error\":{\"message\":\"m\",\"type\":\"insufficient_quota\",\"code\":\"insufficient_quota\"}}\n\n", 429, Some("insufficient_quota")),
            (b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n", 529, Some("overloaded_error")),
            (b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\"}}\n\n", 400, Some("invalid_request_error")),
            (b"event: error\ndata: {\"type\":\"error\",\"code\":\"rate_limit_exceeded\",\"message\":\"m\",\"param\":null}\n\n", 429, Some("rate_limit_exceeded")),
            (b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"m\"}}}\n\n", 500, Some("server_error")),
            (b"data: {\"error\":{\"code\":502,\"message\":\"bad gateway\"}}\n\n", 502, None),
            (b"event: error\ndata: oops\n\n", 500, None),
        ];
        for (bytes, status, code) in cases {
            let Found::Error(data) = scan_all(bytes).0 else {
                panic!("not an error: {}", String::from_utf8_lossy(bytes));
            };
            assert_eq!(
                error_status(&data),
                (
                    StatusCode::from_u16(status).unwrap(),
                    code.map(str::to_owned)
                )
            );
        }
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"error\"}}]}\n\n";
        assert_eq!(scan_all(chunk).0, Found::Content);
    }
}
