//! The store itself: key space, history, leases and watchers.
//!
//! Everything here is synchronous and runs under the backend's mutex, so each method is atomic
//! with respect to every other operation on the same backend.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::faults::SnapshotLease;
use super::{MemoryState, TxnOp};
use crate::backend::{
    BackendError, BackendErrorKind, Event, EventKind, Header, KeyRevision, KeyValue, WatchMessage,
};

/// One item of a watch stream.
pub(super) type Item = Result<WatchMessage, BackendError>;

/// The cluster id of a new backend.
pub(super) const INITIAL_CLUSTER_ID: u64 = 0x1000;

/// The first lease id handed out.
const FIRST_LEASE_ID: i64 = 0x7000_0001;

/// What the store keeps for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stored {
    pub(super) value: Vec<u8>,
    pub(super) create_revision: i64,
    pub(super) mod_revision: i64,
    pub(super) version: i64,
    pub(super) lease: i64,
}

impl Stored {
    /// The key as a keys-only read shows it.
    fn key_revision(&self, key: &[u8]) -> KeyRevision {
        KeyRevision {
            key: key.to_vec(),
            mod_revision: self.mod_revision,
            create_revision: self.create_revision,
            lease: self.lease,
            value: Some(self.value.clone()),
        }
    }

    pub(super) fn to_key_value(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: self.lease,
        }
    }
}

/// A granted lease.
#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
}

/// One open watch.
#[derive(Debug)]
struct Watcher {
    prefix: Vec<u8>,
    /// The first revision this watch delivers.
    start: i64,
    tx: UnboundedSender<Item>,
    /// Messages held back while the backend is stalled, in order.
    pending: VecDeque<Item>,
}

impl Watcher {
    /// Queues `item` (held back while `stalled`); returns whether the receiver is still there.
    fn push(&mut self, item: Item, stalled: bool) -> bool {
        if stalled {
            self.pending.push_back(item);
            !self.tx.is_closed()
        } else {
            self.tx.send(item).is_ok()
        }
    }

    /// The events of `events` this watch wants, as one message, if any.
    fn message(&self, header: Header, revision: i64, events: &[Event]) -> Option<Item> {
        if revision < self.start {
            return None;
        }
        let matching: Vec<Event> = events
            .iter()
            .filter(|event| event.kv.key.starts_with(&self.prefix))
            .cloned()
            .collect();
        if matching.is_empty() {
            None
        } else {
            Some(Ok(WatchMessage::Events {
                header,
                events: matching,
            }))
        }
    }
}

/// The whole state of one in-memory etcd.
#[derive(Debug)]
pub(super) struct State {
    pub(super) kvs: BTreeMap<Vec<u8>, Stored>,
    pub(super) revision: i64,
    /// The oldest revision whose events are still in `history`; 0 when nothing was compacted.
    pub(super) compact_revision: i64,
    pub(super) cluster_id: u64,
    /// The highest cluster id this backend ever had, so a new one is always different.
    highest_cluster_id: u64,
    /// Events of each revision after `base_revision`.
    history: BTreeMap<i64, Vec<Event>>,
    /// Every key with its revisions and lease as of `base_revision`: with `history`, the
    /// keyspace at any revision still readable (what [`keys_at`](Self::keys_at) answers from).
    base: BTreeMap<Vec<u8>, KeyRevision>,
    base_revision: i64,
    /// Whether a read at `base_revision` itself is allowed: after a restore (etcd restored from
    /// a snapshot can be read at the snapshot's revision) but not after a compaction (etcd
    /// refuses reads below the compacted revision).
    base_readable: bool,
    leases: BTreeMap<i64, Lease>,
    next_lease_id: i64,
    watchers: BTreeMap<u64, Watcher>,
    next_watcher_id: u64,
    pub(super) reachable: bool,
    pub(super) stalled: bool,
    /// Whether progress requests are answered (etcd's gRPC proxy and old releases do not).
    pub(super) answers_progress: bool,
    pub(super) latency: Duration,
    pub(super) reaper: Option<JoinHandle<()>>,
}

/// `now + ttl`, saturating far in the future instead of overflowing for huge TTLs.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now.checked_add(ttl).unwrap_or_else(|| now + FAR.min(ttl))
}

fn rejected(message: &str) -> BackendError {
    BackendError::new(BackendErrorKind::Rejected, message)
}

fn lease_not_found() -> BackendError {
    rejected("etcdserver: requested lease not found")
}

