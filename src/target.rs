//! Targets: where an attempt goes (base URL), which model it asks for, and with whose key.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};

use crate::error::ConfigError;

/// One place a request can be sent: a base URL, optionally a model ID written into the body, a
/// credential that belongs to this target alone, extra headers and a display name.
///
/// The request path the caller sends is appended to the base URL, as the OpenAI SDKs do: with the
/// base `https://api.cometapi.com/v1`, a caller's `/chat/completions?x=1` goes to
/// `https://api.cometapi.com/v1/chat/completions?x=1`.
///
/// `Debug` and the [`FallbackReport`](crate::FallbackReport) show the credential's header name,
/// never its value.
///
/// ```
/// use tower_model_fallback::Target;
///
/// # fn main() -> Result<(), tower_model_fallback::ConfigError> {
/// let primary = Target::new("https://api.cometapi.com/v1")?
///     .with_name("cometapi")
///     .with_model("gpt-4o-mini")
///     .bearer("sk-secret")?;
/// assert_eq!(primary.name(), "cometapi");
/// assert!(!format!("{primary:?}").contains("sk-secret"));
///
/// assert!(Target::new("api.openai.com/v1").is_err()); // no scheme: an error now, not at request time
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Target {
    pub(crate) name: Arc<str>,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    pub(crate) host: HeaderValue,
    /// The base path without its trailing slash (empty for the root).
    pub(crate) base_path: Arc<str>,
    pub(crate) model: Option<TargetModel>,
    pub(crate) credentials: Vec<(HeaderName, HeaderValue)>,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) forward_caller_credentials: bool,
}

/// Which target an attempt is for: in the extensions of every request the layer sends to its
/// inner service, so that a service inside the layer can tell the targets apart (give each its
/// own rate limit, concurrency limit, timeout or client — see [`PerTarget`](crate::PerTarget)).
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::ServiceExt;
/// use tower_model_fallback::{AttemptTarget, FallbackLayer, ReplayBody, Target};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let layer = FallbackLayer::new([
///     Target::new("https://a.example/v1")?.with_name("a"),
///     Target::new("https://b.example/v1")?.with_name("b"),
/// ])?;
/// let client = tower::service_fn(|req: Request<ReplayBody>| async move {
///     let target = req.extensions().get::<AttemptTarget>().unwrap();
///     let status = if target.index() == 0 { 503 } else { 200 };
///     Ok::<_, Infallible>(Response::builder().status(status).body(target.name().to_owned()).unwrap())
/// });
/// let response = tower::Layer::layer(&layer, client).oneshot(Request::new(String::new())).await?;
/// assert_eq!(response.status(), 200);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptTarget {
    index: usize,
    name: Arc<str>,
}

impl AttemptTarget {
    pub(crate) fn new(index: usize, target: &Target) -> Self {
        AttemptTarget {
            index,
            name: target.name.clone(),
        }
    }

    /// The target's position in the layer's list of targets, from 0: the order of
    /// [`FallbackLayer::targets`](crate::FallbackLayer::targets), which is the flattened list
    /// (a target inside a group counts where it stands in that list).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The target's display name ([`Target::name`]).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A model ID and its pre-escaped JSON forms.
#[derive(Clone)]
pub(crate) struct TargetModel {
    pub(crate) id: Arc<str>,
    pub(crate) literal: ModelLiteral,
}

impl Target {
    /// A target at `base_url`, an absolute `http` or `https` URL with an optional path (no query,
    /// fragment or user info). Its name defaults to the URL's host.
    pub fn new(base_url: impl AsRef<str>) -> Result<Target, ConfigError> {
        let given = base_url.as_ref();
        // Error messages quote the URL without anything that may hold a key.
        let shown = redacted(given);
        let raw = shown.as_str();
        let field = "base_url";
        if !raw.contains("://") {
            return Err(ConfigError::new(
                field,
                format!("{raw:?} is a relative URL; give scheme and host, e.g. https://api.openai.com/v1"),
            ));
        }
        // `{model}` (an Azure deployment, a Gemini-style path) is filled in per attempt.
        let templated = given.replace("{model}", MODEL_PLACEHOLDER);
        let uri: Uri = templated
            .parse()
            .map_err(|e| ConfigError::new(field, format!("{raw:?} is not a valid URL: {e}")))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            Some(s) => {
                return Err(ConfigError::new(
                    field,
                    format!("{raw:?}: scheme {s} is not http or https"),
                ))
            }
            None => {
                return Err(ConfigError::new(
                    field,
                    format!("{raw:?} is a relative URL; give scheme and host, e.g. https://api.openai.com/v1"),
                ))
            }
        };
        let authority = match uri.authority() {
            Some(a) if a.as_str().contains('@') => {
                return Err(ConfigError::new(
                    field,
                    "user info in the URL is not allowed; give the credential with bearer() or api_key_header()",
                ))
            }
            Some(a) if a.host().is_empty() => {
                return Err(ConfigError::new(field, format!("{raw:?} has no host")))
            }
            Some(a) => a.clone(),
            None => return Err(ConfigError::new(field, format!("{raw:?} has no host"))),
        };
        if uri.query().is_some() {
            return Err(ConfigError::new(
                field,
                format!("{raw:?} has a query; the caller's query is appended to the base URL"),
            ));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ConfigError::new(field, format!("{raw:?} has an invalid host")))?;
        let base_path = uri.path().trim_end_matches('/');
        Ok(Target {
            name: Arc::from(authority.host()),
            scheme,
            authority,
            host,
            base_path: Arc::from(base_path),
            model: None,
            credentials: Vec::new(),
            headers: Vec::new(),
            forward_caller_credentials: false,
        })
    }

