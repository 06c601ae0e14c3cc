//! The sweep timer: an ejection that ends while the caller is idle (no pick, report or health
//! read to notice it) is ended by a timer at most `sweep_interval` after its end, so the
//! `etcd_registry_ejected` gauge and the return event do not wait for the next request.
//!
//! Picks and reports call nothing here: every check reads the gauge, which only a sweep moves
//! back down (`ServiceCache::health()` sweeps too, so these tests read it only at the end).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use etcd_registry::backend::{BackendError, KeysAt, ListResponse, PutCondition, PutOutcome, Watch};
use etcd_registry::{Backend, FreezeCause, Freshness, OutlierEjection};
use futures_util::future::BoxFuture;

use crate::support::recorder::Recorder;

use super::*;

/// Lets every task the last time advance woke run before the test goes on. The runtime is the
/// test's current-thread runtime, so a bounded number of yields is deterministic, not a wait
/// for luck: the timer, once due, sweeps in its first poll.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// Awaits `condition`, yielding to the runtime between looks, at most 64 times.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..64 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what}: never happened");
}

/// A current-thread runtime with paused time, for tests that run a cache in two runtimes.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

/// A cache of `a`, `b`, `c` with `ejection`.
async fn setup(ejection: OutlierEjection) -> (MemoryBackend, ServiceCache) {
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c"]);
    let users = users(discovery(&etcd).outlier_ejection(ejection)).await;
    (etcd, users)
}

/// Issue to rule out: with no traffic after an ejection, the gauge stayed at 1 (and the
/// instance's return went unlogged) until the next request, however long that took. With the
/// default settings the timer ends it 10 s (Envoy's `interval`) after its 30 s, not before.
#[tokio::test(start_paused = true)]
async fn the_timer_ends_an_idle_caller_s_ejection_within_the_sweep_interval() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_etcd, users) = setup(OutlierEjection::default()).await;
    fail(&users, "a", 5);
    assert_eq!(ejected_gauge(&recorder), 1.0);

    advance(secs(40) - ms(1)).await;
    settle().await;
    assert_eq!(
        ejected_gauge(&recorder),
        1.0,
        "swept before the interval was over"
    );
    advance(ms(1)).await;
    until("the timer's sweep", || ejected_gauge(&recorder) == 0.0).await;
    let a = health_of(&users, "a");
    assert!(a.on_probation && a.ejected_until.is_none(), "{a:?}");
}

/// `sweep_interval` zero: the timer ends the ejection at its very end; `Duration::MAX`: there
/// is no timer, and an hour later only the health view ends it.
#[tokio::test(start_paused = true)]
async fn a_zero_interval_sweeps_at_the_very_end_and_the_longest_never() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_etcd, users) = setup(OutlierEjection::default().sweep_interval(Duration::ZERO)).await;
    fail(&users, "a", 5);
    advance(secs(30) - ms(1)).await;
    settle().await;
    assert_eq!(ejected_gauge(&recorder), 1.0, "swept before the end");
    advance(ms(1)).await;
    until("the sweep at the end", || ejected_gauge(&recorder) == 0.0).await;
    drop(users);

    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_etcd, users) = setup(OutlierEjection::default().sweep_interval(Duration::MAX)).await;
    fail(&users, "a", 5);
    advance(secs(3600)).await;
    settle().await;
    assert_eq!(ejected_gauge(&recorder), 1.0, "swept with the timer off");
    assert!(ejected(&users).is_empty(), "the health view sweeps");
    assert_eq!(ejected_gauge(&recorder), 0.0);
}

/// An ejection that ends before the one the timer sleeps for wakes it: `a`, ejected a second
/// time at 41 s for 60 s (timer due at 111 s), then `b` at 42 s for 30 s: at 82 s the timer has
/// ended `b`'s ejection, not waited for `a`'s.
#[tokio::test(start_paused = true)]
async fn an_earlier_end_wakes_the_timer_sooner() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_etcd, users) = setup(OutlierEjection::default().max_ejection_percent(100)).await;
    fail(&users, "a", 5);
    advance(secs(40)).await;
    until("a's first ejection swept", || {
        ejected_gauge(&recorder) == 0.0
    })
    .await;
    advance(secs(1)).await;
    // On probation: one failure ejects it again, for twice as long.
    fail(&users, "a", 1);
    assert_eq!(ejected_gauge(&recorder), 1.0);
    advance(secs(1)).await;
    fail(&users, "b", 5);
    assert_eq!(ejected_gauge(&recorder), 2.0);

    advance(secs(40) - ms(1)).await;
    settle().await;
    assert_eq!(
        ejected_gauge(&recorder),
        2.0,
        "b swept before its end + 10 s"
    );
    advance(ms(1)).await;
    until("b's ejection swept at 82 s", || {
        ejected_gauge(&recorder) == 1.0
    })
    .await;
    assert_eq!(ejected(&users), ["a"]);
}

