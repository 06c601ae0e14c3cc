//! [`Balancing`]: one cache's registry of instance health, and [`Outliers`]: its settings,
//! ejected count and metric handles.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{Health, HealthSlot, OutlierEjection, duration_nanos, instant_of, stamp_after};
use crate::balance::slow_start::SlowStart;
use crate::instance::Instance;

/// What one cache's balancing shares across snapshots: its [`Outliers`] and the registry of
/// instance health.
#[derive(Debug)]
pub(crate) struct Balancing {
    outliers: Arc<Outliers>,
    /// The health of every instance that has some, by instance id, and the newest snapshot's
    /// instances and health slots: one lock, so health made on a report lands in the newest
    /// slots too, never in a registry that a snapshot built a moment earlier does not show.
    registry: Mutex<Registry>,
}

/// A sweep taken by [`Outliers::sweep_due`]: when it was due, in nanoseconds after the
/// cache's clock origin.
#[derive(Debug, Clone, Copy)]
#[must_use = "a sweep taken must run or be given back"]
pub(crate) struct SweepDue(u64);

/// See [`Balancing::registry`].
#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<Arc<str>, Arc<Health>>,
    newest: Option<Newest>,
}

/// The newest snapshot's instances and their health slots.
type Newest = (Arc<[Arc<Instance>]>, Arc<[HealthSlot]>);

impl std::ops::Deref for Balancing {
    type Target = Outliers;

    fn deref(&self) -> &Outliers {
        &self.outliers
    }
}

/// Settings, the ejected count and metric handles of one cache: what each instance's health
/// refers to (not the registry, which refers to the health: no cycle).
#[derive(Debug)]
pub(crate) struct Outliers {
    pub(crate) service: Arc<str>,
    pub(crate) ejection: OutlierEjection,
    pub(crate) slow_start: Option<SlowStart>,
    /// Instances ejected right now (an expired ejection counts until it is noticed, by a look
    /// at the instance or by a sweep: see [`sweep_if_due`](Self::sweep_if_due)).
    ejected: AtomicU32,
    /// Bumped (wrapping) after every change of an instance's ejection: an ejection, its end, its
    /// lift. A selection's tables keep the count of their own ejected instances until it moves
    /// (see [`ejection_epoch`](Self::ejection_epoch)).
    epoch: AtomicU32,
    /// How many instances of the newest published snapshot are up: what the max ejected share
    /// is a share of, whichever snapshot or selection a failure is reported through.
    up: AtomicUsize,
    /// The clock origin of `sweep_at` and of every stamp of this cache's instance health.
    origin: Instant,
    /// When some ejection may have ended, in nanoseconds after `origin` (`u64::MAX`: none):
    /// at or before the end of every ejection, so the first clock read past it sweeps the
    /// expired ones out of the count.
    sweep_at: AtomicU64,
    pub(super) metrics: Metrics,
    /// The balancing this belongs to, where a sweep finds every instance's health. Weak: the
    /// balancing holds this, and its health refers to this.
    balancing: Weak<Balancing>,
    /// Wakes the [sweep timer](super::sweeper) when `sweep_at` moves earlier.
    sweep_moved: Notify,
}

/// Metric handles registered once per cache, so that reporting never allocates.
#[derive(Debug)]
pub(super) struct Metrics {
    pub(super) success: metrics::Counter,
    pub(super) failure: metrics::Counter,
    pub(super) dropped: metrics::Counter,
    pub(super) ejections: metrics::Counter,
    pub(super) ejected: metrics::Gauge,
}

impl Balancing {
    /// A registry whose clock starts now.
    pub(crate) fn new(
        service: Arc<str>,
        ejection: OutlierEjection,
        slow_start: Option<SlowStart>,
    ) -> Arc<Self> {
        Self::new_at(service, ejection, slow_start, crate::balance::now())
    }

