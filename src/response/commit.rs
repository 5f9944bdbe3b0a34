//! [`CommitPoint`]: where the layer stops being able to try another target for a success.

use serde::Deserialize;

/// Where the layer commits to a successful response: until then a failure still moves on to
/// the next target, after it the response is the caller's (set with
/// [`FallbackLayer::commit_on`](crate::FallbackLayer::commit_on), or `"commit_on"` in a
/// config file: `"first_content"`, `"first_event"`, `"head"`).
///
/// Whatever is held before the commit point is bounded: 64 KiB, and the
/// [first-byte timeout](crate::FallbackLayer::first_byte_timeout). A stream reaching either
/// bound with only preamble read commits there (a slow model is not cut); one that fails or
/// ends first is dropped, preamble and all, and the next target's stream starts clean.
///
/// ```
/// use tower_model_fallback::{CommitPoint, FallbackLayer, Target};
///
/// # fn main() -> Result<(), tower_model_fallback::ConfigError> {
/// let layer = FallbackLayer::new([Target::new("https://api.openai.com/v1")?])?
///     .commit_on(CommitPoint::FirstEvent);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CommitPoint {
    /// The default. A `text/event-stream` commits at its first event that carries content: a
    /// chat chunk with non-empty `delta.content`, `delta.tool_calls` or `delta.refusal` (or a
    /// `finish_reason`, or `usage`), a Responses output event (`response.output_text.delta`, …),
    /// an Anthropic `content_block_delta`, or any event not recognised as preamble. Preamble
    /// events (a role-only delta, `response.created` / `response.in_progress`,
    /// `message_start` / `content_block_start` / `ping`) are held. Other bodies commit at their
    /// first chunk.
    #[default]
    FirstContent,
    /// A `text/event-stream` commits at its first complete event, whatever it is; other bodies
    /// at their first chunk.
    FirstEvent,
    /// Commit as soon as the head arrives: nothing is read ahead, and a body that fails at once
    /// is the caller's.
    Head,
}
