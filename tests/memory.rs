//! ARCHITECTURE.md §6: a cached instance costs at most 256 bytes beyond its strings.
//!
//! A counting allocator measures the bytes live on the test's thread (the cache's runtime is a
//! current-thread one, so the sync task allocates there too) after a cache of 1 000 and of
//! 10 000 instances went quiet. The difference, divided by 9 000, is what one more instance
//! costs; the fixed costs of the runtime, the task and the cache cancel out. The strings (id,
//! address and etcd key) are what arrived from etcd and are subtracted. `benches/memory.rs`
//! reports the same figure; this test keeps it from growing unnoticed.

mod support;

use std::time::Duration;

use etcd_registry::{Discovery, Instance, MemoryBackend};
use support::alloc::{Counting, live_bytes};
use support::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes a quiet cache of `n` instances holds, and the bytes of those instances' strings.
fn cache_bytes(n: usize) -> (i64, i64) {
    let etcd = MemoryBackend::new();
    let codec = codec();
    let mut strings = 0;
    for i in 0..n {
        let instance = Instance::builder("user", format!("10.0.{}.{}:8080", i / 250, i % 250))
            .id(format!("u{i}"))
            .build()
            .unwrap();
        let key = codec.key(&instance, 0);
        strings += instance.id().len() + instance.addr().len() + key.len();
        etcd.put(key, codec.encode_value(&instance));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let before = live_bytes();
    let users = rt.block_on(async {
        let users = Discovery::memory(etcd.clone())
            .namespace(NS)
            .build()
            .unwrap()
            .service("user")
            .await
            .unwrap();
        // Paused time: this returns once every task is idle, the watch open and waiting.
        tokio::time::sleep(Duration::from_secs(1)).await;
        users
    });
    let held = live_bytes() - before;
    assert_eq!(users.snapshot().len(), n, "the cache holds every instance");
    assert!(users.freshness().is_live());
    drop(users);
    drop(rt);
    (held, i64::try_from(strings).unwrap())
}

#[test]
fn a_cached_instance_costs_at_most_256_bytes_beyond_its_strings() {
    let (small, small_strings) = cache_bytes(1_000);
    let (large, large_strings) = cache_bytes(10_000);
    let per_instance = (large - small) / 9_000;
    let strings = (large_strings - small_strings) / 9_000;
    let overhead = per_instance - strings;
    println!("per instance: {per_instance} bytes, strings {strings}, overhead {overhead}");
    assert!(
        per_instance > strings,
        "the counter must see the instances: {per_instance} bytes per instance"
    );
    assert!(
        overhead <= 256,
        "a cached instance costs {overhead} bytes beyond its {strings} bytes of strings"
    );
}
