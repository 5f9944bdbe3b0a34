//! The caller's request, prepared once (headers cleaned, body located), and each attempt's request
//! built from it for one target.

pub(crate) mod collect;
pub(crate) mod json;
pub(crate) mod multipart;
mod replay;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{request, Extensions, Method, Request};

use crate::error::FallbackError;
use crate::target::{Target, CREDENTIAL_HEADERS};
use json::ModelSlots;
use multipart::ModelParts;
pub use replay::ReplayBody;

/// Headers that belong to one hop (RFC 9110 §7.6.1). `host` and `content-length` are rewritten
/// for every attempt instead (see [`Prepared::new`]).
static DROPPED_HEADERS: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// The credential header names for a set of targets: the well-known ones and every header a
/// target sends its own key in, so a caller's value for any of them reaches no other target.
pub(crate) fn credential_names(targets: &[Target]) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = CREDENTIAL_HEADERS
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
    for (name, _) in targets.iter().flat_map(|t| t.credentials.iter()) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The caller's request, read and cleaned once; every attempt is built from it.
pub(crate) struct Prepared {
    method: Method,
    /// Kept as parsed: a clone is a reference count, not a copy.
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    caller_credentials: Vec<(HeaderName, HeaderValue)>,
    extensions: Extensions,
    body: Bytes,
    plan: BodyPlan,
    send_content_length: bool,
    pub(crate) requested_model: Option<Arc<str>>,
}

/// What one attempt asks for.
pub(crate) struct AttemptPlan {
    pub(crate) request: Request<ReplayBody>,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) substituted: bool,
}

impl Prepared {
    /// Whether the request may go to another target after a failure: its body is rewritten
    /// for each target (a JSON object, or multipart with a `model` field), or its method is
    /// idempotent (GET, HEAD). Any other body (a file upload, a batch, a run with side effects)
    /// is the same request everywhere, and it may have taken effect where it failed.
    pub(crate) fn replayable(&self) -> bool {
        matches!(self.plan, BodyPlan::Json(_) | BodyPlan::Multipart(_))
            || self.method == Method::GET
            || self.method == Method::HEAD
    }

    /// Whether `target` can be sent this body with its own model in it: not when the body is
    /// compressed and the target names a model (it would get the caller's model instead).
    pub(crate) fn fits(&self, target: &Target) -> bool {
        !(matches!(self.plan, BodyPlan::Encoded) && target.model.is_some())
    }

    /// The body's `content-encoding`, as the caller sent it.
    pub(crate) fn encoding(&self) -> &str {
        self.headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
    }

    /// Cleans the head and locates the model in the body. Invalid JSON under a JSON content type
    /// is an error; other bodies are sent unchanged.
    /// `credentials` are the header names treated as credentials: the well-known ones and every
    /// name a target sends its own key in.
    /// `targets` are checked against the request's URI first ([`check_destination`]).
    pub(crate) fn new(
        parts: request::Parts,
        body: Bytes,
        credentials: &[HeaderName],
        targets: &[Target],
    ) -> Result<Self, FallbackError> {
        check_destination(&parts.uri, parts.version, targets)?;
        let request::Parts {
            method,
            uri,
            mut headers,
            extensions,
            ..
        } = parts;
        let send_content_length = !body.is_empty()
            || headers.contains_key(header::CONTENT_LENGTH)
            || matches!(method, Method::POST | Method::PUT | Method::PATCH);
        let plan = locate_model(&headers, &body)?;
        let requested_model = match &plan {
            BodyPlan::Json(slots) => json::requested_model(&body, slots),
            BodyPlan::Multipart(parts) => parts.requested_model(&body),
            BodyPlan::Unchanged | BodyPlan::Encoded => None,
        };

        let caller_credentials = remove_hop_and_credentials(&mut headers, credentials);
        // Every attempt sets `host` (and `content-length`, when one is sent) to its own value.
        // Their entries stay in the head, so that each attempt's copy of it replaces them in place
        // rather than growing (a clone of a header map has no room to spare).
        headers.insert(header::HOST, HeaderValue::from_static(""));
        if send_content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        let path_and_query = uri
            .into_parts()
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Prepared {
            method,
            path_and_query,
            headers,
            caller_credentials,
            extensions,
            body,
            plan,
            send_content_length,
            requested_model,
        })
    }

    /// The request for `target`: its URI, its credential, its model in the body.
    pub(crate) fn attempt(&self, target: &Target) -> Result<AttemptPlan, FallbackError> {
        let spliced = match (&self.plan, &target.model) {
            (BodyPlan::Json(slots), Some(model)) => Some(slots.splice(&self.body, &model.literal)),
            (BodyPlan::Multipart(parts), Some(model)) => parts.splice(&self.body, &model.id),
            _ => None,
        };
        let substituted = spliced.is_some();
        let model = match (&target.model, substituted) {
            (Some(model), true) => Some(model.id.clone()),
            _ => self.requested_model.clone(),
        };
        let segments = spliced.unwrap_or_else(|| {
            if self.body.is_empty() {
                Vec::new()
            } else {
                vec![self.body.clone()]
            }
        });
        // A `{model}` in the base URL takes the target's model, else the caller's.
        let url_model = target.model().or(self.requested_model.as_deref());
        let uri = target
            .uri_for(&self.path_and_query, url_model)
            .map_err(FallbackError::request)?;
        let body = ReplayBody::from_segments(segments);

        let mut headers = self.headers.clone();
        if target.forward_caller_credentials {
            for (name, value) in &self.caller_credentials {
                headers.append(name.clone(), value.clone());
            }
        }
        for (name, value) in target.credentials.iter().chain(target.headers.iter()) {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(header::HOST, target.host.clone());
        if self.send_content_length {
            headers.insert(header::CONTENT_LENGTH, content_length(body.len()));
        }

        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        *request.extensions_mut() = self.extensions.clone();
        Ok(AttemptPlan {
            request,
            model,
            substituted,
        })
    }
}

