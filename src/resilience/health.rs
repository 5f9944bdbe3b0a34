//! Cooldowns: a circuit breaker per target, shared by every clone of the service, behind a small
//! trait ([`HealthStore`]) so that a store shared by several processes can be plugged in.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Which target a [`HealthStore`] is asked about: its position in the layer's list and a key
/// that names it across processes (`name|base_url|model`, and `|key:` with a 32-bit fingerprint
/// of its credential when it has one).
#[derive(Debug, Clone, Copy)]
pub struct TargetId<'a> {
    /// The target's position in the layer's list.
    pub index: usize,
    /// A stable key for the target.
    pub key: &'a str,
}

/// Whether an attempt on a target may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The target is healthy.
    Open,
    /// The target's cooldown has ended and this attempt is its one probe: its outcome closes the
    /// breaker (success) or starts a new cooldown (failure).
    Probe,
    /// The target is cooling down for this much longer (zero while another request probes it).
    Cooling(Duration),
}

/// What an attempt on a target showed about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthOutcome {
    /// It answered well.
    Success,
    /// It failed in a way that is its own (rate limit, overload, 5xx, transport, missing model).
    /// `at_least` is a cooldown the target asked for (`Retry-After`) or earned (exhausted quota).
    Failure {
        /// The shortest cooldown this failure calls for, whatever the failure count.
        at_least: Option<Duration>,
    },
    /// Nothing learned: the caller's own mistake, or an attempt dropped before its outcome.
    Neutral,
}

