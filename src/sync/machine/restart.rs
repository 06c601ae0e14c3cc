//! A machine handed from a sync task that ended without being stopped to the next one: parked
//! by the ended task's destructor ([`Machine::take`]), continued by the restarted task
//! ([`Machine::continue_from`]), so that a restart goes on like a running task after a failure.

use std::sync::Arc;

use super::{Machine, Stats};
use crate::backoff::Backoff;
use crate::snapshot::Snapshot;

/// Where a machine stood after its last completed [`Machine::handle_all`].
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Checkpoint {
    pub(super) listed: bool,
    pub(super) watched: bool,
    pub(super) cluster_id: Option<u64>,
    /// A verification found etcd's history rewritten and the relist that counts it as a reset
    /// had not completed.
    pub(super) rewritten: bool,
}

impl Machine {
    /// Carries the counters of a previous machine of the same cache over, so they keep going
    /// up when a sync task is restarted.
    pub(crate) fn continue_stats(&mut self, stats: Stats) {
        self.stats = stats;
    }

    /// Moves this machine out, leaving an inert one in its place: it has applied nothing and
    /// shares the service, codec, balancing and last snapshot. A sync task that ends without
    /// being stopped parks its machine this way for the next task, from its destructor, before
    /// the cache is told: so this reads no clock, calls no user code (no metric, no log) and
    /// cannot fail.
    pub(crate) fn take(&mut self) -> Machine {
        let inert = Machine::unapplied(
            self.service.clone(),
            self.codec.clone(),
            Backoff::new(*self.backoff.config(), 0),
            self.freshness,
            self.published.clone(),
            self.balancing.clone(),
        );
        std::mem::replace(self, inert)
    }

    /// Starts from `snapshot`, the cache's current one, when a sync task is restarted: until
    /// this machine's first list succeeds, what it publishes (a new freeze cause) keeps that
    /// snapshot's instances and revision, never its own empty start, so a cache is never
    /// cleared by a restart while etcd is down. Its freeze goes on from the same `since`. If
    /// the cache had listed before (its revision is above 0), instances first seen at this
    /// machine's first list are new to the caller (they warm up with slow start on).
    ///
    /// For the machine of the task that ended (see [`take`](Self::take)) this takes the
    /// snapshot published since, frozen with `TaskEnded`; the machine holds what it applied.
    /// If the cache never got the machine's last snapshot (the task ended between making it
    /// and publishing it), the next publish is a whole new snapshot, never only a new freshness
    /// on what the cache holds. If the task ended in the middle of
    /// [`handle_all`](Self::handle_all), nothing applied since the cache's snapshot is trusted:
    /// the machine keeps only the history of its last completed step (whether it had listed,
    /// the cluster id) and the snapshot's revision to check the next list against, takes
    /// `stats` (the cache's counters, as that step left them), and that list publishes a whole
    /// snapshot. The backoff starts over, as a new task's would.
    pub(crate) fn continue_from(&mut self, snapshot: Arc<Snapshot>, stats: Stats) {
        if std::mem::take(&mut self.stepping) {
            let Checkpoint {
                listed,
                watched,
                cluster_id,
                rewritten,
            } = self.checkpoint;
            self.entries.clear();
            self.quarantined.clear();
            self.revision = snapshot.revision();
            self.cluster_id = cluster_id;
            self.listed = listed;
            self.watched = watched;
            self.stats = stats;
            self.changed = false;
            self.regressions = 0;
            self.rewritten = rewritten;
            self.republish = listed;
        } else if self.listed
            && (!snapshot.same_instances(&self.published)
                || snapshot.revision() != self.published.revision())
        {
            self.changed = true;
        }
        self.backoff.reset();
        self.freshness = snapshot.freshness();
        self.first_published = snapshot.revision() > 0;
        self.published = snapshot;
    }
}
