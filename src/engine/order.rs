//! The order of trial: the configured groups in order, a member of each chosen by
//! power-of-two-choices, or, when every target is cooling down, the order in which they recover.
//! Choosing the next target asks the health store and records the targets it passes over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::group::Group;

use crate::report::{FallbackReport, Skip};
use crate::request::Prepared;
use crate::resilience::health::Ticket;
use crate::settings::Shared;

/// Where a request is in its order of targets.
pub(crate) struct Order {
    /// The targets to try, when not the configured order. `None`, the usual case, allocates
    /// nothing.
    order: Option<Vec<usize>>,
    /// The next position in the forced order; else the current group.
    cursor: usize,
    /// The members of the current group tried or passed over, as bits from its first member.
    tried: u64,
    /// Every target was cooling down: try them without asking the health store.
    forced: bool,
}

/// A target chosen for the next call: admitted by the health store, or not asked.
pub(crate) struct Chosen {
    pub(crate) index: usize,
    pub(crate) ticket: Option<Ticket>,
}

impl Order {
    /// The order for a new request. When every target is cooling down they are tried anyway,
    /// soonest to recover first, rather than failing without a call.
    pub(crate) fn new(shared: &Shared) -> Order {
        let mut order = Order {
            order: None,
            cursor: 0,
            tried: 0,
            forced: false,
        };
        if let Some(health) = &shared.health {
            let n = shared.targets.len();
            // Usually answered by the first target, without collecting anything.
            if (0..n).all(|i| !health.cooling_for(i).is_zero()) {
                let mut all: Vec<usize> = (0..n).collect();
                all.sort_by_cached_key(|&i| health.cooling_for(i));
                order.order = Some(all);
                order.forced = true;
            }
        }
        order
    }

    /// The next target to consider: the next in the forced order, or a member of the current
    /// group not yet tried (the next group's once none is left).
    fn next(&mut self, shared: &Shared, now: Instant) -> Option<usize> {
        if let Some(order) = &self.order {
            let index = order.get(self.cursor).copied();
            self.cursor += 1;
            return index;
        }
        loop {
            let group = shared.groups.get(self.cursor)?;
            if group.len() == 1 {
                // The usual case, and today's cost: no draw, no load read.
                self.cursor += 1;
                return Some(group.start);
            }
            match pick(shared, group, self.tried, now) {
                Some(index) => {
                    self.tried |= 1 << (index - group.start);
                    return Some(index);
                }
                None => {
                    self.cursor += 1;
                    self.tried = 0;
                }
            }
        }
    }

    /// Target `index` failed in a way no other member of its group could fix (the model is
    /// missing, the context too long): the rest of its group is passed over.
    pub(crate) fn leave_group(&mut self, shared: &Shared, index: usize) {
        let Some(&group) = shared.group_of.get(index) else {
            return;
        };
        match &mut self.order {
            Some(order) => {
                let rest = order.split_off(self.cursor.min(order.len()));
                let other = |i: &usize| shared.group_of.get(*i) != Some(&group);
                order.extend(rest.into_iter().filter(other));
            }
            None if self.cursor == group => {
                self.cursor += 1;
                self.tried = 0;
            }
            None => {}
        }
    }

    /// The next target the health store admits, recording in `report` (and the stats) the ones
    /// it passes over. `None` when the order is exhausted.
    pub(crate) fn choose(
        &mut self,
        shared: &Arc<Shared>,
        prepared: &Prepared,
        report: &mut FallbackReport,
        now: Instant,
    ) -> Option<Chosen> {
        while let Some(index) = self.next(shared, now) {
            if !shared.targets.get(index).is_some_and(|t| prepared.fits(t)) {
                let recorded = report.skipped.iter().any(|s| s.target_index == index);
                if !recorded {
                    skip(shared, report, index, SkipReason::BodyNotRewritable);
                }
                continue;
            }
            let Some(health) = &shared.health else {
                return Some(Chosen {
                    index,
                    ticket: None,
                });
            };
            if self.forced {
                let ticket = Some(health.unadmitted(index));
                return Some(Chosen { index, ticket });
            }
            match health.admit(index) {
                Ok(ticket) => {
                    let ticket = Some(ticket);
                    return Some(Chosen { index, ticket });
                }
                Err(remaining) => skip(shared, report, index, SkipReason::CoolingDown(remaining)),
            }
        }
        None
    }

