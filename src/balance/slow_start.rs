//! Slow start (warm-up): a new instance ramps in instead of taking its full share at once.

use std::time::Duration;

/// Slow start: an instance first seen after the cache's first list ramps in over `window`.
///
/// Its weight is scaled by `max(min_weight_percent / 100, (age / window)^(1 / aggression))`
/// until it is `window` old: Envoy's slow start formula
/// (`envoy/config/cluster/v3/cluster.proto`, `SlowStartConfig`). With `young` set, it is not
/// picked at all for that long (unless nothing else can be), for callers that must first open
/// long-lived connections to it. Instances present at the cache's first list are adults from
/// the start, so restarting a caller does not ramp the whole fleet (a sync task restarted in
/// the same process is not a first list: what it sees first warms up).
///
/// Off by default. Applies to every picker but the consistent hash, whose keys must not move.
///
/// ```
/// use std::time::Duration;
/// use etcd_registry::SlowStart;
///
/// let slow_start = SlowStart::new(Duration::from_secs(60)).young(Duration::from_secs(2));
/// assert_eq!(slow_start.factor(Duration::from_secs(0)), None, "young: not picked");
/// assert_eq!(slow_start.factor(Duration::from_secs(30)), Some(0.5));
/// assert_eq!(slow_start.factor(Duration::from_secs(60)), Some(1.0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    window: Duration,
    aggression: f64,
    min_weight_percent: u8,
    young: Duration,
}

impl SlowStart {
    /// Slow start over `window`, linear (aggression 1.0), from at least 10 % of the weight
    /// (Envoy's default `min_weight_percent`), with no young period.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            aggression: 1.0,
            min_weight_percent: 10,
            young: Duration::ZERO,
        }
    }

    /// The curve's aggression (default 1.0, linear): above 1 the weight rises faster at first.
    /// Must be a finite number above zero.
    pub fn aggression(mut self, aggression: f64) -> Self {
        self.aggression = aggression;
        self
    }

    /// The lowest share of its weight a warming instance gets, in percent (default 10, 1 to 100).
    pub fn min_weight_percent(mut self, percent: u8) -> Self {
        self.min_weight_percent = percent;
        self
    }

    /// A period after it is first seen during which the instance is not picked at all (default
    /// zero), unless no other instance up may be (all young or ejected): better a young one
    /// than none. The ramp is measured from first sight, so it is already under way when this
    /// ends. Must be less than the window.
    pub fn young(mut self, young: Duration) -> Self {
        self.young = young;
        self
    }

    /// The ramp's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The share of its weight an instance `age` old gets: `None` while young, then up to `1.0`
    /// once `window` old.
    pub fn factor(&self, age: Duration) -> Option<f64> {
        if age < self.young {
            return None;
        }
        if age >= self.window {
            return Some(1.0);
        }
        let ramp = age.as_secs_f64() / self.window.as_secs_f64();
        let curve = ramp.powf(1.0 / self.aggression);
        Some(
            curve
                .max(f64::from(self.min_weight_percent) / 100.0)
                .min(1.0),
        )
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.window.is_zero() {
            return Err("slow start: the window must be more than zero".into());
        }
        if !(self.aggression.is_finite() && self.aggression > 0.0) {
            return Err(format!(
                "slow start: aggression must be a finite number above zero, not {}",
                self.aggression
            ));
        }
        if !(1..=100).contains(&self.min_weight_percent) {
            return Err("slow start: min_weight_percent must be 1 to 100".into());
        }
        if self.young >= self.window {
            return Err("slow start: the young period must be shorter than the window".into());
        }
        Ok(())
    }
}
