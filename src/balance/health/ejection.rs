//! [`OutlierEjection`]: the settings of outlier ejection.

use std::time::Duration;

/// Outlier ejection: when an instance that keeps failing stops being picked, and how it comes
/// back.
///
/// Defaults after Envoy's outlier detection (`envoy/api/v3/cluster/outlier_detection.proto`:
/// `consecutive_5xx` 5, `base_ejection_time` 30 s, `max_ejection_time` 300 s, `interval` 10 s)
/// and its panic threshold (`healthy_panic_threshold` 50 %). The max ejected share defaults to
/// 10 % like Envoy's `max_ejection_percent`, but at least one instance may always be ejected
/// (as in gRPC's `outlier_detection` balancer), so a service of three can route around one
/// failed instance.
///
/// ```
/// use std::time::Duration;
/// use etcd_registry::OutlierEjection;
///
/// let ejection = OutlierEjection::default()
///     .consecutive_failures(3)
///     .base_ejection_time(Duration::from_secs(10));
/// assert_eq!(ejection.max_ejection_time, Duration::from_secs(300));
/// ```
///
/// Start from [`default`](Self::default) and change settings with the methods named after the
/// fields (the fields are public, but the struct is `#[non_exhaustive]`: no struct literal
/// outside this crate, so a later setting is not a breaking change). Settings are checked when
/// the [`Discovery`](crate::Discovery) is built: a bad one is
/// [`Error::Config`](crate::Error::Config) naming it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct OutlierEjection {
    /// Consecutive failures that eject an instance (default 5). At least 1.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts (default 30 s); the n-th lasts n times as long, up to
    /// [`max_ejection_time`](field@Self::max_ejection_time). The multiplier goes down by one
    /// for every `base_ejection_time` an instance stays healthy between ejections.
    pub base_ejection_time: Duration,
    /// The longest an ejection lasts (default 300 s). At least `base_ejection_time`.
    pub max_ejection_time: Duration,
    /// The most instances ejected at once, in percent of the service's instances up (default
    /// 10); one may always be ejected, whatever the share. A failure reported through a
    /// [`Selection`](crate::Selection) counts against the same share. 0 to 100.
    pub max_ejection_percent: u8,
    /// Panic threshold, in percent (default 50): when fewer than this share of the instances up
    /// are healthy (not ejected), picks ignore ejection and choose among all of them, as Envoy
    /// does. A [`Selection`](crate::Selection)'s picks weigh its own instances (Envoy weighs a
    /// subset's hosts the same way), the cache's all of them. 0 turns panic mode off. 0 to
    /// 100.
    pub panic_threshold_percent: u8,
    /// The longest an ended ejection goes unnoticed (default 10 s, Envoy's `interval`).
    ///
    /// An ejection ends at the first clock read after its end by a pick that meets the
    /// instance, a report, or [`health`](crate::ServiceCache::health). A caller with no
    /// traffic reads no clock, so a timer in the cache's sync task ends it at the latest this
    /// long after its end (while that task runs, that is while the cache's runtime does): the
    /// `etcd_registry_ejected` gauge and the instance's return event then follow within this
    /// bound on an idle caller too. `Duration::ZERO` ends every ejection at its very end by
    /// the timer; `Duration::MAX` (or any interval that takes the end past what an `Instant`
    /// can hold) means the timer never sweeps.
    pub sweep_interval: Duration,
}

impl Default for OutlierEjection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            panic_threshold_percent: 50,
            sweep_interval: Duration::from_secs(10),
        }
    }
}

impl OutlierEjection {
    /// Sets [`consecutive_failures`](field@Self::consecutive_failures): failures in a row that
    /// eject an instance. At least 1.
    #[must_use]
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = failures;
        self
    }

    /// Sets [`base_ejection_time`](field@Self::base_ejection_time): how long the first ejection
    /// lasts. More than zero.
    #[must_use]
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.base_ejection_time = time;
        self
    }

    /// Sets [`max_ejection_time`](field@Self::max_ejection_time): the longest an ejection lasts. At
    /// least `base_ejection_time`.
    #[must_use]
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.max_ejection_time = time;
        self
    }

    /// Sets [`max_ejection_percent`](field@Self::max_ejection_percent): the most instances ejected
    /// at once, in percent of the instances up (one may always be). 0 to 100.
    #[must_use]
    pub fn max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent;
        self
    }

    /// Sets [`panic_threshold_percent`](field@Self::panic_threshold_percent): below this share of
    /// healthy instances, picks ignore ejection. 0 (off) to 100.
    #[must_use]
    pub fn panic_threshold_percent(mut self, percent: u8) -> Self {
        self.panic_threshold_percent = percent;
        self
    }

    /// Sets [`sweep_interval`](field@Self::sweep_interval): the longest an ended ejection goes
    /// unnoticed on a caller with no traffic. `Duration::MAX` turns the timer off.
    #[must_use]
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

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
