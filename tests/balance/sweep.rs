//! Ejections that end unnoticed: the shared ejected count (max ejected share, the service's
//! panic threshold, the `etcd_registry_ejected` gauge) and a selection's count of its own
//! ejected instances (its panic threshold) must drop them at the first sweep, which runs
//! wherever the clock is read past the earliest end: a pick that meets an ejected candidate, a
//! pick in panic mode, a report, or the health view, but not a pick whose candidate shows no
//! ejection.
//!
//! `ejected()` and `health_of()` call `ServiceCache::health()`, which sweeps: these tests call
//! them only before an ejection ends or as the final check, so that they never hide a stale
//! count from the action under test. For the same reason every cache here has its sweep timer
//! off (`sweep_timer.rs` tests it): past an end plus its interval, it would sweep for them.

use etcd_registry::{OutlierEjection, Selector};

use crate::support::recorder::Recorder;

use super::*;

/// A cache of plain instances `ids` with `ejection`.
async fn setup(ids: &[&str], ejection: OutlierEjection) -> (MemoryBackend, ServiceCache) {
    let etcd = MemoryBackend::new();
    put_all(&etcd, ids);
    let users = users(discovery(&etcd).outlier_ejection(untimed(ejection))).await;
    (etcd, users)
}

/// `ejection` with the sweep timer off (see the module docs).
fn untimed(ejection: OutlierEjection) -> OutlierEjection {
    ejection.sweep_interval(Duration::MAX)
}

/// No share limit (every instance may be ejected), default panic threshold (50 %).
fn unlimited() -> OutlierEjection {
    OutlierEjection::default().max_ejection_percent(100)
}

/// A key that the consistent hash maps to `id` now (probed: `key-0`, `key-1`, ...).
#[track_caller]
fn key_of(users: &ServiceCache, id: &str) -> String {
    (0..10_000)
        .map(|n| format!("key-{n}"))
        .find(|key| users.pick_by(key).expect("an instance is up").id() == id)
        .unwrap_or_else(|| panic!("no key maps to {id}"))
}

/// The instance `key` maps to now.
fn hashed(users: &ServiceCache, key: &str) -> String {
    users
        .pick_by(key)
        .expect("an instance is up")
        .id()
        .to_owned()
}

/// How a report is made on a consistent-hash pick.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Report {
    /// `Picked::failure` / `Picked::success`.
    Picked,
    /// `Picked::start`, then `Call::failure` / `Call::success`.
    Call,
}

/// Reports `n` outcomes on picks of `key`, each expected to land on `id`.
#[track_caller]
fn report_by_key(users: &ServiceCache, key: &str, id: &str, n: usize, how: Report, ok: bool) {
    for k in 0..n {
        let picked = users.pick_by(key).expect("an instance is up");
        assert_eq!(picked.id(), id, "report {k} on key {key:?} ({how:?})");
        match (how, ok) {
            (Report::Picked, true) => picked.success(ms(1)),
            (Report::Picked, false) => picked.failure(),
            (Report::Call, true) => picked.start().success(),
            (Report::Call, false) => picked.start().failure(),
        }
    }
}

/// Issue to rule out: with a consistent-hash caller, no pick ever meets an instance whose keys
/// it does not use, so nothing noticed that its ejection ended. The ended ejection of `a` must
/// not hold the only slot of the max ejected share (1 of 3) when `b`, reached only through its
/// own keys, fails five times: `b` is ejected, by `Picked::failure` and by `Call::failure`.
#[tokio::test(start_paused = true)]
async fn an_ended_ejection_nobody_hashes_to_gives_its_slot_to_the_next_failing_instance() {
    for how in [Report::Picked, Report::Call] {
        let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default()).await;
        let kb = key_of(&users, "b");
        fail(&users, "a", 5);
        assert_eq!(ejected(&users), ["a"], "{how:?}");
        let until = health_of(&users, "a").ejected_until.expect("a is ejected");
        advance_to(until + secs(1)).await;

        // Only b's key from here on: no pick meets a.
        report_by_key(&users, &kb, "b", 5, how, false);
        assert_ne!(
            hashed(&users, &kb),
            "b",
            "{how:?}: b was not ejected after 5 failures (a's ended ejection kept the slot?)"
        );
        assert_eq!(ejected(&users), ["b"], "{how:?}");
        let a = health_of(&users, "a");
        assert!(
            a.on_probation && a.ejected_until.is_none(),
            "{how:?}: {a:?}"
        );
    }
}