/// The timer runs inside the cache's sync task: dropping the last handle of the cache ends both,
/// and no task is left.
#[tokio::test(start_paused = true)]
async fn the_timer_ends_with_its_cache() {
    let runtime = tokio::runtime::Handle::current();
    let before = runtime.metrics().num_alive_tasks();
    let (_etcd, users) = setup(OutlierEjection::default()).await;
    fail(&users, "a", 5);
    assert_eq!(
        runtime.metrics().num_alive_tasks(),
        before + 1,
        "one task: the sync loop and the sweep timer"
    );
    let selection = users.select(etcd_registry::Selector::new());
    drop(users);
    settle().await;
    assert_eq!(
        runtime.metrics().num_alive_tasks(),
        before + 1,
        "a selection keeps its cache and its task"
    );
    drop(selection);
    until("the task ended", || {
        runtime.metrics().num_alive_tasks() == before
    })
    .await;
}

/// A cache whose runtime shut down gets its timer back with its sync task in the next runtime:
/// an ejection made in the first ends by the timer in the second, with no traffic.
#[test]
fn a_restarted_cache_gets_its_timer_back() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c"]);
    let discovery = discovery(&etcd).build().expect("valid settings");
    let first = paused_runtime();
    let users = first
        .block_on(discovery.service("user"))
        .expect("first list");
    fail(&users, "a", 5);
    drop(first);

    let second = paused_runtime();
    second.block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        until_live(&again).await;
        assert_eq!(ejected_gauge(&recorder), 1.0);
        advance(secs(40)).await;
        until("the new timer's sweep", || ejected_gauge(&recorder) == 0.0).await;
    });
}

/// A `MemoryBackend` whose list, watch and history check panic while `panic` is set: the
/// sync task dies, its runtime lives on.
struct Panicking {
    inner: MemoryBackend,
    panic: Arc<AtomicBool>,
}

impl Panicking {
    fn check(&self) {
        assert!(
            !self.panic.load(Ordering::SeqCst),
            "the backend panics on purpose: the sync task dies"
        );
    }
}

type Answer<'a, T> = BoxFuture<'a, Result<T, BackendError>>;

impl Backend for Panicking {
    fn list(&self, prefix: &[u8]) -> Answer<'_, ListResponse> {
        self.check();
        self.inner.list(prefix)
    }
    fn watch(&self, prefix: &[u8], revision: i64) -> Answer<'_, Watch> {
        self.check();
        self.inner.watch(prefix, revision)
    }
    fn keys_at(&self, prefix: &[u8], revision: i64, values: bool) -> Answer<'_, KeysAt> {
        self.check();
        self.inner.keys_at(prefix, revision, values)
    }
    fn grant(&self, ttl: Duration) -> Answer<'_, i64> {
        Backend::grant(&self.inner, ttl)
    }
    fn keep_alive(&self, lease: i64) -> Answer<'_, Duration> {
        Backend::keep_alive(&self.inner, lease)
    }
    fn put(&self, key: &[u8], value: &[u8], lease: i64, c: PutCondition) -> Answer<'_, PutOutcome> {
        Backend::put(&self.inner, key, value, lease, c)
    }
    fn revoke(&self, lease: i64) -> Answer<'_, ()> {
        Backend::revoke(&self.inner, lease)
    }
    fn probe(&self, prefix: &[u8]) -> Answer<'_, u64> {
        self.inner.probe(prefix)
    }
}

/// Issue (review): the timer lived apart from the sync task, one per cache. When the sync task
/// died in runtime A (a panic; A lived on) and the cache was asked for in runtime B, B got a
/// sync task but no timer, since A's still ran; when A went, so did the only timer, for good.
/// The timer now runs inside the sync task: B's task has its own.
#[test]
fn a_cache_restarted_in_another_runtime_keeps_a_timer_when_the_first_goes() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c"]);
    let panic = Arc::new(AtomicBool::new(false));
    let discovery = Discovery::with_backend(Panicking {
        inner: etcd.clone(),
        panic: panic.clone(),
    })
    .namespace(crate::support::NS)
    .build()
    .expect("valid settings");
    let first = paused_runtime();
    let users = first.block_on(async {
        let users = discovery.service("user").await.expect("first list");
        fail(&users, "a", 5);
        panic.store(true, Ordering::SeqCst);
        etcd.break_streams();
        crate::support::wait_for(&users, Duration::from_secs(60), "the task ended", |s| {
            matches!(
                s.freshness(),
                Freshness::Frozen {
                    cause: FreezeCause::TaskEnded,
                    ..
                }
            )
        })
        .await;
        users
    });
    panic.store(false, Ordering::SeqCst);
    assert_eq!(ejected_gauge(&recorder), 1.0);

    let second = paused_runtime();
    second.block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        until_live(&again).await;
    });
    drop(first);
    second.block_on(async {
        advance(secs(40)).await;
        until("the timer's sweep in the second runtime", || {
            ejected_gauge(&recorder) == 0.0
        })
        .await;
    });
    drop(users);
}