/// The cooldown state of every target of a layer, shared by all its clones.
///
/// [`Cooldowns`] is the in-memory implementation. An implementation shared between processes
/// must keep the two rules: a cooldown is only ever extended, never shortened, by a later failure;
/// and after a cooldown, one attempt (the probe) is admitted until its outcome is recorded.
pub trait HealthStore: Send + Sync + 'static {
    /// Called right before an attempt on `target`. Every admitted attempt (`Open` or `Probe`) is
    /// followed by exactly one [`record`](HealthStore::record).
    fn admit(&self, target: TargetId<'_>) -> Admission;

    /// How long `target` still cools down (zero when it is available), without side effects.
    fn cooling_for(&self, target: TargetId<'_>) -> Duration;

    /// The outcome of an attempt on `target`. `probe` tells whether the attempt was the one
    /// [`Admission::Probe`] admitted: only its record ends the probe. Attempts the store did not
    /// admit (made because every target was cooling down, or a same-target retry after the wait
    /// the target asked for) are recorded too, never as the probe.
    fn record(&self, target: TargetId<'_>, outcome: HealthOutcome, probe: bool);

    /// Called once when a layer takes the store, with every target it will ask about. A store
    /// shared between processes names the targets by their keys there. Does nothing by default.
    fn bind(&mut self, targets: &[TargetId<'_>]) {
        let _ = targets;
    }
}

/// A health store bound to a layer's targets: what every attempt's [`Ticket`] reports to.
pub(crate) struct Bound {
    store: Box<dyn HealthStore>,
    keys: Arc<[Box<str>]>,
    /// The store, when it is the layer's in-memory [`Cooldowns`]: a config reload can share
    /// its state.
    memory: Option<Arc<Cooldowns>>,
}

/// In-memory cooldowns shared by two layers' stores (the old and the new config's).
struct SharedCooldowns(Arc<Cooldowns>);

impl HealthStore for SharedCooldowns {
    fn admit(&self, target: TargetId<'_>) -> Admission {
        self.0.admit(target)
    }

    fn cooling_for(&self, target: TargetId<'_>) -> Duration {
        self.0.cooling_for(target)
    }

    fn record(&self, target: TargetId<'_>, outcome: HealthOutcome, probe: bool) {
        self.0.record(target, outcome, probe)
    }
}

impl Bound {
    pub(crate) fn new(store: Box<dyn HealthStore>, keys: Arc<[Box<str>]>) -> Self {
        Bound {
            store,
            keys,
            memory: None,
        }
    }

    /// Bound to in-memory cooldowns.
    pub(crate) fn in_memory(cooldowns: Cooldowns, keys: Arc<[Box<str>]>) -> Self {
        let memory = Arc::new(cooldowns);
        Bound {
            store: Box::new(SharedCooldowns(memory.clone())),
            keys,
            memory: Some(memory),
        }
    }

    /// This store, its in-memory state shared with `previous`'s for each target `j` with
    /// `same[j] == Some(i)`; `None` unless both are in memory (a shared store keeps its state
    /// by itself).
    pub(crate) fn carried_from(&self, previous: &Bound, same: &[Option<usize>]) -> Option<Bound> {
        let (mine, theirs) = (self.memory.as_ref()?, previous.memory.as_ref()?);
        let targets = mine
            .targets
            .iter()
            .zip(same.iter().chain(std::iter::repeat(&None)))
            .map(|(slot, same)| {
                same.and_then(|i| theirs.targets.get(i))
                    .unwrap_or(slot)
                    .clone()
            })
            .collect();
        let cooldowns = Cooldowns {
            settings: mine.settings,
            targets,
        };
        Some(Bound::in_memory(cooldowns, self.keys.clone()))
    }

    fn id(&self, index: usize) -> Option<TargetId<'_>> {
        let key = self.keys.get(index)?;
        Some(TargetId { index, key })
    }

    /// How long target `index` still cools down, without side effects.
    pub(crate) fn cooling_for(&self, index: usize) -> Duration {
        self.id(index)
            .map_or(Duration::ZERO, |id| self.store.cooling_for(id))
    }

    /// Asks whether target `index` may be tried now: its ticket, or how long it still cools.
    pub(crate) fn admit(self: &Arc<Self>, index: usize) -> Result<Ticket, Duration> {
        let admission = self
            .id(index)
            .map_or(Admission::Open, |id| self.store.admit(id));
        match admission {
            Admission::Open => Ok(self.ticket(index, true, false)),
            Admission::Probe => Ok(self.ticket(index, true, true)),
            Admission::Cooling(remaining) => Err(remaining),
        }
    }

    /// A ticket for an attempt the store is not asked about (every target was cooling, or a
    /// same-target retry after the wait the target asked for): its outcome is still told.
    pub(crate) fn unadmitted(self: &Arc<Self>, index: usize) -> Ticket {
        self.ticket(index, false, false)
    }

    fn ticket(self: &Arc<Self>, index: usize, admitted: bool, probe: bool) -> Ticket {
        Ticket {
            bound: self.clone(),
            index,
            admitted,
            probe,
            settled: false,
        }
    }
}

/// One attempt's standing with the health store. The store expects exactly one record for
/// every admission: [`Ticket::record`] gives it the outcome, and a ticket dropped unrecorded
/// (the attempt was cancelled, superseded, or never sent) gives the admission back as
/// [`HealthOutcome::Neutral`], so a probe can never be leaked.
pub(crate) struct Ticket {
    bound: Arc<Bound>,
    index: usize,
    admitted: bool,
    probe: bool,
    settled: bool,
}

impl Ticket {
    /// Tells the store what the attempt showed. Attempts the store did not admit count too,
    /// but never as a probe, and a neutral outcome of theirs is not news.
    pub(crate) fn record(mut self, outcome: HealthOutcome) {
        self.settled = true;
        if self.admitted || outcome != HealthOutcome::Neutral {
            self.tell(outcome);
        }
    }

    fn tell(&self, outcome: HealthOutcome) {
        if let Some(id) = self.bound.id(self.index) {
            self.bound.store.record(id, outcome, self.probe);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled && self.admitted {
            self.tell(HealthOutcome::Neutral);
        }
    }
}

/// In-memory cooldowns: after `failures` failures within `window`, or a failure that asks for a
/// cooldown (`Retry-After` on a 429 or 503, an exhausted quota), a target is skipped for
/// `cooldown` (or longer, when asked); then one probe goes through, and its success closes the
/// breaker. A failure while cooling (or of the probe) extends the cooldown, never shortens it.
///
/// ```
/// use std::time::Duration;
/// use tower_model_fallback::Cooldowns;
///
/// let cooldowns = Cooldowns::new()
///     .failures(3)
///     .window(Duration::from_secs(60))
///     .cooldown(Duration::from_secs(30))
///     .quota_cooldown(Duration::from_secs(15 * 60));
/// # let _ = cooldowns;
/// ```
pub struct Cooldowns {
    settings: CooldownSettings,
    /// One slot per target; an `Arc` so that a config reload can hand a target's slot on.
    targets: Vec<Arc<Mutex<TargetHealth>>>,
}

/// The tunables of [`Cooldowns`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct CooldownSettings {
    pub(crate) failures: u32,
    pub(crate) window: Duration,
    pub(crate) cooldown: Duration,
    pub(crate) quota_cooldown: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct TargetHealth {
    failures: u32,
    first_failure: Option<Instant>,
    open_until: Option<Instant>,
    probing: bool,
}

impl Default for Cooldowns {
    fn default() -> Self {
        Cooldowns::new()
    }
}

impl fmt::Debug for Cooldowns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cooldowns")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Cooldowns {
    /// Defaults: 3 failures within 60 s open the breaker for 30 s; an exhausted quota
    /// (`insufficient_quota`) for 15 minutes.
    pub fn new() -> Self {
        Cooldowns {
            settings: CooldownSettings {
                failures: 3,
                window: Duration::from_secs(60),
                cooldown: Duration::from_secs(30),
                quota_cooldown: Duration::from_secs(15 * 60),
            },
            targets: Vec::new(),
        }
    }

    /// Consecutive failures (within the window) that open the breaker (at least 1).
    pub fn failures(mut self, n: u32) -> Self {
        self.settings.failures = n.max(1);
        self
    }

    /// The window in which failures are counted.
    pub fn window(mut self, window: Duration) -> Self {
        self.settings.window = window;
        self
    }

    /// How long an open breaker skips the target.
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.settings.cooldown = cooldown;
        self
    }

    /// How long a target that answered 429 `insufficient_quota` is skipped.
    pub fn quota_cooldown(mut self, cooldown: Duration) -> Self {
        self.settings.quota_cooldown = cooldown;
        self
    }

    pub(crate) fn settings(&self) -> CooldownSettings {
        self.settings
    }

    /// The same tunables, with no state.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn clone_settings(&self) -> Self {
        Cooldowns {
            settings: self.settings,
            targets: Vec::new(),
        }
    }

    /// Whether target `index` has a cooldown on record (running, or ended and not yet closed
    /// by a successful probe).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_open(&self, index: usize) -> bool {
        self.with(index, |s, _| s.open_until.is_some())
            .unwrap_or(false)
    }

    /// Whether target `index` has no failure on record and no cooldown.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn is_clean(&self, index: usize) -> bool {
        self.with(index, |s, _| s.failures == 0 && s.open_until.is_none())
            .unwrap_or(true)
    }

    /// Whether target `index`'s cooldown has ended and no probe has closed it yet.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn awaits_probe(&self, index: usize) -> bool {
        self.with(index, |s, now| s.open_until.is_some_and(|u| now >= u))
            .unwrap_or(false)
    }

    /// Closes target `index`'s breaker: a probe elsewhere succeeded.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn close(&self, index: usize) {
        self.with(index, |s, _| *s = TargetHealth::default());
    }

    /// Extends the cooldown of target `index` to at least `left` from now (a cooldown learnt
    /// elsewhere); never shortens it, and leaves the failure count and probe alone.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn extend_cooldown(&self, index: usize, left: Duration) {
        self.with(index, |s, now| {
            let until = Instant::from_std(super::later(now.into_std(), left));
            s.open_until = Some(s.open_until.map_or(until, |u| u.max(until)));
        });
    }

    /// Sized for `targets` targets (the layer does this when it is built).
    pub(crate) fn for_targets(mut self, targets: usize) -> Self {
        self.targets = (0..targets).map(|_| Arc::default()).collect();
        self
    }

    fn with<T>(&self, index: usize, f: impl FnOnce(&mut TargetHealth, Instant) -> T) -> Option<T> {
        let slot = self.targets.get(index)?;
        // A poisoned lock only means another thread panicked mid-update; the state is still a
        // valid value, so keep using it.
        let mut state = slot.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut state, Instant::now()))
    }
}