    /// The name shown in reports, errors and logs (default: the base URL's host).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Arc::from(name.into());
        self
    }

    /// The model ID written into the request body's top-level `"model"` member for this target.
    /// Without it, the caller's model is sent unchanged.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        let id: String = model.into();
        self.model = Some(TargetModel {
            literal: ModelLiteral::new(&id),
            id: Arc::from(id),
        });
        self
    }

    /// Sends `authorization: Bearer <key>` to this target (marked sensitive).
    pub fn bearer(self, key: impl AsRef<str>) -> Result<Self, ConfigError> {
        let value = format!("Bearer {}", key.as_ref());
        self.credential_header(AUTHORIZATION, &value, "bearer")
    }

    /// Sends the key in a header of its own, such as `x-api-key` or Azure's `api-key` (marked
    /// sensitive and removed from the caller's request like every credential).
    pub fn api_key_header(
        self,
        name: impl AsRef<str>,
        key: impl AsRef<str>,
    ) -> Result<Self, ConfigError> {
        let name = parse_name(name.as_ref(), "api_key_header")?;
        self.credential_header(name, key.as_ref(), "api_key_header")
    }

    fn credential_header(
        mut self,
        name: HeaderName,
        value: &str,
        field: &'static str,
    ) -> Result<Self, ConfigError> {
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            ConfigError::new(
                field,
                "the credential contains a character not allowed in an HTTP header (a trailing newline?)",
            )
        })?;
        value.set_sensitive(true);
        self.credentials.retain(|(n, _)| *n != name);
        self.credentials.push((name, value));
        Ok(self)
    }

    /// Adds a header sent to this target only (for example `openai-organization`). Setting the
    /// same name twice keeps the last value.
    pub fn header(
        mut self,
        name: impl AsRef<str>,
        value: impl AsRef<str>,
    ) -> Result<Self, ConfigError> {
        let name = parse_name(name.as_ref(), "header")?;
        if is_credential(&name) {
            return Err(ConfigError::new(
                "header",
                format!("{name} carries a credential; use bearer() or api_key_header()"),
            ));
        }
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(ConfigError::new(
                "header",
                format!("{name} is set by the layer for each attempt and cannot be given"),
            ));
        }
        let value = HeaderValue::from_str(value.as_ref()).map_err(|_| {
            ConfigError::new(
                "header",
                format!("the value of {name} contains a character not allowed in an HTTP header"),
            )
        })?;
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value));
        Ok(self)
    }

    /// Lets the caller's own credential headers (`authorization`, `x-api-key`, …) through to this
    /// target. Off by default: a caller's key reaches no target unless that target opts in. A
    /// credential set on the target replaces the caller's header of the same name.
    pub fn forward_caller_credentials(mut self, forward: bool) -> Self {
        self.forward_caller_credentials = forward;
        self
    }

    /// The display name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model ID this target substitutes, if any.
    pub fn model(&self) -> Option<&str> {
        self.model.as_ref().map(|m| &*m.id)
    }

    /// The base URL (scheme, authority and path, without a trailing slash).
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }

    /// When `path` starts with this target's whole base path (segment by segment, a `{model}`
    /// segment matching any one), the rest of it: the path the caller meant. `None` when it does
    /// not, or when the base path has no literal first segment to recognise it by.
    pub(crate) fn repeated_prefix<'p>(&self, path: &'p str) -> Option<&'p str> {
        let base = self.base_path.strip_prefix('/')?;
        let mut rest = path.strip_prefix('/')?;
        for (i, segment) in base.split('/').enumerate() {
            let templated = segment.contains(MODEL_PLACEHOLDER);
            if i == 0 && templated {
                return None;
            }
            let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
            if head.is_empty() || (!templated && head != segment) {
                return None;
            }
            rest = tail;
        }
        // `rest` lost its leading slash to the split; the caller's path is the suffix of `path`.
        Some(&path[path.len() - rest.len() - usize::from(!rest.is_empty())..])
    }

    /// The URI of an attempt: the base URL (with `{model}` filled in) followed by the caller's
    /// path and query.
    pub(crate) fn uri_for(
        &self,
        path_and_query: &PathAndQuery,
        model: Option<&str>,
    ) -> Result<Uri, crate::error::BoxError> {
        let pq = if self.base_path.is_empty() {
            // Already parsed: shared, not copied.
            path_and_query.clone()
        } else {
            let path_and_query = path_and_query.as_str();
            let mut s = String::with_capacity(self.base_path.len() + path_and_query.len());
            if self.base_path.contains(MODEL_PLACEHOLDER) {
                let model =
                    model.ok_or("the base URL has {model} but the request names no model")?;
                // `.` and `..` are dot segments even percent-encoded (`%2E%2E`): a server that
                // normalises the path would climb out of the deployment path with the key.
                if matches!(model, "" | "." | "..") {
                    return Err(format!(
                        "the model {model:?} cannot be a path segment of the base URL's {{model}}"
                    )
                    .into());
                }
                s.push_str(
                    &self
                        .base_path
                        .replace(MODEL_PLACEHOLDER, &percent_encode(model)),
                );
            } else {
                s.push_str(&self.base_path);
            }
            s.push_str(path_and_query);
            PathAndQuery::from_maybe_shared(Bytes::from(s))?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Ok(Uri::from_parts(parts)?)
    }
}

