//! [`Diffs`]: what changed between consecutive snapshots of a cache, instance by instance.
//!
//! For callers that keep something per instance (a long-lived connection, a pool, a
//! subscription): they apply each [`Diff`] to their own state instead of comparing snapshots.
//! The first diff adds every instance of the current snapshot, so applying every diff from the
//! start rebuilds the snapshot's instance list exactly.
//!
//! Diffs follow the snapshots, so they keep the cache's guarantees: while the cache is frozen
//! nothing is removed (a frozen snapshot keeps every instance), and a diff in which nothing
//! changed (a snapshot that differs only in freshness or revision) is not yielded.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::watch;

use crate::cache::ServiceCache;
use crate::instance::Instance;
use crate::snapshot::Snapshot;

/// One instance's change between two consecutive snapshots. Instances are matched by
/// [`id`](Instance::id), the last segment of their etcd key.
///
/// The three cases are all there can be (an instance is new, gone, or changed), so a match on
/// them needs no wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceChange {
    /// An instance that was not in the previous snapshot.
    Added(Arc<Instance>),
    /// An instance that is no longer in the snapshot: etcd deleted its key (or its lease ran
    /// out). Never while the cache is frozen.
    Removed(Arc<Instance>),
    /// An instance whose value changed: address, state (up or draining), weight, tags or
    /// metadata.
    Updated {
        /// The instance as it was.
        old: Arc<Instance>,
        /// The instance as it is now.
        new: Arc<Instance>,
    },
}

impl InstanceChange {
    /// The instance as it is after the change (for a removal, as it was last seen).
    pub fn instance(&self) -> &Arc<Instance> {
        match self {
            Self::Added(instance) | Self::Removed(instance) => instance,
            Self::Updated { new, .. } => new,
        }
    }
}

/// The changes from one snapshot to the next, with the snapshot they lead to.
#[derive(Clone)]
#[non_exhaustive]
pub struct Diff {
    /// The snapshot after the changes.
    pub snapshot: Arc<Snapshot>,
    /// The changes, removals first, then updates and additions in key order of the new snapshot.
    pub changes: Vec<InstanceChange>,
}

impl fmt::Debug for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Diff")
            .field("revision", &self.snapshot.revision())
            .field("freshness", &self.snapshot.freshness())
            .field("changes", &self.changes)
            .finish()
    }
}

/// The changes between `old` (none: empty) and `new`.
pub fn diff(old: Option<&Snapshot>, new: &Snapshot) -> Vec<InstanceChange> {
    let Some(old) = old else {
        return new
            .instances()
            .iter()
            .map(|i| InstanceChange::Added(Arc::clone(i)))
            .collect();
    };
    if old.same_instances(new) {
        return Vec::new();
    }
    let mut before: HashMap<&str, &Arc<Instance>> =
        old.instances().iter().map(|i| (i.id(), i)).collect();
    let mut kept = Vec::with_capacity(new.len());
    for instance in new.instances() {
        match before.remove(instance.id()) {
            None => kept.push(InstanceChange::Added(Arc::clone(instance))),
            Some(was) if Arc::ptr_eq(was, instance) || **was == **instance => {}
            Some(was) => kept.push(InstanceChange::Updated {
                old: Arc::clone(was),
                new: Arc::clone(instance),
            }),
        }
    }
    // Removals in the old snapshot's key order.
    let mut changes: Vec<InstanceChange> = old
        .instances()
        .iter()
        .filter(|i| before.contains_key(i.id()))
        .map(|i| InstanceChange::Removed(Arc::clone(i)))
        .collect();
    changes.extend(kept);
    changes
}

/// The diffs of a cache's snapshots, from [`ServiceCache::diffs`](crate::ServiceCache::diffs).
///
/// Read them with [`next`](Self::next), or as a [`Stream`] with
/// [`into_stream`](Self::into_stream). They hold a clone of the cache, so the cache keeps
/// following etcd while they are read, and they never end.
///
/// ```
/// # use etcd_registry::{Discovery, MemoryBackend, InstanceChange};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// let etcd = MemoryBackend::new();
/// etcd.put("user/u1", r#"{"addr":"10.0.0.1:80"}"#);
/// let users = Discovery::memory(etcd.clone()).build()?.service("user").await?;
/// let mut diffs = users.diffs();
/// // The first diff adds what the cache holds now.
/// let first = diffs.next().await.expect("the cache is alive");
/// assert!(matches!(&first.changes[..], [InstanceChange::Added(i)] if i.id() == "u1"));
///
/// etcd.put("user/u2", r#"{"addr":"10.0.0.2:80"}"#);
/// etcd.delete("user/u1");
/// let mut seen = Vec::new();
/// while seen.len() < 2 {
///     seen.extend(diffs.next().await.expect("the cache is alive").changes);
/// }
/// assert!(seen.iter().any(|c| matches!(c, InstanceChange::Added(i) if i.id() == "u2")));
/// assert!(seen.iter().any(|c| matches!(c, InstanceChange::Removed(i) if i.id() == "u1")));
/// # Ok(()) }
/// ```
pub struct Diffs {
    /// Keeps the cache (and its sync task) alive.
    _cache: ServiceCache,
    changes: watch::Receiver<Arc<Snapshot>>,
    last: Option<Arc<Snapshot>>,
}

impl Diffs {
    pub(crate) fn new(cache: ServiceCache) -> Self {
        Self {
            changes: cache.changes(),
            _cache: cache,
            last: None,
        }
    }

    /// The next diff with at least one change (the first one: every instance, possibly none),
    /// waiting for the cache to publish one. `None` never happens while the diffs hold their
    /// cache; it is there for a cache whose snapshots can no longer change.
    pub async fn next(&mut self) -> Option<Diff> {
        loop {
            if self.last.is_some() && self.changes.changed().await.is_err() {
                return None;
            }
            let snapshot = Arc::clone(&self.changes.borrow_and_update());
            let changes = diff(self.last.as_deref(), &snapshot);
            let first = self.last.is_none();
            self.last = Some(Arc::clone(&snapshot));
            if first || !changes.is_empty() {
                return Some(Diff { snapshot, changes });
            }
        }
    }

    /// These diffs as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Diff> + Send + 'static {
        futures_util::stream::unfold(self, |mut diffs| async move {
            let diff = diffs.next().await?;
            Some((diff, diffs))
        })
    }
}

impl fmt::Debug for Diffs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Diffs")
            .field("last_revision", &self.last.as_ref().map(|s| s.revision()))
            .finish()
    }
}
