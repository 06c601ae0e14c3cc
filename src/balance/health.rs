//! Passive health: per-instance load and latency for p2c, and outlier ejection.
//!
//! Each instance's [`Health`] lives outside the snapshot, in its cache's [`Balancing`] registry,
//! keyed by the instance id (the last segment of its etcd key in every layout, so the key and
//! the id name the same thing within one service): every snapshot that holds the key gets the
//! same `Arc<Health>`, so health survives every publish and every freeze, and is dropped when
//! etcd removes the key.
//!
//! Health is made on first need: the first reported outcome or started call of an instance (or,
//! with slow start on, when the instance is first seen). A caller that reports nothing pays no
//! memory for it.
//!
//! Every field is an atomic written by whoever reports an outcome, with the time passed in: the
//! logic here reads no clock, so tests drive it with any `Instant` they like.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::slow_start::SlowStart;
use crate::instance::Instance;

/// Where a snapshot's pick tables keep one instance's health: empty until first needed.
pub(crate) type HealthSlot = OnceLock<Arc<Health>>;

/// Outlier ejection: when an instance that keeps failing stops being picked, and how it comes
/// back.
///
/// Defaults after Envoy's outlier detection (`envoy/api/v3/cluster/outlier_detection.proto`:
/// `consecutive_5xx` 5, `base_ejection_time` 30 s, `max_ejection_time` 300 s) and its panic
/// threshold (`healthy_panic_threshold` 50 %). The max ejected share defaults to 10 % like
/// Envoy's `max_ejection_percent`, but at least one instance may always be ejected (as in gRPC's
/// `outlier_detection` balancer), so a service of three can route around one failed instance.
///
/// ```
/// use std::time::Duration;
/// use etcd_registry::OutlierEjection;
///
/// let ejection = OutlierEjection {
///     consecutive_failures: 3,
///     base_ejection_time: Duration::from_secs(10),
///     ..OutlierEjection::default()
/// };
/// assert_eq!(ejection.max_ejection_time, Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierEjection {
    /// Consecutive failures that eject an instance (default 5). At least 1.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts (default 30 s); the n-th lasts n times as long, up to
    /// [`max_ejection_time`](Self::max_ejection_time). The multiplier goes down by one for every
    /// `base_ejection_time` an instance stays healthy between ejections.
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts (default 300 s). At least `base_ejection_time`.
    pub max_ejection_time: Duration,
    /// The most instances ejected at once, in percent of the instances up (default 10); one may
    /// always be ejected, whatever the share. 0 to 100.
    pub max_ejection_percent: u8,
    /// Panic threshold, in percent (default 50): when fewer than this share of the instances up
    /// are healthy (not ejected), picks ignore ejection and choose among all of them, as Envoy
    /// does. 0 turns panic mode off. 0 to 100.
    pub panic_threshold_percent: u8,
}

impl Default for OutlierEjection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            panic_threshold_percent: 50,
        }
    }
}

impl OutlierEjection {
    /// Checks the settings; the error says which one is wrong.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.consecutive_failures == 0 {
            return Err("outlier ejection: consecutive_failures must be at least 1".into());
        }
        if self.base_ejection_time.is_zero() {
            return Err("outlier ejection: base_ejection_time must be more than zero".into());
        }
        if self.max_ejection_time < self.base_ejection_time {
            return Err(format!(
                "outlier ejection: max_ejection_time ({:?}) is less than base_ejection_time ({:?})",
                self.max_ejection_time, self.base_ejection_time
            ));
        }
        if self.max_ejection_percent > 100 || self.panic_threshold_percent > 100 {
            return Err("outlier ejection: percentages must be 0 to 100".into());
        }
        Ok(())
    }

    /// How many of `up` instances may be ejected at once: the share, but at least one.
    pub(crate) fn max_ejected(&self, up: usize) -> u32 {
        let share = up.saturating_mul(usize::from(self.max_ejection_percent)) / 100;
        u32::try_from(share.max(1)).unwrap_or(u32::MAX)
    }
}

