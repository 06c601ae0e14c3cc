//! Selection by tags and metadata: picks among the instances that carry them.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

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

/// The selected part of one snapshot, and the snapshot it was built from.
struct Built {
    source: Arc<Snapshot>,
    view: Arc<Snapshot>,
}

/// The instances of a service that match a [`Selector`], with every picker of
/// [`ServiceCache`].
///
/// A selection has pick tables of its own, built once per snapshot (the first pick after a
/// publish builds them), not a filter run on every pick. Ejection and slow start apply as for
/// the whole service: health is shared, and the max ejected share and the panic threshold are
/// weighed with the service's count of ejected instances against the selection's instances up.
/// Cheap to clone; clones share the built tables.
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
    built: Arc<ArcSwapOption<Built>>,
}

impl Selection {
    pub(crate) fn new(cache: ServiceCache, selector: Selector) -> Self {
        Self {
            cache,
            selector: Arc::new(selector),
            built: Arc::new(ArcSwapOption::empty()),
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
        let current = self.cache.load();
        if let Some(built) = &*self.built.load() {
            if Arc::ptr_eq(&built.source, &current) {
                return built.view.clone();
            }
            // Only the freshness or revision changed: the same selected instances and tables.
            if built.source.same_instances(&current) {
                let view = Arc::new(built.view.with(current.revision(), current.freshness()));
                self.store(&current, &view);
                return view;
            }
        }
        let view = Arc::new(current.select(|instance| self.selector.matches(instance)));
        // Health is read and made in the whole snapshot's slots, shared with the cache.
        if let Some(at) = positions(&current, &view) {
            view.tables().select_from(Arc::clone(&current), at);
        }
        self.store(&current, &view);
        view
    }

    fn store(&self, source: &Arc<Snapshot>, view: &Arc<Snapshot>) {
        self.built.store(Some(Arc::new(Built {
            source: Arc::clone(source),
            view: Arc::clone(view),
        })));
    }

    fn picked(&self, pick: impl FnOnce(&Snapshot) -> Option<u32>) -> Option<Picked> {
        let view = self.snapshot();
        let index = pick(&view)?;
        Some(Picked::new(arc_swap::Guard::from_inner(view), index))
    }

    /// Round-robin among the selected instances; see [`ServiceCache::pick`].
    pub fn pick(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_round_robin)
    }

    /// Uniformly random; see [`ServiceCache::pick_random`].
    pub fn pick_random(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_random)
    }

    /// Smooth weighted round-robin; see [`ServiceCache::pick_weighted`].
    pub fn pick_weighted(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_weighted)
    }

    /// Weighted random; see [`ServiceCache::pick_weighted_random`].
    pub fn pick_weighted_random(&self) -> Option<Picked> {
        self.picked(Snapshot::pick_weighted_random)
    }

    /// Consistent hash of `key` among the selected instances; see [`ServiceCache::pick_by`].
    pub fn pick_by(&self, key: impl AsRef<[u8]>) -> Option<Picked> {
        self.picked(|snapshot| snapshot.pick_by_key(key.as_ref()))
    }

    /// Power of two choices among the selected instances; see [`ServiceCache::pick_p2c`].
    pub fn pick_p2c(&self) -> Option<Call> {
        self.snapshot().pick_p2c()
    }
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