    /// A registry whose clock starts at `origin` (times are kept as offsets from it); the sync
    /// machine passes the time it was given, and reads no clock.
    pub(crate) fn new_at(
        service: Arc<str>,
        ejection: OutlierEjection,
        slow_start: Option<SlowStart>,
        origin: std::time::Instant,
    ) -> Arc<Self> {
        let label = service.to_string();
        let picks = |outcome: &'static str| metrics::counter!(crate::metrics::PICKS, "service" => label.clone(), "outcome" => outcome);
        let metrics = Metrics {
            success: picks("success"),
            failure: picks("failure"),
            dropped: picks("dropped"),
            ejections: metrics::counter!(crate::metrics::EJECTIONS, "service" => label.clone()),
            ejected: metrics::gauge!(crate::metrics::EJECTED, "service" => label),
        };
        Arc::new_cyclic(|balancing| Self {
            outliers: Arc::new(Outliers {
                service,
                ejection,
                slow_start,
                ejected: AtomicU32::new(0),
                epoch: AtomicU32::new(0),
                up: AtomicUsize::new(0),
                origin,
                sweep_at: AtomicU64::new(u64::MAX),
                metrics,
                balancing: balancing.clone(),
                sweep_moved: Notify::new(),
            }),
            registry: Mutex::new(Registry::default()),
        })
    }

    /// The settings, ejected count and metric handles every health of this cache refers to.
    pub(crate) fn outliers(&self) -> Arc<Outliers> {
        self.outliers.clone()
    }

    /// The health of `instance`, made now if it has none (an adult: it does not warm up).
    ///
    /// Made health goes into the registry and into the newest snapshot's slot of the instance,
    /// under one lock, so no snapshot published since shows the instance without it. An
    /// instance the newest snapshot no longer holds (etcd removed it; a call to it was still
    /// in flight) gets health of its own, benched: it can be reported on, never ejected.
    pub(crate) fn health_of(&self, instance: &Instance, now: Instant) -> Arc<Health> {
        let mut guard = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let Registry { by_id, newest } = &mut *guard;
        if let Some(health) = by_id.get(instance.id()) {
            return health.clone();
        }
        let health = Arc::new(Health::new(self.outliers.clone(), now, true));
        let newest_slot = newest.as_ref().and_then(|(instances, slots)| {
            let at = instances.iter().position(|i| i.id() == instance.id())?;
            Some((slots.get(at)?, instances.get(at)?.is_up()))
        });
        match newest_slot {
            Some((slot, up)) => {
                health.bench(!up);
                // Empty: a pick fills a slot only through this registry, which had no entry.
                let _ = slot.set(health.clone());
                by_id.insert(instance.id().into(), health.clone());
            }
            None => health.bench(true),
        }
        health
    }

    /// The health slots of a new snapshot of `instances`, filled from the registry; the
    /// registry drops (and releases the ejection of) every instance no longer there. With slow
    /// start on, every instance gets health now, and those first seen after the first list
    /// (`first_list` false) warm up from `now`.
    pub(crate) fn slots(
        &self,
        instances: &Arc<[Arc<Instance>]>,
        now: Instant,
        first_list: bool,
    ) -> Arc<[HealthSlot]> {
        let mut guard = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let registry = &mut *guard;
        let up = instances.iter().filter(|i| i.is_up()).count();
        self.outliers.up.store(up, Ordering::Relaxed);
        if registry.by_id.is_empty() && self.slow_start.is_none() {
            let slots: Arc<[HealthSlot]> = instances.iter().map(|_| HealthSlot::new()).collect();
            registry.newest = Some((instances.clone(), slots.clone()));
            return slots;
        }
        let slots: Arc<[HealthSlot]> = instances
            .iter()
            .map(|instance| {
                let health = match registry.by_id.get(instance.id()) {
                    Some(health) => Some(health.clone()),
                    None if self.slow_start.is_some() => {
                        let health = Arc::new(Health::new(self.outliers.clone(), now, first_list));
                        registry.by_id.insert(instance.id().into(), health.clone());
                        Some(health)
                    }
                    None => None,
                };
                // A draining instance is out of the instances up, the ones the max ejected share
                // and the panic threshold count: an ejection of it (which no pick would notice
                // over, since none picks it) would hold a slot for nothing.
                if let Some(health) = &health {
                    health.bench(!instance.is_up());
                }
                health.map_or_else(HealthSlot::new, HealthSlot::from)
            })
            .collect();
        let present: HashSet<&str> = instances.iter().map(|i| i.id()).collect();
        registry.by_id.retain(|id, health| {
            let keep = present.contains(&**id);
            if !keep {
                // For good: calls still in flight to it may report, but not eject it.
                health.bench(true);
            }
            keep
        });
        registry.newest = Some((instances.clone(), slots.clone()));
        slots
    }

