//! An in-process model of etcd v3: revisions, transactions, leases, compaction, watches with
//! replay and progress notifications, and injectable faults.
//!
//! See [`MemoryBackend`].

mod faults;
mod serve;
mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use self::faults::MemoryState;
use self::store::State;
use super::{BackendError, KeyValue};

/// The one member of the in-memory etcd, as response headers would name it.
const MEMBER_ID: u64 = 1;

/// An in-process model of etcd v3, for tests, demos and fault injection.
///
/// All clones share one store, so a test can keep a handle to write keys and inject faults while
/// the code under test holds another as its [`Backend`](crate::Backend).
///
/// # Store
///
/// Like etcd, a new store is at revision 1 with no keys. Every write that changes something
/// ([`put`](Self::put), [`delete`](Self::delete), [`txn`](Self::txn), a lease's end) takes
/// exactly one new revision, shared by all its events; a write that changes nothing (deleting
/// a missing key) takes none. A put always changes something, even with an identical value.
/// Every event since the last [`compact`](Self::compact) is kept for watch replay.
///
/// The write and inspection methods are synchronous (there is nothing to wait for) and are
/// never affected by the injected faults: they model other clients, which can still reach etcd
/// while this client cannot.
///
/// # Leases
///
/// Leases run on tokio's clock ([`tokio::time::Instant`]), so they are deterministic under
/// `tokio::time::pause()`. A lease that reaches its deadline is revoked exactly as by
/// [`revoke`](Self::revoke): its keys are deleted in one revision, in key order. This happens at
/// the deadline even if nobody calls the backend (a background task, spawned on the first
/// [`grant`](Self::grant) made inside a tokio runtime, sleeps until the next deadline and stops
/// when the last handle is dropped), and every call also first ends the leases that are due, so
/// results never depend on task scheduling. Faults do not stop leases from expiring: etcd's
/// leader keeps time whatever this client's connection does.
///
/// # Watches
///
/// A watch from revision `r` first replays the kept events at `r` and later, one
/// [`WatchMessage::Events`](crate::backend::WatchMessage::Events) per revision, then delivers each new
/// revision live, one message per revision, leaving out events outside its prefix (and the
/// whole message when none is left). Replay and registration are one atomic step, so nothing
/// is lost or seen twice. `r <= 0` means "from the next revision"; an `r` in the future is
/// accepted and delivers from `r` on. If `r` is older than the compaction revision (the oldest
/// revision still available), the stream yields one
/// [`WatchMessage::Compacted`](crate::backend::WatchMessage::Compacted) and ends, as etcd does; a watch
/// from exactly the compaction revision is served. Every message's header carries the store
/// revision when it was sent. Delete events carry the key and the delete's revision only.
///
/// A progress request queues a [`WatchMessage::Progress`](crate::backend::WatchMessage::Progress) with
/// the current revision behind everything already queued on that watch, so it always means
/// "every event up to this revision was delivered". Streams are unbounded: writers never block.
///
/// # Faults
///
/// * [`set_reachable(false)`](Self::set_reachable): an outage. New `list`/`watch` calls fail
///   with [`Unavailable`](crate::backend::BackendErrorKind::Unavailable), and every open watch stream
///   yields one `Unavailable` error and ends.
/// * [`stall`](Self::stall): a hung etcd. Open watches hold back their messages (none is lost),
///   progress requests go unanswered, and new calls wait; [`resume`](Self::resume) delivers
///   everything held back, in order, and lets the waiting calls proceed. While stalled, calls
///   wait whatever the reachability; once resumed, an unreachable backend fails them.
/// * [`break_streams`](Self::break_streams): a dropped connection. Open watch streams yield one
///   `Unavailable` error and end; new calls succeed.
/// * [`set_latency`](Self::set_latency): every `list`/`watch` call sleeps this long first.
/// * [`snapshot_state`](Self::snapshot_state) / [`restore`](Self::restore) / [`wipe`](Self::wipe):
///   etcd restored from a backup, with a new cluster id and no history.
///
/// When a watch stream is broken (outage, broken streams, restore), messages it already
/// received are still yielded before the error, but messages held back by a stall are dropped:
/// they never left the hung server.
///
/// # Example
///
/// ```
/// use etcd_registry::backend::{Backend, EventKind, MemoryBackend, WatchMessage};
/// use futures_util::StreamExt;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
/// rt.block_on(async {
///     let etcd = MemoryBackend::new();
///     assert_eq!(etcd.put("svc/a", "10.0.0.1:80"), 2);
///
///     // List, then watch from the next revision: nothing is missed in between.
///     let list = etcd.list(b"svc/").await?;
///     assert_eq!(list.header.revision, 2);
///     assert_eq!(list.kvs.len(), 1);
///     let mut watch = etcd.watch(b"svc/", list.header.revision + 1).await?;
///
///     etcd.delete("svc/a");
///     match watch.stream.next().await {
///         Some(Ok(WatchMessage::Events { header, events })) => {
///             assert_eq!(header.revision, 3);
///             assert_eq!(events[0].kind, EventKind::Delete);
///         }
///         other => panic!("unexpected {other:?}"),
///     }
///
///     // An outage ends the stream with an error and refuses new calls.
///     etcd.set_reachable(false);
///     assert!(matches!(watch.stream.next().await, Some(Err(_))));
///     assert!(etcd.list(b"svc/").await.is_err());
///     Ok::<_, Box<dyn std::error::Error>>(())
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

