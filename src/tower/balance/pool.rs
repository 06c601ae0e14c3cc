//! [`Pool`]: one inner service per instance, built on first need, kept while the instance is
//! in the snapshot, dropped when etcd removes it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::sync::OnceCell;

use crate::instance::Instance;
use crate::snapshot::Snapshot;

/// The service of one instance: connected once (shared by the requests that wait for it),
/// for the instance value it was built for.
pub(crate) struct Entry<S> {
    /// The instance as it was when the entry was made: a changed value (a new address) makes
    /// a new entry.
    pub(crate) instance: Arc<Instance>,
    pub(crate) service: OnceCell<S>,
    /// Set when a connection attempt of this entry failed: the requests that were waiting for
    /// it fail at once (and go elsewhere) instead of each trying again, one after another.
    pub(crate) failed: AtomicBool,
}

/// The services by instance id. Reads are lock-free (an `ArcSwap` of the map); inserts and
/// removals copy the map under a lock, which happens once per instance and per change.
pub(crate) struct Pool<S> {
    entries: ArcSwap<HashMap<Arc<str>, Arc<Entry<S>>>>,
    /// Serializes writers, so that none loses another's insert.
    write: Mutex<()>,
    /// The snapshot the pool was last pruned against.
    pruned: ArcSwap<Snapshot>,
}

impl<S> Pool<S> {
    pub(crate) fn new(snapshot: Arc<Snapshot>) -> Self {
        Self {
            entries: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            pruned: ArcSwap::new(snapshot),
        }
    }

    /// The entry of `instance`: the one there if it was made for the same value, else a new one
    /// (an instance whose value changed, even only its metadata, gets a new service: the
    /// constructor may read any of it).
    pub(crate) fn entry(&self, instance: &Arc<Instance>) -> Arc<Entry<S>> {
        if let Some(entry) = self.entries.load().get(instance.id())
            && (Arc::ptr_eq(&entry.instance, instance) || *entry.instance == **instance)
        {
            return Arc::clone(entry);
        }
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.entries.load();
        if let Some(entry) = current.get(instance.id())
            && (Arc::ptr_eq(&entry.instance, instance) || *entry.instance == **instance)
        {
            return Arc::clone(entry);
        }
        let entry = Arc::new(Entry {
            instance: Arc::clone(instance),
            service: OnceCell::new(),
            failed: AtomicBool::new(false),
        });
        // An instance the newest snapshot no longer holds (picked just before its removal was
        // pruned) gets a service for this request only: kept, it would outlive its instance.
        if self.pruned.load().get(instance.id()).is_none() {
            return entry;
        }
        let mut next = HashMap::clone(&current);
        next.insert(Arc::from(instance.id()), Arc::clone(&entry));
        self.entries.store(Arc::new(next));
        entry
    }

    /// Drops `entry` (its service failed), unless another has replaced it already.
    pub(crate) fn forget(&self, entry: &Arc<Entry<S>>) {
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.entries.load();
        let id = entry.instance.id();
        if current.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            let mut next = HashMap::clone(&current);
            next.remove(id);
            self.entries.store(Arc::new(next));
        }
    }

    /// Drops the entries of instances that `snapshot` no longer holds, if it holds other
    /// instances than the snapshot of the last prune. Called with the snapshots in the order
    /// they were published (by one pruner), so it never goes back to an older one. Instances
    /// that are draining, and every instance while the snapshot is frozen, keep their entries.
    pub(crate) fn prune(&self, snapshot: &Arc<Snapshot>) {
        if self.pruned.load().same_instances(snapshot) {
            return;
        }
        let _write = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        self.pruned.store(Arc::clone(snapshot));
        let current = self.entries.load();
        let ids: HashSet<&str> = snapshot.instances().iter().map(|i| i.id()).collect();
        if current.keys().all(|id| ids.contains(&**id)) {
            return;
        }
        let next: HashMap<_, _> = current
            .iter()
            .filter(|(id, _)| ids.contains(&***id))
            .map(|(id, entry)| (Arc::clone(id), Arc::clone(entry)))
            .collect();
        self.entries.store(Arc::new(next));
    }

    /// How many instances have an entry (connected or not).
    pub(crate) fn len(&self) -> usize {
        self.entries.load().len()
    }
}
