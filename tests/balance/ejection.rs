//! Outlier ejection through `pick()` and `pick_p2c()`, live and frozen: the failure threshold,
//! ejection periods and probation, the max ejected share, panic mode, slots given back, health
//! that survives freezes and publishes, and the outage drill.

use etcd_registry::OutlierEjection;
use etcd_registry::balance::p2c::FORCE_PICK;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Picker {
    RoundRobin,
    P2c,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Live,
    Frozen,
}

const COMBOS: [(Picker, Mode); 4] = [
    (Picker::RoundRobin, Mode::Live),
    (Picker::RoundRobin, Mode::Frozen),
    (Picker::P2c, Mode::Live),
    (Picker::P2c, Mode::Frozen),
];

/// A cache of plain instances `ids` with `ejection`, frozen (etcd cut off) if `mode` says so.
async fn setup(
    ids: &[&str],
    ejection: OutlierEjection,
    mode: Mode,
) -> (MemoryBackend, ServiceCache) {
    let etcd = MemoryBackend::new();
    put_all(&etcd, ids);
    let users = users(discovery(&etcd).outlier_ejection(ejection)).await;
    if mode == Mode::Frozen {
        etcd.set_reachable(false);
        until_frozen(&users).await;
    }
    (etcd, users)
}

/// `n` picks with `picker`, unreported (p2c calls dropped): the ids picked.
fn picks(users: &ServiceCache, picker: Picker, n: usize) -> BTreeMap<String, usize> {
    tally(n, || match picker {
        Picker::RoundRobin => users.pick().map(|p| p.id().to_owned()),
        Picker::P2c => users.pick_p2c().map(|c| c.id().to_owned()),
    })
}

/// Whether `picker` picks `id` now. p2c avoids an instance that failed (its cost) until it has
/// been left alone for `FORCE_PICK`, so for p2c this first lets that much time pass: then a
/// pick probes it unless it is ejected.
async fn reaches(users: &ServiceCache, picker: Picker, id: &str) -> bool {
    if picker == Picker::P2c {
        advance(FORCE_PICK + ms(1)).await;
    }
    picks(users, picker, 300).contains_key(id)
}

/// A pick in hand, from either picker, to report on.
enum Pick {
    Picked(Picked),
    Call(etcd_registry::Call),
}

impl Pick {
    fn end(self, success: bool) {
        match (self, success) {
            (Pick::Picked(p), true) => p.success(ms(1)),
            (Pick::Picked(p), false) => p.failure(),
            (Pick::Call(c), true) => c.success(),
            (Pick::Call(c), false) => c.failure(),
        }
    }
}

/// The first pick of `id` by `picker` within 300 picks (the others unreported).
fn find(users: &ServiceCache, picker: Picker, id: &str) -> Option<Pick> {
    (0..300).find_map(|_| match picker {
        Picker::RoundRobin => users.pick().filter(|p| p.id() == id).map(Pick::Picked),
        Picker::P2c => users.pick_p2c().filter(|c| c.id() == id).map(Pick::Call),
    })
}

/// Reports the outcome of the first pick of `id` by `picker`. For p2c, if it was probed by a
/// forced pick of this very instant (while looking for another), waits for its next one.
async fn report(users: &ServiceCache, picker: Picker, id: &str, success: bool) {
    for _ in 0..2 {
        if let Some(pick) = find(users, picker, id) {
            return pick.end(success);
        }
        advance(FORCE_PICK + ms(1)).await;
    }
    panic!("{picker:?} never picked {id}");
}

