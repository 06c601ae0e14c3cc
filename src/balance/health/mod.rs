//! Passive health: per-instance load and latency for p2c, and outlier ejection.
//!
//! [`ejection`] holds the settings, [`registry`] the per-cache registry and ejected count,
//! [`sweeper`] the timer that ends ejections an idle caller does not notice, this module each
//! instance's [`Health`].
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
//! logic here reads no clock, so tests drive it with any time they like (at or after the
//! cache's clock origin: an earlier `Instant` counts as the origin itself).

mod ejection;
mod registry;
pub(crate) mod sweeper;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use ejection::OutlierEjection;
pub(crate) use registry::{Balancing, Outliers, SweepDue};

/// Where a snapshot's pick tables keep one instance's health: empty until first needed.
pub(crate) type HealthSlot = OnceLock<Arc<Health>>;

/// The tau of the latency and success-rate EWMAs: a sample's weight halves every
/// `tau * ln 2` (about 6.9 s). go-zero's `p2c` balancer uses the same 10 s decay
/// (`zrpc/internal/balancer/p2c/p2c.go`, `decayTime`).
pub(crate) const DECAY_TAU: Duration = Duration::from_secs(10);

/// The passive health of one instance: what p2c weighs and what ejection decides on.
///
/// Times are stored as stamps: nanoseconds after the cache's clock origin, plus one, so that
/// 0 means "never" (see [`stamp`](Self::stamp)). A caller converts an `Instant` once per clock
/// read and passes the stamp on.
///
/// Laid out for the pick path: what every pick reads and every report writes comes first, with
/// the clock origin every stamp needs, in one cache line of its own (`align(64)` also keeps
/// the `Arc`'s reference counts off that line), so a report on one thread costs a pick on
/// another one line's transfer, where the fields used to spread over two or three lines. The
/// second line is read by every report too (`probation`, the metric handles) but written only
/// on ejections and publishes.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Health {
    // The hot line: 64 bytes.
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Peak-sensitive EWMA of latency, in nanoseconds (`f64` bits); 0 before the first sample.
    latency: AtomicU64,
    /// EWMA of the success rate, 0.0 to 1.0 (`f64` bits); starts at 1.0.
    success: AtomicU64,
    /// When the last outcome was reported.
    last_report: AtomicU64,
    /// When p2c last picked it (for the forced pick of an instance left alone too long).
    last_pick: AtomicU64,
    /// 0 when not ejected; else the end of the ejection.
    ejected_until: AtomicU64,
    /// The clock origin of every stamp: its cache's (so all instances of a cache compare).
    origin: Instant,
    // The second line: read by reports, written rarely.
    /// Back from an ejection and not yet proven: one failure ejects it again.
    probation: AtomicBool,
    /// When the sync machine first saw the key: the start of slow start.
    born: Instant,
    balancing: Arc<Outliers>,
    /// The ejection multiplier: ejections so far, minus the healthy periods since.
    times_ejected: AtomicU32,
    /// The end of the last ejection, to decay the multiplier.
    last_ejection_end: AtomicU64,
    /// Not up (draining, or its key is gone): not counted among the instances up, so never
    /// ejected.
    benched: AtomicBool,
    /// Present at the cache's first list: never warms up.
    adult: bool,
}

