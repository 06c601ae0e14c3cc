//! [`ServiceCache`]: the always-readable view of one service.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use crate::balance::picked::{Call, Picked};
use crate::balance::select::{Selection, Selector};
use crate::balance::view::InstanceHealth;
use crate::diff::Diffs;
use crate::snapshot::{FreezeCause, Freshness, Snapshot};
use crate::sync::machine::{Machine, Stats};

/// Counters of what a cache's sync loop did; see [`ServiceCache::stats`].
pub type SyncStats = Stats;

/// A sequence count of a cache's publishes: even between publishes, odd while one is under way
/// (between [`begin`](Self::begin) and [`end`](Self::end)). Publishes of one cache never overlap:
/// its one sync task makes them, and [`Shared::task_ended`] publishes under the lock a restarted
/// task waits for.
///
/// Whoever reads an even count `c` and then loads `current` gets the snapshot of publish `c / 2`
/// or a newer one (`end` releases after the store). Whoever has seen a snapshot, through any
/// handle, and then reads the count, reads at least the odd count of its publish (`begin` comes
/// before the store, which releases it): so a reader never takes tables marked with an even
/// count below that for current once it has seen a newer snapshot.
#[derive(Debug, Default)]
struct PublishCount(AtomicU64);

impl PublishCount {
    /// The count now.
    #[inline]
    fn read(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// A publish starts: the count becomes odd.
    fn begin(&self) {
        let was = self.0.fetch_add(1, Ordering::AcqRel);
        debug_assert!(was % 2 == 0, "two publishes of one cache overlap");
    }

    /// The publish is in `current`: the count becomes even.
    fn end(&self) {
        let was = self.0.fetch_add(1, Ordering::Release);
        debug_assert!(was % 2 == 1, "a publish ended that had not begun");
    }
}

/// What the sync driver and every handle of one cache share.
pub(crate) struct Shared {
    pub(crate) service: Arc<str>,
    /// Written only by [`publish`](Self::publish), which keeps `publishes` in step.
    current: ArcSwap<Snapshot>,
    /// Counts publishes, odd while one is under way: a [`Selection`] tells by it whether its
    /// tables are still current without loading `current` itself.
    publishes: PublishCount,
    pub(crate) changes: watch::Sender<Arc<Snapshot>>,
    pub(crate) stats: Mutex<Stats>,
    pub(crate) last_error: Mutex<Option<(String, Option<FreezeCause>)>>,
    /// Whether a sync task runs for this cache: claimed before one is spawned, cleared when it
    /// ends without being stopped (its runtime shut down, or it panicked). A lock, not an atomic:
    /// [`task_ended`](Self::task_ended) publishes the frozen snapshot and clears the flag as one
    /// step, so whoever saw that snapshot and asks again is granted the restart.
    task_running: Mutex<bool>,
    /// The machine of a sync task that ended without being stopped, for the next task to go on
    /// with (see [`task_ended`](Self::task_ended)): what it applied, its revision and cluster
    /// id, its counters and backoff.
    parked: Mutex<Option<Machine>>,
}

impl Shared {
    /// The current snapshot, as an `Arc`.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub(crate) fn new(initial: Arc<Snapshot>) -> Self {
        Self {
            service: initial.service().into(),
            current: ArcSwap::new(initial.clone()),
            publishes: PublishCount::default(),
            changes: watch::Sender::new(initial),
            stats: Mutex::new(Stats::default()),
            last_error: Mutex::new(None),
            task_running: Mutex::new(false),
            parked: Mutex::new(None),
        }
    }

    /// Claims the start of a sync task for this cache: `true` (and the task counts as running)
    /// when none runs, `false` when one does. The lock is not held while the task is spawned: a
    /// task dropped at once (its runtime is shutting down) ends through
    /// [`task_ended`](Self::task_ended), which takes it too.
    pub(crate) fn claim_task(&self) -> bool {
        let mut running = self
            .task_running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        !std::mem::replace(&mut *running, true)
    }

