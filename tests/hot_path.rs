//! Invariant 8: readers never wait. `load()`, every picker (of the cache and of a selection)
//! and every outcome report allocate nothing, and keep answering while the sync task is busy or
//! etcd is gone.
//!
//! A counting global allocator (per thread, so other threads' work does not count) proves the
//! "allocate nothing" part; it lives in its own test binary so it sees only this file's code.
//! A metrics recorder that hands out real counters is installed, so that reports do update
//! metrics (through the handles each cache registers when it is made).

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_registry::{Discovery, Instance, MemoryBackend, Picked, Selector, ServiceCache, Snapshot};
use support::alloc::{Counting, allocations};
use support::recorder::Recorder;
use support::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `load()`, `pick()` and `pick_random()` allocate nothing, live or frozen, on two threads.
#[test]
fn picks_and_loads_allocate_nothing_even_while_frozen() {
    let rt = paused_runtime();
    let etcd = MemoryBackend::new();
    for n in 0..10 {
        register(&etcd, &format!("i{n}"), 8000 + n);
    }
    let users = users_of(&rt, &etcd);

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

/// The counting allocator does count: the tests above can fail.
#[test]
fn the_counter_sees_allocations() {
    // The test above can fail: this one shows the allocator does count.
    let before = allocations();
    black_box(vec![1u8; 64]);
    assert!(allocations() > before);
}

/// The recorder every cache of this binary registers its handles with.
static RECORDER: Recorder = Recorder::new();

/// Round-robin picks until instance `id` (allocation-free: the id is compared in place).
fn pick_of(users: &ServiceCache, id: &str) -> Picked {
    (0..1000)
        .filter_map(|_| users.pick())
        .find(|p| p.id() == id)
        .expect("the instance is picked")
}

/// Every picker of the cache and of a selection once, and every kind of report: successes,
/// a failure and a drop each answered by a success on the same instance, so that nothing is
/// ejected here.
fn round(users: &ServiceCache, canaries: &etcd_registry::Selection, n: usize) {
    const KEYS: [&str; 4] = ["user-1", "user-2", "session:abc", "tenant/7"];
    let key = KEYS[n % KEYS.len()];
    black_box(users.pick().map(|p| p.weight()));
    black_box(users.pick_random().map(|p| p.weight()));
    black_box(users.pick_weighted().map(|p| p.weight()));
    black_box(users.pick_weighted_random().map(|p| p.weight()));
    black_box(users.pick_by(key).map(|p| p.weight()));
    black_box(canaries.pick().map(|p| p.weight()));
    black_box(canaries.pick_random().map(|p| p.weight()));
    black_box(canaries.pick_weighted().map(|p| p.weight()));
    black_box(canaries.pick_weighted_random().map(|p| p.weight()));
    black_box(canaries.pick_by(key).map(|p| p.weight()));

    users.pick().expect("up").success(Duration::from_millis(3));
    users.pick_weighted().expect("up").start().success();
    canaries
        .pick()
        .expect("up")
        .success(Duration::from_millis(1));
    canaries.pick_p2c().expect("up").success();
    drop(canaries.pick_p2c().expect("up"));
    drop(users.pick().expect("up").start());

    let call = users.pick_p2c().expect("up");
    let target: Arc<Instance> = call.instance().clone();
    call.failure();
    pick_of(users, target.id()).success(Duration::from_millis(2));
    let picked = users.pick_random().expect("up");
    let target = picked.to_arc();
    picked.failure();
    pick_of(users, target.id()).start().success();
    let call = users.pick_p2c().expect("up");
    let target = call.instance().clone();
    drop(call);
    pick_of(users, target.id()).start().failure();
    pick_of(users, target.id()).success(Duration::from_millis(2));
}

/// Five failures of `id` through each kind of report (it is ejected), picks while it is.
fn eject(users: &ServiceCache, canaries: &etcd_registry::Selection, id: &str) {
    pick_of(users, id).failure();
    pick_of(users, id).failure();
    pick_of(users, id).start().failure();
    pick_of(users, id).start().failure();
    pick_of(users, id).failure();
    for n in 0..20 {
        round(users, canaries, n);
    }
}

/// Every picker and every outcome report allocates nothing once warm.
#[test]
fn balancing_picks_and_reports_allocate_nothing() {
    // Every picker and every report allocates nothing once warm: the lazy tables built and each
    // instance's health made (both on first need), an ejection and a return seen once. Ejection,
    // its end noticed by a pick (probation) and the restoring success included.
    let _ = metrics::set_global_recorder(&RECORDER);
    let rt = paused_runtime();
    let etcd = fleet(10, 4);
    let users = users_of(&rt, &etcd);
    let canaries = users.select(Selector::new().tag("canary"));
    // Balancing reads tokio's (paused) clock: picks run in the runtime's context, not in it.
    let _context = rt.enter();
    let counted = |f: &mut dyn FnMut()| {
        let before = allocations();
        f();
        allocations() - before
    };
    let cycle = |counting: bool| {
        let mut allocated = 0;
        let mut run = |f: &mut dyn FnMut()| {
            if counting {
                allocated += counted(f);
            } else {
                f();
            }
        };
        run(&mut || {
            for n in 0..300 {
                round(&users, &canaries, n);
            }
            eject(&users, &canaries, "i5");
        });
        assert_eq!(ejected_ids(&users), ["i5"]);
        rt.block_on(tokio::time::advance(Duration::from_secs(301)));
        // The first pick notices the end of the ejection; the probe's success restores it.
        run(&mut || pick_of(&users, "i5").success(Duration::from_millis(1)));
        assert!(ejected_ids(&users).is_empty());
        allocated
    };
    cycle(false);
    let outcomes =
        |outcome: &str| RECORDER.total(&["picks", "service=user", &format!("outcome={outcome}")]);
    let before = [
        outcomes("success"),
        outcomes("failure"),
        outcomes("dropped"),
    ];
    let allocated: u64 = (0..3).map(|_| cycle(true)).sum();
    assert_eq!(allocated, 0, "picks or reports allocated");
    // Every report reached its metric: per round 7 successes, 3 failures, 3 drops; per cycle
    // 320 rounds, the 5 failures that eject and the restoring success.
    let after = [
        outcomes("success"),
        outcomes("failure"),
        outcomes("dropped"),
    ];
    let per_cycle = [320 * 7 + 1, 320 * 3 + 5, 320 * 3];
    for ((b, a), want) in before.iter().zip(after).zip(per_cycle) {
        assert_eq!(
            a - b,
            3 * want,
            "success, failure, dropped: {before:?} -> {after:?}"
        );
    }
    assert_eq!(RECORDER.total(&["ejections_total", "service=user"]), 4);
}

/// Readers on many threads write no line they share: a pick, from the cache or from a
/// selection, holds arc-swap's guard on the snapshot it came from, not a reference count of its
/// own, so picks running on every thread never bounce the snapshot's count between cores.
#[test]
fn picks_take_no_reference_count() {
    let rt = paused_runtime();
    let etcd = fleet(4, 2);
    let users = users_of(&rt, &etcd);
    let canaries = users.select(Selector::new().tag("canary"));
    let _context = rt.enter();
    takes_no_reference("cache", users.snapshot(), || users.pick());
    takes_no_reference("selection", canaries.snapshot(), || canaries.pick());
}

/// Asserts that four picks held at once leave `snapshot`'s reference count as it was.
fn takes_no_reference(what: &str, snapshot: Arc<Snapshot>, pick: impl Fn() -> Option<Picked>) {
    let before = Arc::strong_count(&snapshot);
    // Four at once: arc-swap keeps eight guards per thread without a count.
    let picks: Vec<Picked> = (0..4).map(|_| pick().expect("up")).collect();
    assert!(
        picks.iter().all(|p| std::ptr::eq(p.snapshot(), &*snapshot)),
        "{what}: picked from the snapshot in hand"
    );
    assert_eq!(
        Arc::strong_count(&snapshot),
        before,
        "{what}: each pick took a reference"
    );
}

/// A selection keeps up with its cache across threads: while the cache publishes 300 times, a
/// pick from a selection never comes from a snapshot older than the one its
/// thread saw through the cache just before (a selection checks its tables against the cache's
/// publish count, not against the snapshot itself).
#[test]
fn a_selection_never_lags_what_its_thread_has_seen() {
    const PUTS: u16 = 300;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let etcd = MemoryBackend::new();
    register(&etcd, "i0", 8000);
    let users = users_of(&rt, &etcd);
    let all = users.select(Selector::new());
    let done = AtomicBool::new(false);
    // Both readers and the writer start together, so the readers overlap the publishes.
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        // Set however the writer's part ends, a panic included: the readers stop, and the
        // scope's join passes the panic on instead of waiting for ever.
        let _stop = Stop(&done);
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let mut picks = 0u64;
                    while !done.load(Ordering::Acquire) {
                        let seen = users.load().revision();
                        let picked = all.pick().expect("an instance is up");
                        assert!(
                            picked.snapshot().revision() >= seen,
                            "picked at revision {} after seeing {seen}",
                            picked.snapshot().revision()
                        );
                        picks += 1;
                    }
                    picks
                })
            })
            .collect();
        start.wait();
        // One publish per put: each waits until the cache has it.
        for n in 1..=PUTS {
            let revision = register(&etcd, &format!("i{n}"), 8000 + n);
            rt.block_on(wait_for(&users, Duration::from_secs(10), "the put", |s| {
                s.revision() >= revision
            }));
        }
        done.store(true, Ordering::Release);
        for reader in readers {
            assert!(reader.join().expect("reader") > 0, "the reader picked");
        }
    });
    assert_eq!(all.snapshot().len(), usize::from(PUTS) + 1);
}