impl HealthStore for Cooldowns {
    fn admit(&self, target: TargetId<'_>) -> Admission {
        self.with(target.index, |s, now| match s.open_until {
            None => Admission::Open,
            Some(until) if now < until => Admission::Cooling(until - now),
            Some(_) if s.probing => Admission::Cooling(Duration::ZERO),
            Some(_) => {
                s.probing = true;
                Admission::Probe
            }
        })
        .unwrap_or(Admission::Open)
    }

    fn cooling_for(&self, target: TargetId<'_>) -> Duration {
        self.with(target.index, |s, now| {
            s.open_until
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
        })
        .unwrap_or(Duration::ZERO)
    }

    fn record(&self, target: TargetId<'_>, outcome: HealthOutcome, probe: bool) {
        let settings = self.settings;
        self.with(target.index, |s, now| match outcome {
            HealthOutcome::Success => *s = TargetHealth::default(),
            HealthOutcome::Neutral => {
                if probe {
                    s.probing = false;
                }
            }
            HealthOutcome::Failure { at_least } => {
                let in_window = s
                    .first_failure
                    .is_some_and(|first| now.saturating_duration_since(first) <= settings.window);
                if !in_window {
                    s.failures = 0;
                    s.first_failure = Some(now);
                }
                s.failures = s.failures.saturating_add(1);
                let mut until = s.open_until;
                let mut extend = |d: Duration| {
                    let candidate = Instant::from_std(super::later(now.into_std(), d));
                    until = Some(until.map_or(candidate, |u| u.max(candidate)));
                };
                if let Some(d) = at_least {
                    extend(d);
                }
                // Reaching the threshold opens the breaker; a failure while open (a probe, or an
                // attempt made because every target was cooling) extends it.
                if s.failures >= settings.failures || s.open_until.is_some() {
                    extend(settings.cooldown);
                }
                s.open_until = until;
                if probe {
                    s.probing = false;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: usize) -> TargetId<'static> {
        TargetId { index, key: "t" }
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_after_n_failures_then_admits_one_probe() {
        let c = Cooldowns::new()
            .failures(2)
            .cooldown(Duration::from_secs(30))
            .for_targets(1);
        let fail = HealthOutcome::Failure { at_least: None };
        c.record(id(0), fail, false);
        assert_eq!(c.admit(id(0)), Admission::Open);
        c.record(id(0), fail, false);
        assert_eq!(c.admit(id(0)), Admission::Cooling(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(c.admit(id(0)), Admission::Probe);
        assert_eq!(
            c.admit(id(0)),
            Admission::Cooling(Duration::ZERO),
            "one probe at a time"
        );
        c.record(id(0), HealthOutcome::Success, false);
        assert_eq!(c.admit(id(0)), Admission::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_carried_over_target_shares_its_cooldown_and_a_new_one_starts_clean() {
        let keys: Arc<[Box<str>]> = Arc::from(vec![Box::from("a"), Box::from("b")]);
        let fail = HealthOutcome::Failure {
            at_least: Some(Duration::from_secs(30)),
        };
        let old = Bound::in_memory(Cooldowns::new().for_targets(2), keys.clone());
        old.store.record(id(1), fail, false);
        // The new config: `b` first (it was old target 1), then a new target.
        let new = Bound::in_memory(Cooldowns::new().for_targets(2), keys.clone())
            .carried_from(&old, &[Some(1), None])
            .unwrap();
        assert_eq!(new.cooling_for(0), Duration::from_secs(30));
        assert_eq!(new.cooling_for(1), Duration::ZERO);
        // A request still in flight on the old config reports to the same place.
        old.store.record(id(1), HealthOutcome::Success, false);
        assert_eq!(new.cooling_for(0), Duration::ZERO);
        let shared = Bound::new(Box::new(Cooldowns::new().for_targets(2)), keys);
        assert!(shared.carried_from(&old, &[Some(1), None]).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_shorter_cooldown_never_shortens_a_longer_one() {
        let c = Cooldowns::new()
            .cooldown(Duration::from_secs(5))
            .for_targets(1);
        c.record(
            id(0),
            HealthOutcome::Failure {
                at_least: Some(Duration::from_secs(120)),
            },
            false,
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        c.record(
            id(0),
            HealthOutcome::Failure {
                at_least: Some(Duration::from_secs(1)),
            },
            false,
        );
        assert_eq!(c.cooling_for(id(0)), Duration::from_secs(110));
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_cooldown_does_not_overflow() {
        let c = Cooldowns::new()
            .failures(1)
            .cooldown(Duration::MAX)
            .for_targets(1);
        c.record(
            id(0),
            HealthOutcome::Failure {
                at_least: Some(Duration::MAX),
            },
            false,
        );
        assert!(matches!(c.admit(id(0)), Admission::Cooling(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_start_a_new_count() {
        let c = Cooldowns::new()
            .failures(2)
            .window(Duration::from_secs(10))
            .for_targets(1);
        c.record(id(0), HealthOutcome::Failure { at_least: None }, false);
        tokio::time::advance(Duration::from_secs(11)).await;
        c.record(id(0), HealthOutcome::Failure { at_least: None }, false);
        assert_eq!(c.admit(id(0)), Admission::Open);
    }
}
