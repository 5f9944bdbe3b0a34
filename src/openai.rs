//! OpenAI's wire shapes for a proxy built on the layer (an axum handler, a gateway): a
//! [`FallbackError`] as the error response an OpenAI SDK understands, and the
//! [`FallbackReport`] as `x-fallback-*` response headers. The gateway in this workspace answers
//! with exactly these.
//!
//! Always built: it needs nothing beyond what the layer already uses (`http`, `bytes`,
//! `serde_json`), so a feature flag would only add a build to test.
//!
//! ```
//! use bytes::Bytes;
//! use http::HeaderMap;
//! use http_body_util::Full;
//! use tower_model_fallback::{openai, FallbackError, FallbackReport};
//!
//! // In a handler: the stack's answer, or its error, as the client sees it.
//! fn answer<B>(result: Result<http::Response<B>, FallbackError>) -> http::Response<Full<Bytes>>
//! where
//!     B: Into<Full<Bytes>>,
//! {
//!     match result {
//!         Ok(response) => {
//!             let (mut head, body) = response.into_parts();
//!             tower_model_fallback::strip_hop_by_hop(&mut head.headers); // see its docs
//!             if let Some(report) = head.extensions.remove::<FallbackReport>() {
//!                 openai::report_headers(&report, &mut head.headers);
//!             }
//!             http::Response::from_parts(head, body.into())
//!         }
//!         Err(error) => openai::error_response(&error),
//!     }
//! }
//! # let _ = answer::<Full<Bytes>>;
//! ```

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

use crate::error::FallbackError;
use crate::report::{AttemptOutcome, FallbackReport};

/// The header naming the target that served (its display name).
pub const TARGET_HEADER: HeaderName = HeaderName::from_static("x-fallback-target");
/// The header naming the model that served, when known.
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("x-fallback-model");
/// The header counting the attempts made.
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-fallback-attempts");
/// OpenAI's and Anthropic's SDKs do not retry a response that says `x-should-retry: false`.
pub const SHOULD_RETRY_HEADER: HeaderName = HeaderName::from_static("x-should-retry");

/// Puts `report` into response headers: `x-fallback-target` and `x-fallback-model` (who
/// served, when someone did; a value that cannot be a header is left out),
/// `x-fallback-attempts`, and `x-should-retry: false` when the layer gave up (every target
/// tried, or a budget or deadline stopped it): an SDK's own retries would only run the chain
/// again. An upstream's `retry-after` is left as it is.
pub fn report_headers(report: &FallbackReport, headers: &mut HeaderMap) {
    if let Some(served) = report.served_by() {
        set(headers, TARGET_HEADER, served.target());
        if let Some(model) = served.model() {
            set(headers, MODEL_HEADER, model);
        }
    }
    headers.insert(ATTEMPTS_HEADER, count(report.attempts().len()));
    if gave_up(report) {
        headers.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
    }
}

/// Whether the layer stopped with every target tried, or a budget or the deadline stopped it.
fn gave_up(report: &FallbackReport) -> bool {
    report.is_exhausted() || report.stop_reason().is_some()
}

/// `error` as OpenAI's error response: a status, `content-type: application/json` and
/// `{"error": {"message", "type", "code"}}`, with `x-should-retry: false` when retrying the
/// same request would run the same chain again.
///
/// | error | status | `code` |
/// |---|---|---|
/// | [`is_body_too_large`](FallbackError::is_body_too_large) | 413 | `request_too_large` |
/// | [`is_invalid_json`](FallbackError::is_invalid_json) | 400 | `invalid_json` |
/// | [`is_body_unreadable`](FallbackError::is_body_unreadable) | 400 | `body_unreadable` |
/// | [`is_misdirected`](FallbackError::is_misdirected) | 400 | `invalid_path` |
/// | [`is_body_not_rewritable`](FallbackError::is_body_not_rewritable) | 415 | `unsupported_content_encoding` |
/// | [`is_deadline`](FallbackError::is_deadline) | 504 | `deadline_exceeded` |
/// | [`is_invalid_request`](FallbackError::is_invalid_request) | 400 | `invalid_request` |
/// | every target failed without a response | 502 | `all_targets_failed` |
///
/// The message names the targets tried and what each did (`tried primary (gpt-4o-mini):
/// connect error, backup (gpt-4o): 503 Service Unavailable`), never a URL, a socket error or a
/// key: the error's own `Display` has the detail, for the log.
///
/// ```
/// use http_body_util::Full;
/// # use bytes::Bytes;
/// # fn show(error: &tower_model_fallback::FallbackError) {
/// let response: http::Response<Full<Bytes>> = tower_model_fallback::openai::error_response(error);
/// # }
/// ```
pub fn error_response<B: From<Bytes>>(error: &FallbackError) -> Response<B> {
    let (status, kind, code, message) = describe(error);
    let mut response = error_body(status, kind, code, &message);
    if gave_up(error.report()) || error.is_upstream() || error.is_deadline() {
        response
            .headers_mut()
            .insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
    }
    response
}

