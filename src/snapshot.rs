//! An immutable view of one service's instances at one etcd revision.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{BackendErrorKind, TlsProblem};
use crate::balance::health::{Balancing, HealthSlot};
use crate::balance::picked::Call;
use crate::balance::table::Tables;
use crate::balance::{p2c, pick};
use crate::instance::Instance;

/// Why a snapshot is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FreezeCause {
    /// The service has not been listed yet, and no attempt has failed so far (a failure
    /// before the first list replaces this with its own cause; the snapshot's revision stays 0
    /// until the first list).
    NotListed,
    /// etcd could not be reached, or the connection broke.
    Unavailable,
    /// The etcd member has no leader, so its answers are not authoritative.
    NoLeader,
    /// A request to etcd timed out.
    Timeout,
    /// The watch went silent: no event and no answer to a progress request within the stall
    /// bound (a hung or partitioned etcd).
    Stalled,
    /// etcd refused the credentials.
    Auth,
    /// The member serving the watch is behind the revision already applied (it lags, or etcd
    /// went back in time); the cache backs off and relists.
    HistoryBehind,
    /// The task that kept this cache in step with etcd is gone: the tokio runtime it ran on
    /// shut down, or it panicked (in a user's [`Backend`](crate::Backend), say). Nothing will
    /// update the snapshot until [`Discovery::service`](crate::Discovery::service) (or
    /// `service_now`) is asked for the service again, which starts a new task for every handle
    /// of this cache.
    TaskEnded,
    /// etcd's answer was larger than the client accepts (see
    /// [`BackendErrorKind::TooLarge`]); the cache's
    /// `last_error` names the sizes.
    ResponseTooLarge,
    /// The TLS connection to etcd failed, for the reason given: a certificate that is not
    /// trusted, expired or for another host, a missing or refused client certificate, or TLS on
    /// one side only. The cache's `last_error` has the details.
    Tls(TlsProblem),
    /// Any other failure.
    Other,
}

impl From<BackendErrorKind> for FreezeCause {
    fn from(kind: BackendErrorKind) -> Self {
        match kind {
            BackendErrorKind::Unavailable => FreezeCause::Unavailable,
            BackendErrorKind::NoLeader => FreezeCause::NoLeader,
            BackendErrorKind::Timeout => FreezeCause::Timeout,
            BackendErrorKind::Auth => FreezeCause::Auth,
            BackendErrorKind::TooLarge => FreezeCause::ResponseTooLarge,
            BackendErrorKind::Tls(problem) => FreezeCause::Tls(problem),
            _ => FreezeCause::Other,
        }
    }
}

impl fmt::Display for FreezeCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FreezeCause::NotListed => "not listed yet",
            FreezeCause::Unavailable => "etcd unavailable",
            FreezeCause::NoLeader => "etcd has no leader",
            FreezeCause::Timeout => "request timed out",
            FreezeCause::Stalled => "watch stalled",
            FreezeCause::Auth => "authentication failed",
            FreezeCause::HistoryBehind => "etcd's history is behind the applied revision",
            FreezeCause::TaskEnded => "the sync task ended",
            FreezeCause::ResponseTooLarge => "a response from etcd was too large",
            FreezeCause::Tls(problem) => return write!(f, "TLS to etcd failed: {problem}"),
            FreezeCause::Other => "backend error",
        })
    }
}

/// Whether a snapshot follows etcd right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The last answer came from etcd and the cache is following it: a watch is open, or being
    /// opened right after a list. The snapshot is etcd's state, give or take a round trip.
    Live,
    /// etcd is unreachable: the snapshot is the last known state, kept as it was (never cleared)
    /// until etcd answers again.
    Frozen {
        /// When the snapshot froze.
        since: Instant,
        /// Why it froze.
        cause: FreezeCause,
    },
}

impl Freshness {
    /// Whether the snapshot is live.
    pub fn is_live(&self) -> bool {
        matches!(self, Freshness::Live)
    }
}

/// One service's instances at one etcd revision; immutable, shared as `Arc<Snapshot>`.
///
/// Instances are sorted by their etcd key. A snapshot also carries the tables that picks use:
/// the list of instances up is built with the snapshot, and the weighted cycle, the alias
/// table and the Maglev table the first time a picker needs them (that first pick builds it,
/// once); after that a pick does no work that grows with the instance count, except while
/// some instance is ejected (see [`OutlierEjection`](crate::OutlierEjection)).
///
/// ```
/// # use etcd_registry::{Discovery, Instance, MemoryBackend, Codec, KeyLayout};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// let etcd = MemoryBackend::new();
/// let codec = Codec::new(KeyLayout::Native, "/services");
/// let instance = Instance::builder("user", "10.0.0.7:8080").id("u7").build()?;
/// etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
///
/// let users = Discovery::memory(etcd).namespace("/services").build()?.service("user").await?;
/// let snapshot = users.snapshot();
/// assert!(snapshot.freshness().is_live());
/// assert_eq!(snapshot.instances()[0].addr(), "10.0.0.7:8080");
/// assert_eq!(snapshot.get("u7").map(|i| i.addr()), Some("10.0.0.7:8080"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Snapshot {
    service: Arc<str>,
    revision: i64,
    freshness: Freshness,
    instances: Arc<[Arc<Instance>]>,
    tables: Arc<Tables>,
    /// For a selection's view, its mark: the cache's publish count read before the view was
    /// made, or 0 when a publish was under way then (see [`Selection`](crate::Selection)); the
    /// view is current while the count is at most its mark. 0 for a cache's own snapshots.
    made_at_publish: u64,
}

