//! Errors: [`FallbackError`] for requests that end without a response, [`ConfigError`] for
//! targets and layers that cannot be built.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;

use crate::policy::ErrorKind;
use crate::report::{AttemptOutcome, FallbackReport};

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// A request that ended without a response to hand back.
///
/// Either nothing was sent (the body was over the bound, unreadable or invalid JSON), or every
/// attempt failed without a response. Its `Display` lists every attempt, one per line; the last
/// inner error is its [`source`](StdError::source); its [`report`](FallbackError::report) holds
/// the same history a response would carry.
///
/// ```
/// # fn handle(err: tower_model_fallback::FallbackError) -> u16 {
/// if err.is_body_too_large() {
///     413
/// } else if err.is_invalid_json() {
///     400
/// } else {
///     eprintln!("{err}"); // every attempt, one per line
///     502
/// }
/// # }
/// ```
pub struct FallbackError {
    inner: Box<Inner>,
}

struct Inner {
    kind: Kind,
    report: FallbackReport,
    source: Option<BoxError>,
}

#[derive(Debug)]
enum Kind {
    BodyTooLarge { limit: usize },
    BodyUnreadable,
    InvalidJson { detail: String },
    NotRewritable { encoding: String },
    Misdirected { problem: String },
    Request,
    Upstream,
    Unready,
    Deadline,
}

impl FallbackError {
    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new(Kind::BodyTooLarge { limit }, None)
    }

    pub(crate) fn body_unreadable(source: BoxError) -> Self {
        Self::new(Kind::BodyUnreadable, Some(source))
    }

    pub(crate) fn invalid_json(detail: String) -> Self {
        Self::new(Kind::InvalidJson { detail }, None)
    }

    /// Every target names a model and the body is compressed: none could be sent its own model.
    pub(crate) fn not_rewritable(encoding: String, report: FallbackReport) -> Self {
        Self::new(Kind::NotRewritable { encoding }, None).with_report(report)
    }

    /// The request's URI would send it somewhere the caller did not mean (see
    /// [`FallbackError::is_misdirected`]); `problem` names the fix.
    pub(crate) fn misdirected(problem: String) -> Self {
        Self::new(Kind::Misdirected { problem }, None)
    }

    pub(crate) fn request(source: BoxError) -> Self {
        Self::new(Kind::Request, Some(source))
    }

    pub(crate) fn upstream(source: BoxError, report: FallbackReport) -> Self {
        Self::new(Kind::Upstream, Some(source)).with_report(report)
    }

    /// The deadline ended the request; `last` is the last attempt's error, if it left one.
    pub(crate) fn deadline(last: Option<BoxError>, report: FallbackReport) -> Self {
        let source = last.unwrap_or_else(|| Box::new(tower::timeout::error::Elapsed::new()));
        Self::new(Kind::Deadline, Some(source)).with_report(report)
    }

    pub(crate) fn unready(source: BoxError, report: FallbackReport) -> Self {
        Self::new(Kind::Unready, Some(source)).with_report(report)
    }

    fn new(kind: Kind, source: Option<BoxError>) -> Self {
        FallbackError {
            inner: Box::new(Inner {
                kind,
                report: FallbackReport::default(),
                source,
            }),
        }
    }

    pub(crate) fn with_report(mut self, report: FallbackReport) -> Self {
        self.inner.report = report;
        self
    }

    /// The request body was larger than the layer's `max_body_bytes`; nothing was sent.
    pub fn is_body_too_large(&self) -> bool {
        matches!(self.inner.kind, Kind::BodyTooLarge { .. })
    }

    /// Reading the request body failed; nothing was sent. The body's error is the source.
    pub fn is_body_unreadable(&self) -> bool {
        matches!(self.inner.kind, Kind::BodyUnreadable)
    }

    /// The request declared a JSON content type but its body is not a JSON object; nothing was
    /// sent.
    pub fn is_invalid_json(&self) -> bool {
        matches!(self.inner.kind, Kind::InvalidJson { .. })
    }

    /// Nothing was sent because the request's URI would have gone somewhere the caller did not
    /// mean: its path repeats a target's base path (`/v1/chat/completions` sent to the base
    /// `https://api.openai.com/v1` would reach `/v1/v1/chat/completions`), or it is an absolute
    /// URI whose scheme and host are no target's. Paths are relative to each target's base URL,
    /// as in the OpenAI SDKs: send `/chat/completions`. The message names the fix.
    pub fn is_misdirected(&self) -> bool {
        matches!(self.inner.kind, Kind::Misdirected { .. })
    }

    /// Nothing was sent because the request could not be rebuilt for a target.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self.inner.kind, Kind::Request)
    }

    /// Nothing was sent because the body is compressed (`content-encoding`) and every target
    /// names a model: none of them could be sent a body that carries its own model. Send the body
    /// uncompressed, or decompress it in front of the layer (tower-http's
    /// `RequestDecompressionLayer`).
    pub fn is_body_not_rewritable(&self) -> bool {
        matches!(self.inner.kind, Kind::NotRewritable { .. })
    }

    /// Attempts were made and the last one failed without a response (or the inner service
    /// failed to become ready). The report lists every attempt.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self.inner.kind,
            Kind::Upstream | Kind::Unready | Kind::Deadline
        )
    }

    /// Whether the last attempt timed out, or the overall deadline passed.
    pub fn is_timeout(&self) -> bool {
        self.is_deadline() || self.last_kind() == Some(ErrorKind::Timeout)
    }

    /// Whether the overall deadline passed with no response to hand back.
    pub fn is_deadline(&self) -> bool {
        matches!(self.inner.kind, Kind::Deadline)
    }

    /// Whether the last attempt could not connect.
    pub fn is_connect(&self) -> bool {
        self.last_kind() == Some(ErrorKind::Connect)
    }

    /// Whether nothing at all was sent upstream.
    pub fn is_nothing_sent(&self) -> bool {
        self.inner.report.attempts.is_empty()
    }

    fn last_kind(&self) -> Option<ErrorKind> {
        match self.inner.report.attempts.last()?.outcome {
            AttemptOutcome::Error { kind, .. } | AttemptOutcome::BodyFailed { kind, .. } => {
                Some(kind)
            }
            AttemptOutcome::Status(_)
            | AttemptOutcome::ErrorEvent { .. }
            | AttemptOutcome::Superseded => None,
        }
    }

    /// The history of the request: every attempt made before the error.
    pub fn report(&self) -> &FallbackReport {
        &self.inner.report
    }

    /// Takes the history out.
    pub fn into_report(self) -> FallbackReport {
        self.inner.report
    }
}