impl Health {
    pub(crate) fn new(balancing: Arc<Outliers>, born: Instant, adult: bool) -> Self {
        Self {
            origin: balancing.origin(),
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

    /// `now` as a stamp: nanoseconds after the cache's clock origin, plus one. The same for
    /// every instance of a cache (and of its selections).
    #[inline]
    pub(crate) fn stamp(&self, now: Instant) -> u64 {
        stamp_after(self.origin, now)
    }

    fn instant(&self, stamp: u64) -> Instant {
        instant_of(self.origin, stamp)
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

    /// Ends its ejection if it is over by `now` (see [`is_ejected`](Self::is_ejected)), or else
    /// makes sure a sweep comes by its end: one instance's part of a sweep.
    pub(crate) fn sweep(&self, now: Instant) {
        if self.maybe_ejected()
            && self.is_ejected(now)
            && let Some(until) = self.ejected_until()
        {
            self.balancing.sweep_after(until);
        }
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

    /// Records a p2c pick at `stamp`.
    pub(crate) fn mark_picked(&self, stamp: u64) {
        // At most one write per millisecond: the forced pick works in seconds, and a write per
        // pick would bounce the cache line between threads picking the same instance.
        if stamp.saturating_sub(self.last_pick.load(Ordering::Relaxed)) >= 1_000_000 {
            self.last_pick.store(stamp, Ordering::Relaxed);
        }
    }

    /// Takes a forced pick at `stamp`: true if its last pick is still `seen` (no other thread
    /// took the forced pick in between).
    pub(crate) fn take_forced_pick(&self, seen: u64, stamp: u64) -> bool {
        self.last_pick
            .compare_exchange(seen, stamp, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Folds one sample into the EWMAs: peak-sensitive for latency (a slower sample replaces the
    /// average at once, as Finagle's and Linkerd's peak EWMA do), decayed by the time since the
    /// last sample for both (`w = e^(-elapsed / tau)`, go-zero's `p2c`). Concurrent reports may
    /// overwrite each other's sample: the averages are estimates, never locked.
    fn sample(&self, stamp: u64, latency_nanos: Option<u64>, success: bool) {
        // A load and a store, not a swap: concurrent reports may both use the same `last`, which
        // the estimate tolerates, and a read-modify-write would serialize them.
        let last = self.last_report.load(Ordering::Relaxed);
        self.last_report.store(stamp, Ordering::Relaxed);
        let w = if last == 0 {
            0.0
        } else {
            decay(nanos_f64(stamp.saturating_sub(last)) * PER_DECAY_TAU_NANO)
        };
        if let Some(latency) = latency_nanos {
            let sample = nanos_f64(latency);
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
        // Written only when it changes: a success at a rate of 1.0 (the common case) keeps it
        // at exactly 1.0 (`w + fl(1 - w)` rounds to 1.0 for every `w` in [0, 1]), and a store
        // of that unchanged 1.0 could land after a concurrent failure's store and erase it.
        if new != old {
            self.success.store(new.to_bits(), Ordering::Relaxed);
        }
    }

    /// A request succeeded at `stamp`, after `latency_nanos` (if measured).
    pub(crate) fn on_success(&self, stamp: u64, latency_nanos: Option<u64>) {
        self.balancing.sweep_if_due_at(stamp);
        self.sample(stamp, latency_nanos, true);
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
        }
    }

    /// A request failed. Ejects the instance after the consecutive-failure threshold, or at
    /// once when on probation, if the max ejected share of the service's instances up allows
    /// (Envoy's `max_ejection_percent` is a share of the cluster: a failure reported through a
    /// selection counts against the same share).
    pub(crate) fn on_failure(&self, now: Instant) {
        // Ejections over by now give their slots back before this failure asks for one.
        self.balancing.sweep_if_due(now);
        self.sample(self.stamp(now), None, false);
        self.balancing.metrics.failure.increment(1);
        // An ejection that ended with nobody noticing (no pick of it since) ends now: the
        // instance is on probation, so this failure ejects it again, for longer.
        if self.maybe_ejected() {
            self.is_ejected(now);
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let policy = &self.balancing.ejection;
        if failures < policy.consecutive_failures && !self.probation.load(Ordering::Acquire) {
            return;
        }
        self.eject(now);
    }

    fn eject(&self, now: Instant) {
        let balancing = &self.balancing;
        let policy = &balancing.ejection;
        // `is_ejected`, not `maybe_ejected`: an ejection that ended unnoticed ends here (the
        // instance goes on probation), so this failure ejects it again instead of being lost.
        if self.benched.load(Ordering::SeqCst)
            || self.is_ejected(now)
            || !balancing.reserve(policy.max_ejected(balancing.up()))
        {
            return;
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
            return;
        }
        if self.benched.load(Ordering::SeqCst) {
            // Benched meanwhile: `bench` may have looked before this ejection was there.
            self.lift();
            return;
        }
        balancing.ejection_changed();
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

/// `now` as a stamp after `origin`: nanoseconds, plus one so that 0 means "never". The one
/// formula of every stamp, so that a [`Health`]'s own and its cache's ([`Outliers::stamp`])
/// always agree (a `Call` subtracts one from the other).
#[inline]
fn stamp_after(origin: Instant, now: Instant) -> u64 {
    duration_nanos(now.saturating_duration_since(origin)).saturating_add(1)
}

/// The instant of a stamp after `origin` (the inverse of [`stamp_after`]).
fn instant_of(origin: Instant, stamp: u64) -> Instant {
    // A stamp is at most u64::MAX ns (584 years) after `origin`: checked all the same, so no
    // input can make this panic.
    let after = Duration::from_nanos(stamp.saturating_sub(1));
    origin.checked_add(after).unwrap_or(origin)
}

/// `d` in nanoseconds, saturating at `u64::MAX` (584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// A count of nanoseconds as `f64`. Through `i64` when it fits (every span under 292 years):
/// one instruction on x86-64, where a `u64` takes a sequence of them.
#[inline]
fn nanos_f64(nanos: u64) -> f64 {
    match i64::try_from(nanos) {
        Ok(nanos) => nanos as f64,
        Err(_) => nanos as f64,
    }
}

/// [`DECAY_TAU`] in nanoseconds.
const DECAY_TAU_NANOS: f64 = DECAY_TAU.as_secs() as f64 * 1e9;

/// `1 / DECAY_TAU_NANOS`: a multiplication where a division would cost several times more on
/// every report (the product differs from the quotient by at most an ulp or two).
const PER_DECAY_TAU_NANO: f64 = 1.0 / DECAY_TAU_NANOS;

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

    /// What a pick reads and a report writes stays in the first cache line of its own: the
    /// layout the struct's docs promise (a reordered or grown field fails here).
    #[test]
    fn the_hot_fields_share_one_cache_line() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(align_of::<Health>(), 64);
        let ends = [
            offset_of!(Health, origin) + size_of::<Instant>(),
            offset_of!(Health, in_flight) + size_of::<AtomicU32>(),
            offset_of!(Health, consecutive_failures) + size_of::<AtomicU32>(),
            offset_of!(Health, latency) + size_of::<AtomicU64>(),
            offset_of!(Health, success) + size_of::<AtomicU64>(),
            offset_of!(Health, last_report) + size_of::<AtomicU64>(),
            offset_of!(Health, last_pick) + size_of::<AtomicU64>(),
            offset_of!(Health, ejected_until) + size_of::<AtomicU64>(),
        ];
        for end in ends {
            assert!(end <= 64, "a hot field ends at byte {end}");
        }
        assert!(offset_of!(Health, probation) >= 64);
    }

    /// A success at a success rate of exactly 1.0 leaves it exactly 1.0 (so `sample` can skip
    /// the store) for every decay weight from 0 up, and a success after a failure moves it.
    #[test]
    fn a_success_at_full_rate_changes_nothing() {
        let outliers =
            Balancing::new(Arc::from("users"), OutlierEjection::default(), None).outliers();
        let health = Health::new(outliers, Instant::now(), true);
        let mut stamp = 1;
        for gap in [
            0u64,
            1,
            1_000,
            1_000_000,
            999_999_999,
            6_900_000_000,
            7_000_000_000,
        ] {
            stamp += gap;
            health.on_success(stamp, Some(1_000));
            assert_eq!(
                health.success_rate().to_bits(),
                1f64.to_bits(),
                "gap {gap} ns"
            );
        }
        for gap in 1..=20_000u64 {
            // The weight exactly as `sample` computes it.
            let w = decay(nanos_f64(gap * 997) * PER_DECAY_TAU_NANO);
            assert_eq!(w + (1.0 - w), 1.0, "w = {w}");
        }
        health.on_failure(health.instant(stamp + 1_000_000_000));
        let after_failure = health.success_rate();
        assert!(after_failure < 1.0);
        health.on_success(stamp + 2_000_000_000, None);
        assert!(health.success_rate() > after_failure);
    }

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
