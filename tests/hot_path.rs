//! Invariant 8: readers never wait. `load()`, `pick()` and `pick_random()` allocate nothing, and
//! keep answering while the sync task is busy or etcd is gone.
//!
//! A counting global allocator (per thread, so other threads' work does not count) proves the
//! "allocate nothing" part; it lives in its own test binary so it sees only this file's code.

mod support;

use std::hint::black_box;
use std::time::Duration;

use etcd_registry::{Discovery, MemoryBackend};
use support::alloc::{Counting, allocations};
use support::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn picks_and_loads_allocate_nothing_even_while_frozen() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let etcd = MemoryBackend::new();
    for n in 0..10 {
        register(&etcd, &format!("i{n}"), 8000 + n);
    }
    let users = rt.block_on(async {
        Discovery::memory(etcd.clone())
            .namespace(NS)
            .build()
            .unwrap()
            .service("user")
            .await
            .unwrap()
    });

    let read_many = || {
        // Warm up: a thread's first read registers it with arc-swap (one allocation, once).
        black_box(users.pick());
        let before = allocations();
        for _ in 0..10_000 {
            let picked = users.pick().expect("instances are up");
            black_box(picked.addr().len());
            black_box(users.pick_random().map(|p| p.weight()));
            black_box(users.load().len());
        }
        allocations() - before
    };
    assert_eq!(read_many(), 0, "reads allocated while live");

    // Frozen: etcd gone, the sync task retrying; reads still answer, still allocation-free.
    rt.block_on(async {
        etcd.set_reachable(false);
        wait_for(&users, Duration::from_secs(60), "frozen", |s| {
            !s.freshness().is_live()
        })
        .await;
    });
    assert_eq!(read_many(), 0, "reads allocated while frozen");
    assert_eq!(users.snapshot().len(), 10);

    // From another thread as well: each thread has its own cursor, none allocates.
    let other = std::thread::scope(|s| s.spawn(read_many).join().unwrap());
    assert_eq!(other, 0, "reads allocated on a second thread");
}

#[test]
fn the_counter_sees_allocations() {
    // The test above can fail: this one shows the allocator does count.
    let before = allocations();
    black_box(vec![1u8; 64]);
    assert!(allocations() > before);
}