/// The path trap: a request URI that would quietly reach the wrong place is an error naming the
/// fix, before anything is sent. An absolute HTTP/1 URI must have a target's scheme and host
/// (its authority is replaced by each target's anyway; another host means the caller expects
/// the request to go there). An HTTP/2 or HTTP/3 request always carries an authority — a
/// server's view of its own, in a proxy handler — so there it says nothing and is not checked.
/// A path that starts with a target's base path (`/v1/chat/completions`
/// for the base `…/v1`) would reach `/v1/v1/chat/completions`. It is refused rather than
/// trimmed: with targets whose base paths differ, no one trimming suits them all, and a path
/// rewritten behind the caller's back hides the mistake in every other client it uses.
fn check_destination(
    uri: &http::Uri,
    version: http::Version,
    targets: &[Target],
) -> Result<(), FallbackError> {
    let multiplexed = version >= http::Version::HTTP_2;
    if let Some(authority) = uri.authority().filter(|_| !multiplexed) {
        let scheme = uri.scheme().unwrap_or(&http::uri::Scheme::HTTP);
        let known = targets
            .iter()
            .any(|t| t.scheme == *scheme && same_origin_host(&t.authority, authority, scheme));
        if !known {
            // Host and port only: user info in the URI may be a key, and is never echoed.
            let host = authority.host();
            let port = authority
                .port()
                .map(|p| format!(":{p}"))
                .unwrap_or_default();
            return Err(FallbackError::misdirected(format!(
                "the request URI names {scheme}://{host}{port}, which is no target's; each \
                 attempt goes to a target's base URL: send the path alone, relative to it \
                 (e.g. /chat/completions)"
            )));
        }
    }
    let path = uri.path();
    for target in targets {
        let Some(rest) = target.repeated_prefix(path) else {
            continue;
        };
        let rest = if rest.is_empty() { "/" } else { rest };
        return Err(FallbackError::misdirected(format!(
            "the request path {path} starts with the base path of target {} and would reach \
             it twice; paths are relative to the base URL: send {rest}",
            target.name
        )));
    }
    Ok(())
}

/// Whether `theirs` names the host and port of `ours` (a target's authority, which has no user
/// info): hosts compare without regard to case, an absent port is the scheme's default, and user
/// info in the caller's URI is not part of where the request goes.
fn same_origin_host(ours: &Authority, theirs: &Authority, scheme: &http::uri::Scheme) -> bool {
    let default = if *scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    ours.host().eq_ignore_ascii_case(theirs.host())
        && ours.port_u16().unwrap_or(default) == theirs.port_u16().unwrap_or(default)
}

