//! Balancing, end to end through `ServiceCache` over `MemoryBackend`, under paused tokio time:
//! weighted pickers, p2c, the consistent hash contract, slow start, selections and outlier
//! ejection. One module per concern; this file holds what they share.
//!
//! Every test reads time from tokio's paused clock (balancing does too), so time moves only
//! when a test advances it and every assertion about ejection periods is exact.

#[path = "../support/mod.rs"]
mod support;

mod ejection;
mod hash;
mod p2c;
mod selection;
mod slow_start;
mod sweep;
mod sweep_timer;
mod weighted;

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_registry::{
    Discovery, DiscoveryBuilder, Instance, InstanceBuilder, InstanceHealth, MemoryBackend, Picked,
    ServiceCache, Snapshot,
};
use support::{NS, codec, wait_for};

/// The service every test uses unless it names another.
pub const SVC: &str = "user";

/// Instance `id` of `service` at `id:80`, weight 1, up: add weights, tags and metadata.
pub fn spec_in(service: &str, id: &str) -> InstanceBuilder {
    Instance::builder(service, format!("{id}:80")).id(id)
}

/// Instance `id` of [`SVC`].
pub fn spec(id: &str) -> InstanceBuilder {
    spec_in(SVC, id)
}

/// Writes `instance` to etcd (native layout under [`NS`]); returns the revision.
pub fn put(etcd: &MemoryBackend, instance: InstanceBuilder) -> i64 {
    let instance = instance.build().expect("a valid instance");
    let codec = codec();
    etcd.put(codec.key(&instance, 0), codec.encode_value(&instance))
}

/// Writes plain instances `ids` of [`SVC`].
pub fn put_all(etcd: &MemoryBackend, ids: &[&str]) {
    for id in ids {
        put(etcd, spec(id));
    }
}

/// `n` instance ids: `prefix-00`, `prefix-01`, ...
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| format!("{prefix}-{k:02}")).collect()
}

/// Deletes instance `id` of [`SVC`] from etcd.
pub fn remove(etcd: &MemoryBackend, id: &str) {
    etcd.delete(format!("{NS}/{SVC}/{id}"))
        .expect("the key was there");
}

/// A discovery over `etcd` under [`NS`]; a test adds the balancing settings it varies.
pub fn discovery(etcd: &MemoryBackend) -> DiscoveryBuilder {
    Discovery::memory(etcd.clone()).namespace(NS)
}

/// The cache of [`SVC`] from `builder`, after its first list.
pub async fn users(builder: DiscoveryBuilder) -> ServiceCache {
    builder
        .build()
        .expect("valid settings")
        .service(SVC)
        .await
        .expect("first list")
}

/// The ids of a snapshot's instances, in key order.
pub fn ids_of(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .instances()
        .iter()
        .map(|i| i.id().to_owned())
        .collect()
}

/// Waits until the cache holds exactly `ids` (in any state).
pub async fn until_ids(cache: &ServiceCache, ids: &[&str]) {
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(
        cache,
        Duration::from_secs(30),
        "the instance set",
        move |s| ids_of(s) == want,
    )
    .await;
}

/// Waits until the cache is frozen (after `etcd.set_reachable(false)`).
pub async fn until_frozen(cache: &ServiceCache) {
    wait_for(cache, Duration::from_secs(120), "frozen", |s| {
        !s.freshness().is_live()
    })
    .await;
}

/// Waits until the cache is live again.
pub async fn until_live(cache: &ServiceCache) {
    wait_for(cache, Duration::from_secs(120), "live", |s| {
        s.freshness().is_live()
    })
    .await;
}

/// How many times each instance id came out of `n` calls of `pick`; `None` counts as `"-"`.
pub fn tally(n: usize, mut pick: impl FnMut() -> Option<String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let id = pick().unwrap_or_else(|| "-".to_owned());
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// The share `id` got in `counts`.
pub fn share(counts: &BTreeMap<String, usize>, id: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(id).copied().unwrap_or(0) as f64 / total as f64
}

/// Round-robin picks until instance `id` comes up (at most 1000 tries): `None` if it never
/// does (ejected, draining, gone).
pub fn pick_id(cache: &ServiceCache, id: &str) -> Option<Picked> {
    (0..1000)
        .filter_map(|_| cache.pick())
        .find(|picked| picked.id() == id)
}

/// Reports `n` failures of instance `id`, each on a round-robin pick of it.
#[track_caller]
pub fn fail(cache: &ServiceCache, id: &str, n: usize) {
    for k in 0..n {
        pick_id(cache, id)
            .unwrap_or_else(|| panic!("failure {k} of {id}: it is not picked any more"))
            .failure();
    }
}

/// The health of instance `id` now.
#[track_caller]
pub fn health_of(cache: &ServiceCache, id: &str) -> InstanceHealth {
    cache
        .health()
        .into_iter()
        .find(|h| h.instance.id() == id)
        .unwrap_or_else(|| panic!("no instance {id}"))
}

/// The ids of the instances ejected now.
pub fn ejected(cache: &ServiceCache) -> Vec<String> {
    cache
        .health()
        .into_iter()
        .filter(|h| h.ejected_until.is_some())
        .map(|h| h.instance.id().to_owned())
        .collect()
}

/// The value of the `etcd_registry_ejected` gauge of `recorder`'s one cache.
pub fn ejected_gauge(recorder: &support::recorder::Recorder) -> f64 {
    // The recorder keeps a gauge as the bits of its `f64` (one handle per cache made under it).
    f64::from_bits(recorder.total(&["etcd_registry_ejected{", "service=user"]))
}

/// Advances paused time by `d`.
pub async fn advance(d: Duration) {
    tokio::time::advance(d).await;
}

/// Advances paused time to `at` (no-op if it is past).
pub async fn advance_to(at: std::time::Instant) {
    let now = tokio::time::Instant::now().into_std();
    if at > now {
        tokio::time::advance(at - now).await;
    }
}

/// Now, on tokio's (paused) clock, as balancing reads it.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A current-thread runtime (real time), for tests that end a cache's task by dropping its
/// runtime.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