/// The end is exact on the report path too: a failure 1 ms before the end of `a`'s ejection
/// still finds the only slot taken, one at the very end (the sweep's due time) gets it.
#[tokio::test(start_paused = true)]
async fn a_failure_just_before_the_end_is_refused_the_slot_and_one_at_the_end_gets_it() {
    let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default()).await;
    let kb = key_of(&users, "b");
    fail(&users, "a", 5);
    let until = health_of(&users, "a").ejected_until.expect("a is ejected");
    advance_to(until - ms(1)).await;
    report_by_key(&users, &kb, "b", 5, Report::Picked, false);
    assert_eq!(hashed(&users, &kb), "b", "b took a slot that a still holds");
    // Still before the end: the health view may sweep here without hiding anything.
    assert_eq!(ejected(&users), ["a"]);
    assert_eq!(health_of(&users, "b").consecutive_failures, 5);

    advance(ms(1)).await;
    report_by_key(&users, &kb, "b", 1, Report::Picked, false);
    assert_ne!(
        hashed(&users, &kb),
        "b",
        "a failure at the exact end of a's ejection was refused the slot"
    );
    assert_eq!(ejected(&users), ["b"]);
}

/// Panic mode must end with the ejections that caused it even when only stale ejections are
/// met. With `a` and `b` ejected at t0 and `c` at t0 + 20 s (3 of 4: panic, so picks take `c`),
/// at t0 + 31 only `c` is still ejected: round-robin and consistent-hash picks must skip it
/// (a stuck panic would keep picking it).
#[tokio::test(start_paused = true)]
async fn stale_ejections_do_not_keep_panic_mode_over_a_running_one() {
    #[derive(Debug, Clone, Copy)]
    enum Picker {
        RoundRobin,
        Hash,
    }
    for picker in [Picker::RoundRobin, Picker::Hash] {
        let (_etcd, users) = setup(&["a", "b", "c", "d"], unlimited()).await;
        let kc = key_of(&users, "c");
        fail(&users, "a", 5);
        fail(&users, "b", 5);
        advance(secs(20)).await;
        fail(&users, "c", 5);
        assert_eq!(ejected(&users), ["a", "b", "c"], "{picker:?}");
        let until_c = health_of(&users, "c").ejected_until.expect("c is ejected");
        // Panic: c is picked, by either picker.
        assert!(
            tally(400, || users.pick().map(|p| p.id().to_owned())).contains_key("c"),
            "{picker:?}: no panic with 3 of 4 ejected"
        );
        assert_eq!(
            hashed(&users, &kc),
            "c",
            "{picker:?}: no panic for the hash"
        );

        advance(secs(11)).await;
        assert!(now() < until_c);
        match picker {
            Picker::RoundRobin => {
                let counts = tally(400, || users.pick().map(|p| p.id().to_owned()));
                assert!(
                    !counts.contains_key("c"),
                    "still in panic on ejections over: {counts:?}"
                );
                for id in ["a", "b", "d"] {
                    assert!(counts.contains_key(id), "{id} not picked: {counts:?}");
                }
            }
            Picker::Hash => {
                for n in 0..50 {
                    assert_ne!(
                        hashed(&users, &kc),
                        "c",
                        "hash pick {n}: still in panic on ejections over"
                    );
                }
            }
        }
        assert_eq!(ejected(&users), ["c"], "{picker:?}");
    }
}

/// Panic mode over ejections that ended while no pick looked (picks held from before) ends at
/// the next report: `a`, failing on probation after the ends, is ejected again, and round-robin
/// picks never return it (a stuck panic, 3 stale + 1, would let it in).
#[tokio::test(start_paused = true)]
async fn after_a_panic_ends_unnoticed_a_failure_on_probation_ejects_and_picks_skip_it() {
    let (_etcd, users) = setup(&["a", "b", "c", "d"], unlimited()).await;
    for id in ["a", "b", "c"] {
        fail(&users, id, 5);
    }
    assert_eq!(ejected(&users), ["a", "b", "c"]);
    // In panic, a is picked: hold one such pick to report on after the ends.
    let late = pick_id(&users, "a").expect("panic lets a in");
    advance(secs(31)).await;

    late.failure();
    let counts = tally(400, || users.pick().map(|p| p.id().to_owned()));
    assert!(
        !counts.contains_key("a"),
        "a, ejected again, is picked: still in panic? {counts:?}"
    );
    for id in ["b", "c", "d"] {
        assert!(counts.contains_key(id), "{id} not picked: {counts:?}");
    }
    assert_eq!(ejected(&users), ["a"]);
    let a = health_of(&users, "a");
    assert_eq!(a.times_ejected, 2, "{a:?}");
    assert_eq!(
        a.ejected_until.map(|u| u.saturating_duration_since(now())),
        Some(secs(60)),
        "{a:?}"
    );
}