/// Four consecutive failures do not eject; the fifth does, for both pickers, live and frozen.
#[tokio::test(start_paused = true)]
async fn the_fifth_consecutive_failure_ejects() {
    // Four consecutive failures do not eject (and a success resets the count); the fifth does, for
    // 30 s, after which neither picker picks it, even where p2c would force a probe.
    for (picker, mode) in COMBOS {
        let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), mode).await;
        fail(&users, "a", 4);
        pick_id(&users, "a").expect("a").success(ms(1));
        fail(&users, "a", 4);
        let a = health_of(&users, "a");
        assert_eq!(
            (a.consecutive_failures, a.ejected_until),
            (4, None),
            "{a:?}"
        );
        assert!(reaches(&users, picker, "a").await, "{picker:?} {mode:?}");

        fail(&users, "a", 1);
        let a = health_of(&users, "a");
        assert_eq!(
            a.ejected_until,
            Some(now() + secs(30)),
            "{picker:?} {mode:?}"
        );
        assert_eq!((a.consecutive_failures, a.times_ejected), (0, 1));
        assert!(!reaches(&users, picker, "a").await, "{picker:?} {mode:?}");
        assert!(!reaches(&users, picker, "a").await, "{picker:?} {mode:?}");
        assert_eq!(ejected(&users), ["a"]);
    }
}

/// An ejection lasts exactly 30 s, then probation, where one success restores the instance.
#[tokio::test(start_paused = true)]
async fn an_ejection_lasts_thirty_seconds_then_probation_and_a_success_restores() {
    // An ejection lasts exactly 30 s; then the instance is picked again, on probation, and one
    // success restores it (a later single failure does not eject it again).
    for (picker, mode) in COMBOS {
        let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), mode).await;
        fail(&users, "a", 5);
        let until = health_of(&users, "a").ejected_until.expect("ejected");
        advance_to(until - ms(1)).await;
        assert!(
            !picks(&users, picker, 1000).contains_key("a"),
            "{picker:?} {mode:?}"
        );
        advance(ms(1)).await;
        // Left alone for 30 s, a is probed at once by p2c too.
        let probe = find(&users, picker, "a").expect("probed when the ejection ends");
        let a = health_of(&users, "a");
        assert!(a.on_probation && a.ejected_until.is_none(), "{a:?}");

        probe.end(true);
        let a = health_of(&users, "a");
        assert!(!a.on_probation, "{a:?}");
        report(&users, Picker::RoundRobin, "a", false).await;
        let a = health_of(&users, "a");
        assert_eq!(
            (a.consecutive_failures, a.ejected_until),
            (1, None),
            "{a:?}"
        );
    }
}

/// On probation one failure ejects again for 60 s, then 90 s: the multiplier grows.
#[tokio::test(start_paused = true)]
async fn a_failure_on_probation_ejects_for_twice_as_long() {
    // On probation one failure ejects again, for twice as long (60 s), and the multiplier keeps
    // growing with each failed probe.
    for (picker, mode) in COMBOS {
        let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), mode).await;
        fail(&users, "a", 5);
        for (n, length) in [(2, 60), (3, 90)] {
            advance_to(health_of(&users, "a").ejected_until.expect("ejected")).await;
            report(&users, picker, "a", false).await;
            let a = health_of(&users, "a");
            assert_eq!(
                a.ejected_until,
                Some(now() + secs(length)),
                "{picker:?} {mode:?}"
            );
            assert_eq!(a.times_ejected, n);
            advance(secs(length) - ms(1)).await;
            assert!(
                !picks(&users, picker, 1000).contains_key("a"),
                "{picker:?} {mode:?}"
            );
        }
        advance(ms(1)).await;
        assert!(
            picks(&users, picker, 20).contains_key("a"),
            "{picker:?} {mode:?}"
        );
    }
}

/// At most 10 % of the instances are ejected, but at least one: 1 of 3, 2 of 20.
#[tokio::test(start_paused = true)]
async fn the_max_ejected_share_is_ten_percent_but_at_least_one() {
    // At most 10 % of the instances are ejected, but always at least one: of 3, one; of 20, two.
    // An instance refused a slot keeps being picked.
    for (picker, mode) in COMBOS {
        let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), mode).await;
        fail(&users, "a", 5);
        fail(&users, "b", 5);
        assert_eq!(ejected(&users), ["a"], "{picker:?} {mode:?}");
        assert_eq!(health_of(&users, "b").consecutive_failures, 5);
        assert!(reaches(&users, picker, "b").await, "{picker:?} {mode:?}");

        let twenty = names("i", 20);
        let ids: Vec<&str> = twenty.iter().map(String::as_str).collect();
        let (_etcd, users) = setup(&ids, OutlierEjection::default(), mode).await;
        for id in &ids[..3] {
            fail(&users, id, 5);
        }
        assert_eq!(ejected(&users), ["i-00", "i-01"], "{picker:?} {mode:?}");
        let counts = picks(&users, picker, 2000);
        assert!(!counts.contains_key("i-00") && !counts.contains_key("i-01"));
        assert!(reaches(&users, picker, "i-02").await, "{picker:?} {mode:?}");
    }
}