/// Removes the hop-by-hop headers (with those named by `connection`) and the credential headers
/// from the caller's `headers`; returns the credentials removed, marked sensitive.
fn remove_hop_and_credentials(
    headers: &mut HeaderMap,
    credentials: &[HeaderName],
) -> Vec<(HeaderName, HeaderValue)> {
    // Headers named by `connection` are hop-by-hop too.
    let named = crate::hop::named_by_connection(headers);
    // One pass over the (few) headers present finds what to drop, rather than a hashed
    // removal for each of the dozen names that could be there. The fixed names are marked
    // in bit sets, so the usual request allocates nothing here.
    let mut dropped_fixed = 0u32;
    let mut dropped_credentials = 0u64;
    let mut dropped_other: Vec<HeaderName> = Vec::new();
    let mut caller_credentials = Vec::new();
    for (name, value) in headers.iter() {
        if let Some(i) = credentials.iter().position(|c| c == name) {
            let mut value = value.clone();
            value.set_sensitive(true);
            caller_credentials.push((name.clone(), value));
            if i < 64 {
                dropped_credentials |= 1 << i;
                continue;
            }
        } else if let Some(i) = DROPPED_HEADERS.iter().position(|d| d == name) {
            dropped_fixed |= 1 << i;
            continue;
        } else if !named.contains(name) {
            continue;
        }
        if !dropped_other.contains(name) {
            dropped_other.push(name.clone());
        }
    }
    let fixed = (0..DROPPED_HEADERS.len())
        .filter(|i| dropped_fixed & (1 << i) != 0)
        .map(|i| &DROPPED_HEADERS[i]);
    let credential = (0..credentials.len().min(64))
        .filter(|i| dropped_credentials & (1 << i) != 0)
        .map(|i| &credentials[i]);
    for name in fixed.chain(credential).chain(&dropped_other) {
        headers.remove(name);
    }
    caller_credentials
}

/// A `content-length` value in one allocation (`HeaderValue::from(usize)` takes two).
fn content_length(n: u64) -> HeaderValue {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&digits[at..]).expect("ASCII digits are a valid header value")
}

/// Where the model goes in a body.
enum BodyPlan {
    /// A JSON object: its top-level `"model"` members.
    Json(ModelSlots),
    /// `multipart/form-data`: its `model` fields.
    Multipart(ModelParts),
    /// Compressed (`content-encoding`): its model cannot be seen or replaced.
    Encoded,
    /// Anything else (empty, other types, compressed, malformed multipart): sent as it is.
    Unchanged,
}

