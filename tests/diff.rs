//! `ServiceCache::diffs`: per-instance changes between snapshots, over the in-memory etcd model
//! under paused time: the first diff adds everything, changes arrive as added, updated and
//! removed, nothing is removed while the cache is frozen, and applying every diff rebuilds the
//! snapshot's instance list.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_registry::{Diffs, Discovery, Instance, InstanceChange, MemoryBackend, State};
use support::*;

const LONG: Duration = Duration::from_secs(120);

/// The next diff, within `LONG` of paused time.
async fn next(diffs: &mut Diffs) -> Vec<InstanceChange> {
    tokio::time::timeout(LONG, diffs.next())
        .await
        .expect("a diff within the bound")
        .expect("the diffs never end while they hold the cache")
        .changes
}

/// Applies `changes` to `state` (id -> instance), checking that each change is consistent
/// with it: an addition of something new, an update or removal of something known.
fn apply(state: &mut BTreeMap<String, Arc<Instance>>, changes: &[InstanceChange]) {
    for change in changes {
        match change {
            InstanceChange::Added(i) => {
                assert!(
                    state.insert(i.id().to_owned(), i.clone()).is_none(),
                    "added twice: {i:?}"
                );
            }
            InstanceChange::Updated { old, new } => {
                assert_eq!(old.id(), new.id());
                assert_ne!(old, new, "an update changes something");
                let was = state.insert(new.id().to_owned(), new.clone());
                assert_eq!(
                    was.as_ref(),
                    Some(old),
                    "the update's old value is the one known"
                );
            }
            InstanceChange::Removed(i) => {
                assert_eq!(
                    state.remove(i.id()).as_ref(),
                    Some(i),
                    "removed what was known"
                );
            }
        }
    }
}

fn put(etcd: &MemoryBackend, instance: &Instance) {
    let codec = codec();
    etcd.put(codec.key(instance, 0), codec.encode_value(instance));
}

#[tokio::test(start_paused = true)]
async fn the_first_diff_adds_everything_and_later_ones_say_what_changed() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    register(&etcd, "b", 2);
    let users = users(&etcd).await;
    let mut diffs = users.diffs();

    let first = next(&mut diffs).await;
    let added: Vec<&str> = first
        .iter()
        .map(|c| match c {
            InstanceChange::Added(i) => i.id(),
            other => panic!("the first diff only adds: {other:?}"),
        })
        .collect();
    assert_eq!(added, ["a", "b"]);

    // One change at a time, each awaited, so each is one diff.
    register(&etcd, "c", 3);
    assert!(matches!(&next(&mut diffs).await[..], [InstanceChange::Added(i)] if i.id() == "c"));

    let draining = instance("user", "b", 2)
        .to_builder()
        .state(State::Draining)
        .build()
        .expect("valid");
    put(&etcd, &draining);
    match &next(&mut diffs).await[..] {
        [InstanceChange::Updated { old, new }] => {
            assert_eq!((old.id(), old.state()), ("b", State::Up));
            assert_eq!(new.state(), State::Draining);
        }
        other => panic!("expected b drained: {other:?}"),
    }

    etcd.delete(user_key("a"));
    assert!(matches!(&next(&mut diffs).await[..], [InstanceChange::Removed(i)] if i.id() == "a"));

    // A value written again unchanged is no change: the cache applies that revision, and no
    // diff comes of it.
    let revision = register(&etcd, "c", 3);
    wait_for(&users, LONG, "the rewrite applied", |s| {
        s.revision() >= revision
    })
    .await;
    let quiet = tokio::time::timeout(Duration::from_secs(30), diffs.next()).await;
    assert!(
        quiet.is_err(),
        "a diff for an unchanged value: {:?}",
        quiet.map(|d| d.map(|d| d.changes))
    );
    register(&etcd, "d", 4);
    assert!(matches!(&next(&mut diffs).await[..], [InstanceChange::Added(i)] if i.id() == "d"));
}