    /// The machine a task that ended left (see [`task_ended`](Self::task_ended)), if any; taken
    /// by whoever claimed the restart.
    pub(crate) fn take_parked(&self) -> Option<Machine> {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Gives back a claim whose task could not be spawned (no runtime).
    pub(crate) fn release_task(&self) {
        *self
            .task_running
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = false;
    }

    /// Called when the sync task ends without being stopped (from its destructor: the runtime
    /// shut down, or the task panicked). Freezes the current snapshot with
    /// [`FreezeCause::TaskEnded`], so nobody takes it for live; the instances stay. `machine`,
    /// the task's, is parked for the next task (see [`take_parked`](Self::take_parked)), so that
    /// a restart goes on like a running task after a failure: its first list is a relist,
    /// checked against the revision and cluster it had applied.
    pub(crate) fn task_ended(&self, machine: Option<Machine>) {
        let mut running = self
            .task_running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Parked before the flag is cleared: whoever is granted the restart finds it.
        *self.parked.lock().unwrap_or_else(PoisonError::into_inner) = machine;
        let current = self.current.load_full();
        // The clock is read here, outside the sans-IO machine, like every other time input.
        let since = match current.freshness() {
            Freshness::Frozen { since, .. } => since,
            Freshness::Live => std::time::Instant::now(),
        };
        let frozen = current.with(
            current.revision(),
            Freshness::Frozen {
                since,
                cause: FreezeCause::TaskEnded,
            },
        );
        self.set_last_error(Some((
            "the sync task ended (its tokio runtime shut down, or it panicked); \
             ask Discovery::service for the service again to restart it"
                .to_owned(),
            Some(FreezeCause::TaskEnded),
        )));
        // Both under the lock: whoever sees the frozen snapshot and claims a restart waits for
        // the flag to be cleared, and a restarted task publishes after this snapshot, never
        // before it.
        self.publish(Arc::new(frozen));
        *running = false;
        drop(running);
        // Logged last: the application's subscriber is user code, and may panic (or find its
        // thread's state gone, in a thread being torn down); the cache has been told by then.
        tracing::warn!(
            service = %self.service,
            revision = current.revision(),
            "the sync task ended without being stopped; the snapshot is frozen until the service is asked for again"
        );
    }

    /// Makes `snapshot` the one readers see, then tells subscribers.
    pub(crate) fn publish(&self, snapshot: Arc<Snapshot>) {
        self.publishes.begin();
        self.current.store(snapshot.clone());
        self.publishes.end();
        self.changes.send_replace(snapshot);
    }

    /// The publish count (see [`PublishCount`]): even between publishes, odd during one.
    #[inline]
    pub(crate) fn publishes(&self) -> u64 {
        self.publishes.read()
    }

    /// A [`publish`](Self::publish) one step at a time, for tests of what readers see between
    /// the steps: the count made odd.
    #[cfg(test)]
    pub(crate) fn begin_publish(&self) {
        self.publishes.begin();
    }

    /// The second step of a publish: `snapshot` stored.
    #[cfg(test)]
    pub(crate) fn store_published(&self, snapshot: Arc<Snapshot>) {
        self.current.store(snapshot);
    }

    /// The last step of a publish: the count made even.
    #[cfg(test)]
    pub(crate) fn end_publish(&self) {
        self.publishes.end();
    }

    pub(crate) fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_stats(&self, stats: Stats) {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = stats;
    }

    /// Records the last failure and the freeze cause it came with, if any (`None` clears).
    pub(crate) fn set_last_error(&self, error: Option<(String, Option<FreezeCause>)>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(message, _)| message.clone())
    }

    /// The freeze cause of the last failure, kept after the cache is live again.
    pub(crate) fn last_failure_cause(&self) -> Option<FreezeCause> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|(_, cause)| *cause)
    }
}

/// Keeps the sync task alive; dropping the last handle of a cache stops it.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    /// Never sent on: its receivers see it closed when the last handle is dropped. A restarted
    /// task subscribes anew.
    pub(crate) stop: watch::Sender<()>,
    /// The health registry and ejection state, handed to every sync task of this cache, so a
    /// restarted task keeps them.
    pub(crate) balancing: Arc<crate::balance::health::Balancing>,
}