/// The status, `type`, `code` and message for `error`.
fn describe(error: &FallbackError) -> (StatusCode, &'static str, &'static str, String) {
    const INVALID: &str = "invalid_request_error";
    let local = |status, code, message: &str| (status, INVALID, code, message.to_owned());
    if error.is_body_too_large() {
        local(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "the request body is over the size limit",
        )
    } else if error.is_invalid_json() {
        local(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body is not valid JSON",
        )
    } else if error.is_body_unreadable() {
        local(
            StatusCode::BAD_REQUEST,
            "body_unreadable",
            "the request body could not be read (or decompressed)",
        )
    } else if error.is_misdirected() {
        (
            StatusCode::BAD_REQUEST,
            INVALID,
            "invalid_path",
            error.to_string(),
        )
    } else if error.is_body_not_rewritable() {
        local(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            "the request body is compressed and cannot carry each target's model; send it uncompressed",
        )
    } else if error.is_deadline() {
        let message = format!("the deadline passed; {}", tried(error.report()));
        (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "deadline_exceeded",
            message,
        )
    } else if error.is_invalid_request() {
        local(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request cannot be sent to any target",
        )
    } else {
        let message = format!("no target answered; {}", tried(error.report()));
        (
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "all_targets_failed",
            message,
        )
    }
}

/// An error response in OpenAI's shape, `{"error": {"message", "type", "code"}}`, for a proxy's
/// own refusals (a 401 for a missing key, a 404 for an unknown route).
///
/// ```
/// use http::StatusCode;
/// use http_body_util::Full;
/// # use bytes::Bytes;
///
/// let response: http::Response<Full<Bytes>> = tower_model_fallback::openai::error_body(
///     StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", "a valid key is required",
/// );
/// assert_eq!(response.status(), 401);
/// assert_eq!(response.headers()["content-type"], "application/json");
/// ```
pub fn error_body<B: From<Bytes>>(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
) -> Response<B> {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    let mut response = Response::new(B::from(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `tried primary (model-a): connect error, fallback (model-b): 503 Service Unavailable`:
/// target names, models and what kind of failure, without the failure's own message.
fn tried(report: &FallbackReport) -> String {
    use std::fmt::Write;
    let mut out = String::from("tried ");
    for (i, attempt) in report.attempts().iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(attempt.target());
        if let Some(model) = attempt.model() {
            let _ = write!(out, " ({model})");
        }
        let _ = match attempt.outcome() {
            AttemptOutcome::Status(s) => write!(out, ": {s}"),
            AttemptOutcome::Error { kind, .. } => write!(out, ": {kind}"),
            AttemptOutcome::BodyFailed { status, kind, .. } => {
                write!(out, ": {status}, then {kind}")
            }
            other => write!(out, ": {other}"),
        };
    }
    if report.attempts().is_empty() {
        out.push_str("no target");
    }
    for skip in report.skipped() {
        let _ = write!(out, ", {} cooling down", skip.target());
    }
    out
}

/// A small count as a header value without an allocation (`HeaderValue::from` makes two).
fn count(n: usize) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    DIGITS
        .get(n)
        .map_or_else(|| HeaderValue::from(n), |d| HeaderValue::from_static(d))
}

/// A header, when the value can be one (a model ID with a newline cannot, and is left out).
fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(response: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(response.body()).unwrap()
    }

    #[test]
    fn local_errors_are_the_callers_to_fix_and_say_so() {
        let too_large: Response<Bytes> = error_response(&FallbackError::body_too_large(10));
        assert_eq!(too_large.status(), 413);
        assert_eq!(json(&too_large)["error"]["code"], "request_too_large");
        assert!(!too_large.headers().contains_key(SHOULD_RETRY_HEADER));
        let path = FallbackError::misdirected("the request path /v1/x repeats it".into());
        let misdirected: Response<Bytes> = error_response(&path);
        assert_eq!(misdirected.status(), 400);
        let body = json(&misdirected);
        assert_eq!(body["error"]["code"], "invalid_path");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("/v1/x"));
    }

    #[test]
    fn an_upstream_failure_is_a_502_that_sdks_do_not_retry() {
        let failed = FallbackError::upstream("refused".into(), FallbackReport::default());
        let response: Response<Bytes> = error_response(&failed);
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()[SHOULD_RETRY_HEADER], "false");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let message = json(&response)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(message, "no target answered; tried no target");
    }

    #[test]
    fn a_target_name_that_cannot_be_a_header_is_left_out() {
        let mut headers = HeaderMap::new();
        set(&mut headers, TARGET_HEADER, "bad\nname");
        assert!(headers.is_empty());
        assert_eq!(count(3), "3");
        assert_eq!(count(12), "12");
    }
}
