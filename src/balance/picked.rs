//! What a pick returns: [`Picked`], and [`Call`] for a request whose outcome is tracked.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::Guard;

use super::clock;
use super::health::{Health, duration_nanos};
use crate::instance::Instance;
use crate::snapshot::Snapshot;

/// An instance picked from a snapshot, borrowed from it: a pick from a [`ServiceCache`] or a
/// [`Selection`](crate::Selection) touches no reference count (it holds the arc-swap guard of
/// the snapshot). Only a selection's pick that finds its view out of date (after or during a
/// publish) makes a new one and holds an `Arc` of it.
///
/// [`ServiceCache`]: crate::ServiceCache
///
/// Dereferences to the [`Instance`]. Meant to be short-lived, like the guard of
/// [`ServiceCache::load`](crate::ServiceCache::load): keep [`to_arc`](Self::to_arc) across an
/// `.await`, or turn it into a [`Call`] with [`start`](Self::start).
///
/// Reporting is optional and costs nothing when not done: report the request's outcome with
/// [`success`](Self::success) or [`failure`](Self::failure) so that an instance that keeps
/// failing is ejected (see [`OutlierEjection`](crate::OutlierEjection)); dropping it reports
/// nothing.
pub struct Picked {
    /// Arc-swap's guard (no reference-count write), or, for a selection's pick that made a new
    /// view, an `Arc` wrapped in a guard ([`Guard::from_inner`]): reading the instance is the
    /// same code, without a branch, for both.
    snapshot: Guard<Arc<Snapshot>>,
    index: u32,
}

impl Picked {
    pub(crate) fn new(snapshot: Guard<Arc<Snapshot>>, index: u32) -> Self {
        Self { snapshot, index }
    }

    /// The instance as an `Arc`, to keep beyond this pick.
    pub fn to_arc(&self) -> Arc<Instance> {
        Arc::clone(self.as_arc())
    }

    fn as_arc(&self) -> &Arc<Instance> {
        // `index` came from this very snapshot's pick tables, which only hold positions of its
        // own instance list: the lookup cannot miss.
        &self.snapshot.instances()[self.index as usize]
    }

    /// The instance's health, made now if it has none yet.
    fn health(&self) -> Option<&Arc<Health>> {
        self.snapshot
            .tables()
            .health_or_new(self.index, self.snapshot.instances())
    }

    /// The snapshot the instance was picked from.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Reports that the request to this instance succeeded after `latency`: it resets the
    /// instance's consecutive failures, restores an instance on probation, and feeds the latency
    /// and success-rate EWMAs that [`pick_p2c`](crate::ServiceCache::pick_p2c) weighs.
    pub fn success(self, latency: Duration) {
        if let Some(health) = self.health() {
            health.on_success(health.stamp(clock::now()), Some(duration_nanos(latency)));
        }
    }

    /// Reports that the request to this instance failed: after the consecutive-failure threshold
    /// (or at once, on probation) the instance is ejected.
    pub fn failure(self) {
        if let Some(health) = self.health() {
            health.on_failure(clock::now());
        }
    }

    /// Starts a request to this instance: counts it in flight (for p2c) and times it until its
    /// outcome is reported on the [`Call`].
    pub fn start(self) -> Call {
        let instance = self.to_arc();
        let health = self.health().cloned();
        let now = clock::now();
        let stamp = health.as_ref().map_or(0, |health| health.stamp(now));
        Call::new(instance, health, now, stamp)
    }
}

impl Deref for Picked {
    type Target = Instance;

    #[inline]
    fn deref(&self) -> &Instance {
        self.as_arc()
    }
}

impl fmt::Debug for Picked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A request in flight to a picked instance, from [`ServiceCache::pick_p2c`] or
/// [`Picked::start`].
///
/// It counts in the instance's in-flight load until it ends. End it with
/// [`success`](Self::success) (its latency is the time since the pick) or
/// [`failure`](Self::failure); dropping it reports it *dropped*: neither (a request cancelled by
/// the caller says nothing about the instance). Dereferences to the [`Instance`]; it owns what
/// it needs, so it can be held across `.await`s and sent to other tasks.
///
/// [`ServiceCache::pick_p2c`]: crate::ServiceCache::pick_p2c
pub struct Call {
    instance: Arc<Instance>,
    /// `None` only for an instance whose health was gone (never in practice: every snapshot
    /// holds the health of each of its instances).
    health: Option<Arc<Health>>,
    started: Instant,
    /// `started` as a stamp of `health` (0 without health).
    started_stamp: u64,
    ended: bool,
}

impl Call {
    pub(crate) fn new(
        instance: Arc<Instance>,
        health: Option<Arc<Health>>,
        started: Instant,
        started_stamp: u64,
    ) -> Self {
        if let Some(health) = &health {
            health.start();
        }
        Self {
            instance,
            health,
            started,
            started_stamp,
            ended: false,
        }
    }

    /// Starts the request's clock again now: for a caller that picked, then had to wait for
    /// something that is not the instance's doing (a connection being set up) before sending.
    #[cfg(feature = "tower")]
    pub(crate) fn restart_clock(&mut self) {
        self.started = clock::now();
        if let Some(health) = &self.health {
            self.started_stamp = health.stamp(self.started);
        }
    }

    /// The instance, as an `Arc`.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// When the request started (the pick), on tokio's clock.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The request succeeded; its latency is the time since the pick.
    pub fn success(mut self) {
        self.ended = true;
        if let Some(health) = &self.health {
            // One conversion of the clock read: the latency is a difference of stamps.
            let stamp = health.stamp(clock::now());
            health.finish();
            health.on_success(stamp, Some(stamp.saturating_sub(self.started_stamp)));
        }
    }

    /// The request failed: counts towards the instance's ejection.
    pub fn failure(mut self) {
        self.ended = true;
        if let Some(health) = &self.health {
            health.finish();
            health.on_failure(clock::now());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.ended
            && let Some(health) = &self.health
        {
            health.finish();
            health.balancing().count_dropped();
        }
    }
}

impl Deref for Call {
    type Target = Instance;

    #[inline]
    fn deref(&self) -> &Instance {
        &self.instance
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("instance", &self.instance)
            .field("started", &self.started)
            .finish()
    }
}
