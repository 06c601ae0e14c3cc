//! Exponential backoff with full jitter, shared by the sync machine and registrations.
//!
//! `backon` gives the exponential envelope (initial, doubling, capped); each delay is then drawn
//! uniformly from `[0, envelope]` ("full jitter") by a generator seeded by the caller, so that a
//! machine stays deterministic in tests while processes with different seeds spread their
//! retries instead of hitting a recovering etcd in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::balance::rng::splitmix64;

/// Backoff between reconnection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The first delay's upper bound (default 100 ms).
    pub initial: Duration,
    /// The largest delay (default 10 s).
    pub max: Duration,
    /// A connection that stayed healthy this long resets the backoff to `initial` (default 30 s).
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(30),
        }
    }
}

/// The longest duration any setting takes: longer ones would only overflow deadlines, and are
/// refused when the setting is built.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks that a duration setting is within `1 ns ..= MAX_SETTING`.
pub(crate) fn check_setting(name: &str, value: Duration) -> Result<(), String> {
    if value.is_zero() {
        return Err(format!("{name} must be greater than zero"));
    }
    if value > MAX_SETTING {
        return Err(format!("{name} ({value:?}) must be at most one day"));
    }
    Ok(())
}

impl BackoffConfig {
    /// Checks that the delays are positive, at most a day, and ordered.
    pub(crate) fn validate(&self) -> Result<(), String> {
        check_setting("backoff.initial", self.initial)?;
        check_setting("backoff.max", self.max)?;
        check_setting("backoff.reset_after", self.reset_after)?;
        if self.max < self.initial {
            return Err(format!(
                "backoff.max ({:?}) must be at least backoff.initial ({:?})",
                self.max, self.initial
            ));
        }
        Ok(())
    }
}

/// The delays of one retry loop.
#[derive(Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    envelope: ExponentialBackoff,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig, seed: u64) -> Self {
        Self {
            envelope: envelope(&config),
            config,
            rng: splitmix64(seed),
        }
    }

    pub(crate) fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// Starts again from the initial delay.
    pub(crate) fn reset(&mut self) {
        self.envelope = envelope(&self.config);
    }

    /// The next delay: uniform in `[1 ms, envelope]`, the envelope doubling up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let envelope = self.envelope.next().unwrap_or(self.config.max);
        self.rng = splitmix64(self.rng);
        let fraction = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        envelope.mul_f64(fraction).max(Duration::from_millis(1))
    }
}

fn envelope(config: &BackoffConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(config.initial)
        .with_max_delay(config.max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}