/// The endpoints of one service, kept in step with etcd by a background task.
///
/// Reading is lock-free and never waits: [`load`](Self::load), [`snapshot`](Self::snapshot) and
/// the picks read the current [`Snapshot`] through an [`ArcSwap`], while the task publishes new
/// snapshots as etcd changes. When etcd is unreachable the snapshot is frozen, never cleared:
/// picks keep returning the last known instances, and [`freshness`](Self::freshness) says
/// [`Frozen`](Freshness::Frozen).
///
/// Cloning is cheap and clones share the same task; the task stops when the last clone is
/// dropped.
///
/// ```
/// # use etcd_registry::{Discovery, Instance, MemoryBackend, Codec, KeyLayout};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// # let etcd = MemoryBackend::new();
/// # let codec = Codec::new(KeyLayout::Native, "/services");
/// # for n in 1..=2 {
/// #     let i = Instance::builder("user", format!("10.0.0.{n}:8080")).id(format!("u{n}")).build()?;
/// #     etcd.put(codec.key(&i, 0), codec.encode_value(&i));
/// # }
/// let discovery = Discovery::memory(etcd).namespace("/services").build()?;
/// let users = discovery.service("user").await?;
///
/// // Round-robin: two picks in a row on one thread give both instances.
/// let a = users.pick().expect("an instance is up");
/// let b = users.pick().expect("an instance is up");
/// assert_ne!(a.addr(), b.addr());
///
/// // Hold an instance across an `.await` as an `Arc`.
/// let target = a.to_arc();
/// # let _ = target;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ServiceCache {
    /// Read on every pick: held directly, one pointer from the `ArcSwap`.
    shared: Arc<Shared>,
    /// Keeps the sync task running while any clone lives.
    handle: Arc<Handle>,
}

impl ServiceCache {
    pub(crate) fn new(handle: Arc<Handle>) -> Self {
        Self {
            shared: handle.shared.clone(),
            handle,
        }
    }

    pub(crate) fn handle(&self) -> &Arc<Handle> {
        &self.handle
    }

    #[inline]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The service this cache follows.
    pub fn service(&self) -> &str {
        &self.shared().service
    }

