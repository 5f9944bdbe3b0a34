//! The order of trial: the configured order, or, when every target is cooling down, the order in
//! which they recover. Choosing the next target asks the health store and records the targets it
//! passes over.

use std::sync::Arc;
use std::time::Duration;

use crate::report::{FallbackReport, Skip};
use crate::request::Prepared;
use crate::resilience::health::Ticket;
use crate::settings::Shared;

/// Where a request is in its order of targets.
pub(crate) struct Order {
    /// The targets to try, when not the configured order. `None`, the usual case, allocates
    /// nothing.
    order: Option<Vec<usize>>,
    /// The next position in the order.
    cursor: usize,
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

    fn at(&self, position: usize, targets: usize) -> Option<usize> {
        match &self.order {
            Some(order) => order.get(position).copied(),
            None => (position < targets).then_some(position),
        }
    }

    /// The next target the health store admits, recording in `report` (and the stats) the ones
    /// it passes over. `None` when the order is exhausted.
    pub(crate) fn choose(
        &mut self,
        shared: &Arc<Shared>,
        prepared: &Prepared,
        report: &mut FallbackReport,
    ) -> Option<Chosen> {
        while let Some(index) = self.at(self.cursor, shared.targets.len()) {
            self.cursor += 1;
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
        self.forced = true;
    }
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
        target: target.unwrap_or_else(|| Arc::from("?")),
        target_index: index,
        remaining,
        reason,
    });
}