/// Where the model goes; invalid JSON under a JSON content type is an error.
fn locate_model(headers: &HeaderMap, body: &Bytes) -> Result<BodyPlan, FallbackError> {
    if body.is_empty() {
        return Ok(BodyPlan::Unchanged);
    }
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Ok(BodyPlan::Encoded);
    }
    let essence = crate::media::essence(headers);
    if essence.is_some_and(|e| e.eq_ignore_ascii_case(b"multipart/form-data")) {
        let boundary = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(multipart::boundary);
        let parts = boundary.and_then(|b| multipart::locate(body, &b));
        return Ok(parts.map_or(BodyPlan::Unchanged, BodyPlan::Multipart));
    }
    match essence.map(crate::media::is_json) {
        Some(true) => json::locate(body)
            .map(BodyPlan::Json)
            .map_err(|e| FallbackError::invalid_json(e.to_string())),
        // No content type: substitute when the body is a JSON object, else send it unchanged.
        None => Ok(json::locate(body).map_or(BodyPlan::Unchanged, BodyPlan::Json)),
        Some(false) => Ok(BodyPlan::Unchanged),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(req: Request<&'static str>) -> Result<Prepared, FallbackError> {
        let (parts, body) = req.into_parts();
        let targets = [Target::new("http://custom.example")
            .unwrap()
            .api_key_header("x-custom-key", "k")
            .unwrap()];
        Prepared::new(
            parts,
            Bytes::from_static(body.as_bytes()),
            &credential_names(&targets),
            &targets,
        )
    }

    /// How `locate_model` tells a JSON body: by the essence of its content type.
    fn content_type_is_json(headers: &HeaderMap) -> Option<bool> {
        crate::media::essence(headers).map(crate::media::is_json)
    }

    #[test]
    fn json_content_types() {
        let ct = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            content_type_is_json(&h)
        };
        assert_eq!(ct("application/json"), Some(true));
        assert_eq!(ct("Application/JSON; charset=utf-8"), Some(true));
        assert_eq!(ct("application/merge-patch+json"), Some(true));
        assert_eq!(ct("application/VND.api+JSON"), Some(true));
        assert_eq!(ct("text/plain"), Some(false));
        assert_eq!(ct("json"), Some(false));
        assert_eq!(ct("+json"), Some(true));
        assert_eq!(ct("application/jsonp"), Some(false));
        assert_eq!(content_type_is_json(&HeaderMap::new()), None);
    }

    #[test]
    fn a_destination_is_its_host_and_port_with_the_schemes_default() {
        use http::uri::Scheme;
        let ours: Authority = "api.openai.com".parse().unwrap();
        let same = |theirs: &str, scheme: &Scheme| {
            same_origin_host(&ours, &theirs.parse().unwrap(), scheme)
        };
        assert!(same("API.OpenAI.com", &Scheme::HTTPS));
        assert!(same("api.openai.com:443", &Scheme::HTTPS));
        assert!(same("user:key@api.openai.com", &Scheme::HTTPS));
        assert!(!same("api.openai.com:8443", &Scheme::HTTPS));
        assert!(same("api.openai.com:80", &Scheme::HTTP));
        assert!(!same("api.openai.com.evil.test", &Scheme::HTTPS));
    }

    #[test]
    fn content_length_values() {
        for n in [0, 7, 10, 13, 1_048_576, u64::MAX] {
            assert_eq!(content_length(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn every_credential_name_is_removed_past_the_first_sixty_four() {
        let targets: Vec<Target> = (0..70)
            .map(|i| {
                Target::new("http://up.example")
                    .unwrap()
                    .api_key_header(format!("x-key-{i}"), "k")
                    .unwrap()
            })
            .collect();
        let names = credential_names(&targets);
        assert!(names.len() > 64);
        let mut req = Request::post("/v1/x");
        for name in &names {
            req = req.header(name, "caller").header(name, "caller-again");
        }
        let (parts, _) = req.body(()).unwrap().into_parts();
        let p = Prepared::new(parts, Bytes::new(), &names, &targets).unwrap();
        let plan = p
            .attempt(&Target::new("http://other.example").unwrap())
            .unwrap();
        for name in &names {
            assert!(
                !plan.request.headers().contains_key(name),
                "{name} was forwarded"
            );
        }
        assert_eq!(p.caller_credentials.len(), names.len() * 2);
    }

    #[test]
    fn hop_by_hop_and_credential_headers_are_removed() {
        // As a proxy's server sees an HTTP/2 request: with its own authority.
        let req = Request::post("http://gateway.local/chat/completions?x=1")
            .version(http::Version::HTTP_2)
            .header("content-type", "application/json")
            .header("authorization", "Bearer caller")
            .header("x-api-key", "caller2")
            .header("x-api-key", "caller2-again")
            .header("x-custom-key", "caller3")
            .header("proxy-authorization", "Basic x")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("te", "trailers")
            .header("host", "gateway.local")
            .header("content-length", "17")
            .header("x-keep", "yes")
            .body(r#"{"model":"a"}"#)
            .unwrap();
        let p = prepare(req).unwrap();
        let target = Target::new("https://up.example/v1")
            .unwrap()
            .with_model("b")
            .bearer("target-key")
            .unwrap();
        let plan = p.attempt(&target).unwrap();
        let h = plan.request.headers();
        assert_eq!(
            plan.request.uri(),
            "https://up.example/v1/chat/completions?x=1"
        );
        assert_eq!(h["authorization"], "Bearer target-key");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["host"], "up.example");
        assert_eq!(h["content-length"], "13");
        assert_eq!(h["x-keep"], "yes");
        for gone in [
            "x-api-key",
            "x-custom-key",
            "proxy-authorization",
            "connection",
            "x-hop",
            "te",
        ] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(plan.model.as_deref(), Some("b"));
        assert!(plan.substituted);
    }

    #[test]
    fn a_target_may_opt_in_to_the_callers_credential() {
        let req = Request::post("/v1/x")
            .header("authorization", "Bearer caller")
            .body("")
            .unwrap();
        let p = prepare(req).unwrap();
        let pass = Target::new("http://a.example")
            .unwrap()
            .forward_caller_credentials(true);
        let plan = p.attempt(&pass).unwrap();
        assert_eq!(plan.request.headers()["authorization"], "Bearer caller");
        assert!(plan.request.headers()["authorization"].is_sensitive());
        assert_eq!(plan.request.headers()["content-length"], "0");
        let own = pass.bearer("mine").unwrap();
        let plan = p.attempt(&own).unwrap();
        assert_eq!(plan.request.headers()["authorization"], "Bearer mine");
        assert_eq!(
            plan.request
                .headers()
                .get_all("authorization")
                .iter()
                .count(),
            1
        );
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_sent_unchanged() {
        let target = Target::new("http://a.example").unwrap().with_model("b");
        for req in [
            Request::post("/x").body(r#"[1]"#).unwrap(),
            Request::post("/x")
                .header("content-type", "text/plain")
                .body(r#"{"model":"a"}"#)
                .unwrap(),
            Request::post("/x")
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body("\u{1f}binary")
                .unwrap(),
            Request::get("/x").body("").unwrap(),
        ] {
            let p = prepare(req).unwrap();
            let plan = p.attempt(&target).unwrap();
            assert!(!plan.substituted);
        }
        let get = prepare(Request::get("/models").body("").unwrap()).unwrap();
        let plan = get.attempt(&target).unwrap();
        assert!(!plan.request.headers().contains_key("content-length"));
    }

    #[test]
    fn invalid_json_under_a_json_content_type_is_an_error() {
        for body in ["{", "[1,2]", "{\"model\":}"] {
            let req = Request::post("/x")
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            assert!(
                prepare(req).err().is_some_and(|e| e.is_invalid_json()),
                "{body}"
            );
        }
    }
}
