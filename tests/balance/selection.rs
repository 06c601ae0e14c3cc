//! Selections by tags and metadata: only matching instances, tables rebuilt after a publish,
//! `None` when nothing matches, health shared with the cache, the max ejected share counted
//! for the whole service, and the panic threshold for the selection's own instances.

use etcd_registry::balance::p2c::FORCE_PICK;
use etcd_registry::{OutlierEjection, Selection, Selector};

use super::*;

/// Every picker of `selection`, `n` times each: the ids picked, with `"-"` for `None`.
fn picked_ids(selection: &Selection, n: usize) -> BTreeMap<String, usize> {
    let id = |p: Option<Picked>| p.map(|p| p.id().to_owned());
    let mut all = BTreeMap::new();
    let mut k = 0;
    let mut add = |counts: BTreeMap<String, usize>| {
        for (id, c) in counts {
            *all.entry(id).or_insert(0) += c;
        }
    };
    add(tally(n, || id(selection.pick())));
    add(tally(n, || id(selection.pick_random())));
    add(tally(n, || id(selection.pick_weighted())));
    add(tally(n, || id(selection.pick_weighted_random())));
    add(tally(n, || {
        k += 1;
        id(selection.pick_by(format!("key-{k}")))
    }));
    add(tally(n, || selection.pick_p2c().map(|c| c.id().to_owned())));
    all
}