impl State {
    pub(super) fn new() -> Self {
        Self {
            kvs: BTreeMap::new(),
            revision: 1,
            compact_revision: 0,
            cluster_id: INITIAL_CLUSTER_ID,
            highest_cluster_id: INITIAL_CLUSTER_ID,
            history: BTreeMap::new(),
            base: BTreeMap::new(),
            base_revision: 1,
            base_readable: true,
            leases: BTreeMap::new(),
            next_lease_id: FIRST_LEASE_ID,
            watchers: BTreeMap::new(),
            next_watcher_id: 1,
            reachable: true,
            stalled: false,
            answers_progress: true,
            latency: Duration::ZERO,
            reaper: None,
        }
    }

    pub(super) fn header(&self) -> Header {
        Header {
            revision: self.revision,
            cluster_id: self.cluster_id,
        }
    }

    pub(super) fn watcher_count(&self) -> usize {
        self.watchers.len()
    }

    pub(super) fn range(&self, prefix: &[u8]) -> Vec<KeyValue> {
        self.kvs
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, stored)| stored.to_key_value(key))
            .collect()
    }

    // ----- writes -------------------------------------------------------------------------

    /// Checks a transaction the way etcd does before applying any of it.
    pub(super) fn validate(&self, ops: &[TxnOp]) -> Result<(), BackendError> {
        let mut seen = BTreeSet::new();
        for op in ops {
            let key = match op {
                TxnOp::Put { key, lease, .. } => {
                    if *lease != 0 && !self.leases.contains_key(lease) {
                        return Err(lease_not_found());
                    }
                    key
                }
                TxnOp::Delete { key } => key,
            };
            if key.is_empty() {
                return Err(rejected("etcdserver: key is not provided"));
            }
            if !seen.insert(key.as_slice()) {
                return Err(rejected("etcdserver: duplicate key given in txn request"));
            }
        }
        Ok(())
    }

    /// Applies already validated ops as one revision. Returns that revision, or `None` when
    /// nothing changed (and the revision did not move).
    pub(super) fn apply(&mut self, ops: Vec<TxnOp>) -> Option<i64> {
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let (create_revision, version, old_lease) = match self.kvs.get(&key) {
                        Some(old) => (old.create_revision, old.version + 1, old.lease),
                        None => (revision, 1, 0),
                    };
                    if old_lease != lease {
                        self.detach(old_lease, &key);
                        if let Some(attached) = self.leases.get_mut(&lease) {
                            attached.keys.insert(key.clone());
                        }
                    }
                    let stored = Stored {
                        value,
                        create_revision,
                        mod_revision: revision,
                        version,
                        lease,
                    };
                    events.push(Event {
                        kind: EventKind::Put,
                        kv: stored.to_key_value(&key),
                    });
                    self.kvs.insert(key, stored);
                }
                TxnOp::Delete { key } => {
                    if let Some(old) = self.kvs.remove(&key) {
                        self.detach(old.lease, &key);
                        events.push(Event {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key,
                                mod_revision: revision,
                                ..KeyValue::default()
                            },
                        });
                    }
                }
            }
        }
        if events.is_empty() {
            return None;
        }
        self.revision = revision;
        self.deliver(revision, &events);
        self.history.insert(revision, events);
        Some(revision)
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if let Some(attached) = self.leases.get_mut(&lease) {
            attached.keys.remove(key);
        }
    }

    pub(super) fn compact(&mut self, revision: i64) -> Result<(), BackendError> {
        if revision <= self.compact_revision {
            return Err(rejected("mvcc: required revision has been compacted"));
        }
        if revision > self.revision {
            return Err(rejected("mvcc: required revision is a future revision"));
        }
        self.compact_revision = revision;
        let kept = self.history.split_off(&revision);
        for events in std::mem::replace(&mut self.history, kept).into_values() {
            fold(&mut self.base, &events);
        }
        self.base_revision = revision - 1;
        self.base_readable = false;
        Ok(())
    }

    /// Every key under `prefix` with its mod revision as of `revision`, as etcd's keys-only
    /// range read at that revision answers it.
    pub(super) fn keys_at(
        &self,
        prefix: &[u8],
        revision: i64,
        with_values: bool,
    ) -> Result<Vec<KeyRevision>, BackendError> {
        let shown = |mut k: KeyRevision| {
            if !with_values {
                k.value = None;
            }
            k
        };
        if revision > self.revision {
            return Err(BackendError::new(
                BackendErrorKind::FutureRevision,
                "mvcc: required revision is a future revision",
            ));
        }
        let under = |key: &[u8]| key.starts_with(prefix);
        if revision == self.revision {
            return Ok(self
                .kvs
                .iter()
                .filter(|(key, _)| under(key))
                .map(|(key, stored)| shown(stored.key_revision(key)))
                .collect());
        }
        if revision < self.base_revision || (revision == self.base_revision && !self.base_readable)
        {
            return Err(BackendError::new(
                BackendErrorKind::Compacted,
                "mvcc: required revision has been compacted",
            ));
        }
        let mut keys = self.base.clone();
        for events in self.history.range(..=revision).map(|(_, events)| events) {
            fold(&mut keys, events);
        }
        Ok(keys
            .into_values()
            .filter(|k| under(&k.key))
            .map(shown)
            .collect())
    }

    // ----- leases -------------------------------------------------------------------------

    pub(super) fn grant(&mut self, ttl: Duration, now: Instant) -> i64 {
        let id = self.next_lease_id;
        self.next_lease_id += 1;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: deadline(now, ttl),
                keys: BTreeSet::new(),
            },
        );
        id
    }

    pub(super) fn keep_alive(&mut self, id: i64, now: Instant) -> Result<Duration, BackendError> {
        let lease = self.leases.get_mut(&id).ok_or_else(lease_not_found)?;
        lease.deadline = deadline(now, lease.ttl);
        Ok(lease.ttl)
    }

    pub(super) fn lease_ttl(&self, id: i64, now: Instant) -> Option<Duration> {
        self.leases
            .get(&id)
            .map(|lease| lease.deadline.saturating_duration_since(now))
    }

    /// Ends a lease and deletes its keys in one revision. `Err` if there is no such lease;
    /// `Ok(None)` if it had no keys (no revision is used then, as in etcd).
    pub(super) fn revoke(&mut self, id: i64) -> Result<Option<i64>, BackendError> {
        let lease = self.leases.remove(&id).ok_or_else(lease_not_found)?;
        // Keys come out of the set in key order, which is the order etcd deletes them in.
        let ops = lease
            .keys
            .into_iter()
            .map(|key| TxnOp::Delete { key })
            .collect();
        Ok(self.apply(ops))
    }

    /// Revokes every lease whose deadline is at or before `now`, earliest first.
    pub(super) fn expire(&mut self, now: Instant) {
        loop {
            let due = self
                .leases
                .iter()
                .filter(|(_, lease)| lease.deadline <= now)
                .min_by_key(|(id, lease)| (lease.deadline, **id))
                .map(|(id, _)| *id);
            match due {
                Some(id) => {
                    // The lease was just found in the map, so revoking it cannot fail.
                    let _ = self.revoke(id);
                }
                None => break,
            }
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|lease| lease.deadline).min()
    }

    // ----- watches ------------------------------------------------------------------------

    /// Hands `events` of `revision` to every watch that wants them.
    fn deliver(&mut self, revision: i64, events: &[Event]) {
        let header = self.header();
        let stalled = self.stalled;
        self.watchers.retain(
            |_, watcher| match watcher.message(header, revision, events) {
                Some(item) => watcher.push(item, stalled),
                None => !watcher.tx.is_closed(),
            },
        );
    }

    /// Opens a watch: replays history from `from_revision` and registers for what follows, in
    /// one step. Returns the creation header, the receiver, and the watch id (`None` when the
    /// watch was cancelled at once because its start was compacted).
    pub(super) fn open_watch(
        &mut self,
        prefix: Vec<u8>,
        from_revision: i64,
    ) -> (Header, UnboundedReceiver<Item>, Option<u64>) {
        let header = self.header();
        let (tx, rx) = unbounded_channel();
        let start = if from_revision <= 0 {
            self.revision + 1
        } else {
            from_revision
        };
        if start < self.compact_revision {
            // The receiver is alive right here, so the send cannot fail.
            let _ = tx.send(Ok(WatchMessage::Compacted {
                compact_revision: self.compact_revision,
            }));
            return (header, rx, None);
        }
        let mut watcher = Watcher {
            prefix,
            start,
            tx,
            pending: VecDeque::new(),
        };
        for (&revision, events) in self.history.range(start..) {
            if let Some(item) = watcher.message(header, revision, events) {
                watcher.push(item, self.stalled);
            }
        }
        let id = self.next_watcher_id;
        self.next_watcher_id += 1;
        self.watchers.insert(id, watcher);
        (header, rx, Some(id))
    }

    pub(super) fn close_watch(&mut self, id: u64) {
        self.watchers.remove(&id);
    }

    /// Queues a progress notification on watch `id`, after everything already queued on it.
    pub(super) fn request_progress(&mut self, id: Option<u64>) -> Result<(), BackendError> {
        let closed = || BackendError::unavailable("the watch is closed");
        let id = id.ok_or_else(closed)?;
        if !self.reachable {
            return Err(BackendError::unavailable("etcd is unreachable"));
        }
        if !self.answers_progress {
            // Taken, never answered: what etcd's gRPC proxy does.
            return Ok(());
        }
        let header = self.header();
        let stalled = self.stalled;
        let watcher = self.watchers.get_mut(&id).ok_or_else(closed)?;
        if watcher.push(Ok(WatchMessage::Progress { header }), stalled) {
            Ok(())
        } else {
            self.watchers.remove(&id);
            Err(closed())
        }
    }

    /// Ends every watch with one `Unavailable` error; messages held back by a stall are lost.
    pub(super) fn break_watches(&mut self, reason: &str) {
        for (_, watcher) in std::mem::take(&mut self.watchers) {
            let _ = watcher.tx.send(Err(BackendError::unavailable(reason)));
        }
    }

    /// Sends everything held back by a stall, in order.
    pub(super) fn flush(&mut self) {
        self.watchers.retain(|_, watcher| {
            while let Some(item) = watcher.pending.pop_front() {
                if watcher.tx.send(item).is_err() {
                    return false;
                }
            }
            true
        });
    }

    // ----- backups ------------------------------------------------------------------------

    pub(super) fn snapshot(&self) -> MemoryState {
        MemoryState {
            kvs: self.kvs.clone(),
            revision: self.revision,
            cluster_id: self.cluster_id,
            leases: self
                .leases
                .iter()
                .map(|(&id, lease)| {
                    let snapshot = SnapshotLease {
                        ttl: lease.ttl,
                        keys: lease.keys.clone(),
                    };
                    (id, snapshot)
                })
                .collect(),
            next_lease_id: self.next_lease_id,
        }
    }

    /// Replaces the store with `snapshot`, as an etcd restored from a backup: new cluster id,
    /// no history, every watch broken, every lease's deadline reset to a full TTL.
    /// Replaces the store with `snapshot`, as etcd restored from it and restarted. With
    /// `keep_identity` the cluster id stays (etcd restored or rebuilt with unchanged flags);
    /// otherwise it is one this backend never had.
    pub(super) fn restore(&mut self, snapshot: MemoryState, now: Instant, keep_identity: bool) {
        self.break_watches("etcd restarted from a backup");
        if !keep_identity {
            self.cluster_id = self.highest_cluster_id.max(snapshot.cluster_id) + 1;
            self.highest_cluster_id = self.cluster_id;
        }
        self.base = snapshot
            .kvs
            .iter()
            .map(|(key, stored)| (key.clone(), stored.key_revision(key)))
            .collect();
        self.base_revision = snapshot.revision;
        self.base_readable = true;
        self.kvs = snapshot.kvs;
        self.revision = snapshot.revision;
        self.history.clear();
        // No event before the restored revision can be replayed any more; the first revision
        // whose events will all be available is the next one. A store that never had a write
        // lost nothing.
        self.compact_revision = if self.revision > 1 {
            self.revision + 1
        } else {
            0
        };
        self.leases = snapshot
            .leases
            .into_iter()
            .map(|(id, lease)| {
                let lease = Lease {
                    ttl: lease.ttl,
                    deadline: deadline(now, lease.ttl),
                    keys: lease.keys,
                };
                (id, lease)
            })
            .collect();
        self.next_lease_id = self.next_lease_id.max(snapshot.next_lease_id);
    }

    pub(super) fn empty_snapshot(&self) -> MemoryState {
        MemoryState {
            kvs: BTreeMap::new(),
            revision: 1,
            cluster_id: self.cluster_id,
            leases: BTreeMap::new(),
            next_lease_id: self.next_lease_id,
        }
    }
}

/// Applies one revision's events to a map of keys as a keys-only read shows them.
fn fold(keys: &mut BTreeMap<Vec<u8>, KeyRevision>, events: &[Event]) {
    for event in events {
        match event.kind {
            EventKind::Put => {
                let kv = &event.kv;
                let entry = KeyRevision {
                    key: kv.key.clone(),
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    lease: kv.lease,
                    value: Some(kv.value.clone()),
                };
                keys.insert(kv.key.clone(), entry);
            }
            EventKind::Delete => {
                keys.remove(&event.kv.key);
            }
        }
    }
}