/// `{model}` in a base URL, as it is kept once parsed.
const MODEL_PLACEHOLDER: &str = "%7Bmodel%7D";

/// A model ID as one path segment: everything but unreserved characters percent-encoded.
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL as error messages may show it: no user info, no query, no fragment.
fn redacted(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .find('/')
        .map_or(url.len(), |i| authority_start + i);
    match url[authority_start..authority_end].rfind('@') {
        Some(at) => format!(
            "{}[user info]@{}",
            &url[..authority_start],
            &url[authority_start + at + 1..]
        ),
        None => url.to_owned(),
    }
}

/// Headers a target may not set: the layer computes them, or they belong to one hop.
const RESERVED_HEADERS: [&str; 10] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

fn parse_name(name: &str, field: &'static str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ConfigError::new(field, format!("{name:?} is not a valid header name")))
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials: Vec<String> = self
            .credentials
            .iter()
            .map(|(n, _)| format!("{n}: [redacted]"))
            .collect();
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("base_url", &self.base_url())
            .field("model", &self.model())
            .field("credentials", &credentials)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "forward_caller_credentials",
                &self.forward_caller_credentials,
            )
            .finish()
    }
}

/// Headers that carry a caller's credential: removed from every attempt unless the target opts in.
pub(crate) const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    // A caller's session with the app is not the provider's business.
    "cookie",
];

/// Whether `name` carries a credential (the caller's never crosses to a target).
pub(crate) fn is_credential(name: &HeaderName) -> bool {
    CREDENTIAL_HEADERS.contains(&name.as_str()) || *name == http::header::PROXY_AUTHORIZATION
}

/// The JSON string literal for a model ID and the member inserted when a body has none.
#[derive(Clone)]
pub(crate) struct ModelLiteral {
    /// `"<escaped id>"`.
    pub(crate) value: Bytes,
    /// `"model":"<escaped id>",` — the trailing comma is sliced off for empty objects.
    pub(crate) member: Bytes,
}

impl ModelLiteral {
    pub(crate) fn new(model: &str) -> Self {
        let value = escape_string(model);
        let mut member = Vec::with_capacity(value.len() + 9);
        member.extend_from_slice(b"\"model\":");
        member.extend_from_slice(&value);
        member.push(b',');
        ModelLiteral {
            value: Bytes::from(value),
            member: Bytes::from(member),
        }
    }
}