/// The `etcd_registry_ejected` gauge and the count go back down when an ejection ends and only
/// successes on other instances are reported (no pick meets the ejected one), from the very
/// instant it ends: by `Picked::success` and by `Call::success`. The freed slot then takes
/// `c`'s ejection.
#[tokio::test(start_paused = true)]
async fn successes_on_other_instances_end_an_ejection_over() {
    for how in [Report::Picked, Report::Call] {
        let recorder = Recorder::new();
        let _local = metrics::set_default_local_recorder(&recorder);
        let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default()).await;
        let (kb, kc) = (key_of(&users, "b"), key_of(&users, "c"));
        fail(&users, "a", 5);
        assert_eq!(ejected_gauge(&recorder), 1.0, "{how:?}");
        // To the very end of a's ejection: the first instant it is over.
        advance(secs(30)).await;

        report_by_key(&users, &kb, "b", 1, how, true);
        assert_eq!(
            ejected_gauge(&recorder),
            0.0,
            "{how:?}: a success after the end left the gauge at a's ejection"
        );
        report_by_key(&users, &kc, "c", 5, how, false);
        assert_ne!(hashed(&users, &kc), "c", "{how:?}: c was refused the slot");
        assert_eq!(ejected_gauge(&recorder), 1.0, "{how:?}");
        assert_eq!(ejected(&users), ["c"], "{how:?}");
        let a = health_of(&users, "a");
        assert!(
            a.on_probation && a.ejected_until.is_none(),
            "{how:?}: {a:?}"
        );
    }
}

/// The health view alone ends an ejection over: it shows no ejection, the instance on
/// probation, and the gauge at 0, with no pick or report since the end.
#[tokio::test(start_paused = true)]
async fn the_health_view_alone_ends_an_ejection_over() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default()).await;
    fail(&users, "a", 5);
    assert_eq!(ejected_gauge(&recorder), 1.0);
    advance(secs(30)).await;
    assert_eq!(ejected_gauge(&recorder), 1.0, "nothing has looked yet");
    let a = health_of(&users, "a");
    assert!(a.on_probation && a.ejected_until.is_none(), "{a:?}");
    assert_eq!(ejected_gauge(&recorder), 0.0, "health() did not sweep");
}

/// A sweep that ends one ejection sets the next at the end of the next running one: `a` ends at
/// t0 + 30 s and is swept by a success at t0 + 31 while `b` runs to t0 + 40; at t0 + 41, with
/// no pick meeting `b`, two slots (50 % of 4) are free again for `c` and `d`.
#[tokio::test(start_paused = true)]
async fn a_sweep_sets_the_next_one_at_the_next_ejection_end() {
    let ejection = OutlierEjection::default().max_ejection_percent(50);
    let (_etcd, users) = setup(&["a", "b", "c", "d"], ejection).await;
    let (kc, kd) = (key_of(&users, "c"), key_of(&users, "d"));
    fail(&users, "a", 5);
    advance(secs(10)).await;
    fail(&users, "b", 5);
    assert_eq!(ejected(&users), ["a", "b"]);
    advance(secs(21)).await;
    report_by_key(&users, &kc, "c", 1, Report::Picked, true);
    advance(secs(10)).await;

    report_by_key(&users, &kc, "c", 5, Report::Picked, false);
    report_by_key(&users, &kd, "d", 5, Report::Picked, false);
    assert_ne!(hashed(&users, &kc), "c", "c was refused a slot");
    assert_ne!(
        hashed(&users, &kd),
        "d",
        "d was refused a slot: b's ended ejection still counts"
    );
    assert_eq!(ejected(&users), ["c", "d"]);
}

