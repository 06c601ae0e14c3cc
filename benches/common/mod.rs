//! What the benches build: instances, and a live cache of them over the memory backend.
//!
//! Each bench uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use etcd_registry::{Codec, Discovery, Instance, KeyLayout, MemoryBackend, ServiceCache};

/// Per-operation times of every sample, by benchmark id, for the summary a bench prints at
/// the end (criterion's own reports are per benchmark; the summaries compare within one run).
#[derive(Default)]
pub struct Record(Mutex<BTreeMap<String, Vec<f64>>>);

impl Record {
    /// One sample of benchmark `id`: `iters` operations in `elapsed`.
    pub fn add(&self, id: &str, elapsed: Duration, iters: u64) {
        let per_op = elapsed.as_nanos() as f64 / iters.max(1) as f64;
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default()
            .push(per_op);
    }

    /// The median time per operation of the last `samples` samples (the measured ones:
    /// warm-up runs come first); `None` with no more than `samples` in all (as in `--test`
    /// mode, where each benchmark runs once).
    pub fn median(&self, id: &str, samples: usize) -> Option<f64> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = all.get(id)?;
        if taken.len() <= samples {
            return None;
        }
        let mut last = taken[taken.len() - samples..].to_vec();
        last.sort_by(f64::total_cmp);
        Some(last[last.len() / 2])
    }

    /// Every benchmark id recorded, in order.
    pub fn ids(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }
}

/// A tokio runtime for `threads` caller threads: a current-thread runtime for 1, a
/// multi-thread runtime with that many workers otherwise.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("runtime")
}

/// The namespace the benches register under.
pub const NAMESPACE: &str = "/services";

/// Instance `i` of service `user`, with a distinct address, on `port`.
pub fn instance(i: usize, port: u16) -> Instance {
    instance_of("user", i, port)
}

/// Instance `i` of `service`, with a distinct address, on `port`.
pub fn instance_of(service: &str, i: usize, port: u16) -> Instance {
    Instance::builder(
        service,
        format!("10.{}.{}.{}:{port}", i >> 16, (i >> 8) & 255, i & 255),
    )
    .id(format!("u{i}"))
    .build()
    .expect("valid instance")
}

/// The key and value of `instance` in the native layout.
pub fn encoded(instance: &Instance) -> (String, Vec<u8>) {
    let codec = Codec::new(KeyLayout::Native, NAMESPACE);
    (codec.key(instance, 0), codec.encode_value(instance))
}

/// A memory backend holding `n` instances, a live cache of them, and the runtime that keeps the
/// cache's task.
pub fn cache(n: usize) -> (tokio::runtime::Runtime, MemoryBackend, ServiceCache) {
    cache_with(n, |_| 1, |discovery| discovery)
}

/// A live cache of `service` over `etcd`, once its first list is in.
pub async fn discover(etcd: &MemoryBackend, service: &str) -> ServiceCache {
    Discovery::memory(etcd.clone())
        .namespace(NAMESPACE)
        .build()
        .expect("valid config")
        .service(service)
        .await
        .expect("first list")
}

/// Like [`cache`], with instance `i` at `weight(i)` and the discovery's balancing settings
/// from `configure`.
pub fn cache_with(
    n: usize,
    weight: impl Fn(usize) -> u32,
    configure: impl FnOnce(etcd_registry::DiscoveryBuilder) -> etcd_registry::DiscoveryBuilder,
) -> (tokio::runtime::Runtime, MemoryBackend, ServiceCache) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = MemoryBackend::new();
    for i in 0..n {
        let weighted = instance(i, 8080)
            .to_builder()
            .weight(weight(i))
            .build()
            .expect("valid instance");
        let (key, value) = encoded(&weighted);
        etcd.put(key, value);
    }
    let cache = rt.block_on(async {
        configure(Discovery::memory(etcd.clone()).namespace(NAMESPACE))
            .build()
            .expect("valid config")
            .service("user")
            .await
            .expect("first list")
    });
    assert_eq!(cache.snapshot().len(), n);
    (rt, etcd, cache)
}