/// A correctly escaped JSON string literal (with quotes) for `s`.
pub(crate) fn escape_string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_starts_with_the_whole_base_path_is_recognised() {
        let t = Target::new("https://api.openai.com/v1/").unwrap();
        assert_eq!(
            t.repeated_prefix("/v1/chat/completions"),
            Some("/chat/completions")
        );
        assert_eq!(t.repeated_prefix("/v1"), Some(""));
        assert_eq!(t.repeated_prefix("/v1beta/models"), None);
        assert_eq!(t.repeated_prefix("/chat/completions"), None);
        let deep = Target::new("https://a.example/api/v1").unwrap();
        assert_eq!(deep.repeated_prefix("/api/v1/models"), Some("/models"));
        assert_eq!(deep.repeated_prefix("/api/models"), None);
        let azure = Target::new("https://r.example/openai/deployments/{model}").unwrap();
        assert_eq!(
            azure.repeated_prefix("/openai/deployments/gpt-4o/chat/completions"),
            Some("/chat/completions")
        );
        assert_eq!(azure.repeated_prefix("/openai/deployments"), None);
        assert_eq!(azure.repeated_prefix("/chat/completions"), None);
        let root = Target::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(root.repeated_prefix("/v1/models"), None);
        let by_model = Target::new("https://g.example/{model}").unwrap();
        assert_eq!(by_model.repeated_prefix("/anything/at/all"), None);
    }

    #[test]
    fn joins_the_base_path_and_the_callers_path_like_the_openai_sdk() {
        let t = Target::new("https://api.cometapi.com/v1/").unwrap();
        assert_eq!(
            t.uri_for(&PathAndQuery::from_static("/chat/completions?a=1"), None)
                .unwrap(),
            "https://api.cometapi.com/v1/chat/completions?a=1"
        );
        let root = Target::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            root.uri_for(&PathAndQuery::from_static("/v1/models"), Some("m"))
                .unwrap(),
            "http://127.0.0.1:8080/v1/models"
        );
        let azure = Target::new("https://res.openai.azure.com/openai/deployments/{model}").unwrap();
        assert_eq!(
            azure
                .uri_for(&PathAndQuery::from_static("/chat/completions?api-version=2024-10-21"), Some("gpt-4o mini/é"))
                .unwrap(),
            "https://res.openai.azure.com/openai/deployments/gpt-4o%20mini%2F%C3%A9/chat/completions?api-version=2024-10-21"
        );
        assert!(azure
            .uri_for(&PathAndQuery::from_static("/chat/completions"), None)
            .is_err());
        assert_eq!(root.name(), "127.0.0.1");
        assert_eq!(root.host, "127.0.0.1:8080");
    }

    #[test]
    fn a_model_in_a_model_url_never_forms_a_dot_segment() {
        let azure = Target::new("https://res.openai.azure.com/openai/deployments/{model}").unwrap();
        let chat = PathAndQuery::from_static("/chat/completions");
        for model in ["..", ".", ""] {
            let err = azure.uri_for(&chat, Some(model)).unwrap_err();
            assert!(
                err.to_string().contains("cannot be a path segment"),
                "{err}"
            );
        }
        for (model, segment) in [
            ("../../admin", "..%2F..%2Fadmin"),
            ("...", "..."),
            ("%2e%2e", "%252e%252e"),
            ("a/..", "a%2F.."),
        ] {
            let uri = azure.uri_for(&chat, Some(model)).unwrap();
            assert_eq!(
                uri.path(),
                format!("/openai/deployments/{segment}/chat/completions"),
                "{model}"
            );
            assert!(
                uri.path().split('/').all(|s| s != "." && s != ".."),
                "{uri}"
            );
        }
    }

    #[test]
    fn rejects_bad_base_urls_with_the_reason() {
        for (url, needle) in [
            ("api.openai.com/v1", "relative URL"),
            ("/v1", "relative URL"),
            ("ftp://example.com", "not http or https"),
            ("https://user:pw@example.com", "user info"),
            ("https://example.com/v1?key=1", "has a query"),
            ("http://exa mple.com", "not a valid URL"),
            ("", "relative URL"),
            ("https://", "not a valid URL"),
            ("https://x.example/v1?api-key=sk-123", "has a query"),
            ("https://u:sk-456@exa mple.com", "not a valid URL"),
        ] {
            let err = Target::new(url).unwrap_err();
            assert_eq!(err.field(), "base_url");
            assert!(err.to_string().contains(needle), "{url}: {err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
            assert!(!err.to_string().contains("sk-"), "{err}");
        }
    }

    #[test]
    fn credentials_are_sensitive_and_never_printed() {
        let t = Target::new("https://a.example/v1")
            .unwrap()
            .bearer("sk-top-secret")
            .unwrap()
            .api_key_header("x-api-key", "other-secret")
            .unwrap();
        assert!(t.credentials.iter().all(|(_, v)| v.is_sensitive()));
        let debug = format!("{t:?}");
        assert!(!debug.contains("secret"), "{debug}");
        let err = Target::new("https://a.example")
            .unwrap()
            .bearer("sk-abc\n")
            .unwrap_err();
        assert!(!err.to_string().contains("sk-abc"), "{err}");
        for reserved in [
            "authorization",
            "content-length",
            "Transfer-Encoding",
            "host",
            "te",
        ] {
            assert!(
                Target::new("https://a.example")
                    .unwrap()
                    .header(reserved, "x")
                    .is_err(),
                "{reserved}"
            );
        }
    }
}
