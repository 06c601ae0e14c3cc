//! The read hot path: `pick()` and `load()` against the baselines a cache could be built on.
//!
//! - `arcswap_load`: a bare `ArcSwap::load`, the floor.
//! - `mutex_hashmap`: a `Mutex<HashMap<service, Vec<Arc<Instance>>>>` with a round-robin pick
//!   that clones the instance out of the lock (the shape of go-zero's subscriber).
//! - `rwlock_vec`: an `RwLock<Vec<Arc<Instance>>>` with the same pick.
//!
//! Each runs with 1 thread and with 2 threads picking at once (per-thread time reported), over
//! 10, 1 000 and 100 000 instances.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock};
use std::time::{Duration, Instant};

mod common;

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use etcd_registry::Instance;

const SIZES: [usize; 3] = [10, 1_000, 100_000];

fn instances(n: usize) -> Vec<Arc<Instance>> {
    (0..n)
        .map(|i| Arc::new(common::instance(i, 8080)))
        .collect()
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns the mean per-thread time.
fn on_threads(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let barrier = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    });
    total / threads as u32
}

fn bench(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut group = c.benchmark_group(format!("lookup/{threads}-thread"));
        for n in SIZES {
            let (_rt, _etcd, users) = common::cache(n);
            group.bench_with_input(BenchmarkId::new("pick", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    on_threads(threads, iters, &|| {
                        let picked = users.pick();
                        black_box(picked.as_ref().map(|i| i.addr().len()));
                    })
                })
            });
            group.bench_with_input(BenchmarkId::new("load", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    on_threads(threads, iters, &|| {
                        black_box(users.load().len());
                    })
                })
            });

            let all = instances(n);
            let bare = ArcSwap::from_pointee(all.clone());
            group.bench_with_input(BenchmarkId::new("arcswap_load", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    on_threads(threads, iters, &|| {
                        black_box(bare.load().len());
                    })
                })
            });

            let cursor = AtomicUsize::new(0);
            let map = Mutex::new(HashMap::from([("user".to_owned(), all.clone())]));
            group.bench_with_input(BenchmarkId::new("mutex_hashmap", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    on_threads(threads, iters, &|| {
                        let guard = map.lock().expect("not poisoned");
                        let list = &guard["user"];
                        let i = cursor.fetch_add(1, Ordering::Relaxed) % list.len();
                        black_box(list[i].clone());
                    })
                })
            });

            let vec = RwLock::new(all);
            group.bench_with_input(BenchmarkId::new("rwlock_vec", n), &n, |b, _| {
                b.iter_custom(|iters| {
                    on_threads(threads, iters, &|| {
                        let guard = vec.read().expect("not poisoned");
                        let i = cursor.fetch_add(1, Ordering::Relaxed) % guard.len();
                        black_box(guard[i].clone());
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
