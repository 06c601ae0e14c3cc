//! A cache's sync task restarted (its runtime shut down, or it panicked, and the service was
//! asked for again) goes on like a running task after a failure: it takes over the machine the
//! ended task parked, so its first list is a relist, checked against the revision and cluster
//! applied before (etcd gone back in time or replaced meanwhile is a counted reset), and an
//! unchanged instance keeps its allocation. Until a list succeeds the cache keeps its instances
//! and its freeze's `since`. Memory backend; the task ends when its runtime is dropped. The
//! same with a real etcd: `tests/etcd_never_stuck.rs`.

mod support;

use std::time::Duration;

use etcd_registry::{Discovery, FreezeCause, Freshness, MemoryBackend, ServiceCache};
use support::*;

const LONG: Duration = Duration::from_secs(20);

fn discovery(etcd: &MemoryBackend) -> Discovery {
    Discovery::memory(etcd.clone())
        .namespace(NS)
        .build()
        .expect("valid settings")
}

/// The cache of `user`, listed on a runtime that is then shut down: its task ended.
fn cache_whose_task_ended(discovery: &Discovery) -> ServiceCache {
    let first = runtime();
    let users = first
        .block_on(discovery.service("user"))
        .expect("first list");
    drop(first);
    assert!(task_ended(users.freshness()), "{:?}", users.freshness());
    users
}

/// Issue (review): etcd restored from an older backup while the cache's task was gone. The
/// restarted task's list took the cache's revision down without counting a reset (its new
/// machine had applied nothing to compare with); a running task counts one.
#[test]
fn a_restarted_task_that_finds_etcd_restored_to_an_older_revision_counts_a_reset() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    let backup = etcd.snapshot_state();
    register(&etcd, "b", 2);
    register(&etcd, "c", 3);
    let discovery = discovery(&etcd);
    let users = cache_whose_task_ended(&discovery);
    let high = users.snapshot().revision();
    let before = users.stats();

    etcd.restore(backup);
    runtime().block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        let s = wait_for(&again, LONG, "reset to the backup", |s| {
            s.freshness().is_live() && ids(s) == list(&["a@1"])
        })
        .await;
        assert!(
            s.revision() < high,
            "the revision went back with etcd: {} vs {high}",
            s.revision()
        );
        let stats = again.stats();
        assert_eq!(
            stats.resets,
            before.resets + 1,
            "the cache's revision went down from {high} to {} across the restart, yet no reset \
             was counted: {stats:?}",
            s.revision()
        );
    });
}

/// Issue (review): a backend replaced by another cluster (new cluster id, a higher revision)
/// while the task was gone. A running task counts that as a reset (control below); a restarted
/// one adopted the other history silently.
#[test]
fn a_restarted_task_that_finds_another_cluster_counts_a_reset() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    let discovery = discovery(&etcd);
    let users = cache_whose_task_ended(&discovery);
    let before = users.stats();
    let old_revision = users.snapshot().revision();

    etcd.restore(another_cluster(old_revision));
    runtime().block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        let s = wait_for(&again, LONG, "the other cluster's keys", |s| {
            s.freshness().is_live() && ids(s) == list(&["a@1", "z@26"])
        })
        .await;
        assert!(s.revision() > old_revision);
        let stats = again.stats();
        assert_eq!(
            stats.resets,
            before.resets + 1,
            "another cluster's history adopted across the restart with no reset: {stats:?}"
        );
    });
}

/// Control: the same replacement seen by a running task is a reset.
#[test]
fn control_a_running_task_that_finds_another_cluster_counts_a_reset() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    let discovery = discovery(&etcd);
    runtime().block_on(async {
        let users = discovery.service("user").await.expect("first list");
        let old_revision = users.snapshot().revision();
        etcd.restore(another_cluster(old_revision));
        wait_for(&users, LONG, "the other cluster's keys", |s| {
            s.freshness().is_live() && ids(s) == list(&["a@1", "z@26"])
        })
        .await;
        assert_eq!(users.stats().resets, 1, "{:?}", users.stats());
    });
}

/// A backup of another cluster, past `revision`, holding `a` and `z`.
fn another_cluster(revision: i64) -> etcd_registry::backend::memory::MemoryState {
    let other = MemoryBackend::new();
    register(&other, "a", 1);
    register(&other, "z", 26);
    while other.revision() <= revision + 5 {
        other.put("/elsewhere", "x");
    }
    other.snapshot_state()
}