/// A later ejection with a later end must not put off the sweep due at an earlier one: `b`
/// (ejected at t0, 30 s) ends before `a` (ejected at t0 + 5 s, its first ejection too, so 30 s);
/// at t0 + 31, with no pick meeting `b`, its slot (one of 50 % of 4) goes to `c`.
#[tokio::test(start_paused = true)]
async fn a_later_ejection_does_not_put_off_the_sweep_of_an_earlier_end() {
    let ejection = OutlierEjection::default().max_ejection_percent(50);
    let (_etcd, users) = setup(&["a", "b", "c", "d"], ejection).await;
    let kc = key_of(&users, "c");
    fail(&users, "b", 5);
    advance(secs(5)).await;
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a", "b"]);
    advance(secs(26)).await;

    report_by_key(&users, &kc, "c", 5, Report::Picked, false);
    assert_ne!(
        hashed(&users, &kc),
        "c",
        "c was refused a slot: b's ended ejection still counts"
    );
    assert_eq!(ejected(&users), ["a", "c"]);
}

/// A success reported on an instance whose ejection ended unnoticed (a pick held from before)
/// restores it: a later single failure does not eject it again.
#[tokio::test(start_paused = true)]
async fn a_success_on_an_unnoticed_return_restores_the_instance() {
    let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default()).await;
    let late = pick_id(&users, "a").expect("a");
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    advance(secs(31)).await;
    late.success(ms(1));
    let ka = key_of(&users, "a");
    report_by_key(&users, &ka, "a", 1, Report::Picked, false);
    let a = health_of(&users, "a");
    assert_eq!(
        (a.ejected_until, a.on_probation, a.consecutive_failures),
        (None, false, 1),
        "{a:?}"
    );
    assert_eq!(a.times_ejected, 1, "{a:?}");
}

/// A report through a selection frees the slot of an ejection over outside the selection:
/// `a` (not selected) ended unnoticed, and `c`, failing through the selection's picks (which
/// meet only `c` and `d`), is ejected.
#[tokio::test(start_paused = true)]
async fn a_report_through_a_selection_frees_the_slot_of_an_ejection_over_outside_it() {
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b"]);
    put(&etcd, spec("c").tag("x"));
    put(&etcd, spec("d").tag("x"));
    let users = users(discovery(&etcd).outlier_ejection(untimed(OutlierEjection::default()))).await;
    let selection = users.select(Selector::new().tag("x"));
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    advance(secs(31)).await;

    for k in 0..5 {
        (0..100)
            .filter_map(|_| selection.pick())
            .find(|p| p.id() == "c")
            .unwrap_or_else(|| panic!("failure {k}: the selection does not pick c"))
            .failure();
    }
    let counts = tally(200, || selection.pick().map(|p| p.id().to_owned()));
    assert!(
        !counts.contains_key("c"),
        "c was refused the slot of a's ended ejection: {counts:?}"
    );
    assert_eq!(ejected(&users), ["c"]);
}

/// A selection's pick that meets an ejected instance sweeps the whole service's ejections:
/// `a` and `b` (not selected) ended unnoticed while `c` (selected) still runs, and a pick of
/// the selection that meets `c` ends them (the gauge goes from 3 to 1). The selection, 1 of 2
/// healthy, is never in panic mode, whatever the service's count.
#[tokio::test(start_paused = true)]
async fn a_selection_pick_sweeps_ejections_outside_the_selection() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b"]);
    put(&etcd, spec("c").tag("x"));
    put(&etcd, spec("d").tag("x"));
    let users = users(discovery(&etcd).outlier_ejection(untimed(unlimited()))).await;
    let selection = users.select(Selector::new().tag("x"));
    fail(&users, "a", 5);
    fail(&users, "b", 5);
    advance(secs(20)).await;
    fail(&users, "c", 5);
    assert_eq!(ejected_gauge(&recorder), 3.0);
    advance(secs(11)).await;
    assert_eq!(ejected_gauge(&recorder), 3.0, "nothing has looked yet");

    let counts = tally(200, || selection.pick().map(|p| p.id().to_owned()));
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["d"], "{counts:?}");
    assert_eq!(ejected_gauge(&recorder), 1.0, "the selection's pick swept");
    assert_eq!(ejected(&users), ["c"]);
}

/// A selection in panic mode only on its own ejections that ended unnoticed leaves it at its
/// first pick: the pick in panic mode reads the clock and sweeps, and the selection counts its
/// own again (`c` ended, `d` runs: 1 of 2 healthy, no panic).
#[tokio::test(start_paused = true)]
async fn a_selection_s_stale_panic_ends_at_its_first_pick() {
    let etcd = MemoryBackend::new();
    put(&etcd, spec("c").tag("x"));
    put(&etcd, spec("d").tag("x"));
    put_all(&etcd, &["a", "b"]);
    let users = users(discovery(&etcd).outlier_ejection(untimed(unlimited()))).await;
    let selection = users.select(Selector::new().tag("x"));
    fail(&users, "c", 5);
    advance(secs(20)).await;
    fail(&users, "d", 5);
    advance(secs(11)).await;
    // Each pick alone: the first one must already be out of panic mode.
    for round in 0..20 {
        let got = selection.pick().map(|p| p.id().to_owned());
        assert_eq!(got.as_deref(), Some("c"), "pick {round}");
    }
    assert_eq!(ejected(&users), ["d"]);
}

