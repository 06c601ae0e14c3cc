//! Injected faults: etcd unreachable, hung, slow, its streams broken, restored from a backup
//! or wiped; and [`MemoryState`], the backup.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::MemoryBackend;
use super::store::Stored;
use crate::backend::KeyValue;

impl MemoryBackend {
    /// Cuts this client off from etcd (`false`) or reconnects it (`true`).
    ///
    /// While unreachable, new `list`/`watch` calls and progress requests fail with
    /// [`Unavailable`](crate::backend::BackendErrorKind::Unavailable). Going unreachable also ends every
    /// open watch stream with one `Unavailable` error. Writes through this handle keep working:
    /// they model other clients.
    pub fn set_reachable(&self, reachable: bool) {
        let mut state = self.lock();
        state.reachable = reachable;
        if !reachable {
            state.break_watches("etcd is unreachable");
        }
    }

    /// Whether progress requests are answered (default true). `false` models etcd's gRPC proxy
    /// (and releases before 3.4), which take the request and never answer it, while answering
    /// everything else.
    pub fn set_progress_answered(&self, answered: bool) {
        self.lock().answers_progress = answered;
    }

    /// Hangs etcd, as if the process were stopped.
    ///
    /// Open watch streams stop delivering (their messages are held back, not lost), progress
    /// requests are accepted but not answered, and new `list`/`watch` calls wait until
    /// [`resume`](Self::resume). Writes through this handle still apply; watches see them after
    /// the resume.
    pub fn stall(&self) {
        self.lock().stalled = true;
    }

    /// Ends a [`stall`](Self::stall): delivers everything held back, in order, and lets waiting
    /// calls proceed (they answer with the state at that moment).
    pub fn resume(&self) {
        {
            let mut state = self.lock();
            state.stalled = false;
            state.flush();
        }
        self.shared.resumed.notify_waiters();
    }

    /// Drops the connection: every open watch stream yields one
    /// [`Unavailable`](crate::backend::BackendErrorKind::Unavailable) error and ends. New calls succeed.
    pub fn break_streams(&self) {
        self.lock().break_watches("connection lost");
    }

    /// Makes every later `list`/`watch` call sleep `latency` (on tokio's clock) before it is
    /// answered. `Duration::ZERO` turns it off.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Takes a backup: every key, the revision, and the leases with their TTLs.
    pub fn snapshot_state(&self) -> MemoryState {
        self.lock().snapshot()
    }

    /// Restores a backup, as etcd restored from a snapshot and restarted.
    ///
    /// The revision goes back to the backup's, a new cluster id is assigned (different from
    /// every one this backend had and from the backup's), the event history is lost (watches
    /// from the backup's revision or earlier get
    /// [`Compacted`](crate::backend::WatchMessage::Compacted), watches from later revisions wait for
    /// them), every open watch stream yields one
    /// [`Unavailable`](crate::backend::BackendErrorKind::Unavailable) error and ends, and every lease in
    /// the backup gets a full TTL from now (as after an etcd leader change). Lease ids handed
    /// out since the backup are not reused. Fault settings (reachability, stall, latency) are
    /// kept.
    pub fn restore(&self, backup: MemoryState) {
        {
            let mut state = self.lock();
            state.restore(backup, Instant::now(), false);
        }
        self.shared.reaper_wake.notify_one();
    }

    /// Replaces the store with an empty one at revision 1 and a new cluster id, as an etcd
    /// rebuilt from nothing. Open watch streams end with an
    /// [`Unavailable`](crate::backend::BackendErrorKind::Unavailable) error; all leases are gone.
    pub fn wipe(&self) {
        let mut state = self.lock();
        let empty = state.empty_snapshot();
        state.restore(empty, Instant::now(), false);
    }

    /// [`wipe`](Self::wipe), but the cluster id stays: an etcd whose data directory was deleted
    /// and that was started again with unchanged flags (same name, peer URLs and cluster
    /// token), or restored from a snapshot with the default token. Its new history reuses
    /// revisions the old one had; only what it holds at them tells the two apart.
    pub fn wipe_keeping_identity(&self) {
        let mut state = self.lock();
        let empty = state.empty_snapshot();
        state.restore(empty, Instant::now(), true);
    }
}

/// A backup of a [`MemoryBackend`]: every key, the revision, and the leases. Taken with
/// [`MemoryBackend::snapshot_state`], applied with [`MemoryBackend::restore`].
#[derive(Clone, PartialEq, Eq)]
pub struct MemoryState {
    pub(super) kvs: BTreeMap<Vec<u8>, Stored>,
    pub(super) revision: i64,
    pub(super) cluster_id: u64,
    pub(super) leases: BTreeMap<i64, SnapshotLease>,
    pub(super) next_lease_id: i64,
}

/// A lease as kept in a [`MemoryState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SnapshotLease {
    pub(super) ttl: Duration,
    pub(super) keys: BTreeSet<Vec<u8>>,
}

impl MemoryState {
    /// The store revision the backup was taken at.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The cluster id of the backend the backup was taken from.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Every key in the backup, in key order.
    pub fn kvs(&self) -> Vec<KeyValue> {
        self.kvs
            .iter()
            .map(|(key, stored)| stored.to_key_value(key))
            .collect()
    }
}

impl fmt::Debug for MemoryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryState")
            .field("revision", &self.revision)
            .field("cluster_id", &self.cluster_id)
            .field("keys", &self.kvs.len())
            .field("leases", &self.leases.len())
            .finish()
    }
}