impl fmt::Debug for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackError")
            .field("kind", &self.inner.kind)
            .field("attempts", &self.inner.report.attempts)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl FallbackError {
    fn with_source(&self, f: &mut fmt::Formatter<'_>, message: &str) -> fmt::Result {
        f.write_str(message)?;
        match &self.inner.source {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.kind {
            Kind::BodyTooLarge { limit } => write!(
                f,
                "request body is larger than the limit of {limit} bytes; nothing was sent"
            ),
            Kind::BodyUnreadable => {
                self.with_source(f, "reading the request body failed; nothing was sent")
            }
            Kind::InvalidJson { detail } => write!(
                f,
                "request body is not a valid JSON object ({detail}); nothing was sent"
            ),
            Kind::NotRewritable { encoding } => write!(
                f,
                "the request body is compressed ({encoding}) and every target names its own \
                 model, which a compressed body cannot carry; nothing was sent (send it \
                 uncompressed)"
            ),
            Kind::Misdirected { problem } => write!(f, "{problem}; nothing was sent"),
            Kind::Request => self.with_source(f, "the request could not be rebuilt for a target"),
            Kind::Upstream if self.inner.report.attempts.is_empty() => {
                self.with_source(f, "the inner service failed before any attempt")
            }
            Kind::Deadline => {
                let n = self.inner.report.attempts.len();
                write!(
                    f,
                    "the overall deadline passed after {n} attempt{}:",
                    if n == 1 { "" } else { "s" }
                )?;
                for (i, a) in self.inner.report.attempts.iter().enumerate() {
                    write!(f, "\n  {}. {a}", i + 1)?;
                }
                Ok(())
            }
            Kind::Unready => {
                let next = self.inner.report.attempts.len() + 1;
                self.with_source(
                    f,
                    &format!("the inner service failed while getting ready for attempt {next}"),
                )?;
                for (i, a) in self.inner.report.attempts.iter().enumerate() {
                    write!(f, "\n  {}. {a}", i + 1)?;
                }
                Ok(())
            }
            Kind::Upstream => {
                let n = self.inner.report.attempts.len();
                let why = match self.inner.report.stop {
                    Some(crate::report::StopReason::Exhausted) => ", every target failed",
                    Some(crate::report::StopReason::RetryBudget) => ", the retry budget is spent",
                    Some(crate::report::StopReason::Deadline) => ", the overall deadline passed",
                    Some(crate::report::StopReason::Unready) => {
                        ", the inner service failed to get ready"
                    }
                    _ => "",
                };
                write!(
                    f,
                    "no response after {n} attempt{}{why}:",
                    if n == 1 { "" } else { "s" }
                )?;
                for (i, a) in self.inner.report.attempts.iter().enumerate() {
                    write!(f, "\n  {}. {a}", i + 1)?;
                }
                Ok(())
            }
        }
    }
}

impl StdError for FallbackError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A target or layer that cannot be built; its `Display` names the field and the problem
/// (`base_url: "api.openai.com/v1" is a relative URL; …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: Cow<'static, str>,
    problem: String,
}

impl ConfigError {
    /// An error for `field`, saying what is wrong with it.
    pub fn new(field: impl Into<Cow<'static, str>>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Prefixes the field with its place, e.g. `targets[1]`.
    pub fn within(mut self, place: impl fmt::Display) -> Self {
        self.field = Cow::Owned(format!("{place}.{}", self.field));
        self
    }

    /// The field at fault, e.g. `base_url` or `targets[1].base_url`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl StdError for ConfigError {}

/// An error's message followed by its sources' (those that add something).
pub(crate) fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !message.contains(&next) {
            message.push_str(": ");
            message.push_str(&next);
        }
        source = e.source();
    }
    message
}