/// An ejection that ended unnoticed and whose key is then deleted gives its slot back once,
/// not twice: `b` takes the only slot, and `c` is then refused one (1 of the 2 left).
#[tokio::test(start_paused = true)]
async fn a_removed_instance_with_an_ejection_over_gives_its_slot_back_once() {
    let (etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default()).await;
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    advance(secs(31)).await;
    remove(&etcd, "a");
    until_ids(&users, &["b", "c"]).await;
    let (kb, kc) = (key_of(&users, "b"), key_of(&users, "c"));
    report_by_key(&users, &kb, "b", 5, Report::Picked, false);
    assert_ne!(hashed(&users, &kb), "b", "b was refused the slot");
    report_by_key(&users, &kc, "c", 5, Report::Picked, false);
    assert_eq!(
        hashed(&users, &kc),
        "c",
        "a second slot: a's was given back twice"
    );
    assert_eq!(ejected(&users), ["b"]);
}

/// Four threads pick (round-robin and by key) and report, with time moved past ejection ends
/// between rounds (so the rounds' picks and reports race to sweep the ended ones, panic mode
/// included): the count neither leaks up nor down. After every ejection has ended, nothing is
/// ejected, the gauge is 0, and exactly the max share (6 of 10) can be ejected again.
#[tokio::test(start_paused = true)]
async fn the_ejected_count_stays_exact_under_concurrent_sweeps() {
    let recorder = Recorder::new();
    let _local = metrics::set_default_local_recorder(&recorder);
    let ejection = OutlierEjection::default()
        .consecutive_failures(2)
        .max_ejection_percent(60);
    let ten = names("i", 10);
    let ids: Vec<&str> = ten.iter().map(String::as_str).collect();
    let (_etcd, users) = setup(&ids, ejection).await;
    let runtime = tokio::runtime::Handle::current();
    let gaps = [31, 5, 61, 29, 91, 1, 120, 30, 45, 59];
    for (round, gap) in gaps.into_iter().enumerate() {
        // All four start together, so that their first picks race for the ends just passed.
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let (users, runtime, start) = (&users, &runtime, &start);
                s.spawn(move || {
                    let _context = runtime.enter();
                    start.wait();
                    for n in 0..1500u32 {
                        let picked = if n % 3 == 0 {
                            users.pick_by(format!("k{}", (n * 31 + t) % 97))
                        } else {
                            users.pick()
                        }
                        .expect("never None");
                        // The first six fail most of the time, the others now and then.
                        let index: u32 = picked.id()[2..].parse().expect("i-NN");
                        let fails = if index < 6 {
                            (n + t + round as u32) % 5 != 0
                        } else {
                            (n * 7 + t) % 11 == 0
                        };
                        match (n % 2 == 0, fails) {
                            (true, true) => picked.failure(),
                            (true, false) => picked.success(ms(1)),
                            (false, true) => picked.start().failure(),
                            (false, false) => picked.start().success(),
                        }
                    }
                });
            }
        });
        // Before the clock moves: the view shows no more than the share.
        let during = ejected(&users);
        assert!(during.len() <= 6, "round {round}: {during:?}");
        advance(secs(gap)).await;
    }
    let ejections = recorder.total(&["etcd_registry_ejections_total"]);
    assert!(ejections >= 10, "only {ejections} ejections in all");

    advance(secs(301)).await;
    assert_eq!(ejected(&users), Vec::<String>::new());
    assert_eq!(ejected_gauge(&recorder), 0.0, "the gauge after every end");
    for id in &ids {
        pick_id(&users, id)
            .unwrap_or_else(|| panic!("{id} is not picked"))
            .success(ms(1));
    }
    for id in &ids[..7] {
        fail(&users, id, 2);
    }
    assert_eq!(
        ejected(&users),
        ["i-00", "i-01", "i-02", "i-03", "i-04", "i-05"],
        "exactly 6 slots"
    );
    assert_eq!(ejected_gauge(&recorder), 6.0);
}
