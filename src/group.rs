//! Target groups: several equivalent deployments of one model (keys, regions, providers serving
//! the same open model), balanced within the group; the layer falls back to the next group only
//! when the whole group fails.

use std::sync::Arc;

use crate::error::ConfigError;
use crate::target::Target;

/// The most members a group may have.
pub const MAX_GROUP_MEMBERS: usize = 64;

/// Several equivalent targets, one entry of a layer's list. A [`Target`] on its own is a group
/// of one (`TargetGroup::from(target)`), so a layer's list can mix both.
///
/// Within a group each request picks a member by power-of-two-choices: two members drawn at
/// random (in proportion to their weights) and the one with the lower load wins, the load being
/// a peak-EWMA of its attempt latency times its attempts in flight, divided by its weight.
/// Members that are cooling down are skipped. A failure another member could fix (429, 5xx,
/// 408, 409, a timeout or connection error) sends the next try to another member, each member
/// at most once per request; a model-specific one (404 `model_not_found`, an opted-in context
/// length error) moves to the next group at once.
///
/// ```
/// use tower_model_fallback::{FallbackLayer, Target, TargetGroup};
///
/// # fn main() -> Result<(), tower_model_fallback::ConfigError> {
/// let key = |n: &str| Target::new("https://api.openai.com/v1").map(|t| t.with_name(n).with_model("gpt-4o-mini"));
/// let openai = TargetGroup::new("openai")
///     .member(key("key-1")?.bearer("sk-1")?)
///     .weighted(key("key-2")?.bearer("sk-2")?, 2);
/// let layer = FallbackLayer::new([
///     openai,
///     Target::new("https://api.cometapi.com/v1")?.with_model("gpt-4o-mini").into(),
/// ])?;
/// assert_eq!(layer.targets().len(), 3); // every member, in order
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TargetGroup {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) members: Vec<(Target, u32)>,
}

impl TargetGroup {
    /// An empty group named `name` (the name the report and the stats give it).
    pub fn new(name: impl Into<String>) -> Self {
        TargetGroup {
            name: Some(Arc::from(name.into())),
            members: Vec::new(),
        }
    }

    /// Adds a member of weight 1.
    pub fn member(self, target: Target) -> Self {
        self.weighted(target, 1)
    }

    /// Adds a member of weight `weight`: its relative capacity. A member of weight 2 is drawn
    /// twice as often and may carry twice the load of a member of weight 1 before it loses the
    /// choice. A weight of 0 is an error when the layer is built.
    pub fn weighted(mut self, target: Target, weight: u32) -> Self {
        self.members.push((target, weight));
        self
    }

    /// The group's name; `None` for a target on its own.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The members, in order.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.members.iter().map(|(t, _)| t)
    }
}

impl From<Target> for TargetGroup {
    fn from(target: Target) -> Self {
        TargetGroup {
            name: None,
            members: vec![(target, 1)],
        }
    }
}

/// A group as the layer keeps it: its members are the flat targets `start..end`.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl Group {
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }
}

/// The flat list of targets, each member's weight and group, and the groups.
pub(crate) struct Flattened {
    pub(crate) targets: Vec<Target>,
    pub(crate) weights: Vec<u32>,
    pub(crate) group_of: Vec<usize>,
    pub(crate) groups: Vec<Group>,
}

/// Flattens `entries`, checking that every group has between 1 and [`MAX_GROUP_MEMBERS`]
/// members and no weight is 0. Errors name the entry (`targets[1].members[0].weight`).
pub(crate) fn flatten(
    entries: impl IntoIterator<Item = TargetGroup>,
) -> Result<Flattened, ConfigError> {
    let mut flat = Flattened {
        targets: Vec::new(),
        weights: Vec::new(),
        group_of: Vec::new(),
        groups: Vec::new(),
    };
    for (g, entry) in entries.into_iter().enumerate() {
        let place = format!("targets[{g}]");
        if entry.members.is_empty() {
            return Err(
                ConfigError::new("members", "a group needs at least one member").within(place),
            );
        }
        if entry.members.len() > MAX_GROUP_MEMBERS {
            let problem = format!("a group has at most {MAX_GROUP_MEMBERS} members");
            return Err(ConfigError::new("members", problem).within(place));
        }
        let start = flat.targets.len();
        for (m, (target, weight)) in entry.members.into_iter().enumerate() {
            if weight == 0 {
                let field = format!("members[{m}].weight");
                return Err(ConfigError::new(field, "must be at least 1").within(place));
            }
            flat.targets.push(target);
            flat.weights.push(weight);
            flat.group_of.push(g);
        }
        let end = flat.targets.len();
        let name = entry.name;
        flat.groups.push(Group { name, start, end });
    }
    Ok(flat)
}