    /// Notices every ejection that has ended by `now` (the instance goes on probation and gives
    /// its slot back) and sets the next sweep at the earliest end of those still running. Over
    /// the registry, under its lock: for reports, which may wait for it (they make health on
    /// first need under it too).
    fn sweep(&self, now: Instant) {
        Self::sweep_registry(
            &self.registry.lock().unwrap_or_else(PoisonError::into_inner),
            now,
        );
    }

    /// [`sweep`](Self::sweep) for a pick, which must not wait: `false` (nothing swept) when
    /// the registry's lock is held.
    pub(crate) fn try_sweep(&self, now: Instant) -> bool {
        match self.registry.try_lock() {
            Ok(registry) => Self::sweep_registry(&registry, now),
            Err(TryLockError::Poisoned(poisoned)) => {
                Self::sweep_registry(&poisoned.into_inner(), now);
            }
            Err(TryLockError::WouldBlock) => return false,
        }
        true
    }

    /// Holds the registry's lock until the guard is dropped, as a publish or a report does.
    #[cfg(test)]
    pub(crate) fn hold_registry(&self) -> impl Drop + '_ {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sweep_registry(registry: &MutexGuard<'_, Registry>, now: Instant) {
        for health in registry.by_id.values() {
            health.sweep(now);
        }
    }
}

impl Outliers {
    /// The clock origin of every stamp of this cache's instances.
    pub(crate) fn origin(&self) -> Instant {
        self.origin
    }