/// Picks skip the ejected while half are healthy and ignore ejection below that (panic).
#[tokio::test(start_paused = true)]
async fn below_the_panic_threshold_picks_ignore_ejection() {
    // With no share limit, picks skip the ejected while at least half are healthy; below half
    // (panic) they pick among all, ejected or not.
    let ejection = OutlierEjection::default().max_ejection_percent(100);
    for (picker, mode) in COMBOS {
        let (_etcd, users) = setup(&["a", "b", "c", "d"], ejection, mode).await;
        fail(&users, "a", 5);
        fail(&users, "b", 5);
        assert_eq!(ejected(&users), ["a", "b"]);
        assert!(
            !reaches(&users, picker, "a").await,
            "2 of 4 healthy: no panic"
        );
        assert!(
            !reaches(&users, picker, "b").await,
            "2 of 4 healthy: no panic"
        );

        fail(&users, "c", 5);
        assert_eq!(ejected(&users), ["a", "b", "c"]);
        for id in ["a", "b", "c", "d"] {
            assert!(
                reaches(&users, picker, id).await,
                "panic: {id} {picker:?} {mode:?}"
            );
        }
    }
}

/// Panic mode ends when the ejections that caused it end, and ejection works again.
#[tokio::test(start_paused = true)]
async fn panic_mode_ends_when_the_ejections_end() {
    // Panic mode ends when the ejections that caused it end: back on probation, the recovered
    // instances are restored by a success, the one still failing is ejected again by its first
    // failure, and picks skip it again.
    let ejection = OutlierEjection::default().max_ejection_percent(100);
    for (picker, mode) in COMBOS {
        let (_etcd, users) = setup(&["a", "b", "c", "d"], ejection, mode).await;
        for id in ["a", "b", "c"] {
            fail(&users, id, 5);
        }
        assert!(reaches(&users, picker, "c").await, "panic");
        advance(secs(30)).await;
        report(&users, picker, "a", true).await;
        report(&users, picker, "b", true).await;
        report(&users, picker, "c", false).await;
        assert_eq!(ejected(&users), ["c"], "{picker:?} {mode:?}");
        assert_eq!(health_of(&users, "c").times_ejected, 2);
        assert!(
            !reaches(&users, picker, "c").await,
            "{picker:?} {mode:?}: no panic"
        );
        assert!(reaches(&users, picker, "a").await, "{picker:?} {mode:?}");
    }
}

/// Ejection slots add up exactly after a storm of reports from 8 threads at once.
#[tokio::test(start_paused = true)]
async fn ejection_slots_add_up_under_concurrent_reports() {
    // Ejection slots add up under reports from many threads at once: after a storm of failures
    // and successes from 8 threads, once every ejection is over, exactly the max share (3 of 10)
    // can be ejected again, and no more.
    let ejection = OutlierEjection::default()
        .consecutive_failures(2)
        .max_ejection_percent(30)
        .panic_threshold_percent(0);
    let ten = names("i", 10);
    let ids: Vec<&str> = ten.iter().map(String::as_str).collect();
    let (_etcd, users) = setup(&ids, ejection, Mode::Live).await;
    let runtime = tokio::runtime::Handle::current();
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let (users, runtime) = (&users, &runtime);
            s.spawn(move || {
                let _context = runtime.enter();
                for n in 0..3000u32 {
                    let fails = (n * 7 + t * 13) % 5 < 3;
                    if n % 2 == 0 {
                        let picked = users.pick_random().expect("never None");
                        if fails {
                            picked.failure()
                        } else {
                            picked.success(ms(1))
                        }
                    } else {
                        let call = users.pick_p2c().expect("never None");
                        if fails {
                            call.failure()
                        } else {
                            call.success()
                        }
                    }
                }
            });
        }
    });
    let during = ejected(&users);
    assert!(during.len() <= 3, "{during:?}");
    advance(secs(301)).await;
    assert!(users.pick().is_some());
    assert_eq!(ejected(&users), Vec::<String>::new());
    for id in &ids {
        report(&users, Picker::RoundRobin, id, true).await;
    }
    for id in &ids[..4] {
        fail(&users, id, 2);
    }
    assert_eq!(ejected(&users), ["i-00", "i-01", "i-02"], "exactly 3 slots");
}