    /// The current snapshot, without touching its reference count: the cheapest read.
    ///
    /// The guard is meant to be short-lived (within one request, not across an `.await`); use
    /// [`snapshot`](Self::snapshot) to keep one.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.shared().current.load()
    }

    /// The current snapshot, as an `Arc` that can be kept and sent across tasks.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared().current.load_full()
    }

    /// The next instance in round-robin order, or `None` when no instance is up.
    ///
    /// Each thread keeps its own cursor, so picks from many threads never contend, and each
    /// thread cycles through every up instance. Draining instances are never picked, ejected
    /// ones are skipped (see [`OutlierEjection`](crate::OutlierEjection)), and warming ones are
    /// taken at their share (see [`SlowStart`](crate::SlowStart)).
    #[inline]
    pub fn pick(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_round_robin)
    }

    /// A uniformly random up instance, or `None` when no instance is up.
    #[inline]
    pub fn pick_random(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_random)
    }

    /// The next instance in smooth weighted round-robin order (nginx's algorithm), or `None`
    /// when no instance is up.
    ///
    /// Over each cycle of `sum(weights)` picks on one thread, each instance is picked exactly
    /// [`weight`](crate::Instance::weight) times, spread out rather than in runs (a sum above 65,536 is
    /// scaled down to it, each instance keeping at least one turn). The cycle is built once per
    /// snapshot, on the first weighted pick.
    ///
    /// ```
    /// # use etcd_registry::{Discovery, Instance, MemoryBackend, Codec, KeyLayout};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), etcd_registry::Error> {
    /// # let etcd = MemoryBackend::new();
    /// # let codec = Codec::new(KeyLayout::Native, "/services");
    /// # for (n, weight) in [(1, 3), (2, 1)] {
    /// #     let i = Instance::builder("user", format!("10.0.0.{n}:80")).weight(weight).build()?;
    /// #     etcd.put(codec.key(&i, 0), codec.encode_value(&i));
    /// # }
    /// let users = Discovery::memory(etcd).namespace("/services").build()?.service("user").await?;
    /// let picks: Vec<String> = (0..4)
    ///     .map(|_| users.pick_weighted().expect("up").addr().to_owned())
    ///     .collect();
    /// assert_eq!(picks.iter().filter(|a| *a == "10.0.0.1:80").count(), 3, "weights 3:1");
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn pick_weighted(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_weighted)
    }

    /// A random up instance, with probability proportional to its weight (Vose's alias
    /// method: O(1) per pick), or `None` when no instance is up.
    #[inline]
    pub fn pick_weighted_random(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_weighted_random)
    }

    /// The instance `key` maps to by consistent hashing (weighted Maglev over XXH3-64), or
    /// `None` when no instance is up: sticky routing for a user, a session, a shard.
    ///
    /// Every process, in every release, maps a key to the same instance for the same set of
    /// instances (the hash and the table are specified in
    /// [`balance::hash`](crate::balance::hash), and tests pin golden values). When an instance
    /// joins, about `1/(n+1)` of the keys move to it, and Maglev moves some more between the
    /// others: measured over 100,000 keys, 1.3 × `1/(n+1)` in all for 10 instances, 3 × for
    /// 100 (2 % of the keys); when one of 10 leaves or drains, its keys and 2.7 % of the
    /// others' move. Keys of an ejected instance go to their next choice and come back when it
    /// returns (only its keys move). Slow start does not apply: keys must not move while an
    /// instance warms up.
    ///
    /// ```
    /// # use etcd_registry::{Discovery, Instance, MemoryBackend, Codec, KeyLayout};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), etcd_registry::Error> {
    /// # let etcd = MemoryBackend::new();
    /// # let codec = Codec::new(KeyLayout::Native, "/services");
    /// # for n in 1..=3 {
    /// #     let i = Instance::builder("user", format!("10.0.0.{n}:80")).build()?;
    /// #     etcd.put(codec.key(&i, 0), codec.encode_value(&i));
    /// # }
    /// let users = Discovery::memory(etcd).namespace("/services").build()?.service("user").await?;
    /// let first = users.pick_by("user-42").expect("up").to_arc();
    /// assert_eq!(users.pick_by("user-42").expect("up").addr(), first.addr(), "sticky");
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn pick_by(&self, key: impl AsRef<[u8]>) -> Option<Picked> {
        self.picked(|snapshot| snapshot.pick_by_key(key.as_ref()))
    }

    /// Power of two choices on load (the pick for request/response traffic), started as a
    /// [`Call`], or `None` when no instance is up.
    ///
    /// Two random instances; the one with the lower cost (peak latency EWMA × in-flight
    /// requests, over the success rate; see [`balance::p2c`](crate::balance::p2c)) wins, except
    /// that an instance p2c left alone for a second is taken anyway, to probe it. End the
    /// [`Call`] with [`success`](Call::success) or [`failure`](Call::failure): that is what
    /// feeds the costs and outlier ejection.
    ///
    /// ```
    /// # use etcd_registry::{Discovery, Instance, MemoryBackend, Codec, KeyLayout};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), etcd_registry::Error> {
    /// # let etcd = MemoryBackend::new();
    /// # let codec = Codec::new(KeyLayout::Native, "/services");
    /// # for n in 1..=2 {
    /// #     let i = Instance::builder("user", format!("10.0.0.{n}:80")).build()?;
    /// #     etcd.put(codec.key(&i, 0), codec.encode_value(&i));
    /// # }
    /// let users = Discovery::memory(etcd).namespace("/services").build()?.service("user").await?;
    /// let call = users.pick_p2c().expect("an instance is up");
    /// // ... send the request to call.addr() ...
    /// call.success();
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn pick_p2c(&self) -> Option<Call> {
        self.load().pick_p2c()
    }

    /// The instances with the tags and metadata of `selector`, with every picker of their
    /// own; see [`Selection`].
    pub fn select(&self, selector: Selector) -> Selection {
        Selection::new(self.clone(), selector)
    }

    /// The passive health of every instance of the current snapshot, in key order: in-flight
    /// requests, latency and success EWMAs, ejection. For debugging and status pages.
    pub fn health(&self) -> Vec<InstanceHealth> {
        let snapshot = self.load();
        let now = crate::balance::now();
        // Ejections over by now end (and leave the `ejected` gauge) before they are shown.
        snapshot.tables().balancing.sweep_if_due(now);
        snapshot
            .instances()
            .iter()
            .zip(snapshot.tables().slots())
            .map(|(instance, slot)| InstanceHealth::read(instance, slot.get().map(|h| &**h), now))
            .collect()
    }

    #[inline]
    fn picked(&self, pick: impl FnOnce(&Snapshot) -> Option<u32>) -> Option<Picked> {
        let snapshot = self.load();
        let index = pick(&snapshot)?;
        Some(Picked::new(snapshot, index))
    }

    /// A receiver of the snapshots published from now on. The current one counts as seen; read
    /// it with `borrow()`. Like every `tokio::sync::watch`, a slow receiver sees the latest
    /// snapshot, not each one in between.
    ///
    /// ```
    /// # use etcd_registry::{Discovery, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), etcd_registry::Error> {
    /// # let etcd = MemoryBackend::new();
    /// let users = Discovery::memory(etcd.clone()).build()?.service("user").await?;
    /// let mut changes = users.changes();
    /// etcd.put("user/u1", r#"{"addr":"10.0.0.1:80"}"#);
    /// changes.changed().await.expect("the cache is alive");
    /// assert_eq!(changes.borrow_and_update().len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn changes(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared().changes.subscribe()
    }

    /// What changes between consecutive snapshots, instance by instance: for callers that keep
    /// something per instance (a connection, a pool). See [`Diffs`].
    pub fn diffs(&self) -> Diffs {
        Diffs::new(self.clone())
    }

    /// Whether the cache follows etcd right now, or is frozen at the last known state.
    pub fn freshness(&self) -> Freshness {
        self.load().freshness()
    }

    /// The last failure of the sync loop (a list, a watch, or a stall), cleared once a watch
    /// is established again. Useful to say why a cache is frozen, or why it never listed.
    pub fn last_error(&self) -> Option<String> {
        self.shared().last_error()
    }

    /// Counters of the sync loop: relists, resets, watch restarts, events, decode errors.
    pub fn stats(&self) -> SyncStats {
        self.shared().stats()
    }
}