/// A restart that finds etcd as it was: the list is a relist (counted), and every instance
/// keeps its allocation.
#[test]
fn a_restart_that_finds_etcd_unchanged_keeps_every_instance() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    register(&etcd, "b", 2);
    let discovery = discovery(&etcd);
    let users = cache_whose_task_ended(&discovery);
    let before = users.snapshot();
    let stats = users.stats();

    runtime().block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        let live = wait_for(&again, LONG, "live again", |s| s.freshness().is_live()).await;
        assert_eq!(live.revision(), before.revision());
        assert_eq!(ids(&live), list(&["a@1", "b@2"]));
        for (old, new) in before.instances().iter().zip(live.instances().iter()) {
            assert!(
                std::sync::Arc::ptr_eq(old, new),
                "{} was allocated again",
                new.id()
            );
        }
        let after = again.stats();
        assert_eq!(after.relists, stats.relists + 1, "{after:?}");
        assert_eq!(after.resets, stats.resets, "{after:?}");
    });
}

/// A restart while etcd cannot be reached: the cache keeps its instances, its revision and
/// the `since` of the freeze that began when the task ended; only the cause changes.
#[test]
fn a_restart_while_etcd_is_unreachable_keeps_the_freeze_s_since() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    let discovery = discovery(&etcd);
    let users = cache_whose_task_ended(&discovery);
    let ended = users.snapshot();
    let Freshness::Frozen { since, .. } = ended.freshness() else {
        panic!("frozen: {:?}", ended.freshness());
    };

    etcd.set_reachable(false);
    runtime().block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        let frozen = wait_for(&again, LONG, "the restarted task's failure", |s| {
            matches!(
                s.freshness(),
                Freshness::Frozen { cause, .. } if cause != FreezeCause::TaskEnded
            )
        })
        .await;
        assert_eq!(
            frozen.freshness(),
            Freshness::Frozen {
                since,
                cause: FreezeCause::Unavailable
            }
        );
        assert_eq!(ids(&frozen), list(&["a@1"]), "frozen, never cleared");
        assert_eq!(frozen.revision(), ended.revision());
    });
}

/// A metrics recorder that panics once, armed, when the driver records a publish (the
/// `etcd_registry_instances` gauge): after the machine made the snapshot and before the cache
/// stores it, as a user's recorder (or tracing layer) could. Installed for one thread with
/// `metrics::with_local_recorder`, which a current-thread runtime's tasks run on; every other
/// metric is a no-op.
struct PanicAtPublish(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl metrics::Recorder for PanicAtPublish {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        if key.name() == etcd_registry::metrics::INSTANCES
            && self.0.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("a metrics recorder panics at the publish");
        }
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// Issue (review): the parked machine holds what it applied, while `continue_from` puts the
/// cache's snapshot in its `published`. When the task panicked after the machine made a
/// snapshot and before the cache stored it (the publish goes through the user's metrics
/// recorder and tracing subscriber first), the two disagreed: the machine had applied `b`, the
/// cache never showed it. The restarted task's list found etcd as the machine had it, so only
/// the freshness was republished over the cache's old instances: live without `b`, at the
/// revision that added `b`. Now the next publish is a whole snapshot when they disagree.
#[test]
fn a_task_that_panicked_before_its_publish_reached_the_cache_restarts_with_what_etcd_holds() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    let discovery = Discovery::memory(etcd.clone())
        .namespace(NS)
        .build()
        .expect("valid settings");
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first = runtime();
    let recorder = PanicAtPublish(armed.clone());
    let users = metrics::with_local_recorder(&recorder, || {
        first.block_on(async {
            let users = discovery.service("user").await.expect("first list");
            assert_eq!(ids(&users.snapshot()), list(&["a@1"]));
            armed.store(true, std::sync::atomic::Ordering::SeqCst);
            let b = register(&etcd, "b", 2);
            wait_for(&users, LONG, "the task ended", |s| {
                matches!(
                    s.freshness(),
                    Freshness::Frozen {
                        cause: FreezeCause::TaskEnded,
                        ..
                    }
                )
            })
            .await;
            assert!(
                !armed.load(std::sync::atomic::Ordering::SeqCst),
                "it panicked"
            );
            assert!(users.snapshot().revision() < b, "the cache never saw b");
            users
        })
    });
    drop(first);
    assert_eq!(ids(&users.snapshot()), list(&["a@1"]));

    runtime().block_on(async {
        let again = discovery.service("user").await.expect("the service again");
        let live = wait_for(&again, LONG, "live again", |s| s.freshness().is_live()).await;
        assert_eq!(
            ids(&live),
            list(&["a@1", "b@2"]),
            "live at revision {} (etcd at {}), without what etcd holds",
            live.revision(),
            etcd.revision()
        );
    });
}