#[tokio::test(start_paused = true)]
async fn nothing_is_removed_while_frozen_and_the_changes_arrive_after() {
    let etcd = MemoryBackend::new();
    register(&etcd, "a", 1);
    register(&etcd, "b", 2);
    let users = users(&etcd).await;
    let mut diffs = users.diffs();
    let mut state = BTreeMap::new();
    apply(&mut state, &next(&mut diffs).await);

    etcd.set_reachable(false);
    wait_for(&users, LONG, "frozen", |s| !s.freshness().is_live()).await;
    etcd.delete(user_key("a"));
    register(&etcd, "c", 3);
    // Frozen for a minute: the freeze itself changed no instance, so no diff is yielded.
    let quiet = tokio::time::timeout(Duration::from_secs(60), diffs.next()).await;
    assert!(
        quiet.is_err(),
        "a diff while frozen: {:?}",
        quiet.map(|d| d.map(|d| d.changes))
    );

    etcd.set_reachable(true);
    loop {
        let diff = tokio::time::timeout(LONG, diffs.next())
            .await
            .expect("a diff within the bound")
            .expect("the diffs never end while they hold the cache");
        if !diff.snapshot.freshness().is_live() {
            let removed = diff
                .changes
                .iter()
                .any(|c| matches!(c, InstanceChange::Removed(_)));
            assert!(!removed, "removed while frozen: {diff:?}");
        }
        apply(&mut state, &diff.changes);
        if state.keys().map(String::as_str).eq(["b", "c"]) {
            break;
        }
    }
}

/// Applying every diff from the start rebuilds the instance list of the snapshot each diff
/// leads to, through a random run of puts, drains, deletes and outages.
#[tokio::test(start_paused = true)]
async fn applying_every_diff_rebuilds_each_snapshot() {
    let etcd = MemoryBackend::new();
    // A fixed jitter seed: how many diffs a run yields depends on how long each outage's
    // backoff lasts (a long one folds many changes into one diff), so with a random seed the
    // count below varied from 9 to 124 between runs.
    let users = Discovery::memory(etcd.clone())
        .namespace(NS)
        .stall_timeout(Duration::from_secs(4))
        .jitter_seed(7)
        .build()
        .expect("valid config")
        .service("user")
        .await
        .expect("first list");
    let mut diffs = users.diffs();
    let mut state = BTreeMap::new();
    let writer = {
        let etcd = etcd.clone();
        tokio::spawn(async move {
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            for step in 0..400u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = format!("i{}", x % 12);
                match x % 7 {
                    0..=2 => {
                        register(&etcd, &id, (x % 5) as u16 + 1);
                    }
                    3 => {
                        let i = instance("user", &id, 1)
                            .to_builder()
                            .state(State::Draining)
                            .build()
                            .expect("valid");
                        put(&etcd, &i);
                    }
                    4 | 5 => {
                        etcd.delete(user_key(&id));
                    }
                    _ => etcd.set_reachable(step % 3 != 0),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            etcd.set_reachable(true);
        })
    };
    let mut checked = 0;
    while !writer.is_finished() || state.len() != users.snapshot().len() {
        let Ok(Some(diff)) = tokio::time::timeout(Duration::from_secs(5), diffs.next()).await
        else {
            continue;
        };
        // (Removals in frozen diffs are not checked here: a removal applied while live and the
        // freeze right after it can reach a slow reader as one diff.)
        apply(&mut state, &diff.changes);
        let expected: BTreeMap<String, Arc<Instance>> = diff
            .snapshot
            .instances()
            .iter()
            .map(|i| (i.id().to_owned(), i.clone()))
            .collect();
        assert_eq!(
            state, expected,
            "the diffs rebuild the snapshot they lead to"
        );
        checked += 1;
    }
    assert!(checked > 20, "only {checked} diffs checked");
}