impl fmt::Debug for ServiceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.load();
        f.debug_struct("ServiceCache")
            .field("service", &self.service())
            .field("revision", &snapshot.revision())
            .field("instances", &snapshot.len())
            .field("freshness", &snapshot.freshness())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        let balancing = crate::balance::health::Balancing::new(
            "user".into(),
            crate::OutlierEjection::default(),
            None,
        );
        let initial = Snapshot::new(
            "user".into(),
            7,
            Freshness::Live,
            Arc::default(),
            Arc::default(),
            balancing,
        );
        Arc::new(Shared::new(Arc::new(initial)))
    }

    fn says_task_ended(shared: &Shared) -> bool {
        matches!(
            shared.current.load().freshness(),
            Freshness::Frozen {
                cause: FreezeCause::TaskEnded,
                ..
            }
        )
    }

    /// Issue: whoever saw the `TaskEnded` snapshot and asked for the service again at once
    /// could still find the task "running" (the flag was cleared just after the publish), so no
    /// task was restarted and the cache stayed frozen for good. Seeing the snapshot now implies
    /// that a restart is granted.
    #[test]
    fn whoever_sees_task_ended_may_restart_the_task() {
        for round in 0..2_000 {
            let shared = shared();
            assert!(shared.claim_task(), "round {round}: no task ran yet");
            let ending = std::thread::spawn({
                let shared = shared.clone();
                move || shared.task_ended(None)
            });
            while !says_task_ended(&shared) {
                std::hint::spin_loop();
            }
            let granted = shared.claim_task();
            ending.join().expect("task_ended does not panic");
            assert!(
                granted,
                "round {round}: TaskEnded seen, yet no restart granted"
            );
        }
    }
}
