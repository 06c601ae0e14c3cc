//! What the benches build: instances, and a live cache of them over the memory backend.
//!
//! Each bench uses only part of it.
#![allow(dead_code)]

use etcd_registry::{Codec, Discovery, Instance, KeyLayout, MemoryBackend, ServiceCache};

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
    cache_with(n, |_| 1, etcd_registry::OutlierEjection::default())
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

/// Like [`cache`], with instance `i` at `weight(i)` and outlier ejection set to `ejection`.
pub fn cache_with(
    n: usize,
    weight: impl Fn(usize) -> u32,
    ejection: etcd_registry::OutlierEjection,
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
        Discovery::memory(etcd.clone())
            .namespace(NAMESPACE)
            .outlier_ejection(ejection)
            .build()
            .expect("valid config")
            .service("user")
            .await
            .expect("first list")
    });
    assert_eq!(cache.snapshot().len(), n);
    (rt, etcd, cache)
}
