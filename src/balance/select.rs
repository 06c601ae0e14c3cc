//! Selection by tags and metadata: picks among the instances that carry them.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use super::picked::{Call, Picked};
use crate::cache::ServiceCache;
use crate::instance::Instance;
use crate::snapshot::Snapshot;

/// Which instances a [`Selection`] picks among: those with every tag and every metadata value
/// given (`Find(service, tags...)` in the Naming interface). An empty selector selects all.
///
/// ```
/// use etcd_registry::{Instance, Selector};
///
/// let canary = Selector::new().tag("canary").meta("zone", "eu-1");
/// let instance = Instance::builder("user", "10.0.0.1:80")
///     .tag("canary")
///     .meta("zone", "eu-1")
///     .build()?;
/// assert!(canary.matches(&instance));
/// assert!(!Selector::new().tag("stable").matches(&instance));
/// # Ok::<(), etcd_registry::InstanceError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    tags: Vec<String>,
    meta: Vec<(String, String)>,
}

impl Selector {
    /// A selector that selects every instance.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also requires `tag`.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Also requires the metadata entry `key` to be `value`.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.push((key.into(), value.into()));
        self
    }

    /// Whether `instance` carries every tag and metadata value of this selector.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.tags.iter().all(|tag| instance.has_tag(tag))
            && self
                .meta
                .iter()
                .all(|(key, value)| instance.meta(key) == Some(value.as_str()))
    }
}

/// The instances of a service that match a [`Selector`], with every picker of
/// [`ServiceCache`].
///
/// A selection has pick tables of its own, built once per snapshot, not a filter run on every
/// pick: [`ServiceCache::select`] builds them for the current snapshot (O(n) in the service's
/// instances), and the first pick after each publish for the new one. A pick costs what the
/// cache's picks cost plus one atomic read (the cache's publish count, which tells whether the
/// selection's tables are still current), and, like them, touches no reference count: its
/// [`Picked`] holds one of the thread's arc-swap guards, so keep it short-lived, as the cache's.
/// A caller that has seen a snapshot through the cache never gets an older one through a
/// selection. Ejection and slow start apply as for the whole service: health is shared, so an
/// instance ejected through the cache is skipped by its selections and the other way round, and
/// the max ejected share is the service's, whichever reports a failure. The panic threshold
/// weighs the selection's own instances: it panics when fewer than the threshold of them are
/// healthy, whatever is ejected elsewhere in the service (as Envoy weighs each subset's
/// hosts, `LoadBalancerBase::isHostSetInPanic`). Cheap to clone; clones share the built
/// tables.
///
/// ```
/// # use etcd_registry::{Codec, Discovery, Instance, KeyLayout, MemoryBackend, Selector};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), etcd_registry::Error> {
/// # let etcd = MemoryBackend::new();
/// # let codec = Codec::new(KeyLayout::Native, "/services");
/// # for (n, tag) in [(1, "stable"), (2, "canary")] {
/// #     let i = Instance::builder("user", format!("10.0.0.{n}:80")).tag(tag).build()?;
/// #     etcd.put(codec.key(&i, 0), codec.encode_value(&i));
/// # }
/// let users = Discovery::memory(etcd).namespace("/services").build()?.service("user").await?;
/// let canaries = users.select(Selector::new().tag("canary"));
/// assert_eq!(canaries.pick().expect("a canary is up").addr(), "10.0.0.2:80");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Selection {
    cache: ServiceCache,
    selector: Arc<Selector>,
    /// The selected part of a snapshot of the cache, marked with the cache's publish count when
    /// it was made ([`Snapshot::made_at_publish`], [`mark`]): current while the count is no
    /// higher.
    view: Arc<ArcSwap<Snapshot>>,
}

impl Selection {
    pub(crate) fn new(cache: ServiceCache, selector: Selector) -> Self {
        let publishes = cache.shared().publishes();
        let view = made(&cache.load(), &selector, publishes);
        Self {
            cache,
            selector: Arc::new(selector),
            view: Arc::new(ArcSwap::new(view)),
        }
    }

    /// The cache this selection picks from.
    pub fn cache(&self) -> &ServiceCache {
        &self.cache
    }

