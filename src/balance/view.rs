//! [`InstanceHealth`]: one instance's passive health, as read for debugging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::Health;
use crate::instance::Instance;

/// One instance's passive health at the time it was read: what p2c weighs and what outlier
/// ejection decided. From [`ServiceCache::health`](crate::ServiceCache::health); for debugging
/// and status pages (reading it allocates).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstanceHealth {
    /// The instance.
    pub instance: Arc<Instance>,
    /// Requests started ([`Call`](crate::Call)s) and not yet ended.
    pub in_flight: u32,
    /// The peak-sensitive latency EWMA (zero before the first reported success).
    pub latency: Duration,
    /// The success-rate EWMA, from 0.0 to 1.0 (1.0 before any report).
    pub success_rate: f64,
    /// Failures reported in a row since the last success or ejection.
    pub consecutive_failures: u32,
    /// The ejection multiplier as of the last ejection: how many times it was ejected, less
    /// the healthy periods between ejections (those since the last one count at the next),
    /// at most `ceil(max_ejection_time / base_ejection_time)`.
    pub times_ejected: u32,
    /// When its ejection ends, if it is ejected (on tokio's clock).
    pub ejected_until: Option<Instant>,
    /// Back from an ejection and not yet proven: one failure ejects it again.
    pub on_probation: bool,
    /// When the cache first saw it, if after the first list (it may be warming up). Known with
    /// slow start on only: without it nothing warms up, and health is made on first need.
    pub first_seen: Option<Instant>,
}

impl InstanceHealth {
    /// What `health` says of `instance` (an instance with no health yet was never reported:
    /// idle, no latency, all successes).
    pub(crate) fn read(instance: &Arc<Instance>, health: Option<&Health>, now: Instant) -> Self {
        let Some(health) = health else {
            return Self {
                instance: Arc::clone(instance),
                in_flight: 0,
                latency: Duration::ZERO,
                success_rate: 1.0,
                consecutive_failures: 0,
                times_ejected: 0,
                ejected_until: None,
                on_probation: false,
                first_seen: None,
            };
        };
        Self {
            instance: Arc::clone(instance),
            in_flight: health.in_flight(),
            latency: Duration::from_nanos(health.latency_nanos() as u64),
            success_rate: health.success_rate(),
            consecutive_failures: health.consecutive_failures(),
            times_ejected: health.times_ejected(),
            ejected_until: health.ejected_until().filter(|&until| until > now),
            on_probation: health.on_probation(),
            first_seen: health.born(),
        }
    }
}