/// Sets its flag when dropped.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The ids of the instances ejected now (allocates: outside the counted parts).
fn ejected_ids(users: &ServiceCache) -> Vec<String> {
    users
        .health()
        .into_iter()
        .filter(|h| h.ejected_until.is_some())
        .map(|h| h.instance.id().to_owned())
        .collect()
}

/// A current-thread runtime with tokio's clock paused.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Instances `i0` to `i{n-1}` of `user` in a new memory etcd, weights 1 to 3 in turn, the
/// first `canaries` of them tagged `canary`.
fn fleet(n: u32, canaries: u32) -> MemoryBackend {
    let etcd = MemoryBackend::new();
    let codec = codec();
    for k in 0..n {
        let mut builder = Instance::builder("user", format!("10.0.1.{k}:80"))
            .id(format!("i{k}"))
            .weight(1 + k % 3);
        if k < canaries {
            builder = builder.tag("canary");
        }
        let instance = builder.build().unwrap();
        etcd.put(codec.key(&instance, 0), codec.encode_value(&instance));
    }
    etcd
}

/// The live cache of service `user` over `etcd`, its task on `rt`.
fn users_of(rt: &tokio::runtime::Runtime, etcd: &MemoryBackend) -> ServiceCache {
    rt.block_on(async {
        Discovery::memory(etcd.clone())
            .namespace(NS)
            .build()
            .unwrap()
            .service("user")
            .await
            .unwrap()
    })
}
