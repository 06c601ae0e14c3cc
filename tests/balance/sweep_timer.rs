//! The sweep timer: an ejection that ends while the caller is idle (no pick, report or health
//! read to notice it) is ended by a timer at most `sweep_interval` after its end, so the
//! `etcd_registry_ejected` gauge and the return event do not wait for the next request.
//!
//! Picks and reports call nothing here: every check reads the gauge, which only a sweep moves
//! back down (`ServiceCache::health()` sweeps too, so these tests read it only at the end).

use etcd_registry::OutlierEjection;

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

/// A cache of `a`, `b`, `c` with `ejection`, made under `recorder`.
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
    let (_etcd, users) = setup(OutlierEjection {
        sweep_interval: Duration::ZERO,
        ..OutlierEjection::default()
    })
    .await;
    fail(&users, "a", 5);
    advance(secs(30) - ms(1)).await;
    settle().await;
    assert_eq!(ejected_gauge(&recorder), 1.0, "swept before the end");
    advance(ms(1)).await;
    until("the sweep at the end", || ejected_gauge(&recorder) == 0.0).await;
    drop(users);

    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_etcd, users) = setup(OutlierEjection {
        sweep_interval: Duration::MAX,
        ..OutlierEjection::default()
    })
    .await;
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
    let (_etcd, users) = setup(OutlierEjection {
        max_ejection_percent: 100,
        ..OutlierEjection::default()
    })
    .await;
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

/// Dropping the last handle of a cache ends its timer with its sync task: no task is left.
#[tokio::test(start_paused = true)]
async fn the_timer_ends_with_its_cache() {
    let runtime = tokio::runtime::Handle::current();
    let before = runtime.metrics().num_alive_tasks();
    let (_etcd, users) = setup(OutlierEjection::default()).await;
    fail(&users, "a", 5);
    assert_eq!(
        runtime.metrics().num_alive_tasks(),
        before + 2,
        "the sync task and the sweep timer"
    );
    let selection = users.select(etcd_registry::Selector::new());
    drop(users);
    settle().await;
    assert_eq!(
        runtime.metrics().num_alive_tasks(),
        before + 2,
        "a selection keeps its cache and its tasks"
    );
    drop(selection);
    until("both tasks ended", || {
        runtime.metrics().num_alive_tasks() == before
    })
    .await;
}

/// A cache whose runtime shut down gets its timer back with its sync task in the next runtime:
/// an ejection made in the first ends by the timer in the second, with no traffic.
#[test]
fn a_restarted_cache_gets_its_timer_back() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
    };
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c"]);
    let discovery = discovery(&etcd).build().expect("valid settings");
    let first = runtime();
    let users = first
        .block_on(discovery.service("user"))
        .expect("first list");
    fail(&users, "a", 5);
    drop(first);

    let second = runtime();
    second.block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        until_live(&again).await;
        assert_eq!(ejected_gauge(&recorder), 1.0);
        advance(secs(40)).await;
        until("the new timer's sweep", || ejected_gauge(&recorder) == 0.0).await;
    });
}