impl Snapshot {
    /// A snapshot of `instances` (already sorted by key) at `revision`.
    ///
    /// `health` holds each instance's health slot, in the same order.
    pub(crate) fn new(
        service: Arc<str>,
        revision: i64,
        freshness: Freshness,
        instances: Arc<[Arc<Instance>]>,
        health: Arc<[HealthSlot]>,
        balancing: Arc<Balancing>,
    ) -> Self {
        let tables = Arc::new(Tables::new(&instances, health, balancing));
        Self {
            service,
            revision,
            freshness,
            instances,
            tables,
            made_at_publish: 0,
        }
    }

    /// The snapshot of the instances `keep` selects, with pick tables of its own (same service,
    /// revision, freshness and health).
    pub(crate) fn select(&self, keep: impl Fn(&Instance) -> bool) -> Self {
        let (instances, health): (Vec<_>, Vec<_>) = self
            .instances
            .iter()
            .zip(self.tables.slots())
            .filter(|(instance, _)| keep(instance))
            .map(|(instance, slot)| {
                let slot = slot
                    .get()
                    .cloned()
                    .map_or_else(HealthSlot::new, HealthSlot::from);
                (Arc::clone(instance), slot)
            })
            .unzip();
        Self::new(
            self.service.clone(),
            self.revision,
            self.freshness,
            instances.into(),
            health.into(),
            self.tables.balancing.clone(),
        )
    }

    /// Whether `other` holds the very same instances (it differs at most in revision or
    /// freshness).
    pub(crate) fn same_instances(&self, other: &Snapshot) -> bool {
        Arc::ptr_eq(&self.tables, &other.tables)
    }

    /// The pick tables.
    #[inline]
    pub(crate) fn tables(&self) -> &Tables {
        &self.tables
    }

    /// For a selection's view: its mark (see the field `made_at_publish`).
    #[inline]
    pub(crate) fn made_at_publish(&self) -> u64 {
        self.made_at_publish
    }

    /// This view, marked with `mark` (see `made_at_publish`).
    pub(crate) fn at_publish(mut self, mark: u64) -> Self {
        self.made_at_publish = mark;
        self
    }

    /// The same instances with another revision and freshness; shares the instance list.
    pub(crate) fn with(&self, revision: i64, freshness: Freshness) -> Self {
        Self {
            revision,
            freshness,
            ..self.clone()
        }
    }

    /// The service these instances belong to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The etcd revision this snapshot reflects: every change up to it is included.
    ///
    /// It never goes down, except when etcd itself went back in time (restored from a backup, or
    /// replaced by another cluster); the cache detects that, relists, logs it and counts it in
    /// [`SyncStats::resets`](crate::SyncStats::resets).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Whether the snapshot follows etcd right now, or is frozen at the last known state.
    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    /// Every instance, up or draining, sorted by etcd key.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// The instances that may be picked (state up), in key order.
    pub fn up(&self) -> impl Iterator<Item = &Arc<Instance>> + '_ {
        self.instances.iter().filter(|i| i.is_up())
    }

    /// The instance with `id`, if any.
    pub fn get(&self, id: &str) -> Option<&Arc<Instance>> {
        self.instances.iter().find(|i| i.id() == id)
    }

    /// How many instances the snapshot holds.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether the snapshot holds no instance.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    #[inline]
    pub(crate) fn pick_round_robin(&self) -> Option<u32> {
        pick::round_robin(&self.tables)
    }

    #[inline]
    pub(crate) fn pick_random(&self) -> Option<u32> {
        pick::random(&self.tables)
    }

    #[inline]
    pub(crate) fn pick_weighted(&self) -> Option<u32> {
        pick::weighted(&self.tables, &self.instances)
    }

    #[inline]
    pub(crate) fn pick_weighted_random(&self) -> Option<u32> {
        pick::weighted_random(&self.tables, &self.instances)
    }

    #[inline]
    pub(crate) fn pick_by_key(&self, key: &[u8]) -> Option<u32> {
        pick::by_key(&self.tables, &self.instances, key)
    }

    /// A p2c pick, started as a [`Call`].
    pub(crate) fn pick_p2c(&self) -> Option<Call> {
        let now = crate::balance::now();
        let (index, stamp, health) = p2c::pick(&self.tables, &self.instances, now)?;
        let instance = self.instances.get(index as usize)?;
        Some(Call::new(
            Arc::clone(instance),
            Some(Arc::clone(health)),
            now,
            stamp,
        ))
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("service", &&*self.service)
            .field("revision", &self.revision)
            .field("freshness", &self.freshness)
            .field("instances", &self.instances)
            .finish()
    }
}