fn set(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn keys_of(counts: &BTreeMap<String, usize>) -> Vec<String> {
    counts.keys().cloned().collect()
}

/// Tags, metadata and both together select exactly the matching instances, for every picker.
#[tokio::test(start_paused = true)]
async fn a_selection_picks_only_matching_instances() {
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").tag("canary").meta("zone", "eu"));
    put(&etcd, spec("b").tag("canary").meta("zone", "us"));
    put(&etcd, spec("c").tag("stable").meta("zone", "eu"));
    put(&etcd, spec("d").tag("stable").tag("canary"));
    let users = users(discovery(&etcd)).await;

    let cases = [
        (Selector::new().tag("canary"), set(&["a", "b", "d"])),
        (Selector::new().meta("zone", "eu"), set(&["a", "c"])),
        (
            Selector::new().tag("canary").meta("zone", "eu"),
            set(&["a"]),
        ),
        (Selector::new().tag("stable").tag("canary"), set(&["d"])),
        (Selector::new(), set(&["a", "b", "c", "d"])),
    ];
    for (selector, want) in cases {
        let selection = users.select(selector.clone());
        assert_eq!(ids_of(&selection.snapshot()), want, "{selector:?}");
        let counts = picked_ids(&selection, 300);
        assert_eq!(keys_of(&counts), want, "{selector:?}: {counts:?}");
    }
}

/// A selection's tables are rebuilt after each publish and survive a freeze.
#[tokio::test(start_paused = true)]
async fn a_selection_follows_publishes() {
    // A selection's tables are rebuilt after a publish: a new matching instance is picked, a
    // removed one no longer is, a non-matching one never is.
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").tag("canary"));
    put(&etcd, spec("b"));
    let users = users(discovery(&etcd)).await;
    let canaries = users.select(Selector::new().tag("canary"));
    assert_eq!(keys_of(&picked_ids(&canaries, 100)), set(&["a"]));

    put(&etcd, spec("c").tag("canary"));
    put(&etcd, spec("d"));
    until_ids(&users, &["a", "b", "c", "d"]).await;
    assert_eq!(keys_of(&picked_ids(&canaries, 300)), set(&["a", "c"]));

    remove(&etcd, "a");
    until_ids(&users, &["b", "c", "d"]).await;
    assert_eq!(keys_of(&picked_ids(&canaries, 300)), set(&["c"]));

    // A freeze (same instances, new freshness) keeps the selection answering.
    etcd.set_reachable(false);
    until_frozen(&users).await;
    assert!(!canaries.snapshot().freshness().is_live());
    assert_eq!(keys_of(&picked_ids(&canaries, 100)), set(&["c"]));
}

/// A selection with nothing up (no match, or all draining) gives `None` from every picker.
#[tokio::test(start_paused = true)]
async fn an_empty_selection_gives_none() {
    // A selection that matches nothing gives `None` from every picker, as does one whose matches
    // are all draining.
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").tag("stable"));
    put(
        &etcd,
        spec("b")
            .tag("canary")
            .state(etcd_registry::State::Draining),
    );
    let users = users(discovery(&etcd)).await;

    let nobody = users.select(Selector::new().tag("nobody"));
    assert!(nobody.snapshot().is_empty());
    assert_eq!(keys_of(&picked_ids(&nobody, 10)), set(&["-"]));

    let draining = users.select(Selector::new().tag("canary"));
    assert_eq!(ids_of(&draining.snapshot()), set(&["b"]));
    assert_eq!(keys_of(&picked_ids(&draining, 10)), set(&["-"]));
}

/// A selection and its cache share health: an ejection through either shows in both.
#[tokio::test(start_paused = true)]
async fn a_selection_and_its_cache_share_health() {
    // A selection and its cache share each instance's health, whichever reports: an instance
    // ejected through the cache's picks is skipped by a selection already built (its tables made
    // before anything was reported), and one ejected through the selection's picks is skipped by
    // the cache's picks and shows in its `health()`.
    for through_selection in [false, true] {
        let etcd = MemoryBackend::new();
        for id in ["a", "b", "c"] {
            put(&etcd, spec(id).tag("canary"));
        }
        put_all(&etcd, &["d", "e", "f"]);
        let users = users(discovery(&etcd)).await;
        let canaries = users.select(Selector::new().tag("canary"));
        assert_eq!(
            picked_ids(&canaries, 30).len(),
            3,
            "built, nothing reported"
        );
        assert_eq!(keys_of(&picked_ids(&canaries, 30)), set(&["a", "b", "c"]));

        if through_selection {
            for _ in 0..5 {
                let picked = (0..100)
                    .filter_map(|_| canaries.pick())
                    .find(|p| p.id() == "b")
                    .expect("b picked");
                picked.failure();
            }
        } else {
            fail(&users, "b", 5);
        }
        assert_eq!(
            ejected(&users),
            ["b"],
            "through the selection: {through_selection}"
        );
        let counts = picked_ids(&canaries, 300);
        assert_eq!(
            keys_of(&counts),
            set(&["a", "c"]),
            "{through_selection}: {counts:?}"
        );
        let counts = tally(600, || users.pick().map(|p| p.id().to_owned()));
        assert!(!counts.contains_key("b"), "{through_selection}: {counts:?}");
        let counts = tally(600, || users.pick_p2c().map(|c| c.id().to_owned()));
        assert!(!counts.contains_key("b"), "{through_selection}: {counts:?}");
    }
}

/// Reports `n` failures of `id` through `selection`, each on the first of 300 picks that finds
/// it (the others unreported). p2c avoids an instance that failed until it has been left alone
/// for `FORCE_PICK`: that much time passes before each of its picks, which then probe it.
async fn fail_through(selection: &Selection, id: &str, n: usize, through: Through) {
    let pick = || (0..300).find_map(|_| selection.pick().filter(|p| p.id() == id));
    for k in 0..n {
        let missing = format!("failure {k} of {id}: not picked ({through:?})");
        match through {
            Through::Picked => pick().expect(&missing).failure(),
            Through::Started => pick().expect(&missing).start().failure(),
            Through::P2c => {
                advance(FORCE_PICK + ms(1)).await;
                (0..300)
                    .find_map(|_| selection.pick_p2c().filter(|c| c.id() == id))
                    .expect(&missing)
                    .failure();
            }
        }
    }
}

/// How [`fail_through`] reports a failure: on a `Picked`, on a `Call` it started, or on a
/// p2c `Call`.
#[derive(Debug, Clone, Copy)]
enum Through {
    Picked,
    Started,
    P2c,
}

/// The max ejected share is the service's, whichever way a failure is reported: a selection of
/// 3 of 40 instances does not cap ejections at its own share (one instance).
#[tokio::test(start_paused = true)]
async fn failures_through_a_selection_get_the_service_s_ejection_slots() {
    // 40 instances at the default 10 %: four may be ejected. One plain instance is; the three
    // canaries, failing five times each through the canaries' selection (each a different way
    // of reporting), are the others.
    let etcd = MemoryBackend::new();
    for id in ["c0", "c1", "c2"] {
        put(&etcd, spec(id).tag("canary"));
    }
    let plain = names("s", 37);
    put_all(&etcd, &plain.iter().map(String::as_str).collect::<Vec<_>>());
    let users = users(discovery(&etcd)).await;
    let canaries = users.select(Selector::new().tag("canary"));
    fail(&users, "s-00", 5);
    assert_eq!(ejected(&users), ["s-00"]);

    let mut want = vec!["s-00"];
    for (id, through) in [
        ("c0", Through::Picked),
        ("c1", Through::Started),
        ("c2", Through::P2c),
    ] {
        fail_through(&canaries, id, 5, through).await;
        want.insert(want.len() - 1, id);
        assert_eq!(ejected(&users), want, "4 of 40 may be ejected: {through:?}");
    }
    // The fifth asks for a slot the service does not have.
    fail(&users, "s-01", 5);
    assert_eq!(ejected(&users), want, "at most 4 of 40");
}

/// A selection's panic threshold weighs its own instances: ejections elsewhere in the service
/// do not put it in panic mode, and its own do.
#[tokio::test(start_paused = true)]
async fn a_selection_s_panic_threshold_counts_its_own_instances() {
    // 4 canaries among 12 instances, no share limit. With three plain instances and one canary
    // ejected, the canaries are 3 of 4 healthy: the ejected canary is not picked. With three
    // canaries ejected (1 of 4 healthy) the selection panics and picks all four, while the
    // service (6 of 12 healthy) does not.
    let ejection = OutlierEjection::default().max_ejection_percent(100);
    let etcd = MemoryBackend::new();
    for id in ["c0", "c1", "c2", "c3"] {
        put(&etcd, spec(id).tag("canary"));
    }
    let plain = names("s", 8);
    put_all(&etcd, &plain.iter().map(String::as_str).collect::<Vec<_>>());
    let users = users(discovery(&etcd).outlier_ejection(ejection)).await;
    let canaries = users.select(Selector::new().tag("canary"));
    for id in ["s-00", "s-01", "s-02", "c0"] {
        fail(&users, id, 5);
    }
    assert_eq!(ejected(&users), ["c0", "s-00", "s-01", "s-02"]);
    let counts = picked_ids(&canaries, 300);
    assert_eq!(
        keys_of(&counts),
        set(&["c1", "c2", "c3"]),
        "3 of 4 healthy: {counts:?}"
    );

    fail_through(&canaries, "c1", 5, Through::Picked).await;
    fail(&users, "c2", 5);
    assert_eq!(ejected(&users), ["c0", "c1", "c2", "s-00", "s-01", "s-02"]);
    let counts = picked_ids(&canaries, 300);
    assert_eq!(
        keys_of(&counts),
        set(&["c0", "c1", "c2", "c3"]),
        "panic: {counts:?}"
    );
    let counts = tally(600, || users.pick().map(|p| p.id().to_owned()));
    assert!(
        ["c0", "c1", "c2"]
            .iter()
            .all(|id| !counts.contains_key(*id)),
        "the service, 6 of 12 healthy, is not in panic: {counts:?}"
    );
}

/// An ejection's end refreshes a selection's count of its own ejected instances: with three of
/// four canaries ejected the selection panics; when one of those ends (noticed by the health
/// view, with no ejection after it), 2 of 4 are healthy and the two still ejected are skipped.
#[tokio::test(start_paused = true)]
async fn an_ejection_s_end_takes_a_selection_out_of_panic() {
    let ejection = OutlierEjection::default()
        .max_ejection_percent(100)
        .sweep_interval(Duration::MAX);
    let etcd = MemoryBackend::new();
    for id in ["c0", "c1", "c2", "c3"] {
        put(&etcd, spec(id).tag("canary"));
    }
    put_all(&etcd, &["s0", "s1", "s2", "s3"]);
    let users = users(discovery(&etcd).outlier_ejection(ejection)).await;
    let canaries = users.select(Selector::new().tag("canary"));
    fail(&users, "c0", 5);
    advance(secs(20)).await;
    fail(&users, "c1", 5);
    fail(&users, "c2", 5);
    let counts = picked_ids(&canaries, 300);
    assert_eq!(
        keys_of(&counts),
        set(&["c0", "c1", "c2", "c3"]),
        "panic: {counts:?}"
    );
    advance(secs(11)).await;
    assert_eq!(ejected(&users), ["c1", "c2"], "the health view ends c0's");
    let counts = picked_ids(&canaries, 300);
    assert_eq!(
        keys_of(&counts),
        set(&["c0", "c3"]),
        "2 of 4 healthy: {counts:?}"
    );
}

/// Threads report through a selection and its cache at once, ejections come and go (a short
/// base ejection time, one failure ejects); after each round settles, the selection is in
/// panic mode exactly when fewer than half of its own instances are healthy.
#[tokio::test(start_paused = true)]
async fn a_selection_s_panic_follows_its_own_count_under_concurrent_reports() {
    let ejection = OutlierEjection::default()
        .max_ejection_percent(100)
        .consecutive_failures(1)
        .base_ejection_time(secs(3))
        .max_ejection_time(secs(7))
        .sweep_interval(Duration::MAX);
    let etcd = MemoryBackend::new();
    let canary_ids = names("c", 8);
    for id in &canary_ids {
        put(&etcd, spec(id).tag("canary"));
    }
    put_all(&etcd, &["s0", "s1", "s2", "s3"]);
    let users = users(discovery(&etcd).outlier_ejection(ejection)).await;
    let canaries = users.select(Selector::new().tag("canary"));
    let runtime = tokio::runtime::Handle::current();
    let mut rounds_in_panic = 0;
    for round in 0..200u32 {
        std::thread::scope(|s| {
            for t in 0..3u32 {
                let (users, canaries, runtime) = (&users, &canaries, &runtime);
                s.spawn(move || {
                    let _context = runtime.enter();
                    for n in 0..12u32 {
                        // A spread of picks and outcomes that differs by thread and round.
                        let x = n
                            .wrapping_mul(2_654_435_761)
                            .wrapping_add(t * 97 + round * 13);
                        let picked = if x % 2 == 0 {
                            canaries.pick()
                        } else {
                            users.pick()
                        };
                        let Some(picked) = picked else { continue };
                        if x % 5 < round % 3 {
                            picked.failure();
                        } else {
                            picked.success(ms(1));
                        }
                    }
                });
            }
        });
        advance(ms(u64::from(round % 5) * 900)).await;
        let ejected_now = ejected(&users); // sweeps
        let own = ejected_now.iter().filter(|id| id.starts_with('c')).count();
        let panic = (8 - own) * 100 < 8 * 50;
        let counts = picked_ids(&canaries, 400);
        let picked_ejected = counts.keys().any(|id| ejected_now.contains(id));
        if !panic {
            assert!(
                !picked_ejected,
                "round {round}: {own} of 8 ejected, no panic: {counts:?}"
            );
        } else if own < 8 {
            rounds_in_panic += 1;
            assert!(
                picked_ejected,
                "round {round}: {own} of 8 ejected, panic: {counts:?}"
            );
        }
    }
    assert!(rounds_in_panic > 0, "no round put the selection in panic");
}