    /// Whether any instance may be ejected now: when not, picks skip every health check.
    #[inline]
    pub(crate) fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed) != 0
    }

    /// How many instances of the service are up, as of the newest publish (draining ones are
    /// not): the max ejected share is a share of these.
    pub(crate) fn up(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }

    /// How many instances are ejected now.
    pub(crate) fn ejected(&self) -> u32 {
        self.ejected.load(Ordering::Relaxed)
    }

    /// How many changes of ejection there have been (wrapping at 2^32): 0 while no instance was
    /// ever ejected. Read before looking at the instances' ejections, it tells whether what was
    /// counted then is still true: every change bumps it after the instance's ejection is
    /// written (Release; this read is Acquire), so a count made after reading a value saw
    /// every change that value stands for, and a change it missed bumps the value.
    #[inline]
    pub(crate) fn ejection_epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Marks a change of an instance's ejection, after it was written: see
    /// [`ejection_epoch`](Self::ejection_epoch).
    pub(super) fn ejection_changed(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// Panic mode: fewer than the panic threshold of `up` instances are healthy (`ejected` of
    /// them are not), so picks ignore ejection.
    #[inline]
    pub(crate) fn panicking(&self, up: usize, ejected: u32) -> bool {
        let healthy = up.saturating_sub(ejected as usize);
        healthy.saturating_mul(100)
            < up.saturating_mul(usize::from(self.ejection.panic_threshold_percent))
    }

    /// `at` as nanoseconds after `origin` (0 before it).
    fn nanos(&self, at: Instant) -> u64 {
        duration_nanos(at.saturating_duration_since(self.origin))
    }

    /// `now` as a stamp of this cache's instance health: the same as [`Health::stamp`] of
    /// each (they share this origin).
    #[inline]
    pub(crate) fn stamp(&self, now: Instant) -> u64 {
        stamp_after(self.origin, now)
    }

    /// Makes sure the first sweep check at or after `at` sweeps (an ejection ends then), and
    /// that the sweep timer wakes by `sweep_interval` after `at`.
    pub(crate) fn sweep_after(&self, at: Instant) {
        self.sweep_at_most(self.nanos(at));
    }

    /// [`sweep_after`](Self::sweep_after) in nanoseconds after `origin`.
    fn sweep_at_most(&self, at: u64) {
        if self.sweep_at.fetch_min(at, Ordering::AcqRel) > at {
            // Rare: an ejection, or a sweep setting the next one. No allocation; a permit is
            // kept if the timer is not waiting right now, so the move is never missed.
            self.sweep_moved.notify_one();
        }
    }

    /// When the sweep timer sweeps next: `sweep_interval` after the earliest ejection end that
    /// no sweep has seen yet; `None` while there is none (or the timer is off).
    pub(crate) fn timer_due(&self) -> Option<Instant> {
        match self.sweep_at.load(Ordering::Acquire) {
            u64::MAX => None,
            due => self
                .origin
                .checked_add(Duration::from_nanos(due))?
                .checked_add(self.ejection.sweep_interval),
        }
    }

    /// Resolves when `sweep_at` moved earlier since the last time it resolved.
    pub(super) async fn sweep_moved(&self) {
        self.sweep_moved.notified().await;
    }

    /// Whether an ejection may have ended by `now` and the ejected count may be stale: if so,
    /// the caller got the sweep (no other thread gets it until one is due again) and must look
    /// at every instance's ejection ([`Health::sweep`]), or give it back with
    /// [`give_back`](Self::give_back) if it cannot now. Checked wherever the clock was read
    /// anyway: a pick that met an ejected or warming candidate, a p2c pick, a report, the
    /// health view, and a pick in panic mode whose candidate shows an ejection (which reads the
    /// clock for it); and by the [sweep timer](super::sweeper) of a caller with no traffic.
    /// Without it, an expired ejection would count until a look at that very instance noticed
    /// it: a service would stay in panic mode on ejections long over (in panic mode, picks
    /// admit a candidate without looking at its ejection end), and a failing instance be
    /// refused the slot of one that nobody picks any more (a consistent hash's unused keys).
    #[inline]
    pub(crate) fn sweep_due(&self, now: Instant) -> Option<SweepDue> {
        let now = self.nanos(now);
        if self.sweep_at.load(Ordering::Acquire) <= now {
            self.take_sweep(now)
        } else {
            None
        }
    }

    /// Takes the sweep due by `now` (nanoseconds after `origin`), unless another thread took it
    /// first; an end moved earlier meanwhile (a new ejection) is taken too.
    #[cold]
    #[inline(never)]
    fn take_sweep(&self, now: u64) -> Option<SweepDue> {
        self.sweep_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |due| {
                (due <= now).then_some(u64::MAX)
            })
            .ok()
            .map(SweepDue)
    }

    /// Gives back a sweep taken by [`sweep_due`](Self::sweep_due) that could not run (a pick
    /// found the registry locked): due at the same time as before, the next clock read takes it
    /// and the sweep timer keeps its due time.
    pub(crate) fn give_back(&self, due: SweepDue) {
        self.sweep_at_most(due.0);
    }

    /// For a report at `now`: sweeps the whole registry if [`sweep_due`](Self::sweep_due).
    pub(crate) fn sweep_if_due(&self, now: Instant) {
        if self.sweep_due(now).is_some()
            && let Some(balancing) = self.balancing.upgrade()
        {
            balancing.sweep(now);
        }
    }

    /// [`sweep_if_due`](Self::sweep_if_due) for a report at `stamp`, a stamp of this cache's
    /// instance health: converted back to an instant only when a sweep is due.
    #[inline]
    pub(crate) fn sweep_if_due_at(&self, stamp: u64) {
        // `sweep_at` is nanoseconds after `origin`; a stamp is that plus one.
        if self.sweep_at.load(Ordering::Acquire) < stamp {
            self.sweep_if_due(instant_of(self.origin, stamp));
        }
    }

    /// Takes one ejection slot out of `limit`, or says there is none.
    pub(super) fn reserve(&self, limit: u32) -> bool {
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back an ejection slot: the instance's ejection ended, was lifted, or (another
    /// thread's ejection won) never began.
    pub(super) fn release(&self) {
        self.ejection_changed();
        let left = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
            .map_or(0, |n| n.saturating_sub(1));
        self.metrics.ejected.set(f64::from(left));
    }

    pub(crate) fn count_dropped(&self) {
        self.metrics.dropped.increment(1);
    }
}
