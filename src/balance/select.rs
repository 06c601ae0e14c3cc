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
/// A selection has pick tables of its own, built once per snapshot (the first pick after a
/// publish builds them), not a filter run on every pick. A pick costs what the cache's picks
/// cost plus one atomic read (the cache's count of publishes, which tells whether the
/// selection's tables are still current), and, like them, touches no reference count. Ejection
/// and slow start apply as for the whole service: health is shared, and the max ejected share
/// and the panic threshold are weighed with the service's count of ejected instances against
/// the selection's instances up. Cheap to clone; clones share the built tables.
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
    /// it was made ([`Snapshot::made_at_publish`], [`mark`]): current while the count is the
    /// same.
    view: Arc<ArcSwap<Snapshot>>,
}

impl Selection {
    pub(crate) fn new(cache: ServiceCache, selector: Selector) -> Self {
        let publishes = cache.shared().publishes.read();
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
        let publishes = self.cache.shared().publishes.read();
        let view = self.view.load();
        if view.made_at_publish() == publishes {
            return view;
        }
        self.remake(publishes)
    }

    /// A view of the cache's current snapshot, stored for the picks that follow; `publishes`
    /// was read before the snapshot, so the view is at least as new as its mark says.
    #[cold]
    #[inline(never)]
    fn remake(&self, publishes: u64) -> Guard<Arc<Snapshot>> {
        let current = self.cache.load();
        let stored = self.view.load_full();
        let view = match stored.tables().selected_from() {
            // Only the freshness or revision changed: the same selected instances and tables.
            Some(source) if source.same_instances(&current) => Arc::new(
                stored
                    .with(current.revision(), current.freshness())
                    .at_publish(mark(publishes)),
            ),
            _ => made(&current, &self.selector, publishes),
        };
        // Two threads remaking at once may store in either order: a view stored over a newer
        // one is marked older, so the next pick remakes it again.
        self.view.store(Arc::clone(&view));
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
/// made from may be the one before, so no count ever matches it. (The count would reach it
/// after 2^63 publishes.)
const UNCONFIRMED: u64 = u64::MAX;

/// The mark of a view made from a snapshot loaded after reading the publish count `publishes`.
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

        // Half a publish (no await in between, so the sync task cannot run): the snapshot
        // without `a` stored, the count not yet ended.
        let shared = users.shared();
        let without_a = Arc::new(users.load().select(|i| i.id() != "a"));
        shared.publishes.begin();
        shared.current.store(without_a);
        assert!(users.load().get("a").is_none(), "the caller sees it");
        assert_eq!(ids(&canaries, 10), ["b"].map(String::from).into());
        assert_eq!(canaries.snapshot().len(), 1);

        shared.publishes.end();
        assert_eq!(ids(&canaries, 10), ["b"].map(String::from).into());
    }
}