/// What all handles share.
struct Shared {
    state: Mutex<State>,
    /// Woken when a stall ends.
    resumed: Notify,
    /// Woken when lease deadlines change, and when the last handle goes away. Held by the lease
    /// task too, which holds only a `Weak` to the rest.
    reaper_wake: Arc<Notify>,
}

impl Shared {
    /// Locks the store and ends the leases that are due.
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock in a way that leaves the store inconsistent
        // for readers, so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.expire(Instant::now());
        state
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the lease task notice that the backend is gone.
        self.reaper_wake.notify_one();
    }
}

/// One operation of a [`MemoryBackend::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Sets a key.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach the key to, or 0 for none.
        lease: i64,
    },
    /// Deletes a key, if it exists.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl TxnOp {
    /// A put without a lease.
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        Self::put_with_lease(key, value, 0)
    }

    /// A put attached to `lease`.
    pub fn put_with_lease(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, lease: i64) -> Self {
        Self::Put {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            lease,
        }
    }

    /// A delete.
    pub fn delete(key: impl AsRef<[u8]>) -> Self {
        Self::Delete {
            key: key.as_ref().to_vec(),
        }
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryBackend")
            .field("revision", &state.revision)
            .field("cluster_id", &state.cluster_id)
            .field("keys", &state.kvs.len())
            .field("reachable", &state.reachable)
            .field("stalled", &state.stalled)
            .finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// An empty store at revision 1, cluster id `0x1000`, reachable, with no latency.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new()),
                resumed: Notify::new(),
                reaper_wake: Arc::new(Notify::new()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    // ----- writes -------------------------------------------------------------------------

    /// Sets `key` to `value` (detaching it from any lease) and returns the new revision.
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> i64 {
        let mut state = self.lock();
        // A single put with no lease always changes the store, so a revision is always taken;
        // the fallback only keeps this free of a panic path.
        let revision = state.apply(vec![TxnOp::put(key, value)]);
        revision.unwrap_or(state.revision)
    }

    /// Sets `key` to `value` attached to `lease` (0 for none) and returns the new revision.
    ///
    /// Fails with [`Rejected`](crate::backend::BackendErrorKind::Rejected) if the lease does not exist
    /// (never granted, revoked or expired), or if `key` is empty.
    pub fn put_with_lease(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        lease: i64,
    ) -> Result<i64, BackendError> {
        self.txn(vec![TxnOp::put_with_lease(key, value, lease)])
    }

    /// Deletes `key`. Returns the delete's revision, or `None` (and no new revision) if the key
    /// did not exist.
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Option<i64> {
        self.lock().apply(vec![TxnOp::delete(key)])
    }

    /// Deletes every key starting with `prefix` in one revision, like etcd's range delete.
    /// Returns that revision, or `None` if no key matched.
    pub fn delete_prefix(&self, prefix: impl AsRef<[u8]>) -> Option<i64> {
        let mut state = self.lock();
        let ops = state
            .range(prefix.as_ref())
            .into_iter()
            .map(|kv| TxnOp::Delete { key: kv.key })
            .collect();
        state.apply(ops)
    }

    /// Applies `ops` atomically, as one revision, in order. Returns the store's revision after
    /// the transaction: the new revision, or the unchanged one if no op changed anything.
    ///
    /// Like etcd, the whole transaction is refused with
    /// [`Rejected`](crate::backend::BackendErrorKind::Rejected), changing nothing, if a put names a lease
    /// that does not exist, if a key is empty, or if two ops name the same key.
    pub fn txn(&self, ops: Vec<TxnOp>) -> Result<i64, BackendError> {
        let mut state = self.lock();
        state.validate(&ops)?;
        Ok(state.apply(ops).unwrap_or(state.revision))
    }

    /// Discards the events before `revision`. Watches from an older revision then get
    /// [`WatchMessage::Compacted`](crate::backend::WatchMessage::Compacted); watches from `revision` or
    /// later are still served.
    ///
    /// Like etcd, fails with [`Rejected`](crate::backend::BackendErrorKind::Rejected) if `revision` is
    /// not above the current compaction revision, or is above the store's revision.
    pub fn compact(&self, revision: i64) -> Result<(), BackendError> {
        self.lock().compact(revision)
    }

    // ----- reads (never affected by faults) -----------------------------------------------

    /// The key's current value and revisions, if it exists.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<KeyValue> {
        let key = key.as_ref();
        self.lock()
            .kvs
            .get(key)
            .map(|stored| stored.to_key_value(key))
    }

    /// The key's version: 1 when created, plus one per put since; `None` if it does not exist.
    pub fn version(&self, key: impl AsRef<[u8]>) -> Option<i64> {
        self.lock()
            .kvs
            .get(key.as_ref())
            .map(|stored| stored.version)
    }

    /// Every key starting with `prefix`, in key order.
    pub fn keys(&self, prefix: impl AsRef<[u8]>) -> Vec<KeyValue> {
        self.lock().range(prefix.as_ref())
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// The current cluster id.
    pub fn cluster_id(&self) -> u64 {
        self.lock().cluster_id
    }

    /// The oldest revision whose events are still available to watches; 0 if nothing was ever
    /// compacted. After [`restore`](Self::restore) this is the restored revision plus one.
    pub fn compact_revision(&self) -> i64 {
        self.lock().compact_revision
    }

    /// How many watches are open (a watch closes when its stream ends or is dropped).
    pub fn watcher_count(&self) -> usize {
        self.lock().watcher_count()
    }

    // ----- leases -------------------------------------------------------------------------

    /// Grants a lease that ends `ttl` from now unless kept alive, and returns its id (nonzero,
    /// increasing).
    ///
    /// Called inside a tokio runtime, this also starts the task that ends leases on time when
    /// nobody calls the backend; outside one, leases still end, but only when the backend is
    /// next used.
    pub fn grant(&self, ttl: Duration) -> i64 {
        let mut state = self.lock();
        let id = state.grant(ttl, Instant::now());
        self.ensure_reaper(&mut state);
        id
    }

    /// Resets the lease's deadline to a full TTL from now and returns that TTL.
    ///
    /// Fails with [`Rejected`](crate::backend::BackendErrorKind::Rejected) ("lease not found") if the
    /// lease never existed, was revoked, or has expired.
    pub fn keep_alive(&self, lease: i64) -> Result<Duration, BackendError> {
        let ttl = self.lock().keep_alive(lease, Instant::now())?;
        self.shared.reaper_wake.notify_one();
        Ok(ttl)
    }

    /// Ends the lease now, deleting all its keys in one revision (in key order). Returns that
    /// revision, or `None` if the lease had no keys (then no revision is taken, as in etcd).
    ///
    /// Fails with [`Rejected`](crate::backend::BackendErrorKind::Rejected) if there is no such lease.
    pub fn revoke(&self, lease: i64) -> Result<Option<i64>, BackendError> {
        self.lock().revoke(lease)
    }

    /// The time left before the lease ends, or `None` if it does not exist (any more).
    pub fn lease_ttl(&self, lease: i64) -> Option<Duration> {
        self.lock().lease_ttl(lease, Instant::now())
    }

    fn ensure_reaper(&self, state: &mut State) {
        if state
            .reaper
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            self.shared.reaper_wake.notify_one();
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let task = reap(
                Arc::downgrade(&self.shared),
                Arc::clone(&self.shared.reaper_wake),
            );
            state.reaper = Some(runtime.spawn(task));
        }
    }
}

/// Ends leases on time while the backend exists; holds it only while working.
async fn reap(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            // Locking ends every lease that is due.
            let state = shared.lock();
            state.next_deadline()
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