    /// The selector.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// The selected instances of the current snapshot, as a snapshot of their own (same
    /// service, revision and freshness).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Guard::into_inner(self.view())
    }

    /// The view of the cache's current snapshot: the one stored, unless the cache has published
    /// since it was made, or was publishing then or is now.
    #[inline]
    fn view(&self) -> Guard<Arc<Snapshot>> {
        let publishes = self.cache.shared().publishes();
        let view = self.view.load();
        if view.made_at_publish() >= publishes {
            return view;
        }
        // Released first: arc-swap's store below then need not pay this thread's own debt.
        drop(view);
        self.remake(publishes)
    }

    /// A view of the cache's current snapshot, made after the publish count read `publishes`,
    /// and stored for the picks that follow unless another thread stored one meanwhile.
    #[cold]
    #[inline(never)]
    fn remake(&self, publishes: u64) -> Guard<Arc<Snapshot>> {
        let current = self.cache.load();
        let stored = self.view.load_full();
        if stored.made_at_publish() >= publishes {
            // Another thread remade it since this one looked.
            return Guard::from_inner(stored);
        }
        let view = match stored.tables().selected_from() {
            // Only the freshness or revision changed: the same selected instances and tables.
            Some(source) if source.same_instances(&current) => Arc::new(
                stored
                    .with(current.revision(), current.freshness())
                    .at_publish(mark(publishes)),
            ),
            _ => made(&current, &self.selector, publishes),
        };
        // Only over the view this thread found out of date: a thread that remade meanwhile
        // stored a view at least as new, or one the next pick remakes.
        let _ = self.view.compare_and_swap(&stored, Arc::clone(&view));
        Guard::from_inner(view)
    }

    #[inline]
    fn picked(&self, pick: impl FnOnce(&Snapshot) -> Option<u32>) -> Option<Picked> {
        let view = self.view();
        let index = pick(&view)?;
        Some(Picked::new(view, index))
    }

    /// Round-robin among the selected instances; see [`ServiceCache::pick`].
    #[inline]
    pub fn pick(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_round_robin)
    }

    /// Uniformly random; see [`ServiceCache::pick_random`].
    #[inline]
    pub fn pick_random(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_random)
    }

    /// Smooth weighted round-robin; see [`ServiceCache::pick_weighted`].
    #[inline]
    pub fn pick_weighted(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_weighted)
    }

    /// Weighted random; see [`ServiceCache::pick_weighted_random`].
    #[inline]
    pub fn pick_weighted_random(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_weighted_random)
    }

    /// Consistent hash of `key` among the selected instances; see [`ServiceCache::pick_by`].
    #[inline]
    pub fn pick_by(&self, key: impl AsRef<[u8]>) -> Option<Picked> {
        self.picked(|snapshot| snapshot.pick_by_key(key.as_ref()))
    }

    /// Power of two choices among the selected instances; see [`ServiceCache::pick_p2c`].
    #[inline]
    pub fn pick_p2c(&self) -> Option<Call> {
        self.view().pick_p2c()
    }
}

/// The mark of a view made while a publish was under way (an odd count): the snapshot it was
/// made from may be the one before, so no count taken after it is at or below the mark (the
/// count that was odd is above 0, and counts only grow).
const UNCONFIRMED: u64 = 0;

/// The mark of a view made from a snapshot loaded after reading the publish count `publishes`.
///
/// An even count `c` read before the load means the snapshot is that of publish `c / 2` or a
/// newer one; so the view serves any reader whose count is at most `c`. Such a reader has seen
/// no snapshot newer than publish `c / 2` (see `PublishCount` in the cache), so it is never
/// served an older one.
fn mark(publishes: u64) -> u64 {
    if publishes % 2 == 0 {
        publishes
    } else {
        UNCONFIRMED
    }
}

/// The view of `current` that `selector` selects, marked as made at `publishes` (see
/// [`mark`]), its health read and made in `current`'s slots (shared with the cache).
fn made(current: &Arc<Snapshot>, selector: &Selector, publishes: u64) -> Arc<Snapshot> {
    let view = Arc::new(
        current
            .select(|instance| selector.matches(instance))
            .at_publish(mark(publishes)),
    );
    if let Some(at) = positions(current, &view) {
        view.tables().select_from(Arc::clone(current), at);
    }
    view
}

/// Where each instance of `view` (selected from `source`, in the same order) is in `source`;
/// `None` if one is missing (never: a selection only leaves instances out).
fn positions(source: &Snapshot, view: &Snapshot) -> Option<Box<[u32]>> {
    let mut all = source.instances().iter().enumerate();
    view.instances()
        .iter()
        .map(|instance| {
            let (n, _) = all.find(|(_, candidate)| Arc::ptr_eq(candidate, instance))?;
            u32::try_from(n).ok()
        })
        .collect()
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("service", &self.cache.service())
            .field("selector", &self.selector)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Codec, Discovery, KeyLayout, MemoryBackend};

    /// The ids `n` picks of `selection` gave, each once.
    fn ids(selection: &Selection, n: usize) -> std::collections::BTreeSet<String> {
        (0..n)
            .filter_map(|_| selection.pick().map(|p| p.id().to_owned()))
            .collect()
    }

    /// A caller that has seen a snapshot never gets an older one from a selection, not even
    /// in the instant of a publish between the snapshot's store and the end of the count.
    #[tokio::test(start_paused = true)]
    async fn a_selection_never_answers_older_than_a_snapshot_seen() {
        let etcd = MemoryBackend::new();
        let codec = Codec::new(KeyLayout::Native, "/services");
        for id in ["a", "b"] {
            let instance = Instance::builder("user", "10.0.0.1:80")
                .id(id)
                .tag("canary")
                .build()
                .expect("valid");
            etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
        }
        let users = Discovery::memory(etcd)
            .namespace("/services")
            .build()
            .expect("valid")
            .service("user")
            .await
            .expect("listed");
        let canaries = users.select(Selector::new().tag("canary"));
        assert_eq!(ids(&canaries, 10), ["a", "b"].map(String::from).into());

        // A publish of the snapshot without `a`, one step at a time (no await in between, so
        // the sync task cannot run).
        let shared = users.shared();
        let without_a = Arc::new(users.load().select(|i| i.id() != "a"));
        shared.begin_publish();
        // Under way, not stored yet: the selection remakes its view from the old snapshot, as
        // it may; that view must not outlive the store.
        assert_eq!(ids(&canaries, 10), ["a", "b"].map(String::from).into());
        shared.store_published(without_a);
        assert!(users.load().get("a").is_none(), "the caller sees it");
        assert_eq!(ids(&canaries, 10), ["b"].map(String::from).into());
        assert_eq!(canaries.snapshot().len(), 1);

        shared.end_publish();
        assert_eq!(ids(&canaries, 10), ["b"].map(String::from).into());
    }
}
