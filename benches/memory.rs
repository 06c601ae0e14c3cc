//! Memory per cached instance, and the time a first list of that many instances takes.
//!
//! A counting global allocator tracks the bytes live on the bench's thread, where the cache's
//! current-thread runtime runs its sync task too. The bench builds a
//! cache of 1 000 and of 10 000 instances and takes the difference, so the runtime, the sync task
//! and the cache's fixed cost cancel out; what is left, divided by 9 000, is what one more cached
//! instance costs. Its strings (id, address and etcd key, the bytes that arrived from etcd) are
//! subtracted to give the overhead ARCHITECTURE.md §6 bounds (≤ 256 bytes). The figures are the bytes
//! the library asks the allocator for; the allocator's own rounding and headers come on top.
//!
//! Criterion then times the first list of 10 000 instances (decode, sort, publish): the cost of a
//! relist.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etcd_registry::MemoryBackend;

#[path = "../tests/support/alloc.rs"]
mod alloc;
mod common;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// A memory backend holding `n` instances, and the bytes of their strings as a cache keeps them.
fn backend(n: usize) -> (MemoryBackend, usize) {
    let etcd = MemoryBackend::new();
    let mut strings = 0;
    for i in 0..n {
        let instance = common::instance(i, 8080);
        let (key, value) = common::encoded(&instance);
        strings += instance.id().len() + instance.addr().len() + key.len();
        etcd.put(key, value);
    }
    (etcd, strings)
}

/// Bytes live in the process after a cache of `n` instances is built and has gone quiet, minus
/// the bytes live before it; the runtime and the cache stay alive until the count is taken.
fn cache_bytes(n: usize) -> (i64, usize) {
    let (etcd, strings) = backend(n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let before = alloc::live_bytes();
    let users = rt.block_on(async {
        let users = common::discover(&etcd, "user").await;
        // Paused time: this returns once every task is idle, the watch open and waiting.
        tokio::time::sleep(Duration::from_secs(1)).await;
        users
    });
    assert_eq!(users.snapshot().len(), n, "the cache holds every instance");
    let after = alloc::live_bytes();
    drop(users);
    drop(rt);
    (after - before, strings)
}

fn report_memory() {
    const SMALL: usize = 1_000;
    const LARGE: usize = 10_000;
    let (small, small_strings) = cache_bytes(SMALL);
    let (large, large_strings) = cache_bytes(LARGE);
    let count = (LARGE - SMALL) as f64;
    let per_instance = (large - small) as f64 / count;
    let strings = (large_strings - small_strings) as f64 / count;
    println!(
        "memory/per_instance: {per_instance:.0} bytes, of which strings {strings:.0}, \
         overhead {:.0} bytes (target <= 256)",
        per_instance - strings
    );
}

fn bench(c: &mut Criterion) {
    report_memory();

    let mut group = c.benchmark_group("memory");
    let n = 10_000;
    let (etcd, _) = backend(n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::new("first_list", n), &n, |b, _| {
        b.iter(|| {
            rt.block_on(async {
                let users = common::discover(&etcd, "user").await;
                assert_eq!(users.snapshot().len(), n);
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
