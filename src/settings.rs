//! The settings every service of one layer shares: the targets, the policy and the limits,
//! immutable once built (the layer's builder methods copy them on write).

use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::Budget;

use crate::catalog::ModelCatalog;
use crate::group::Group;
use crate::policy::Classify;
use crate::resilience::balance::{Loads, Rng};
use crate::resilience::health::Bound;
use crate::resilience::{Hedge, Retries, Stats};
use crate::target::Target;

/// The configuration every [`Fallback`](crate::Fallback) built by one layer shares.
#[derive(Clone)]
pub(crate) struct Shared {
    /// Every target, the members of each group in turn (a target on its own is a group of one).
    pub(crate) targets: Arc<[Target]>,
    /// The groups, in order; each names a range of `targets`.
    pub(crate) groups: Arc<[Group]>,
    /// For each target: its group (in `groups`) and its weight within it.
    pub(crate) group_of: Arc<[usize]>,
    pub(crate) weights: Arc<[u32]>,
    /// The members' load estimates and the random source of the choice within a group.
    pub(crate) loads: Arc<Loads>,
    pub(crate) rng: Arc<Rng>,
    /// Header names removed from the caller's request as credentials.
    pub(crate) credential_names: Arc<[http::HeaderName]>,
    pub(crate) classifier: Arc<dyn Classify>,
    pub(crate) max_body_bytes: usize,
    pub(crate) error_body_limit: usize,
    pub(crate) commit_on: crate::response::CommitPoint,
    /// A committed stream that fails ends with its format's terminal error event.
    pub(crate) stream_error_events: bool,
    /// Re-sends requests whose body is not rewritten per target to other targets.
    pub(crate) replay_unrewritable: bool,
    /// Cuts a committed body whose upstream sends nothing for this long.
    pub(crate) stream_idle_timeout: Option<Duration>,
    pub(crate) first_byte_timeout: Option<std::time::Duration>,
    /// Bounds one attempt's wait for its response head.
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) retries: Retries,
    pub(crate) health: Option<Arc<Bound>>,
    /// `name|base_url|model` for each target: how a shared health store names it.
    pub(crate) target_keys: Arc<[Box<str>]>,
    pub(crate) quota_cooldown: Duration,
    pub(crate) budget: Option<Arc<dyn Budget + Send + Sync>>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) hedge: Option<Hedge>,
    pub(crate) stats: Stats,
    pub(crate) record_stats: bool,
    pub(crate) catalog: Option<Arc<ModelCatalog>>,
}

impl Shared {
    /// The name of target `index`'s group; `None` for a target given on its own.
    pub(crate) fn group_name(&self, index: usize) -> Option<&Arc<str>> {
        let group = self.groups.get(*self.group_of.get(index)?)?;
        group.name.as_ref()
    }
}

/// How a shared health store names a target across processes: `name|base_url|model`, plus a
/// short fingerprint of its credential when it has one, so that two keys for the same provider
/// and model (two quota pools) are two targets. The fingerprint is 32 bits of FNV-1a: enough to
/// tell keys apart, too little to say anything about a key.
pub(crate) fn target_key(target: &Target) -> Box<str> {
    let mut key = format!(
        "{}|{}|{}",
        target.name,
        target.base_url(),
        target.model().unwrap_or("")
    );
    if !target.credentials.is_empty() {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, value) in &target.credentials {
            for &b in name.as_str().as_bytes().iter().chain(value.as_bytes()) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        key.push_str(&format!("|key:{:08x}", (hash >> 32) ^ (hash & 0xffff_ffff)));
    }
    key.into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_that_differ_only_by_key_have_different_shared_names() {
        let target = || {
            Target::new("https://api.example.com/v1")
                .unwrap()
                .with_model("m")
        };
        let one = target_key(&target().bearer("sk-one-secret").unwrap());
        let two = target_key(&target().bearer("sk-two-secret").unwrap());
        let one_again = target_key(&target().bearer("sk-one-secret").unwrap());
        let header = target_key(&target().api_key_header("api-key", "sk-one-secret").unwrap());
        assert_ne!(one, two);
        assert_eq!(one, one_again, "stable across builds and processes");
        assert_ne!(one, header, "the header name counts too");
        assert!(!one.contains("secret"));
        assert!(one.starts_with("api.example.com|https://api.example.com/v1|m|key:"));
        assert_eq!(
            &*target_key(&target()),
            "api.example.com|https://api.example.com/v1|m"
        );
    }
}