/// The tau of the latency and success-rate EWMAs: a sample's weight halves every
/// `tau * ln 2` (about 6.9 s). go-zero's `p2c` balancer uses the same 10 s decay
/// (`zrpc/internal/balancer/p2c/p2c.go`, `decayTime`).
pub(crate) const DECAY_TAU: Duration = Duration::from_secs(10);

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
    /// Instances ejected right now (an expired ejection counts until the next pick sweeps it
    /// out: see [`sweep_due`](Self::sweep_due)).
    ejected: AtomicU32,
    /// The clock origin of `sweep_at`.
    origin: Instant,
    /// When some ejection may have ended, in nanoseconds after `origin` (`u64::MAX`: none):
    /// at or before the end of every ejection, so a pick past it sweeps the expired ones out of
    /// the count.
    sweep_at: AtomicU64,
    metrics: Metrics,
}

/// Metric handles registered once per cache, so that reporting never allocates.
#[derive(Debug)]
struct Metrics {
    success: metrics::Counter,
    failure: metrics::Counter,
    dropped: metrics::Counter,
    ejections: metrics::Counter,
    ejected: metrics::Gauge,
}

impl Balancing {
    pub(crate) fn new(
        service: Arc<str>,
        ejection: OutlierEjection,
        slow_start: Option<SlowStart>,
    ) -> Self {
        let label = service.to_string();
        let picks = |outcome: &'static str| metrics::counter!(crate::metrics::PICKS, "service" => label.clone(), "outcome" => outcome);
        let metrics = Metrics {
            success: picks("success"),
            failure: picks("failure"),
            dropped: picks("dropped"),
            ejections: metrics::counter!(crate::metrics::EJECTIONS, "service" => label.clone()),
            ejected: metrics::gauge!(crate::metrics::EJECTED, "service" => label),
        };
        Self {
            outliers: Arc::new(Outliers {
                service,
                ejection,
                slow_start,
                ejected: AtomicU32::new(0),
                origin: super::clock::now(),
                sweep_at: AtomicU64::new(u64::MAX),
                metrics,
            }),
            registry: Mutex::new(Registry::default()),
        }
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
}

impl Outliers {
    /// Whether any instance may be ejected now: when not, picks skip every health check.
    #[inline]
    pub(crate) fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed) != 0
    }

    /// How many instances are ejected now.
    pub(crate) fn ejected(&self) -> u32 {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Panic mode: fewer than the panic threshold of `up` instances are healthy, so picks ignore
    /// ejection.
    #[inline]
    pub(crate) fn panicking(&self, up: usize) -> bool {
        let ejected = self.ejected.load(Ordering::Relaxed) as usize;
        let healthy = up.saturating_sub(ejected);
        healthy.saturating_mul(100)
            < up.saturating_mul(usize::from(self.ejection.panic_threshold_percent))
    }

    /// `at` as nanoseconds after `origin` (0 before it).
    fn nanos(&self, at: Instant) -> u64 {
        duration_nanos(at.saturating_duration_since(self.origin))
    }

    /// Makes sure a pick at or after `at` sweeps (an ejection ends then).
    pub(crate) fn sweep_after(&self, at: Instant) {
        self.sweep_at.fetch_min(self.nanos(at), Ordering::AcqRel);
    }

    /// Whether an ejection may have ended by `now` and the ejected count may be stale: if so,
    /// the caller got the sweep (no other thread gets it until one is due again) and must look
    /// at every instance's ejection, calling [`sweep_after`](Self::sweep_after) with the end of
    /// each one still running. Without it, an expired ejection would count until a pick of
    /// that very instance noticed it, which in panic mode (picks do not look) is never.
    #[inline]
    pub(crate) fn sweep_due(&self, now: Instant) -> bool {
        let due = self.sweep_at.load(Ordering::Acquire);
        due <= self.nanos(now)
            && self
                .sweep_at
                .compare_exchange(due, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Takes one ejection slot out of `limit`, or says there is none.
    fn reserve(&self, limit: u32) -> bool {
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
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

/// The passive health of one instance: what p2c weighs and what ejection decides on.
///
/// Times are stored as nanoseconds after `born` (plus one, so that 0 means "never").
#[derive(Debug)]
pub(crate) struct Health {
    /// When the sync machine first saw the key: the clock origin of the other fields, and the
    /// start of slow start.
    born: Instant,
    /// Present at the cache's first list: never warms up.
    adult: bool,
    balancing: Arc<Outliers>,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// The ejection multiplier: ejections so far, minus the healthy periods since.
    times_ejected: AtomicU32,
    /// 0 when not ejected; else the end of the ejection.
    ejected_until: AtomicU64,
    /// The end of the last ejection, to decay the multiplier.
    last_ejection_end: AtomicU64,
    /// Back from an ejection and not yet proven: one failure ejects it again.
    probation: AtomicBool,
    /// Not up (draining, or its key is gone): not counted among the instances up, so never
    /// ejected.
    benched: AtomicBool,
    /// Peak-sensitive EWMA of latency, in nanoseconds (`f64` bits); 0 before the first sample.
    latency: AtomicU64,
    /// EWMA of the success rate, 0.0 to 1.0 (`f64` bits); starts at 1.0.
    success: AtomicU64,
    /// When the last outcome was reported.
    last_report: AtomicU64,
    /// When p2c last picked it (for the forced pick of an instance left alone too long).
    last_pick: AtomicU64,
}

/// The result of one reported outcome, for the caller to log or count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing changed in the instance's standing.
    Unchanged,
    /// The instance was ejected until the given time.
    Ejected,
    /// The instance was on probation and is healthy again.
    Restored,
}

impl Health {
    pub(crate) fn new(balancing: Arc<Outliers>, born: Instant, adult: bool) -> Self {
        Self {
            born,
            adult,
            balancing,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            times_ejected: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            last_ejection_end: AtomicU64::new(0),
            probation: AtomicBool::new(false),
            benched: AtomicBool::new(false),
            latency: AtomicU64::new(0f64.to_bits()),
            success: AtomicU64::new(1f64.to_bits()),
            last_report: AtomicU64::new(0),
            last_pick: AtomicU64::new(0),
        }
    }

    pub(crate) fn balancing(&self) -> &Outliers {
        &self.balancing
    }

    /// `now` as a stored time: nanoseconds after `born`, plus one.
    #[inline]
    fn stamp(&self, now: Instant) -> u64 {
        duration_nanos(now.saturating_duration_since(self.born)).saturating_add(1)
    }

    fn instant(&self, stamp: u64) -> Instant {
        // A stamp is at most u64::MAX ns (584 years) after `born`: checked all the same, so
        // no input can make this panic.
        let after = Duration::from_nanos(stamp.saturating_sub(1));
        self.born.checked_add(after).unwrap_or(self.born)
    }

    /// How long since the key was first seen; `None` for an instance present at the first list.
    pub(crate) fn age(&self, now: Instant) -> Option<Duration> {
        (!self.adult).then(|| now.saturating_duration_since(self.born))
    }

    /// When the key was first seen, unless it was there at the first list.
    pub(crate) fn born(&self) -> Option<Instant> {
        (!self.adult).then_some(self.born)
    }

    /// Whether an ejection shows (cheap: one load). Check [`is_ejected`](Self::is_ejected) with
    /// the time before skipping the instance.
    #[inline]
    pub(crate) fn maybe_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Whether the instance is ejected at `now`. An ejection found over lets the instance back
    /// on probation (done once, by whoever notices first).
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        if self.stamp(now) < until {
            return true;
        }
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.last_ejection_end.store(until, Ordering::Relaxed);
            self.probation.store(true, Ordering::Release);
            self.balancing.release();
            tracing::info!(
                service = %self.balancing.service,
                "an ejected instance is back on probation: one success restores it, one failure ejects it again"
            );
        }
        false
    }

    /// A request was sent to it.
    #[inline]
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request sent to it ended, whatever its outcome.
    #[inline]
    pub(crate) fn finish(&self) {
        // One plain decrement, not a compare loop: only a `Call` calls this, exactly once, after
        // its `start`, so the count never goes below zero.
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency EWMA, in nanoseconds (0 before any sample).
    pub(crate) fn latency_nanos(&self) -> f64 {
        f64::from_bits(self.latency.load(Ordering::Relaxed))
    }

    /// The success-rate EWMA, 0.0 to 1.0.
    pub(crate) fn success_rate(&self) -> f64 {
        f64::from_bits(self.success.load(Ordering::Relaxed))
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    pub(crate) fn on_probation(&self) -> bool {
        self.probation.load(Ordering::Relaxed)
    }

    /// The end of the current ejection, if any (it may be over and not yet noticed).
    pub(crate) fn ejected_until(&self) -> Option<Instant> {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => None,
            until => Some(self.instant(until)),
        }
    }

    /// When p2c last picked it.
    pub(crate) fn last_pick(&self) -> u64 {
        self.last_pick.load(Ordering::Relaxed)
    }

    /// Records a p2c pick at `now`.
    pub(crate) fn mark_picked(&self, now: Instant) {
        // At most one write per millisecond: the forced pick works in seconds, and a write per
        // pick would bounce the cache line between threads picking the same instance.
        let stamp = self.stamp(now);
        if stamp.saturating_sub(self.last_pick.load(Ordering::Relaxed)) >= 1_000_000 {
            self.last_pick.store(stamp, Ordering::Relaxed);
        }
    }

    /// Takes a forced pick: true if it was last picked before `stale_before` (a stamp) and no
    /// other thread took the forced pick in between.
    pub(crate) fn take_forced_pick(&self, seen: u64, now: Instant) -> bool {
        self.last_pick
            .compare_exchange(seen, self.stamp(now), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// `now` as this instance's stamp, to compare with [`last_pick`](Self::last_pick).
    pub(crate) fn stamp_of(&self, now: Instant) -> u64 {
        self.stamp(now)
    }

    /// Folds one sample into the EWMAs: peak-sensitive for latency (a slower sample replaces the
    /// average at once, as Finagle's and Linkerd's peak EWMA do), decayed by the time since the
    /// last sample for both (`w = e^(-elapsed / tau)`, go-zero's `p2c`). Concurrent reports may
    /// overwrite each other's sample: the averages are estimates, never locked.
    fn sample(&self, now: Instant, latency: Option<Duration>, success: bool) {
        let stamp = self.stamp(now);
        // A load and a store, not a swap: concurrent reports may both use the same `last`, which
        // the estimate tolerates, and a read-modify-write would serialize them.
        let last = self.last_report.load(Ordering::Relaxed);
        self.last_report.store(stamp, Ordering::Relaxed);
        let w = if last == 0 {
            0.0
        } else {
            decay(stamp.saturating_sub(last) as f64 / DECAY_TAU_NANOS)
        };
        if let Some(latency) = latency {
            let sample = latency.as_secs_f64() * 1e9;
            let old = f64::from_bits(self.latency.load(Ordering::Relaxed));
            let new = if old == 0.0 || sample > old {
                sample
            } else {
                old * w + sample * (1.0 - w)
            };
            self.latency.store(new.to_bits(), Ordering::Relaxed);
        }
        let old = f64::from_bits(self.success.load(Ordering::Relaxed));
        let sample = if success { 1.0 } else { 0.0 };
        let new = old * w + sample * (1.0 - w);
        self.success.store(new.to_bits(), Ordering::Relaxed);
    }

    /// A request succeeded after `latency` (if measured).
    pub(crate) fn on_success(&self, now: Instant, latency: Option<Duration>) -> Verdict {
        self.sample(now, latency, true);
        self.balancing.metrics.success.increment(1);
        // Written only when they change: a success on a healthy instance (the common case)
        // then only reads these lines.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.probation.load(Ordering::Acquire) && self.probation.swap(false, Ordering::AcqRel) {
            tracing::info!(
                service = %self.balancing.service,
                "an instance on probation succeeded: it is healthy again"
            );
            return Verdict::Restored;
        }
        Verdict::Unchanged
    }

    /// A request failed. Ejects the instance after the consecutive-failure threshold, or at
    /// once when on probation, if the max ejected share of `up` instances allows.
    pub(crate) fn on_failure(&self, now: Instant, up: usize) -> Verdict {
        self.sample(now, None, false);
        self.balancing.metrics.failure.increment(1);
        // An ejection that ended with nobody noticing (no pick of it since) ends now: the
        // instance is on probation, so this failure ejects it again, for longer.
        if self.maybe_ejected() {
            self.is_ejected(now);
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let policy = &self.balancing.ejection;
        if failures < policy.consecutive_failures && !self.probation.load(Ordering::Acquire) {
            return Verdict::Unchanged;
        }
        self.eject(now, up)
    }

    fn eject(&self, now: Instant, up: usize) -> Verdict {
        let balancing = &self.balancing;
        let policy = &balancing.ejection;
        // `is_ejected`, not `maybe_ejected`: an ejection that ended unnoticed ends here (the
        // instance goes on probation), so this failure ejects it again instead of being lost.
        if self.benched.load(Ordering::SeqCst)
            || self.is_ejected(now)
            || !balancing.reserve(policy.max_ejected(up))
        {
            return Verdict::Unchanged;
        }
        let stamp = self.stamp(now);
        // The multiplier decays by one per base ejection time spent healthy since the last one.
        let last_end = self.last_ejection_end.load(Ordering::Relaxed);
        let healthy_for = if last_end == 0 {
            0
        } else {
            stamp.saturating_sub(last_end) / duration_nanos(policy.base_ejection_time).max(1)
        };
        // Capped where it stops mattering (Envoy caps its multiplier the same way): past
        // ceil(max / base) ejections the length is the max anyway, and an uncapped count would
        // take as many healthy periods to come down.
        let cap = u32::try_from(
            duration_nanos(policy.max_ejection_time)
                .div_ceil(duration_nanos(policy.base_ejection_time).max(1)),
        )
        .unwrap_or(u32::MAX);
        let times = self
            .times_ejected
            .load(Ordering::Relaxed)
            .saturating_sub(u32::try_from(healthy_for).unwrap_or(u32::MAX))
            .saturating_add(1)
            .min(cap);
        let length = policy
            .base_ejection_time
            .saturating_mul(times)
            .min(policy.max_ejection_time);
        let until = stamp
            .saturating_add(duration_nanos(length))
            .max(stamp.saturating_add(1));
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // Another thread ejected it first.
            balancing.release();
            return Verdict::Unchanged;
        }
        if self.benched.load(Ordering::SeqCst) {
            // Benched meanwhile: `bench` may have looked before this ejection was there.
            self.lift();
            return Verdict::Unchanged;
        }
        balancing.sweep_after(self.instant(until));
        self.times_ejected.store(times, Ordering::Relaxed);
        self.probation.store(false, Ordering::Release);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        balancing.metrics.ejections.increment(1);
        balancing
            .metrics
            .ejected
            .set(f64::from(balancing.ejected()));
        tracing::info!(
            service = %balancing.service,
            ejection = times,
            seconds = length.as_secs_f64(),
            "ejected an instance that kept failing; it gets no requests until its ejection ends"
        );
        Verdict::Ejected
    }

    /// Benches the instance (it is draining, or its key left etcd: `true`) or brings it back
    /// (up again: `false`). A benched instance gives back its ejection slot, if it held one, and
    /// cannot be ejected: the max ejected share and the panic threshold count instances up.
    pub(crate) fn bench(&self, benched: bool) {
        self.benched.store(benched, Ordering::SeqCst);
        if benched {
            self.lift();
        }
    }

    /// Ends the ejection, if any, without probation: its slot is given back.
    fn lift(&self) {
        if self.ejected_until.swap(0, Ordering::SeqCst) != 0 {
            self.balancing.release();
        }
    }
}

fn duration_nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// [`DECAY_TAU`] in nanoseconds.
const DECAY_TAU_NANOS: f64 = DECAY_TAU.as_secs() as f64 * 1e9;

/// `e^(-x)` for `x >= 0`: a Taylor polynomial below 10^-3 (reports microseconds apart, the
/// common case under load; relative error under 2 x 10^-10), `exp` above.
#[inline]
fn decay(x: f64) -> f64 {
    if x < 1e-3 {
        1.0 - x + x * x * 0.5
    } else {
        (-x).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial used for small decays stays within 10^-9 of `exp`, and the constant in
    /// nanoseconds is the documented tau.
    #[test]
    fn decay_is_exp() {
        assert_eq!(DECAY_TAU_NANOS, DECAY_TAU.as_secs_f64() * 1e9);
        for x in [0.0, 1e-9, 1e-6, 5e-4, 9.99e-4, 1e-3, 0.1, 1.0, 30.0] {
            let (ours, exact) = (decay(x), (-x).exp());
            assert!(
                (ours - exact).abs() <= 1e-9 * exact.max(1e-300),
                "x={x}: {ours} vs {exact}"
            );
        }
    }
}