/// Deleting an ejected instance's key gives its slot back: another can then be ejected.
#[tokio::test(start_paused = true)]
async fn a_removed_key_gives_its_ejection_slot_back() {
    // Deleting an ejected instance's key gives its slot back: another instance can then be
    // ejected.
    for picker in [Picker::RoundRobin, Picker::P2c] {
        let (etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
        fail(&users, "a", 5);
        fail(&users, "b", 5);
        assert_eq!(ejected(&users), ["a"]);
        remove(&etcd, "a");
        until_ids(&users, &["b", "c"]).await;
        report(&users, Picker::RoundRobin, "b", false).await;
        assert_eq!(ejected(&users), ["b"]);
        assert!(!reaches(&users, picker, "b").await, "{picker:?}");
    }
}

/// Calls that outlive their instance's key cannot eject it and take a slot for ever.
#[tokio::test(start_paused = true)]
async fn a_call_outliving_its_instance_cannot_take_a_slot() {
    // Calls still in flight to an instance whose key was deleted may fail, but cannot eject it:
    // such an ejection would hold a slot that nothing ever gives back (no snapshot holds the
    // instance any more), here the only one, so that a failing instance up could not be ejected.
    let (etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
    let calls: Vec<_> = (0..5)
        .map(|_| pick_id(&users, "c").expect("c").start())
        .collect();
    remove(&etcd, "c");
    until_ids(&users, &["a", "b"]).await;
    for call in calls {
        call.failure();
    }
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    assert!(!picks(&users, Picker::RoundRobin, 100).contains_key("a"));
}

/// A call's failure weighs the max ejected share against the service as it is when the call
/// ends, not as it was when it started.
#[tokio::test(start_paused = true)]
async fn a_call_s_failure_counts_against_the_service_as_it_is_now() {
    // 10 instances: one slot (10 %), taken by `b`. `a` fails four times, a call to it starts,
    // and 10 more instances join: 2 slots of 20. The call's failure, the fifth, ejects `a`.
    let ids = names("i", 8);
    let mut all = vec!["a", "b"];
    all.extend(ids.iter().map(String::as_str));
    let (etcd, users) = setup(&all, OutlierEjection::default(), Mode::Live).await;
    fail(&users, "b", 5);
    fail(&users, "a", 4);
    let call = pick_id(&users, "a").expect("a").start();
    let more = names("j", 10);
    put_all(&etcd, &more.iter().map(String::as_str).collect::<Vec<_>>());
    wait_for(&users, secs(10), "20 instances", |s| s.len() == 20).await;
    call.failure();
    assert_eq!(ejected(&users), ["a", "b"], "2 of 20 may be ejected");
}

/// An ejected instance that turns draining gives its slot back at once.
#[tokio::test(start_paused = true)]
async fn a_draining_instance_gives_its_slot_back() {
    // An ejected instance that turns draining gives its slot back (the share counts instances up):
    // another instance can be ejected at once.
    let (etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
    fail(&users, "a", 5);
    put(&etcd, spec("a").state(etcd_registry::State::Draining));
    wait_for(&users, secs(10), "a draining", |s| {
        s.get("a").is_some_and(|i| !i.is_up())
    })
    .await;
    fail(&users, "b", 5);
    assert_eq!(ejected(&users), ["b"]);
    assert!(!picks(&users, Picker::RoundRobin, 100).contains_key("b"));
}

/// An ejection survives a freeze and a publish, with the same end.
#[tokio::test(start_paused = true)]
async fn health_survives_a_freeze_and_a_publish() {
    // Health survives a freeze and a publish: an ejected instance stays ejected, with the same end,
    // while etcd is cut off and after an unrelated instance is added.
    for picker in [Picker::RoundRobin, Picker::P2c] {
        let (etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
        fail(&users, "a", 5);
        let until = health_of(&users, "a").ejected_until;
        etcd.set_reachable(false);
        until_frozen(&users).await;
        assert_eq!(health_of(&users, "a").ejected_until, until);
        assert!(!picks(&users, picker, 300).contains_key("a"));

        etcd.set_reachable(true);
        until_live(&users).await;
        put(&etcd, spec("d"));
        until_ids(&users, &["a", "b", "c", "d"]).await;
        assert_eq!(health_of(&users, "a").ejected_until, until, "{picker:?}");
        let counts = picks(&users, picker, 300);
        assert!(
            !counts.contains_key("a") && counts.contains_key("d"),
            "{counts:?}"
        );
    }
}

/// `health()` shows load, latency, success rate, failures, ejection and probation.
#[tokio::test(start_paused = true)]
async fn the_health_view_shows_it_all() {
    // `health()` shows in-flight requests, latency, success rate, consecutive failures, the
    // ejection and its end, and probation (`first_seen` is for slow start: see slow_start.rs).
    let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
    let a = health_of(&users, "a");
    assert_eq!((a.in_flight, a.latency, a.success_rate), (0, ms(0), 1.0));
    assert_eq!((a.consecutive_failures, a.times_ejected), (0, 0));
    assert_eq!(
        (a.ejected_until, a.on_probation, a.first_seen),
        (None, false, None)
    );

    let call = pick_id(&users, "a").expect("a").start();
    assert_eq!(health_of(&users, "a").in_flight, 1);
    advance(ms(40)).await;
    call.success();
    let a = health_of(&users, "a");
    assert_eq!((a.in_flight, a.latency), (0, ms(40)));

    advance(secs(1)).await;
    fail(&users, "a", 5);
    let a = health_of(&users, "a");
    let ejected_at = now();
    assert_eq!(a.ejected_until, Some(ejected_at + secs(30)));
    assert_eq!((a.times_ejected, a.consecutive_failures), (1, 0));
    assert!(a.success_rate < 0.95, "{a:?}");
    advance(secs(30)).await;
    assert!(pick_id(&users, "a").is_some());
    assert!(health_of(&users, "a").on_probation);
}

/// A dropped call counts as neither success nor failure.
#[tokio::test(start_paused = true)]
async fn a_dropped_call_counts_as_neither() {
    // A dropped call counts as neither success nor failure: the consecutive failures go on from
    // where they were (the fifth failure still ejects), the success rate does not move, and the
    // in-flight count goes back down.
    for picker in [Picker::RoundRobin, Picker::P2c] {
        let (_etcd, users) = setup(&["a", "b"], OutlierEjection::default(), Mode::Live).await;
        fail(&users, "a", 3);
        let before = health_of(&users, "a");
        advance(secs(2)).await;
        match picker {
            Picker::RoundRobin => drop(pick_id(&users, "a").expect("a").start()),
            Picker::P2c => {
                let call = (0..300)
                    .filter_map(|_| users.pick_p2c())
                    .find(|c| c.id() == "a")
                    .expect("p2c probes a");
                assert_eq!(health_of(&users, "a").in_flight, 1);
                drop(call);
            }
        }
        let after = health_of(&users, "a");
        assert_eq!(after.in_flight, 0);
        assert_eq!(after.consecutive_failures, 3, "{picker:?}");
        assert_eq!(after.success_rate, before.success_rate, "{picker:?}");
        fail(&users, "a", 2);
        assert_eq!(ejected(&users), ["a"], "{picker:?}");
    }
}

/// Drill, frozen: a failing instance gets 5 requests, then one probe per ejection period.
#[tokio::test(start_paused = true)]
async fn drill_a_failing_instance_gets_only_probes_while_frozen() {
    // The drill: etcd cut off, 3 instances, one failing every request for 15 minutes, one
    // request every 100 ms for 25 minutes. At most 5 requests reach it before it is ejected;
    // after that it gets one probe at the end of each ejection (30 s, 60 s, ... up to 300 s),
    // and nothing in between; once it recovers, its probe restores it and it gets its share
    // again.
    for picker in [Picker::RoundRobin, Picker::P2c] {
        let (_etcd, users) =
            setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Frozen).await;
        let start = now();
        let recovers = start + secs(15 * 60);
        let mut to_a = Vec::new();
        let mut after_recovery = 0;
        let mut total_after = 0;
        for _ in 0..(25 * 60 * 10) {
            let t = now();
            let failing = t < recovers;
            let id = match picker {
                Picker::RoundRobin => {
                    let picked = users.pick().expect("never None");
                    let id = picked.id().to_owned();
                    if id == "a" && failing {
                        picked.failure();
                    } else {
                        picked.success(ms(1));
                    }
                    id
                }
                Picker::P2c => {
                    let call = users.pick_p2c().expect("never None");
                    let id = call.id().to_owned();
                    if id == "a" && failing {
                        call.failure();
                    } else {
                        call.success();
                    }
                    id
                }
            };
            if id == "a" && failing {
                to_a.push(t - start);
            }
            if t >= recovers + secs(300) {
                total_after += 1;
                after_recovery += usize::from(id == "a");
            }
            advance(ms(100)).await;
        }
        assert!(!users.snapshot().freshness().is_live(), "frozen throughout");
        println!("{picker:?}: failing requests reached a at {to_a:?}");
        // 5 failures, then failed probes after 30, 60, ... 210 s of ejection (840 s in all);
        // the probe after the next 240 s comes after the recovery at 900 s.
        assert_eq!(to_a.len(), 12, "{picker:?}: {to_a:?}");
        // Ejected at the 5th; each later request is a probe after the n-th ejection's length.
        for (n, pair) in to_a[4..].windows(2).enumerate() {
            let length = secs(30 * (n as u64 + 1)).min(secs(300));
            let gap = pair[1] - pair[0];
            let slack = if picker == Picker::P2c {
                secs(3)
            } else {
                ms(300)
            };
            assert!(
                gap >= length && gap <= length + slack,
                "{picker:?}: probe {n} after {gap:?}, ejection {length:?}: {to_a:?}"
            );
        }
        let a = health_of(&users, "a");
        assert!(!a.on_probation && a.ejected_until.is_none(), "{a:?}");
        let share = after_recovery as f64 / total_after as f64;
        println!("{picker:?}: a's share after recovery {share:.3}");
        match picker {
            Picker::RoundRobin => assert!((share - 1.0 / 3.0).abs() < 0.01, "{share}"),
            // p2c: every latency here is 0 and a's success EWMA comes back to just under 1.0,
            // so a loses each pair by a hair and gets its forced picks (about 1 in 10 here).
            Picker::P2c => assert!(share > 0.05, "{share}"),
        }
    }
}

/// Issue (review): an instance whose first reports came through an older snapshot, after a
/// newer one was built while it had no health, looked never-reported in the newer snapshot (an
/// empty health slot), so an ejected instance was still picked there. Health made now lands
/// in the newest snapshot's slot too.
#[tokio::test(start_paused = true)]
async fn an_instance_ejected_through_an_older_snapshot_is_skipped_in_the_newer_one() {
    let (etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
    // Five picks of `a` from the current snapshot, held: nothing reported yet, so `a` has no
    // health when the next snapshot is built.
    let held: Vec<Picked> = (0..5).map(|_| pick_id(&users, "a").expect("a")).collect();
    let before = users.snapshot().revision();
    put_all(&etcd, &["d"]);
    wait_for(&users, secs(10), "d published", |s| s.revision() > before).await;
    for picked in held {
        picked.failure();
    }
    assert_eq!(
        ejected(&users),
        ["a"],
        "five failures through the older snapshot eject a"
    );
    let counts = picks(&users, Picker::RoundRobin, 300);
    assert!(
        !counts.contains_key("a"),
        "the newer snapshot still picks a: {counts:?}"
    );
    let counts = picks(&users, Picker::P2c, 300);
    assert!(
        !counts.contains_key("a"),
        "p2c in the newer snapshot still picks a: {counts:?}"
    );
}

/// Issue (review): a sync task restarted after its runtime shut down started a fresh health
/// registry, so an ejected instance was picked again at once. Health now belongs to the cache
/// and outlives its tasks.
#[test]
fn an_ejection_survives_a_restart_of_the_sync_task() {
    let etcd = MemoryBackend::new();
    put_all(&etcd, &["a", "b", "c"]);
    let discovery = discovery(&etcd).build().expect("valid settings");
    let first = runtime();
    let users = first
        .block_on(discovery.service("user"))
        .expect("first list");
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    drop(first);
    assert!(
        !users.freshness().is_live(),
        "the task ended with its runtime"
    );

    let second = runtime();
    second.block_on(async {
        let again = discovery.service("user").await.expect("restarted");
        until_live(&again).await;
        assert_eq!(
            ejected(&again),
            ["a"],
            "the restarted task kept the ejection"
        );
        let counts = tally(300, || again.pick().map(|p| p.id().to_owned()));
        assert!(!counts.contains_key("a"), "a is picked again: {counts:?}");
    });
}

/// Issue (review): when no candidate passed, the fallback took the first instance up in key
/// order. With weights 100:1:1 and the heavy instance ejected, weighted random then sent about
/// 87 % of its picks to one light instance and almost none to the other. The fallback now
/// starts from a random place: the two light instances share evenly.
#[tokio::test(start_paused = true)]
async fn with_the_heavy_instance_ejected_the_light_ones_share_evenly() {
    let etcd = MemoryBackend::new();
    put(&etcd, spec("a").weight(100));
    put(&etcd, spec("b").weight(1));
    put(&etcd, spec("c").weight(1));
    let users = users(discovery(&etcd)).await;
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    let counts = tally(20_000, || {
        users.pick_weighted_random().map(|p| p.id().to_owned())
    });
    assert!(!counts.contains_key("a"), "{counts:?}");
    let b = share(&counts, "b");
    assert!((0.45..=0.55).contains(&b), "b's share {b}: {counts:?}");
}

/// Issue (review): a failure reported after an ejection had ended, but before any pick noticed
/// the end, was lost: the instance came back as if it had never failed again. It now counts as
/// a failure on probation and ejects the instance again, for twice as long.
#[tokio::test(start_paused = true)]
async fn a_failure_right_after_an_unnoticed_return_ejects_again() {
    let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
    let late = pick_id(&users, "a").expect("a");
    fail(&users, "a", 5);
    assert_eq!(ejected(&users), ["a"]);
    advance(secs(31)).await;
    late.failure();
    let a = health_of(&users, "a");
    assert_eq!(a.times_ejected, 2, "{a:?}");
    let until = a.ejected_until.expect("ejected again");
    assert_eq!(until.saturating_duration_since(now()), secs(60), "{a:?}");
}

/// Issue (review): the ejection multiplier grew without bound, so an instance ejected a hundred
/// times needed a hundred healthy periods before its ejections got shorter. It stops at
/// ceil(max / base) = 10 with the defaults, where the length reaches the 300 s cap anyway.
#[tokio::test(start_paused = true)]
async fn the_ejection_multiplier_stops_at_the_cap() {
    let (_etcd, users) = setup(&["a", "b", "c"], OutlierEjection::default(), Mode::Live).await;
    fail(&users, "a", 5);
    for _ in 0..12 {
        let until = health_of(&users, "a").ejected_until.expect("ejected");
        advance(until.saturating_duration_since(now()) + ms(1)).await;
        fail(&users, "a", 1);
    }
    let a = health_of(&users, "a");
    assert_eq!(a.times_ejected, 10, "{a:?}");
    let until = a.ejected_until.expect("ejected");
    assert_eq!(until.saturating_duration_since(now()), secs(300), "{a:?}");
}