    /// Every target turned out to be cooling (or probed by another request) while choosing the
    /// first: the same rule as in [`Order::new`], on what the skips said.
    pub(crate) fn force_by_recovery(&mut self, report: &mut FallbackReport) {
        let mut cooling: Vec<(Duration, usize)> = Vec::new();
        report.skipped.retain(|s| {
            let cooling_down = s.reason == crate::report::SkipReason::CoolingDown;
            if cooling_down {
                cooling.push((s.remaining, s.target_index));
            }
            !cooling_down
        });
        cooling.sort();
        self.order = Some(cooling.into_iter().map(|(_, i)| i).collect());
        self.cursor = 0;
        self.tried = 0;
        self.forced = true;
    }
}

/// Power-of-two-choices among the members of `group` not in `tried`: two drawn in proportion
/// to their weights, and the one whose load per unit of weight is lower. Members cooling down
/// are left out of the draw while another is available, so that whether a request counts as a
/// fallback does not depend on the draw; once only cooling members are left they are drawn (and
/// skipped, recorded, by the health store). `None` when every member was tried.
fn pick(shared: &Shared, group: &Group, tried: u64, now: Instant) -> Option<usize> {
    let weight = |i: usize| u64::from(shared.weights.get(i).copied().unwrap_or(1));
    let bit = |i: usize| 1u64 << (i - group.start);
    // The health store is asked once per member, not once per look in each draw.
    let cooling = match &shared.health {
        Some(health) => (group.start..group.end)
            .filter(|&i| tried & bit(i) == 0 && !health.cooling_for(i).is_zero())
            .fold(0, |mask, i| mask | bit(i)),
        None => 0,
    };
    let untried = (group.start..group.end).fold(0, |mask, i| mask | bit(i)) & !tried;
    // Only cooling members left: they are drawn (and the store skips them, recorded).
    let eligible = if untried & !cooling != 0 {
        untried & !cooling
    } else {
        untried
    };
    let open = |i: &usize| eligible & bit(*i) != 0;
    let draw = |except: Option<usize>| {
        let candidates = (group.start..group.end)
            .filter(open)
            .filter(|i| Some(*i) != except);
        let total: u64 = candidates.clone().map(weight).sum();
        if total == 0 {
            return None;
        }
        let mut at = shared.rng.below(total);
        for i in candidates {
            match at.checked_sub(weight(i)) {
                Some(rest) => at = rest,
                None => return Some(i),
            }
        }
        None
    };
    let first = draw(None)?;
    let Some(second) = draw(Some(first)) else {
        return Some(first);
    };
    let cost = |i: usize| shared.loads.cost(i, now) / weight(i) as f64;
    Some(if cost(second) < cost(first) {
        second
    } else {
        first
    })
}

/// Why a target is passed over, with what the report says of it.
enum SkipReason {
    CoolingDown(Duration),
    BodyNotRewritable,
}

fn skip(shared: &Shared, report: &mut FallbackReport, index: usize, why: SkipReason) {
    let target = shared.targets.get(index).map(|t| t.name.clone());
    let name = target.as_deref().unwrap_or("?");
    let (remaining, reason) = match why {
        SkipReason::CoolingDown(remaining) => {
            tracing::debug!(
                target: "tower_model_fallback",
                target_name = name,
                remaining_ms = remaining.as_millis() as u64,
                "skipping a target that is cooling down",
            );
            if shared.record_stats {
                shared.stats.skip(index);
            }
            (remaining, crate::report::SkipReason::CoolingDown)
        }
        SkipReason::BodyNotRewritable => {
            tracing::debug!(
                target: "tower_model_fallback",
                target_name = name,
                "skipping a target with its own model: the compressed body cannot carry it",
            );
            (Duration::ZERO, crate::report::SkipReason::BodyNotRewritable)
        }
    };
    report.first_choice.get_or_insert(index);
    report.skipped.push(Skip {
        group: shared.group_name(index).cloned(),
        target: target.unwrap_or_else(|| Arc::from("?")),
        target_index: index,
        remaining,
        reason,
    });
}
